"""Evaluation tasks: the paper's data sets (COPA, BoolQ, SST-2, SVAMP, MAWPS) and user data, loaded into one
uniform :class:`Task` with deterministic ``fit`` / ``validation`` / ``test`` splits.

Every split is a ``datasets.Dataset`` with a ``prompt`` column (the filled template) and either
``choices`` + ``label`` (choice tasks: ``label`` indexes ``choices``) or ``answer`` (generation tasks: a float), so
the fit, the hyper-parameter sweep and the scoring never need to know which data set they run on.

Split sizes (seed 0 unless told otherwise; the test split never depends on ``n_fit`` / ``n_validation``):

=========  ==========================================  ===================================  ==========================
task       fit (default)                                validation (default)                 test
=========  ==========================================  ===================================  ==========================
copa       400 of copa-dev.xml                          100 of copa-dev.xml (disjoint)       copa-test.xml, 500
boolq      900 of the first 1000 of a seeded            100 of that same 1000 (disjoint)     the other 2270 of
           permutation of val.jsonl                                                          val.jsonl
sst2       500 sampled from train.tsv                   100 more from train.tsv (disjoint)   dev.tsv, 872
svamp      600 of the first 700 of a seeded             100 of that same 700 (disjoint)      the other 300
           permutation of SVAMP.json                                                         (as the paper's Table 6)
mawps      1000 of fold0_train.csv                      100 of fold0_train.csv (disjoint)    fold0_dev.csv, 384
=========  ==========================================  ===================================  ==========================

Within a held-out pool the validation examples come first in the permutation and the fit examples after them, so
changing ``n_fit`` never changes the validation split either.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
from datasets import Dataset, load_dataset

DATA_ENV_VAR = "AUSTEER_DATA"
TASK_NAMES = ("copa", "boolq", "sst2", "svamp", "mawps")
DEFAULT_N_VALIDATION = 100

# Templates of the paper (Appendix B, following the SADI code). COPA and BoolQ are verbatim.
COPA_TEMPLATE = (
    "Question:\n{premise} Based on the previous passage, choose the most reasonable {asks_for}.\n"
    "A:{choice1}\nB:{choice2}\n\nAnswer:\n"
)
COPA_CHOICES = ["A", "B"]
BOOLQ_TEMPLATE = (
    "Is the answer to the question encapsulated in the passage? Please confirm with 'yes' or 'no'.\n\n"
    "Passage: {passage}\n\nQuestion: {question}\n\nAnswer:"
)
BOOLQ_CHOICES = [" yes", " no"]
# SST-2 is not in the paper; a plain template whose two answers differ in their first token.
SST2_TEMPLATE = "Review: {text}\nSentiment:"
SST2_CHOICES = [" negative", " positive"]  # label 1 = positive, as in the GLUE file
# The paper's math template (its Figure 9) is an image that is not in the text; this one asks for the number only,
# so that a greedy continuation of a few tokens can be scored by its last number.
MATH_TEMPLATE = (
    "Solve the following math word problem. Give the final answer as a single number.\n\n"
    "Question: {problem}\n\nAnswer:"
)


class ContrastivePair(NamedTuple):
    """One contrastive pair: the positive sample is ``prompt + chosen``, the negative one ``prompt + rejected``.

    ``chosen`` / ``rejected`` are the continuations only (as in TRL's preference format), so that callers can read
    the activation at the last token of either full text or of the prompt alone.
    """

    prompt: str
    chosen: str
    rejected: str

    @property
    def positive(self) -> str:
        return self.prompt + self.chosen

    @property
    def negative(self) -> str:
        return self.prompt + self.rejected


@dataclass
class Task:
    """A task with its three deterministic splits.

    Args:
        name: task name (``"copa"``, ``"boolq"``, ... or a user name).
        kind: ``"choice"`` (rows have ``choices`` and ``label``) or ``"generation"`` (rows have ``answer``, a float,
            and ``answer_text`` / ``wrong_answer_text``, the continuations of its contrastive pair).
        fit: examples the steering is fitted on (contrastive pairs are built from them).
        validation: a small disjoint split for picking ``k`` and ``alpha``.
        test: the split reported.
        choices: the answer strings shared by every row of a choice task (``None`` when they vary per row or for
            generation tasks).
        split_note: how the splits were made; reports must print it (it says, e.g., that BoolQ has no train split
            offline).
        seed: the seed the splits (and random wrong answers) were drawn with.
    """

    name: str
    kind: str
    fit: Dataset
    validation: Dataset
    test: Dataset
    choices: Optional[list[str]] = None
    split_note: str = ""
    seed: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("choice", "generation"):
            raise ValueError(f"Task kind must be 'choice' or 'generation', got {self.kind!r}.")

    def split(self, name: str) -> Dataset:
        """The split called ``name`` (``"fit"``, ``"validation"`` or ``"test"``; ``"train"`` means ``"fit"``)."""
        name = {"train": "fit", "dev": "validation", "val": "validation"}.get(name, name)
        if name not in ("fit", "validation", "test"):
            raise ValueError(f"Unknown split {name!r}; expected 'fit', 'validation' or 'test'.")
        return getattr(self, name)

    @property
    def sizes(self) -> dict[str, int]:
        return {"fit": len(self.fit), "validation": len(self.validation), "test": len(self.test)}

    def pairs(self, split: str = "fit") -> list[ContrastivePair]:
        """Contrastive pairs ``(prompt, chosen, rejected)`` of a split (Appendix B.1 of the paper).

        Choice tasks: ``chosen`` is the correct choice, ``rejected`` a wrong one (the other one for two choices; for
        more, one drawn with a generator seeded by ``(seed, row index)``, so the same row always gets the same one).
        Generation tasks: ``chosen`` is ``" " + answer_text``, ``rejected`` is ``" " + wrong_answer_text`` (see
        :func:`wrong_answers`).
        """
        data = self.split(split)
        pairs = []
        if self.kind == "generation":
            for row in data:
                pairs.append(ContrastivePair(row["prompt"], " " + row["answer_text"], " " + row["wrong_answer_text"]))
            return pairs
        for index, row in enumerate(data):
            choices, label = row["choices"], row["label"]
            wrong = [i for i in range(len(choices)) if i != label]
            if len(wrong) == 1:
                rejected = wrong[0]
            else:
                rejected = wrong[int(np.random.default_rng([self.seed, index]).integers(len(wrong)))]
            pairs.append(ContrastivePair(row["prompt"], choices[label], choices[rejected]))
        return pairs

    def __repr__(self) -> str:
        return f"Task(name={self.name!r}, kind={self.kind!r}, sizes={self.sizes})"


# ------------------------------------------------------------------------------------------------ data location


def resolve_data_dir(data_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The data folder: ``data_dir`` if given, else ``$AUSTEER_DATA``, else ``<repo>/../shared/data`` (next to the
    folder that holds the package) or ``./../shared/data`` (next to the working directory)."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data_dir {str(path)!r} is not a folder.")
        return path
    if os.environ.get(DATA_ENV_VAR):
        path = Path(os.environ[DATA_ENV_VAR]).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"${DATA_ENV_VAR} points to {str(path)!r}, which is not a folder.")
        return path
    package_parent = Path(__file__).resolve().parents[2]
    candidates = [package_parent.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for path in candidates:
        if path.is_dir():
            return path
    tried = ", ".join(repr(str(p)) for p in candidates)
    raise FileNotFoundError(
        f"No evaluation data folder found (tried {tried}). Pass data_dir=... or set ${DATA_ENV_VAR}."
    )


def _data_file(data_dir: Path, *parts: str) -> Path:
    path = data_dir.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"Missing data file {str(path)!r}; see the data README for the expected layout.")
    return path


# ----------------------------------------------------------------------------------------------------- splitting


def _check_sizes(task: str, n_fit: int, n_validation: int, pool: int, pool_name: str) -> None:
    if n_fit < 0 or n_validation < 0:
        raise ValueError(f"{task}: n_fit and n_validation must be >= 0, got {n_fit} and {n_validation}.")
    if n_fit + n_validation > pool:
        raise ValueError(
            f"{task}: n_fit + n_validation = {n_fit + n_validation} exceeds the {pool} examples of {pool_name}."
        )


def _pool_split(n: int, pool_size: int, n_fit: int, n_validation: int, seed: int) -> tuple[list, list, list]:
    """Indices (fit, validation, test) from one seeded permutation of ``range(n)``: validation is the first
    ``n_validation`` of the first ``pool_size``, fit the next ``n_fit``, test everything after the pool."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    pool, test = order[:pool_size], order[pool_size:]
    validation = pool[:n_validation]
    fit = pool[n_validation : n_validation + n_fit]
    return fit, validation, test


def _select(rows: list[dict], indices: Sequence[int]) -> Dataset:
    return Dataset.from_list([rows[i] for i in indices]) if indices else _empty_like(rows)


def _empty_like(rows: list[dict]) -> Dataset:
    """An empty split with the same columns (``from_list([])`` would have none)."""
    return Dataset.from_list(rows[:1]).select([])


# ---------------------------------------------------------------------------------------------- number handling


def format_number(value: float) -> str:
    """A number as a model would write it: ``51.0 -> "51"``, ``141.5 -> "141.5"``, at most 6 decimals."""
    value = float(value)
    if math.isfinite(value) and value == round(value):
        return str(int(round(value)))
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def wrong_answers(problems: Sequence[str], answers: Sequence[float], tolerance: float = 1e-4) -> list[float]:
    """For each problem, the answer of the most similar *other* problem whose answer differs (no leakage: the pool is
    the split itself).

    The paper picks "the most semantically similar incorrect answer from the answer pool" with a sentence encoder;
    offline we use the cosine similarity of bag-of-words vectors of the problem texts (words only, numbers removed).
    Ties go to the earliest row; if every other answer equals the correct one, ``answer + 1`` is used.
    """
    n = len(problems)
    if n == 0:
        return []
    words = [sorted(set(re.findall(r"[a-z]+", p.lower()))) for p in problems]
    vocabulary = {w: i for i, w in enumerate(sorted({w for ws in words for w in ws}))}
    vectors = np.zeros((n, max(len(vocabulary), 1)), dtype=np.float32)
    for row, ws in enumerate(words):
        vectors[row, [vocabulary[w] for w in ws]] = 1.0
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similarity = vectors @ vectors.T
    values = np.asarray(answers, dtype=np.float64)
    same_answer = np.abs(values[:, None] - values[None, :]) <= tolerance  # includes the diagonal
    similarity[same_answer] = -np.inf
    wrong = []
    for row in range(n):
        if np.isneginf(similarity[row]).all():
            wrong.append(float(values[row]) + 1.0)
        else:
            wrong.append(float(values[int(np.argmax(similarity[row]))]))
    return wrong


def _generation_rows(rows: list[dict]) -> list[dict]:
    """Add ``answer_text`` / ``wrong_answer_text`` (the pair continuations) to generation rows of one split."""
    wrong = wrong_answers([r["problem"] for r in rows], [r["answer"] for r in rows])
    return [{**r, "answer_text": format_number(r["answer"]), "wrong_answer_text": format_number(w)}
            for r, w in zip(rows, wrong)]


def _generation_split(rows: list[dict], indices: Sequence[int]) -> Dataset:
    """A generation split; wrong answers are drawn from the split itself, so no answer leaks across splits."""
    chosen = [rows[i] for i in indices]
    if not chosen:
        return _empty_like(_generation_rows(rows[:1]))
    return Dataset.from_list(_generation_rows(chosen))


# ----------------------------------------------------------------------------------------------- COPA


def _read_copa(path: Path) -> list[dict]:
    rows = []
    for item in ET.parse(path).getroot().iter("item"):
        premise, choice1, choice2 = (item.find(tag).text.strip() for tag in ("p", "a1", "a2"))
        asks_for = item.get("asks-for")
        prompt = COPA_TEMPLATE.format(premise=premise, asks_for=asks_for, choice1=choice1, choice2=choice2)
        rows.append({
            "id": item.get("id"),
            "prompt": prompt,
            "choices": list(COPA_CHOICES),
            "label": int(item.get("most-plausible-alternative")) - 1,
        })
    return rows


def load_copa(data_dir: Optional[Union[str, os.PathLike]] = None, n_fit: Optional[int] = None,
              n_validation: Optional[int] = None, seed: int = 0) -> Task:
    """COPA: fit and validation from copa-dev.xml (500, seeded), test = copa-test.xml (500)."""
    folder = resolve_data_dir(data_dir) / "COPA"
    dev = _read_copa(_data_file(folder, "copa-dev.xml"))
    test = _read_copa(_data_file(folder, "copa-test.xml"))
    n_fit = 400 if n_fit is None else n_fit
    n_validation = DEFAULT_N_VALIDATION if n_validation is None else n_validation
    _check_sizes("copa", n_fit, n_validation, len(dev), "copa-dev.xml")
    fit_idx, val_idx, _ = _pool_split(len(dev), len(dev), n_fit, n_validation, seed)
    note = (f"COPA: fit {len(fit_idx)} + validation {len(val_idx)} drawn disjointly from copa-dev.xml (500) with "
            f"seed {seed}; test = copa-test.xml ({len(test)}).")
    return Task("copa", "choice", _select(dev, fit_idx), _select(dev, val_idx), Dataset.from_list(test),
                choices=list(COPA_CHOICES), split_note=note, seed=seed)


# ----------------------------------------------------------------------------------------------- BoolQ

BOOLQ_POOL = 1000


def load_boolq(data_dir: Optional[Union[str, os.PathLike]] = None, n_fit: Optional[int] = None,
               n_validation: Optional[int] = None, seed: int = 0) -> Task:
    """BoolQ: only the SuperGLUE validation file (3270) is offline, so it is split: the first 1000 of a seeded
    permutation give fit (900) and validation (100), the other 2270 are the test split."""
    path = _data_file(resolve_data_dir(data_dir), "BoolQ", "val.jsonl")
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
    n_fit = BOOLQ_POOL - DEFAULT_N_VALIDATION if n_fit is None else n_fit
    n_validation = DEFAULT_N_VALIDATION if n_validation is None else n_validation
    _check_sizes("boolq", n_fit, n_validation, BOOLQ_POOL, "the held-out BoolQ pool")
    fit_idx, val_idx, test_idx = _pool_split(len(rows), BOOLQ_POOL, n_fit, n_validation, seed)
    note = (f"BoolQ has no train split offline: val.jsonl ({len(rows)}) is split by a seeded permutation (seed "
            f"{seed}); its first {BOOLQ_POOL} give fit {len(fit_idx)} + validation {len(val_idx)}, the other "
            f"{len(test_idx)} are the test split (the paper tests on all {len(rows)}, so numbers are not directly "
            f"comparable).")
    return Task("boolq", "choice", _select(rows, fit_idx), _select(rows, val_idx), _select(rows, test_idx),
                choices=list(BOOLQ_CHOICES), split_note=note, seed=seed)


# ----------------------------------------------------------------------------------------------- SST-2


def _read_sst2(path: Path) -> list[dict]:
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


def load_sst2(data_dir: Optional[Union[str, os.PathLike]] = None, n_fit: Optional[int] = None,
              n_validation: Optional[int] = None, seed: int = 0) -> Task:
    """SST-2: fit (500) and validation (100) sampled disjointly from train.tsv, test = dev.tsv (872)."""
    folder = resolve_data_dir(data_dir) / "SST-2"
    train = _read_sst2(_data_file(folder, "train.tsv"))
    test = _read_sst2(_data_file(folder, "dev.tsv"))
    n_fit = 500 if n_fit is None else n_fit
    n_validation = DEFAULT_N_VALIDATION if n_validation is None else n_validation
    _check_sizes("sst2", n_fit, n_validation, len(train), "train.tsv")
    fit_idx, val_idx, _ = _pool_split(len(train), len(train), n_fit, n_validation, seed)
    note = (f"SST-2: fit {len(fit_idx)} + validation {len(val_idx)} sampled disjointly from train.tsv "
            f"({len(train)}) with seed {seed}; test = dev.tsv ({len(test)}).")
    return Task("sst2", "choice", _select(train, fit_idx), _select(train, val_idx), Dataset.from_list(test),
                choices=list(SST2_CHOICES), split_note=note, seed=seed)


# ----------------------------------------------------------------------------------------------- SVAMP

SVAMP_POOL = 700  # the paper's 700 contrastive pairs; the other 300 are its test set (Table 6)


def load_svamp(data_dir: Optional[Union[str, os.PathLike]] = None, n_fit: Optional[int] = None,
               n_validation: Optional[int] = None, seed: int = 0) -> Task:
    """SVAMP (1000): the first 700 of a seeded permutation give fit (600) and validation (100), the other 300 are the
    test split. The problem is ``Body + " " + Question`` (as the SVAMP authors join them)."""
    path = _data_file(resolve_data_dir(data_dir), "SVAMP", "SVAMP.json")
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
    n_fit = SVAMP_POOL - DEFAULT_N_VALIDATION if n_fit is None else n_fit
    n_validation = DEFAULT_N_VALIDATION if n_validation is None else n_validation
    _check_sizes("svamp", n_fit, n_validation, SVAMP_POOL, "the held-out SVAMP pool")
    fit_idx, val_idx, test_idx = _pool_split(len(rows), SVAMP_POOL, n_fit, n_validation, seed)
    note = (f"SVAMP.json ({len(rows)}) split by a seeded permutation (seed {seed}): its first {SVAMP_POOL} give fit "
            f"{len(fit_idx)} + validation {len(val_idx)}, the other {len(test_idx)} are the test split. Wrong "
            f"answers of the pairs: the answer of the most similar problem (bag of words) in the same split.")
    return Task("svamp", "generation", _generation_split(rows, fit_idx), _generation_split(rows, val_idx),
                _generation_split(rows, test_idx), split_note=note, seed=seed)


# ----------------------------------------------------------------------------------------------- MAWPS


def unmask_numbers(text: str, numbers: str) -> str:
    """Put the numbers back into a MAWPS problem: ``number0`` -> the first of the space-separated ``numbers``."""
    values = numbers.split()

    def replace(match: re.Match) -> str:
        index = int(match.group(1))
        if index >= len(values):
            raise ValueError(f"{match.group(0)} in {text!r} has no value in Numbers={numbers!r}.")
        return format_number(float(values[index])) if float(values[index]).is_integer() else values[index]

    return re.sub(r"number(\d+)", replace, text)


def _read_mawps(path: Path) -> list[dict]:
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


def load_mawps(data_dir: Optional[Union[str, os.PathLike]] = None, n_fit: Optional[int] = None,
               n_validation: Optional[int] = None, seed: int = 0) -> Task:
    """MAWPS fold 0: fit (1000) and validation (100) drawn disjointly from fold0_train.csv (1537), test =
    fold0_dev.csv (384). Masked numbers are put back from the Numbers column."""
    folder = resolve_data_dir(data_dir) / "MAWPS"
    train = _read_mawps(_data_file(folder, "fold0_train.csv"))
    test = _read_mawps(_data_file(folder, "fold0_dev.csv"))
    n_fit = 1000 if n_fit is None else n_fit
    n_validation = DEFAULT_N_VALIDATION if n_validation is None else n_validation
    _check_sizes("mawps", n_fit, n_validation, len(train), "fold0_train.csv")
    fit_idx, val_idx, _ = _pool_split(len(train), len(train), n_fit, n_validation, seed)
    note = (f"MAWPS fold 0: fit {len(fit_idx)} + validation {len(val_idx)} drawn disjointly from fold0_train.csv "
            f"({len(train)}) with seed {seed}; test = fold0_dev.csv ({len(test)}; the paper reports 355). Wrong "
            f"answers of the pairs: the answer of the most similar problem (bag of words) in the same split.")
    return Task("mawps", "generation", _generation_split(train, fit_idx), _generation_split(train, val_idx),
                _generation_split(test, range(len(test))), split_note=note, seed=seed)


# ----------------------------------------------------------------------------------------------- dispatch

_LOADERS = {"copa": load_copa, "boolq": load_boolq, "sst2": load_sst2, "svamp": load_svamp, "mawps": load_mawps}


def load_task(name: str, data_dir: Optional[Union[str, os.PathLike]] = None, n_fit: Optional[int] = None,
              n_validation: Optional[int] = None, seed: int = 0) -> Task:
    """Load one of the built-in tasks by name (``"copa"``, ``"boolq"``, ``"sst2"``, ``"svamp"``, ``"mawps"``).

    Example:
        ```py
        >>> task = load_task("copa")
        >>> task.sizes
        {'fit': 400, 'validation': 100, 'test': 500}
        >>> prompt, chosen, rejected = task.pairs("fit")[0]
        ```
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _LOADERS:
        raise ValueError(f"Unknown task {name!r}; expected one of {', '.join(TASK_NAMES)} (or use load_user_task).")
    return _LOADERS[key](data_dir=data_dir, n_fit=n_fit, n_validation=n_validation, seed=seed)


# ----------------------------------------------------------------------------------------------- user data

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
            = min(100, a fifth of the rest), fit = min(1000, what is left). The test split is taken first, so it does
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
            return _generation_split(rows, indices)
        return _select(rows, indices)

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
        _check_sizes(name, n_fit, n_validation, rest, "the data left after the test split")
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


__all__ = [
    "BOOLQ_CHOICES",
    "BOOLQ_TEMPLATE",
    "COPA_CHOICES",
    "COPA_TEMPLATE",
    "ContrastivePair",
    "MATH_TEMPLATE",
    "SST2_CHOICES",
    "SST2_TEMPLATE",
    "TASK_NAMES",
    "Task",
    "format_number",
    "load_boolq",
    "load_copa",
    "load_mawps",
    "load_sst2",
    "load_svamp",
    "load_task",
    "load_user_task",
    "resolve_data_dir",
    "unmask_numbers",
    "wrong_answers",
]
