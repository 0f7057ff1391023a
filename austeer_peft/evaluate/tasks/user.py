"""User data as a :class:`~austeer_peft.evaluate.tasks.base.Task`: :func:`load_user_task` reads a JSONL/JSON/CSV/TSV
file, a ``datasets.Dataset`` or a list of dicts (or one per split), fills a prompt template, and splits it (or takes
the user's splits); :func:`load_hub_task` does the same for a data set on the Hugging Face Hub.

Separate from the built-in data sets because it is configured by the caller (template, choices or answer column,
label mapping) instead of by a data set's fixed layout. Every row is checked before anything else runs, and a bad
one is named by its source, row number and column, with the fix.
"""

from __future__ import annotations

import json
import math
import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from datasets import Dataset, load_dataset

from .base import DEFAULT_N_VALIDATION, Task, check_sizes, select_rows
from .generation import generation_split
from .hub import HubSource, load_hub_splits, parse_hub_name

DataLike = Union[str, os.PathLike, Dataset, Sequence[Mapping[str, Any]]]
SPLIT_ALIASES = {"train": "fit", "dev": "validation", "val": "validation"}


def _as_dataset(data: DataLike) -> tuple[Dataset, str]:
    """A ``datasets.Dataset`` from a JSON/JSONL/CSV/TSV path, a Dataset, or a list of dicts; and the name errors use
    for it (the file name, or "the data")."""
    if isinstance(data, Dataset):
        return data, "the data"
    if isinstance(data, (str, os.PathLike)):
        path = Path(data).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"No data file at {str(path)!r}.")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path), path.name
        readers = {".json": ("json", {}), ".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"})}
        if suffix not in readers:
            raise ValueError(f"Unsupported data file {path.name!r}; use .jsonl, .json, .csv or .tsv (or a Dataset).")
        builder, options = readers[suffix]
        try:
            return load_dataset(builder, data_files=str(path), split="train", **options), path.name
        except Exception as error:  # datasets wraps parse errors in DatasetGenerationError; its cause says what
            cause = error.__cause__ or error
            raise ValueError(f"Cannot read {path.name} as {suffix[1:].upper()}: {str(cause).strip()[:300]}. Fix the "
                             "file (one row per line, the same columns in every row).") from None
    if isinstance(data, Sequence):
        return _from_rows([dict(row) for row in data], "the data"), "the data"
    raise TypeError(f"Cannot load task data from {type(data).__name__}.")


def _read_jsonl(path: Path) -> Dataset:
    """A JSONL file, one object per non-empty line; a bad line is named by its number."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path.name}, line {number}: not valid JSON ({error.msg}); each line must be one "
                                 "JSON object.") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path.name}, line {number}: a JSON {type(row).__name__}, not an object; each line "
                                 'must be one object such as {"prompt": ..., "label": ...}.')
            rows.append(row)
    if not rows:
        raise ValueError(f"{path.name} holds no rows.")
    return _from_rows(rows, path.name)


def _from_rows(rows: list[dict], source: str) -> Dataset:
    try:
        return Dataset.from_list(rows)
    except Exception as error:  # pyarrow: a column whose type changes from row to row
        mismatch = _type_mismatch(rows)
        if mismatch is None:
            raise ValueError(f"{source}: the rows do not share one type per column ({str(error).strip()[:200]}); "
                             "give each column the same type in every row.") from None
        column, first, number, value = mismatch
        raise ValueError(f"{source}, row {number}: column {column!r} holds {value!r} ({_kind(value)}), but row "
                         f"{first} holds a {_kind(rows[first - 1][column])}; give the column the same type in every "
                         "row.") from None


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _type_mismatch(rows: list[dict]) -> Optional[tuple[str, int, int, Any]]:
    """The first ``(column, row of its first value, row that differs, its value)`` whose kind of value (string,
    number, list, ...) changes between rows (1-based rows), or None."""
    first: dict[str, tuple[int, str]] = {}
    for number, row in enumerate(rows, start=1):
        for column, value in row.items():
            if value is None:
                continue
            kind = _kind(value)
            seen = first.setdefault(column, (number, kind))
            if seen[1] != kind:
                return column, seen[0], number, value
    return None


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
            ``"test"`` and optionally ``"validation"`` entries used as given (without a validation entry,
            ``n_validation`` examples, default min(200, a fifth), are carved from fit by a seeded permutation).
        template: a ``str.format`` template over the row's columns, e.g. ``"Q: {question}\\nA:"`` (double any
            literal braces).
        choices: answer strings shared by all rows (choice task) ...
        choices_column: ... or a column holding each row's list of answer strings (rows may differ in length).
        label_column: the correct choice: an index into the choices, one of the choice strings, or a key of
            ``label_map``.
        label_map: maps raw labels to choice indices, e.g. ``{"true": 0, "false": 1}``.
        answer_column: for a generation task instead: the column with the numeric answer.
        problem_column: generation tasks: the column used to find similar problems for wrong answers (default: the
            filled prompt).
        n_fit, n_validation, n_test: sizes when ``data`` is split here. Defaults: test = half of the data, validation
            = min(200, a fifth of the rest), fit = min(1000, what is left). The test split is taken first, so it does
            not change with ``n_fit`` / ``n_validation``. With a split mapping, a given split is cut to its first
            ``n`` rows.
        seed: seed of the split and of wrong-choice draws.

    Every row is checked first; a bad one raises ``ValueError`` naming the source, row, column and fix.
    """
    if answer_column is None and choices is None and choices_column is None:
        raise ValueError("Give choices (--choices) or choices_column (--choices-column) for a choice task, or "
                         "answer_column (--answer-column) for a generation task.")
    if answer_column is not None and (choices is not None or choices_column is not None):
        raise ValueError("answer_column (generation) cannot be combined with choices / choices_column.")
    if choices is not None and choices_column is not None:
        raise ValueError("Give either choices (shared by every row) or choices_column (per row), not both.")
    if choices is not None and len(choices) < 2:
        raise ValueError(f"choices needs at least two answer strings, got {list(choices)}.")
    kind = "generation" if answer_column is not None else "choice"
    fields = _template_fields(template)

    def convert(data: DataLike) -> list[dict]:
        dataset, source = _as_dataset(data)
        needed = {column: flag for column, flag in ((answer_column, "answer_column (--answer-column)"),
                                                    (problem_column, "problem_column"),
                                                    (choices_column, "choices_column (--choices-column)"))
                  if column is not None}
        if kind == "choice":
            needed[label_column] = "label_column (--label-column)"
        columns = dataset.column_names
        for field in fields:
            if field not in columns:
                raise ValueError(f"{source}: the template field {{{field}}} is not a column (columns: "
                                 f"{', '.join(columns)}); fix the template (--template) or the data.")
        for column, flag in needed.items():
            if column not in columns:
                raise ValueError(f"{source}: no column {column!r} (columns: {', '.join(columns)}); name the right "
                                 f"one with {flag}.")
        return [_convert_row(example, number, source) for number, example in enumerate(dataset, start=1)]

    def _convert_row(example: dict, number: int, source: str) -> dict:
        where = f"{source}, row {number}"
        for field in fields:
            if example[field] is None:
                raise ValueError(f"{where}: column {field!r} (a template field) is empty; fill it or drop the row.")
        prompt = template.format(**example)
        row = {"id": str(example.get("id", number - 1)), "prompt": prompt}
        if kind == "generation":
            row["answer"] = _number(example[answer_column], where, answer_column)
            row["problem"] = str(example[problem_column]) if problem_column else prompt
        else:
            options = choices if choices_column is None else _row_choices(example[choices_column], where,
                                                                          choices_column)
            row["choices"] = [str(c) for c in options]
            row["label"] = _label_index(example[label_column], row["choices"], label_map, where, label_column)
        return row

    def finish(rows: list[dict], indices: Sequence[int]) -> Dataset:
        if kind == "generation":
            return generation_split(rows, indices)
        return select_rows(rows, indices)

    if isinstance(data, Mapping):
        parts = {SPLIT_ALIASES.get(k, k): v for k, v in data.items()}
        unknown = set(parts) - {"fit", "validation", "test"}
        missing = {"fit", "test"} - set(parts)
        if unknown or missing:
            raise ValueError(f"Split mapping has {sorted(parts)}; give 'fit' (or 'train') and 'test', and optionally "
                             "'validation' (else it is carved from fit).")
        converted = {k: convert(v) for k, v in parts.items()}
        for split, rows in converted.items():
            if not rows:
                raise ValueError(f"The {split} split holds no rows.")
        note = f"{name}: splits as given by the user"
        if "validation" in converted:
            splits = {k: finish(v, range(len(v))) for k, v in converted.items()}
        else:
            fit_rows = converted["fit"]
            n_validation = min(DEFAULT_N_VALIDATION, len(fit_rows) // 5) if n_validation is None else n_validation
            check_sizes(name, 0, n_validation, len(fit_rows), "the fit data")
            order = np.random.default_rng(seed).permutation(len(fit_rows)).tolist()
            splits = {"fit": finish(fit_rows, order[n_validation:]),
                      "validation": finish(fit_rows, order[:n_validation]),
                      "test": finish(converted["test"], range(len(converted["test"])))}
            note += (f"; no validation split given, so {n_validation} of the {len(fit_rows)} fit examples were carved "
                     f"out for validation by a seeded permutation (seed {seed})")
        limits = {"fit": n_fit, "test": n_test, **({"validation": n_validation} if "validation" in converted else {})}
        for split, limit in limits.items():  # a given split is cut to its first `limit` rows
            if limit is None:
                continue
            if not 0 <= limit <= len(splits[split]):
                raise ValueError(f"{name}: n_{'validation' if split == 'validation' else split} must be between 0 "
                                 f"and {len(splits[split])} (the {split} split), got {limit}.")
            splits[split] = splits[split].select(range(limit))
        note += (f" (fit {len(splits['fit'])}, validation {len(splits['validation'])}, test "
                 f"{len(splits['test'])}).")
    else:
        rows = convert(data)
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
    shared = list(choices) if (kind == "choice" and choices is not None) else None
    return Task(name, kind, splits["fit"], splits["validation"], splits["test"], choices=shared, split_note=note,
                seed=seed)


def load_hub_task(dataset: Union[str, HubSource], template: str, *, split_map: Optional[Mapping[str, str]] = None,
                  name: Optional[str] = None, **options: Any) -> Task:
    """:func:`load_user_task` over a data set on the Hugging Face Hub, read with ``datasets.load_dataset`` (offline
    from the datasets cache once downloaded).

    Args:
        dataset: ``"name[:config]"``, e.g. ``"nyu-mll/glue:sst2"``.
        split_map: our split -> the Hub split, e.g. ``{"fit": "train", "test": "validation"}`` (default: fit = train,
            test = test; without ``"validation"`` it is carved from fit).
        options: as for :func:`load_user_task` (``choices`` / ``choices_column`` / ``answer_column``,
            ``label_column``, ``n_fit``, ...).
    """
    source = parse_hub_name(dataset) if isinstance(dataset, str) else dataset
    mapping = {"fit": "train", "test": "test"}
    for ours, theirs in (split_map or {}).items():
        key = SPLIT_ALIASES.get(ours, ours)
        if key not in ("fit", "validation", "test"):
            raise ValueError(f"Split map entry {ours}={theirs}: the left side must be fit, validation or test.")
        mapping[key] = theirs
    loaded = load_hub_splits(source, list(mapping.values()))
    task = load_user_task({ours: loaded[theirs] for ours, theirs in mapping.items()}, template,
                          name=name or source.name.split("/")[-1], **options)
    task.split_note = (f"Hub data set {source} (" + ", ".join(f"{k} = its {v} split" for k, v in mapping.items())
                       + f"). {task.split_note}")
    task.metadata["hub_dataset"] = str(source)
    return task


def _template_fields(template: str) -> list[str]:
    """The columns a ``str.format`` template reads (``{question}``, ``{row[0]}`` -> ``row``)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"The template {template!r} is not a valid format string ({error}); double any literal "
                         "braces: {{ }}.") from None
    fields = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise ValueError(f"The template {template!r} has a positional field {{{field}}}; name a column instead, "
                             "e.g. {question}.")
        fields.append(field.split(".")[0].split("[")[0])
    return list(dict.fromkeys(fields))


def _row_choices(value: Any, where: str, column: str) -> list:
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) < 2 or \
            any(not isinstance(c, str) or not c for c in value):
        raise ValueError(f"{where}: column {column!r} holds {value!r}; each row needs a list of at least two "
                         'non-empty answer strings, e.g. [" A", " B", " C"].')
    return list(value)


def _number(value: Any, where: str, column: str) -> float:
    try:
        number = float(str(value).replace(",", ""))
    except ValueError:
        number = math.nan
    if value is None or not math.isfinite(number):
        raise ValueError(f"{where}: column {column!r} holds {value!r}, not a finite number; a generation task "
                         "needs a numeric answer in every row.")
    return number


def _label_index(raw: Any, choices: list[str], label_map: Optional[Mapping[Any, int]], where: str,
                 column: str = "label") -> int:
    """The index of the correct choice from a raw label (mapped, an index, or a choice string)."""
    if label_map is not None:
        key = raw.strip() if isinstance(raw, str) else raw
        if key not in label_map:  # keys given as text (the command line) match labels of other types by their text
            key = str(key).lower() if isinstance(key, bool) else str(key)
        if key not in label_map:
            raise ValueError(f"{where}: label {raw!r} in column {column!r} is not in label_map {dict(label_map)}; "
                             "add it to label_map.")
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
        raise ValueError(f"{where}: cannot turn label {raw!r} in column {column!r} into an index of {choices}; give "
                         "the index (0-based) or the choice string, or pass label_map.")
    if not 0 <= index < len(choices):
        raise ValueError(f"{where}: label {raw!r} in column {column!r} is index {index}, out of range for "
                         f"{len(choices)} choices {choices}; labels are 0-based indices.")
    return index
