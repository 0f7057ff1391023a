"""SVAMP (Patel et al., 2021): 1000 math word problems, one number each; a generation task.

There is no separate test file, so as in the paper's Table 6 one seeded permutation gives 700 for the contrastive
pairs (fit + validation here) and 300 for testing. Without a local data folder the 1000 problems come from the Hub
(``ChilleD/SVAMP``: train 700 + test 300), put back in SVAMP.json's order (by their ``chal-N`` ids) and split the
same way, so the splits are the same.
"""

from __future__ import annotations

from typing import Optional

from datasets import concatenate_datasets, load_dataset

from .base import DEFAULT_N_VALIDATION, PathLike, Task, check_sizes, data_file, find_data_dir, pool_split
from .base import sizes_or_defaults
from .generation import MATH_TEMPLATE, WRONG_ANSWER_NOTE, generation_split
from .hub import HubSource, load_hub_splits

SVAMP_POOL = 700  # the paper's 700 contrastive pairs; the other 300 are its test set (Table 6)
SVAMP_HUB = HubSource("ChilleD/SVAMP")


def svamp_rows(examples) -> list[dict]:
    """Rows of SVAMP problems (``ID``, ``Body``, ``Question``, ``Answer``). The problem is ``Body + " " +
    Question`` (as the SVAMP authors join them)."""
    rows = []
    for example in examples:
        problem = f"{example['Body'].strip()} {example['Question'].strip()}"
        rows.append({"id": example["ID"], "problem": problem, "prompt": MATH_TEMPLATE.format(problem=problem),
                     "answer": float(example["Answer"])})
    return rows


def svamp_order(row_id: str) -> int:
    """SVAMP.json's position of a problem from its id, ``chal-N``."""
    prefix, _, number = row_id.rpartition("-")
    if prefix != "chal" or not number.isdigit():
        raise ValueError(f"SVAMP id {row_id!r} is not of the form chal-N; cannot restore SVAMP.json's order.")
    return int(number)


def load_svamp(data_dir: Optional[PathLike] = None, n_fit: Optional[int] = None, n_validation: Optional[int] = None,
               seed: int = 0) -> Task:
    """SVAMP (1000): the first 700 of a seeded permutation give fit (500) and validation (200), the other 300 are the
    test split."""
    folder = find_data_dir(data_dir)
    if folder is None:
        splits = load_hub_splits(SVAMP_HUB, ["train", "test"])
        rows = sorted(svamp_rows(concatenate_datasets([splits["train"], splits["test"]])),
                      key=lambda row: svamp_order(row["id"]))
        source = (f"SVAMP from the Hub ({SVAMP_HUB}, no local data folder): its train and test splits "
                  f"({len(rows)}) in SVAMP.json's order,")
    else:
        path = data_file(folder, "SVAMP", "SVAMP.json")
        rows = svamp_rows(load_dataset("json", data_files=str(path), split="train"))
        source = f"SVAMP.json ({len(rows)})"
    n_fit, n_validation = sizes_or_defaults(n_fit, n_validation, default_fit=SVAMP_POOL - DEFAULT_N_VALIDATION)
    check_sizes("svamp", n_fit, n_validation, SVAMP_POOL, "the held-out SVAMP pool")
    fit_idx, val_idx, test_idx = pool_split(len(rows), SVAMP_POOL, n_fit, n_validation, seed)
    note = (f"{source} split by a seeded permutation (seed {seed}): its first {SVAMP_POOL} give fit "
            f"{len(fit_idx)} + validation {len(val_idx)}, the other {len(test_idx)} are the test split. "
            + WRONG_ANSWER_NOTE)
    return Task("svamp", "generation", generation_split(rows, fit_idx), generation_split(rows, val_idx),
                generation_split(rows, test_idx), split_note=note, seed=seed,
                metadata={"hub_dataset": str(SVAMP_HUB)} if folder is None else {})
