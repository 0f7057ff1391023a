"""COPA (Gordon et al., 2012): premise + two alternatives, with the paper's verbatim template and answers A / B.

Fit and validation are drawn from copa-dev.xml (500), the test split is copa-test.xml (500).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

from datasets import Dataset

from .base import PathLike, Task, check_sizes, data_file, pool_split, resolve_data_dir, select_rows, sizes_or_defaults

# Template of the paper (Appendix B, following the SADI code), verbatim.
COPA_TEMPLATE = (
    "Question:\n{premise} Based on the previous passage, choose the most reasonable {asks_for}.\n"
    "A:{choice1}\nB:{choice2}\n\nAnswer:\n"
)
COPA_CHOICES = ["A", "B"]


def read_copa(path: Path) -> list[dict]:
    """Rows of one COPA XML file (``<item id asks-for most-plausible-alternative><p/><a1/><a2/></item>``)."""
    rows = []
    for item in ET.parse(path).getroot().iter("item"):
        premise, choice1, choice2 = (item.find(tag).text.strip() for tag in ("p", "a1", "a2"))
        asks_for = item.get("asks-for")
        prompt = COPA_TEMPLATE.format(premise=premise, asks_for=asks_for, choice1=choice1, choice2=choice2)
        rows.append({
            "id": item.get("id"),
            "prompt": prompt,
            "choices": list(COPA_CHOICES),
            "label": int(item.get("most-plausible-alternative")) - 1,
        })
    return rows


def load_copa(data_dir: Optional[PathLike] = None, n_fit: Optional[int] = None, n_validation: Optional[int] = None,
              seed: int = 0) -> Task:
    """COPA: fit and validation from copa-dev.xml (500, seeded), test = copa-test.xml (500)."""
    folder = resolve_data_dir(data_dir) / "COPA"
    dev = read_copa(data_file(folder, "copa-dev.xml"))
    test = read_copa(data_file(folder, "copa-test.xml"))
    n_fit, n_validation = sizes_or_defaults(n_fit, n_validation, default_fit=300)
    check_sizes("copa", n_fit, n_validation, len(dev), "copa-dev.xml")
    fit_idx, val_idx, _ = pool_split(len(dev), len(dev), n_fit, n_validation, seed)
    note = (f"COPA: fit {len(fit_idx)} + validation {len(val_idx)} drawn disjointly from copa-dev.xml (500) with "
            f"seed {seed}; test = copa-test.xml ({len(test)}).")
    return Task("copa", "choice", select_rows(dev, fit_idx), select_rows(dev, val_idx), Dataset.from_list(test),
                choices=list(COPA_CHOICES), split_note=note, seed=seed)
