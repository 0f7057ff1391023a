"""User data as a :class:`~austeer_peft.evaluate.tasks.base.Task`: :func:`load_user_task` reads a JSONL/JSON/CSV/TSV
file, a ``datasets.Dataset`` or a list of dicts, fills a prompt template, and splits it (or takes the user's splits).

Separate from the built-in data sets because it is configured by the caller (template, choices or answer column,
label mapping) instead of by a data set's fixed layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from datasets import Dataset, load_dataset

from .base import DEFAULT_N_VALIDATION, Task, check_sizes, select_rows
from .generation import generation_split

DataLike = Union[str, os.PathLike, Dataset, Sequence[Mapping[str, Any]]]


def _as_dataset(data: DataLike) -> Dataset:
    """A ``datasets.Dataset`` from a JSON/JSONL/CSV/TSV path, a Dataset, or a list of dicts."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        path = Path(data).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"No data file at {str(path)!r}.")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return load_dataset("json", data_files=str(path), split="train")
        if suffix == ".csv":
            return load_dataset("csv", data_files=str(path), split="train")
        if suffix == ".tsv":
            return load_dataset("csv", data_files=str(path), delimiter="\t", split="train")
        raise ValueError(f"Unsupported data file {path.name!r}; use .jsonl, .json, .csv or .tsv (or a Dataset).")
    if isinstance(data, Sequence):
        return Dataset.from_list([dict(row) for row in data])
    raise TypeError(f"Cannot load task data from {type(data).__name__}.")


def load_user_task(
    data: Union[DataLike, Mapping[str, DataLike]],
    template: str,
    *,
    name: str = "user",
    choices: Optional[Sequence[str]] = None,
    choices_column: Optional[str] = None,
    label_column: str = "label",
    label_map: Optional[Mapping[Any, int]] = None,
    answer_column: Optional[str] = None,
    problem_column: Optional[str] = None,
    n_fit: Optional[int] = None,
    n_validation: Optional[int] = None,
    n_test: Optional[int] = None,
    seed: int = 0,
) -> Task:
    """A :class:`Task` from user data (JSONL/JSON/CSV/TSV path, ``datasets.Dataset`` or list of dicts).

    Args:
        data: one data set, split here by a seeded permutation, or a mapping with ``"fit"`` (or ``"train"``),
            ``"validation"`` and ``"test"`` entries used as given.
        template: a ``str.format`` template over the row's columns, e.g. ``"Q: {question}\\nA:"`` (double any
            literal braces).
        choices: answer strings shared by all rows (choice task) ...
        choices_column: ... or a column holding each row's list of answer strings.
        label_column: the correct choice: an index into the choices, one of the choice strings, or a key of
            ``label_map``.
        label_map: maps raw labels to choice indices, e.g. ``{"true": 0, "false": 1}``.
        answer_column: for a generation task instead: the column with the numeric answer.
        problem_column: generation tasks: the column used to find similar problems for wrong answers (default: the
            filled prompt).
        n_fit, n_validation, n_test: sizes when ``data`` is split here. Defaults: test = half of the data, validation
            = min(200, a fifth of the rest), fit = min(1000, what is left). The test split is taken first, so it does
            not change with ``n_fit`` / ``n_validation``.
        seed: seed of the split and of wrong-choice draws.
    """
    if answer_column is None and choices is None and choices_column is None:
        raise ValueError("Give choices or choices_column for a choice task, or answer_column for a generation task.")
    if answer_column is not None and (choices is not None or choices_column is not None):
        raise ValueError("answer_column (generation) cannot be combined with choices / choices_column.")
    kind = "generation" if answer_column is not None else "choice"

    def convert(dataset: Dataset) -> list[dict]:
        rows = []
        for number, example in enumerate(dataset):
            try:
                prompt = template.format(**example)
            except KeyError as error:
                raise KeyError(f"Template field {error} is not a column of the data "
                               f"({', '.join(dataset.column_names)}).") from None
            row = {"id": str(example.get("id", number)), "prompt": prompt}
            if kind == "generation":
                row["answer"] = float(str(example[answer_column]).replace(",", ""))
                row["problem"] = str(example[problem_column]) if problem_column else prompt
            else:
                options = list(example[choices_column]) if choices_column else list(choices)
                row["choices"] = [str(c) for c in options]
                row["label"] = _label_index(example[label_column], row["choices"], label_map, number)
            rows.append(row)
        return rows

    def finish(rows: list[dict], indices: Sequence[int]) -> Dataset:
        if kind == "generation":
            return generation_split(rows, indices)
        return select_rows(rows, indices)

    if isinstance(data, Mapping):
        parts = {("fit" if k == "train" else k): v for k, v in data.items()}
        missing = {"fit", "validation", "test"} - set(parts)
        if missing:
            raise ValueError(f"Split mapping lacks {sorted(missing)}; give 'fit' (or 'train'), 'validation', 'test'.")
        converted = {k: convert(_as_dataset(parts[k])) for k in ("fit", "validation", "test")}
        splits = {k: finish(v, range(len(v))) for k, v in converted.items()}
        note = f"{name}: splits as given by the user (fit {len(splits['fit'])}, validation " \
               f"{len(splits['validation'])}, test {len(splits['test'])})."
    else:
        rows = convert(_as_dataset(data))
        n = len(rows)
        n_test = n // 2 if n_test is None else n_test
        if not 0 <= n_test <= n:
            raise ValueError(f"{name}: n_test must be between 0 and {n}, got {n_test}.")
        rest = n - n_test
        n_validation = min(DEFAULT_N_VALIDATION, rest // 5) if n_validation is None else n_validation
        n_fit = min(1000, rest - n_validation) if n_fit is None else n_fit
        check_sizes(name, n_fit, n_validation, rest, "the data left after the test split")
        order = np.random.default_rng(seed).permutation(n).tolist()
        test_idx, pool = order[:n_test], order[n_test:]
        val_idx, fit_idx = pool[:n_validation], pool[n_validation : n_validation + n_fit]
        splits = {"fit": finish(rows, fit_idx), "validation": finish(rows, val_idx), "test": finish(rows, test_idx)}
        note = (f"{name}: {n} examples split by a seeded permutation (seed {seed}): test {len(test_idx)}, "
                f"validation {len(val_idx)}, fit {len(fit_idx)}.")
    shared = list(choices) if (kind == "choice" and choices is not None and choices_column is None) else None
    return Task(name, kind, splits["fit"], splits["validation"], splits["test"], choices=shared, split_note=note,
                seed=seed)


def _label_index(raw: Any, choices: list[str], label_map: Optional[Mapping[Any, int]], row: int) -> int:
    """The index of the correct choice from a raw label (mapped, an index, or a choice string)."""
    if label_map is not None:
        key = raw.strip() if isinstance(raw, str) else raw
        if key not in label_map:
            raise ValueError(f"Row {row}: label {raw!r} is not in label_map {dict(label_map)}.")
        index = int(label_map[key])
    elif isinstance(raw, str) and raw in choices:
        index = choices.index(raw)
    elif isinstance(raw, str) and raw.strip() in [c.strip() for c in choices]:
        index = [c.strip() for c in choices].index(raw.strip())
    elif isinstance(raw, (int, np.integer)) and not isinstance(raw, bool):
        index = int(raw)
    elif isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        index = int(raw.strip())
    else:
        raise ValueError(f"Row {row}: cannot turn label {raw!r} into an index of {choices}; pass label_map.")
    if not 0 <= index < len(choices):
        raise ValueError(f"Row {row}: label index {index} is out of range for {len(choices)} choices.")
    return index
