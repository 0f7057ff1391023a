"""What the generation (number-answer) tasks share: the math prompt, numbers written as a model writes them, and
splits whose rows carry the continuations of their contrastive pair.

SVAMP, MAWPS and user data with an ``answer_column`` all build their splits here, so the rule "the wrong answer of
a pair comes from the same split" (no answer leaks across splits) lives in one place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from datasets import Dataset

from ...fitting.pairs import wrong_answers
from .base import empty_like

# The paper's math template (its Figure 9) is an image that is not in the text; this one asks for the number only,
# so that a greedy continuation of a few tokens can be scored by its last number.
MATH_TEMPLATE = (
    "Solve the following math word problem. Give the final answer as a single number.\n\n"
    "Question: {problem}\n\nAnswer:"
)
WRONG_ANSWER_NOTE = ("Wrong answers of the pairs: the answer of the most similar problem (bag of words) in the same "
                     "split.")


def format_number(value: float) -> str:
    """A number as a model would write it: ``51.0 -> "51"``, ``141.5 -> "141.5"``, at most 6 decimals."""
    value = float(value)
    if math.isfinite(value) and value == round(value):
        return str(int(round(value)))
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def generation_rows(rows: list[dict]) -> list[dict]:
    """Add ``answer_text`` / ``wrong_answer_text`` (the pair continuations) to generation rows of one split."""
    wrong = wrong_answers([r["problem"] for r in rows], [r["answer"] for r in rows])
    return [{**r, "answer_text": format_number(r["answer"]), "wrong_answer_text": format_number(w)}
            for r, w in zip(rows, wrong)]


def generation_split(rows: list[dict], indices: Sequence[int]) -> Dataset:
    """A generation split; wrong answers are drawn from the split itself, so no answer leaks across splits."""
    chosen = [rows[i] for i in indices]
    if not chosen:
        return empty_like(generation_rows(rows[:1]))
    return Dataset.from_list(generation_rows(chosen))
