"""BoolQ (Clark et al., 2019) with the paper's verbatim template and answers " yes" / " no".

Only the SuperGLUE validation file is offline (no train split), so it is split here: the first 1000 of a seeded
permutation give fit and validation, the other 2270 are the test split (the split note says so). Without a local
data folder the same validation split comes from the Hub's SuperGLUE copy (``aps/super_glue``, ``boolq``), in the
same order, and is split the same way; its train split (9427) is not used, so the numbers stay comparable with the
offline ones (the split note says so).
"""

from __future__ import annotations

from typing import Any, Optional

from datasets import load_dataset

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
BOOLQ_TEMPLATE = (
    "Is the answer to the question encapsulated in the passage? Please confirm with 'yes' or 'no'.\n\n"
    "Passage: {passage}\n\nQuestion: {question}\n\nAnswer:"
)
BOOLQ_CHOICES = [" yes", " no"]
BOOLQ_POOL = 1000
BOOLQ_HUB = HubSource("aps/super_glue", "boolq")


def is_true(label: Any) -> bool:
    """A BoolQ label as a truth value: a bool, the strings "true"/"false" (SuperGLUE's JSONL) or 1/0 (the Hub's
    ClassLabel, names ["False", "True"])."""
    if isinstance(label, bool):
        return label
    if isinstance(label, int):
        return label == 1
    return str(label).strip().lower() == "true"


def boolq_rows(examples) -> list[dict]:
    """Rows of BoolQ examples (``question``, ``passage``, ``idx``, ``label``), local or from the Hub."""
    return [{
        "id": str(example["idx"]),
        "prompt": BOOLQ_TEMPLATE.format(passage=example["passage"], question=example["question"]),
        "choices": list(BOOLQ_CHOICES),
        "label": 0 if is_true(example["label"]) else 1,  # 0 = " yes"
    } for example in examples]


def load_boolq(data_dir: Optional[PathLike] = None, n_fit: Optional[int] = None, n_validation: Optional[int] = None,
               seed: int = 0) -> Task:
    """BoolQ: only the SuperGLUE validation file (3270) is offline, so it is split: the first 1000 of a seeded
    permutation give fit (800) and validation (200), the other 2270 are the test split. The same from the Hub's
    SuperGLUE validation split when no local data folder is found."""
    folder = find_data_dir(data_dir)
    if folder is None:
        rows = boolq_rows(load_hub_splits(BOOLQ_HUB, ["validation"])["validation"])
        source = (f"BoolQ from the Hub ({BOOLQ_HUB}, no local data folder): only its validation split ({len(rows)}) "
                  "is used, as offline (its train split is not), so the numbers match the offline ones;")
    else:
        path = data_file(folder, "BoolQ", "val.jsonl")
        rows = boolq_rows(load_dataset("json", data_files=str(path), split="train"))
        source = f"BoolQ has no train split offline: val.jsonl ({len(rows)}) is"
    n_fit, n_validation = sizes_or_defaults(n_fit, n_validation, default_fit=BOOLQ_POOL - DEFAULT_N_VALIDATION)
    check_sizes("boolq", n_fit, n_validation, BOOLQ_POOL, "the held-out BoolQ pool")
    fit_idx, val_idx, test_idx = pool_split(len(rows), BOOLQ_POOL, n_fit, n_validation, seed)
    if folder is None:
        source += " it is"
    note = (f"{source} split by a seeded permutation (seed {seed}); its first {BOOLQ_POOL} give fit "
            f"{len(fit_idx)} + validation {len(val_idx)}, the other {len(test_idx)} are the test split (the paper "
            f"tests on all {len(rows)}, so numbers are not directly comparable).")
    return Task("boolq", "choice", select_rows(rows, fit_idx), select_rows(rows, val_idx),
                select_rows(rows, test_idx), choices=list(BOOLQ_CHOICES), split_note=note, seed=seed,
                metadata={"hub_dataset": str(BOOLQ_HUB)} if folder is None else {})
