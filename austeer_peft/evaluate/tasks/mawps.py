"""MAWPS (Koncel-Kedziorski et al., 2016), fold 0 of the SVAMP authors' split: math word problems whose numbers are
masked as ``number0``, ``number1``, ... and put back here from the ``Numbers`` column; a generation task.

Fit and validation are drawn from fold0_train.csv (1537), the test split is fold0_dev.csv (384).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from datasets import load_dataset

from .base import PathLike, Task, check_sizes, data_file, pool_split, resolve_data_dir, sizes_or_defaults
from .generation import MATH_TEMPLATE, WRONG_ANSWER_NOTE, format_number, generation_split


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
    raw = load_dataset("csv", data_files=str(path), split="train")
    rows = []
    for number, example in enumerate(raw):
        problem = unmask_numbers(str(example["Question"]).strip(), str(example["Numbers"]))
        rows.append({
            "id": f"{path.stem}-{number}",
            "problem": problem,
            "prompt": MATH_TEMPLATE.format(problem=problem),
            "answer": float(example["Answer"]),
        })
    return rows


def load_mawps(data_dir: Optional[PathLike] = None, n_fit: Optional[int] = None, n_validation: Optional[int] = None,
               seed: int = 0) -> Task:
    """MAWPS fold 0: fit (1000) and validation (200) drawn disjointly from fold0_train.csv (1537), test =
    fold0_dev.csv (384). Masked numbers are put back from the Numbers column."""
    folder = resolve_data_dir(data_dir) / "MAWPS"
    train = read_mawps(data_file(folder, "fold0_train.csv"))
    test = read_mawps(data_file(folder, "fold0_dev.csv"))
    n_fit, n_validation = sizes_or_defaults(n_fit, n_validation, default_fit=1000)
    check_sizes("mawps", n_fit, n_validation, len(train), "fold0_train.csv")
    fit_idx, val_idx, _ = pool_split(len(train), len(train), n_fit, n_validation, seed)
    note = (f"MAWPS fold 0: fit {len(fit_idx)} + validation {len(val_idx)} drawn disjointly from fold0_train.csv "
            f"({len(train)}) with seed {seed}; test = fold0_dev.csv ({len(test)}; the paper reports 355). "
            + WRONG_ANSWER_NOTE)
    return Task("mawps", "generation", generation_split(train, fit_idx), generation_split(train, val_idx),
                generation_split(test, range(len(test))), split_note=note, seed=seed)
