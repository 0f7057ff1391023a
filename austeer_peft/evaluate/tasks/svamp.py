"""SVAMP (Patel et al., 2021): 1000 math word problems, one number each; a generation task.

There is no separate test file, so as in the paper's Table 6 one seeded permutation gives 700 for the contrastive
pairs (fit + validation here) and 300 for testing.
"""

from __future__ import annotations

from typing import Optional

from datasets import load_dataset

from .base import DEFAULT_N_VALIDATION, PathLike, Task, check_sizes, data_file, pool_split, resolve_data_dir
from .base import sizes_or_defaults
from .generation import MATH_TEMPLATE, WRONG_ANSWER_NOTE, generation_split

SVAMP_POOL = 700  # the paper's 700 contrastive pairs; the other 300 are its test set (Table 6)


def load_svamp(data_dir: Optional[PathLike] = None, n_fit: Optional[int] = None, n_validation: Optional[int] = None,
               seed: int = 0) -> Task:
    """SVAMP (1000): the first 700 of a seeded permutation give fit (500) and validation (200), the other 300 are the
    test split. The problem is ``Body + " " + Question`` (as the SVAMP authors join them)."""
    path = data_file(resolve_data_dir(data_dir), "SVAMP", "SVAMP.json")
    raw = load_dataset("json", data_files=str(path), split="train")
    rows = []
    for example in raw:
        problem = f"{example['Body'].strip()} {example['Question'].strip()}"
        rows.append({
            "id": example["ID"],
            "problem": problem,
            "prompt": MATH_TEMPLATE.format(problem=problem),
            "answer": float(example["Answer"]),
        })
    n_fit, n_validation = sizes_or_defaults(n_fit, n_validation, default_fit=SVAMP_POOL - DEFAULT_N_VALIDATION)
    check_sizes("svamp", n_fit, n_validation, SVAMP_POOL, "the held-out SVAMP pool")
    fit_idx, val_idx, test_idx = pool_split(len(rows), SVAMP_POOL, n_fit, n_validation, seed)
    note = (f"SVAMP.json ({len(rows)}) split by a seeded permutation (seed {seed}): its first {SVAMP_POOL} give fit "
            f"{len(fit_idx)} + validation {len(val_idx)}, the other {len(test_idx)} are the test split. "
            + WRONG_ANSWER_NOTE)
    return Task("svamp", "generation", generation_split(rows, fit_idx), generation_split(rows, val_idx),
                generation_split(rows, test_idx), split_note=note, seed=seed)
