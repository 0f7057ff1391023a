"""MAWPS (Koncel-Kedziorski et al., 2016), fold 0 of the SVAMP authors' split: math word problems whose numbers are
masked as ``number0``, ``number1``, ... and put back here from the ``Numbers`` column; a generation task.

Fit and validation are drawn from fold0_train.csv (1537), the test split is fold0_dev.csv (384). Without a local
data folder MAWPS comes from the Hub (``ChilleD/MAWPS``, the same masked format): fit and validation from its train
split, test = its test split (355, the size the paper reports); the split note says so, as that split is not
fold 0.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from datasets import load_dataset

from .base import PathLike, Task, check_sizes, data_file, find_data_dir, pool_split, sizes_or_defaults
from .generation import MATH_TEMPLATE, WRONG_ANSWER_NOTE, format_number, generation_split
from .hub import HubSource, load_hub_splits

MAWPS_HUB = HubSource("ChilleD/MAWPS")


def unmask_numbers(text: str, numbers: str) -> str:
    """Put the numbers back into a MAWPS problem: ``number0`` -> the first of the space-separated ``numbers``."""
    values = numbers.split()

    def replace(match: re.Match) -> str:
        index = int(match.group(1))
        if index >= len(values):
            raise ValueError(f"{match.group(0)} in {text!r} has no value in Numbers={numbers!r}.")
        return format_number(float(values[index])) if float(values[index]).is_integer() else values[index]

    return re.sub(r"number(\d+)", replace, text)


def read_mawps(path: Path) -> list[dict]:
    """Rows of one MAWPS fold CSV (``Question`` with masked numbers, ``Numbers``, ``Answer``)."""
    return mawps_rows(load_dataset("csv", data_files=str(path), split="train"), path.stem)


def mawps_rows(dataset, stem: str) -> list[dict]:
    """Rows of MAWPS problems (``Question`` with numbers masked as ``number0``..., ``Numbers``, ``Answer``), from a
    local fold CSV or a Hub split."""
    missing = {"Question", "Numbers", "Answer"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"MAWPS {stem}: no column(s) {sorted(missing)} (columns: {', '.join(dataset.column_names)}).")
    rows = []
    for number, example in enumerate(dataset):
        problem = unmask_numbers(str(example["Question"]).strip(), str(example["Numbers"]))
        rows.append({
            "id": f"{stem}-{number}",
            "problem": problem,
            "prompt": MATH_TEMPLATE.format(problem=problem),
            "answer": float(example["Answer"]),
        })
    return rows


def load_mawps(data_dir: Optional[PathLike] = None, n_fit: Optional[int] = None, n_validation: Optional[int] = None,
               seed: int = 0) -> Task:
    """MAWPS fold 0: fit (1000) and validation (200) drawn disjointly from fold0_train.csv (1537), test =
    fold0_dev.csv (384). Masked numbers are put back from the Numbers column."""
    folder = find_data_dir(data_dir)
    if folder is None:
        splits = load_hub_splits(MAWPS_HUB, ["train", "test"])
        train, test = mawps_rows(splits["train"], "train"), mawps_rows(splits["test"], "test")
        train_name, test_name = "its train split", "its test split"
        origin, test_extra = f" from the Hub ({MAWPS_HUB}, no local data folder; not fold 0)", ""
    else:
        train = read_mawps(data_file(folder / "MAWPS", "fold0_train.csv"))
        test = read_mawps(data_file(folder / "MAWPS", "fold0_dev.csv"))
        train_name, test_name, origin, test_extra = "fold0_train.csv", "fold0_dev.csv", " fold 0", \
            "; the paper reports 355"
    n_fit, n_validation = sizes_or_defaults(n_fit, n_validation, default_fit=1000)
    check_sizes("mawps", n_fit, n_validation, len(train), train_name)
    fit_idx, val_idx, _ = pool_split(len(train), len(train), n_fit, n_validation, seed)
    note = (f"MAWPS{origin}: fit {len(fit_idx)} + validation {len(val_idx)} drawn disjointly from {train_name} "
            f"({len(train)}) with seed {seed}; test = {test_name} ({len(test)}{test_extra}). " + WRONG_ANSWER_NOTE)
    return Task("mawps", "generation", generation_split(train, fit_idx), generation_split(train, val_idx),
                generation_split(test, range(len(test))), split_note=note, seed=seed,
                metadata={"hub_dataset": str(MAWPS_HUB)} if folder is None else {})
