"""BoolQ (Clark et al., 2019) with the paper's verbatim template and answers " yes" / " no".

Only the SuperGLUE validation file is offline (no train split), so it is split here: the first 1000 of a seeded
permutation give fit and validation, the other 2270 are the test split (the split note says so).
"""

from __future__ import annotations

from typing import Optional

from datasets import load_dataset

from .base import (
    DEFAULT_N_VALIDATION,
    PathLike,
    Task,
    check_sizes,
    data_file,
    pool_split,
    resolve_data_dir,
    select_rows,
    sizes_or_defaults,
)

# Template of the paper (Appendix B, following the SADI code), verbatim.
BOOLQ_TEMPLATE = (
    "Is the answer to the question encapsulated in the passage? Please confirm with 'yes' or 'no'.\n\n"
    "Passage: {passage}\n\nQuestion: {question}\n\nAnswer:"
)
BOOLQ_CHOICES = [" yes", " no"]
BOOLQ_POOL = 1000


def load_boolq(data_dir: Optional[PathLike] = None, n_fit: Optional[int] = None, n_validation: Optional[int] = None,
               seed: int = 0) -> Task:
    """BoolQ: only the SuperGLUE validation file (3270) is offline, so it is split: the first 1000 of a seeded
    permutation give fit (800) and validation (200), the other 2270 are the test split."""
    path = data_file(resolve_data_dir(data_dir), "BoolQ", "val.jsonl")
    raw = load_dataset("json", data_files=str(path), split="train")
    rows = []
    for example in raw:
        label = example["label"]
        truth = label if isinstance(label, bool) else str(label).strip().lower() == "true"
        rows.append({
            "id": str(example["idx"]),
            "prompt": BOOLQ_TEMPLATE.format(passage=example["passage"], question=example["question"]),
            "choices": list(BOOLQ_CHOICES),
            "label": 0 if truth else 1,  # 0 = " yes"
        })
    n_fit, n_validation = sizes_or_defaults(n_fit, n_validation, default_fit=BOOLQ_POOL - DEFAULT_N_VALIDATION)
    check_sizes("boolq", n_fit, n_validation, BOOLQ_POOL, "the held-out BoolQ pool")
    fit_idx, val_idx, test_idx = pool_split(len(rows), BOOLQ_POOL, n_fit, n_validation, seed)
    note = (f"BoolQ has no train split offline: val.jsonl ({len(rows)}) is split by a seeded permutation (seed "
            f"{seed}); its first {BOOLQ_POOL} give fit {len(fit_idx)} + validation {len(val_idx)}, the other "
            f"{len(test_idx)} are the test split (the paper tests on all {len(rows)}, so numbers are not directly "
            f"comparable).")
    return Task("boolq", "choice", select_rows(rows, fit_idx), select_rows(rows, val_idx),
                select_rows(rows, test_idx), choices=list(BOOLQ_CHOICES), split_note=note, seed=seed)
