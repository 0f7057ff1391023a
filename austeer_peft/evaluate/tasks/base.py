"""The uniform task type and what every task loader shares: :class:`Task` and :class:`ContrastivePair`, where the
data folder is (:func:`resolve_data_dir`), and the deterministic seeded splitting of a list of rows.

Kept apart from the loaders so that a new data set is one small module over these helpers (see
``tasks/__init__.py`` for the registry), and so that fitting, sweeps and scoring can depend on the :class:`Task`
type without pulling in any data set's reader.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
from datasets import Dataset

from ...fitting.pairs import pairs_from_choices

DATA_ENV_VAR = "AUSTEER_DATA"
DEFAULT_N_VALIDATION = 200  # the selection rule needs hundreds of examples to tell a gain from noise
# The repository root, the folder that holds the package: tasks/ < evaluate/ < austeer_peft/ < root.
PACKAGE_PARENT = Path(__file__).resolve().parents[3]

PathLike = Union[str, os.PathLike]
TASK_KINDS = ("choice", "generation", "open")


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
        kind: ``"choice"`` (rows have ``choices`` and ``label``), ``"generation"`` (rows have ``answer``, a float,
            and ``answer_text`` / ``wrong_answer_text``, the continuations of its contrastive pair) or ``"open"``
            (open-ended continuations scored by a classifier, e.g. detoxification: fit rows have ``chosen`` /
            ``rejected``, validation and test rows are prompts; ``metadata`` says how they are scored).
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
        if self.kind not in TASK_KINDS:
            raise ValueError(f"Task kind must be one of {', '.join(TASK_KINDS)}, got {self.kind!r}.")

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
        more, one drawn with a generator seeded by ``(seed, row index)``, so the same row always gets the same one:
        :func:`~austeer_peft.fitting.pairs.pairs_from_choices` with ``draw="per_example"``).
        Generation tasks: ``chosen`` is ``" " + answer_text``, ``rejected`` is ``" " + wrong_answer_text`` (see
        :func:`~austeer_peft.fitting.pairs.wrong_answers`).
        """
        data = self.split(split)
        if len(data) == 0:
            return []
        if self.kind == "generation":
            return [ContrastivePair(row["prompt"], " " + row["answer_text"], " " + row["wrong_answer_text"])
                    for row in data]
        if self.kind == "open":
            if not {"chosen", "rejected"} <= set(data.column_names):
                raise ValueError(f"The {split} split of the open-generation task {self.name} holds prompts to "
                                 "continue, not pairs; pairs come from its fit split.")
            return [ContrastivePair(row["prompt"], row["chosen"], row["rejected"]) for row in data]
        triples = pairs_from_choices(data["prompt"], data["choices"], data["label"], seed=self.seed,
                                     draw="per_example")
        return [ContrastivePair(*triple) for triple in triples]

    def __repr__(self) -> str:
        return f"Task(name={self.name!r}, kind={self.kind!r}, sizes={self.sizes})"


# ------------------------------------------------------------------------------------------------ data location


def resolve_data_dir(data_dir: Optional[PathLike] = None) -> Path:
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
    candidates = default_data_dirs()
    for path in candidates:
        if path.is_dir():
            return path
    tried = ", ".join(repr(str(p)) for p in candidates)
    raise FileNotFoundError(
        f"No evaluation data folder found (tried {tried}). Pass data_dir=... or set ${DATA_ENV_VAR}."
    )


def default_data_dirs() -> list[Path]:
    """Where the data folder is looked for when none is named: next to the repository, then next to the working
    directory."""
    return [PACKAGE_PARENT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]


def find_data_dir(data_dir: Optional[PathLike] = None) -> Optional[Path]:
    """:func:`resolve_data_dir`, or None when no folder is named (argument, ``$AUSTEER_DATA``) and none of the
    default places holds one: the built-in tasks then load their public copies from the Hub. A folder that is named
    but missing is still an error (the user asked for it)."""
    if data_dir is None and not os.environ.get(DATA_ENV_VAR) and not any(p.is_dir() for p in default_data_dirs()):
        return None
    return resolve_data_dir(data_dir)


def data_file(data_dir: Path, *parts: str) -> Path:
    """``data_dir/parts...``, which must be a file (the error names it and points to the data README)."""
    path = data_dir.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"Missing data file {str(path)!r}; see the data README for the expected layout.")
    return path


# ----------------------------------------------------------------------------------------------------- splitting


def check_sizes(task: str, n_fit: int, n_validation: int, pool: int, pool_name: str) -> None:
    """Refuse negative sizes, and fit + validation larger than the pool they are drawn from."""
    if n_fit < 0 or n_validation < 0:
        raise ValueError(f"{task}: n_fit and n_validation must be >= 0, got {n_fit} and {n_validation}.")
    if n_fit + n_validation > pool:
        raise ValueError(
            f"{task}: n_fit + n_validation = {n_fit + n_validation} exceeds the {pool} examples of {pool_name}."
        )


def pool_split(n: int, pool_size: int, n_fit: int, n_validation: int, seed: int) -> tuple[list, list, list]:
    """Indices (fit, validation, test) from one seeded permutation of ``range(n)``: validation is the first
    ``n_validation`` of the first ``pool_size``, fit the next ``n_fit``, test everything after the pool."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    pool, test = order[:pool_size], order[pool_size:]
    validation = pool[:n_validation]
    fit = pool[n_validation : n_validation + n_fit]
    return fit, validation, test


def select_rows(rows: list[dict], indices: Sequence[int]) -> Dataset:
    """The rows at ``indices`` as a split (an empty split keeps the columns)."""
    return Dataset.from_list([rows[i] for i in indices]) if indices else empty_like(rows)


def empty_like(rows: list[dict]) -> Dataset:
    """An empty split with the same columns (``from_list([])`` would have none)."""
    return Dataset.from_list(rows[:1]).select([])


def sizes_or_defaults(n_fit: Optional[int], n_validation: Optional[int], default_fit: int) -> tuple[int, int]:
    """``(n_fit, n_validation)`` with the task's default fit size and the shared validation size filled in."""
    return (default_fit if n_fit is None else n_fit,
            DEFAULT_N_VALIDATION if n_validation is None else n_validation)


# ------------------------------------------------------------------------------------------------- chat template

CHAT_TEMPLATE_NOTE = "Prompts wrapped in the tokenizer's chat template (one user turn, then the assistant's turn)."


# What the card of an adapter chosen on chat-templated prompts says (fit's and each of sweep's adapters).
CHAT_TEMPLATE_CARD_LINE = ("fitted and evaluated with each prompt wrapped in the base model's chat template (one user "
                           "turn, then the assistant's turn); use the same at inference.")


def apply_chat_template(task: Task, tokenizer: Any) -> Task:
    """The task with every prompt wrapped as one user turn in ``tokenizer``'s chat template, ending where the
    assistant's answer begins (instruct models answer differently inside it); choices and answers stay the
    continuations. A template that writes the BOS token is stripped of it when the tokenizer adds one itself."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template (base models usually have none); run without it.")
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]

    def wrap(prompt: str) -> str:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return text[len(bos):] if adds_bos and text.startswith(bos) else text

    def wrapped(split: Dataset) -> Dataset:
        if not len(split):
            return split
        prompts = [wrap(prompt) for prompt in split["prompt"]]
        return split.remove_columns("prompt").add_column("prompt", prompts)

    return Task(task.name, task.kind, wrapped(task.fit), wrapped(task.validation), wrapped(task.test),
                choices=task.choices, split_note=f"{task.split_note} {CHAT_TEMPLATE_NOTE}", seed=task.seed,
                metadata={**task.metadata, "chat_template": True})
