"""SST-2 (GLUE): movie-review sentiment, answers " negative" / " positive".

Not in the paper; fit and validation are sampled from train.tsv (67349), the test split is dev.tsv (872). Without a
local data folder the same two splits come from the Hub's GLUE copy (``nyu-mll/glue``, ``sst2``: train and
validation), in the same order, so the splits and prompts are the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from datasets import Dataset

from .base import (
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

# A plain template whose two answers differ in their first token.
SST2_TEMPLATE = "Review: {text}\nSentiment:"
SST2_CHOICES = [" negative", " positive"]  # label 1 = positive, as in the GLUE file
SST2_HUB = HubSource("nyu-mll/glue", "sst2")


def sst2_row(text: str, label: int, row_id: str) -> dict:
    return {"id": row_id, "prompt": SST2_TEMPLATE.format(text=text.strip()), "choices": list(SST2_CHOICES),
            "label": int(label)}


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
            rows.append(sst2_row(text, int(label), f"{path.stem}-{number}"))
    return rows


def sst2_hub_rows(dataset: Dataset, stem: str) -> list[dict]:
    """Rows of a Hub GLUE SST-2 split (``sentence``, ``label`` 0/1, ``idx``); ids as the local files' (train-N,
    dev-N)."""
    return [sst2_row(text, label, f"{stem}-{number}")  # by column: 67k rows one dict at a time take seconds
            for number, (text, label) in enumerate(zip(dataset["sentence"], dataset["label"]))]


def load_sst2(data_dir: Optional[PathLike] = None, n_fit: Optional[int] = None, n_validation: Optional[int] = None,
              seed: int = 0) -> Task:
    """SST-2: fit (500) and validation (200) sampled disjointly from train.tsv, test = dev.tsv (872); from the Hub's
    GLUE train / validation splits when no local data folder is found."""
    folder = find_data_dir(data_dir)
    if folder is None:
        splits = load_hub_splits(SST2_HUB, ["train", "validation"])
        train, test = sst2_hub_rows(splits["train"], "train"), sst2_hub_rows(splits["validation"], "dev")
        train_name, test_name, origin = "train", "validation", f" (from the Hub: {SST2_HUB}, no local data folder)"
    else:
        train = read_sst2(data_file(folder / "SST-2", "train.tsv"))
        test = read_sst2(data_file(folder / "SST-2", "dev.tsv"))
        train_name, test_name, origin = "train.tsv", "dev.tsv", ""
    n_fit, n_validation = sizes_or_defaults(n_fit, n_validation, default_fit=500)
    check_sizes("sst2", n_fit, n_validation, len(train), train_name)
    fit_idx, val_idx, _ = pool_split(len(train), len(train), n_fit, n_validation, seed)
    note = (f"SST-2{origin}: fit {len(fit_idx)} + validation {len(val_idx)} sampled disjointly from {train_name} "
            f"({len(train)}) with seed {seed}; test = {test_name} ({len(test)}).")
    return Task("sst2", "choice", select_rows(train, fit_idx), select_rows(train, val_idx), Dataset.from_list(test),
                choices=list(SST2_CHOICES), split_note=note, seed=seed,
                metadata={"hub_dataset": str(SST2_HUB)} if folder is None else {})
