"""COPA (Gordon et al., 2012): premise + two alternatives, with the paper's verbatim template and answers A / B.

Fit and validation are drawn from copa-dev.xml (500), the test split is copa-test.xml (500). Without a local data
folder COPA comes from the Hub's SuperGLUE copy (``aps/super_glue``, ``copa``), whose test split has no labels:
fit and validation are drawn (same seed) from its train split (the first 400 of copa-dev.xml) and its validation
split (the other 100) is the test split; the split note says so.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

from datasets import Dataset

from .base import (
    DEFAULT_N_VALIDATION,
    PathLike,
    Task,
    check_sizes,
    data_file,
    find_data_dir,
    pool_split,
    select_rows,
    sizes_or_defaults,
)
from .hub import HubSource, load_hub_splits

# Template of the paper (Appendix B, following the SADI code), verbatim.
COPA_TEMPLATE = (
    "Question:\n{premise} Based on the previous passage, choose the most reasonable {asks_for}.\n"
    "A:{choice1}\nB:{choice2}\n\nAnswer:\n"
)
COPA_CHOICES = ["A", "B"]
COPA_HUB = HubSource("aps/super_glue", "copa")


def copa_row(row_id: str, premise: str, asks_for: str, choice1: str, choice2: str, label: int) -> dict:
    """One COPA row; ``label`` is 0 for choice1, 1 for choice2."""
    prompt = COPA_TEMPLATE.format(premise=premise.strip(), asks_for=asks_for, choice1=choice1.strip(),
                                  choice2=choice2.strip())
    return {"id": row_id, "prompt": prompt, "choices": list(COPA_CHOICES), "label": int(label)}


def read_copa(path: Path) -> list[dict]:
    """Rows of one COPA XML file (``<item id asks-for most-plausible-alternative><p/><a1/><a2/></item>``)."""
    return [copa_row(item.get("id"), item.find("p").text, item.get("asks-for"), item.find("a1").text,
                     item.find("a2").text, int(item.get("most-plausible-alternative")) - 1)
            for item in ET.parse(path).getroot().iter("item")]


def copa_hub_rows(dataset: Dataset) -> list[dict]:
    """Rows of a Hub SuperGLUE COPA split (``premise``, ``choice1``, ``choice2``, ``question`` cause/effect,
    ``label`` 0/1, ``idx``); the id is COPA's item number (SuperGLUE's train idx 0 is item 1, validation idx 0 is
    item 401)."""
    rows = []
    for example in dataset:
        if example["label"] not in (0, 1):
            raise ValueError(f"COPA from the Hub: item {example['idx']} has label {example['label']!r} (an unlabelled "
                             "test split?); only labelled splits can be used.")
        rows.append(copa_row(str(example["idx"] + 1), example["premise"], example["question"], example["choice1"],
                             example["choice2"], example["label"]))
    return rows


def load_copa(data_dir: Optional[PathLike] = None, n_fit: Optional[int] = None, n_validation: Optional[int] = None,
              seed: int = 0) -> Task:
    """COPA: fit and validation from copa-dev.xml (500, seeded), test = copa-test.xml (500). From the Hub (no local
    data folder): fit (200) and validation (200) from SuperGLUE's train split (400), test = its validation split
    (100)."""
    folder = find_data_dir(data_dir)
    if folder is None:
        splits = load_hub_splits(COPA_HUB, ["train", "validation"])
        pool, test = copa_hub_rows(splits["train"]), copa_hub_rows(splits["validation"])
        for row in test:  # ids continue after the train items, as in copa-dev.xml
            row["id"] = str(int(row["id"]) + len(pool))
        pool_name, default_fit = "its train split", len(pool) - DEFAULT_N_VALIDATION
        test_text = (f"its validation split ({len(test)}; its test split has no labels, so copa-test.xml's 500 are "
                     "not available and the numbers are not comparable with the offline ones)")
        origin = f" from the Hub ({COPA_HUB}, no local data folder)"
    else:
        pool = read_copa(data_file(folder / "COPA", "copa-dev.xml"))
        test = read_copa(data_file(folder / "COPA", "copa-test.xml"))
        pool_name, default_fit, test_text, origin = "copa-dev.xml", 300, f"copa-test.xml ({len(test)})", ""
    n_fit, n_validation = sizes_or_defaults(n_fit, n_validation, default_fit=default_fit)
    check_sizes("copa", n_fit, n_validation, len(pool), pool_name)
    fit_idx, val_idx, _ = pool_split(len(pool), len(pool), n_fit, n_validation, seed)
    note = (f"COPA{origin}: fit {len(fit_idx)} + validation {len(val_idx)} drawn disjointly from {pool_name} "
            f"({len(pool)}) with seed {seed}; test = {test_text}.")
    return Task("copa", "choice", select_rows(pool, fit_idx), select_rows(pool, val_idx), Dataset.from_list(test),
                choices=list(COPA_CHOICES), split_note=note, seed=seed,
                metadata={"hub_dataset": str(COPA_HUB)} if folder is None else {})
