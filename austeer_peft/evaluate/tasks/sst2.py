"""SST-2 (GLUE): movie-review sentiment, answers " negative" / " positive".

Not in the paper; fit and validation are sampled from train.tsv (67349), the test split is dev.tsv (872).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from datasets import Dataset

from .base import PathLike, Task, check_sizes, data_file, pool_split, resolve_data_dir, select_rows, sizes_or_defaults

# A plain template whose two answers differ in their first token.
SST2_TEMPLATE = "Review: {text}\nSentiment:"
SST2_CHOICES = [" negative", " positive"]  # label 1 = positive, as in the GLUE file


def read_sst2(path: Path) -> list[dict]:
    """GLUE SST-2 TSV (``text<TAB>label``). Read as plain lines: the texts contain unbalanced quotes."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        if header != ["text", "label"]:
            raise ValueError(f"{path}: expected the header 'text<TAB>label', got {header}.")
        for number, line in enumerate(handle):
            line = line.rstrip("\n")
            if not line:
                continue
            text, label = line.rsplit("\t", 1)
            rows.append({
                "id": f"{path.stem}-{number}",
                "prompt": SST2_TEMPLATE.format(text=text.strip()),
                "choices": list(SST2_CHOICES),
                "label": int(label),
            })
    return rows


def load_sst2(data_dir: Optional[PathLike] = None, n_fit: Optional[int] = None, n_validation: Optional[int] = None,
              seed: int = 0) -> Task:
    """SST-2: fit (500) and validation (200) sampled disjointly from train.tsv, test = dev.tsv (872)."""
    folder = resolve_data_dir(data_dir) / "SST-2"
    train = read_sst2(data_file(folder, "train.tsv"))
    test = read_sst2(data_file(folder, "dev.tsv"))
    n_fit, n_validation = sizes_or_defaults(n_fit, n_validation, default_fit=500)
    check_sizes("sst2", n_fit, n_validation, len(train), "train.tsv")
    fit_idx, val_idx, _ = pool_split(len(train), len(train), n_fit, n_validation, seed)
    note = (f"SST-2: fit {len(fit_idx)} + validation {len(val_idx)} sampled disjointly from train.tsv "
            f"({len(train)}) with seed {seed}; test = dev.tsv ({len(test)}).")
    return Task("sst2", "choice", select_rows(train, fit_idx), select_rows(train, val_idx), Dataset.from_list(test),
                choices=list(SST2_CHOICES), split_note=note, seed=seed)
