"""Scoring: pure functions from model outputs (logits, log-probabilities, generated text) to per-example
correctness, plus a bootstrap confidence interval and an exact paired test. Nothing here loads a model.

Three ways to score a choice task, from strictest to most lenient:

* :func:`greedy_choice_correct` -- the paper's metric (as the authors' code): the model's greedy next token over the
  *whole* vocabulary must be the first token of the correct choice. A model that answers something else is wrong.
* :func:`exact_match_predictions` -- the paper's exact-match rule as the official code applies it: the one greedy
  token, decoded, stripped and lower-cased, must equal the stripped, lower-cased gold answer (so ``"Yes"`` matches
  ``" yes"``, and a gold answer longer than one token can never match).
* :func:`restricted_choice_correct` -- argmax among the choices' first-token logits only ("first-token score").
* :func:`loglik_choice_correct` -- the option with the highest summed log-probability of its whole continuation
  (see :func:`continuation_logprobs`; it lives in :mod:`austeer_peft.fitting.logprobs`, as a fit's automatic
  (k, α) scores with it too, and is exported here).

Per-example results are lists of ``bool`` so that :func:`bootstrap_ci` and :func:`paired_test` can use them directly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch

from ..fitting.logprobs import continuation_logprobs
from ..fitting.selection import sign_test_greater

ChoiceIds = Union[Sequence[int], torch.Tensor]
Labels = Union[Sequence[int], torch.Tensor]


# ------------------------------------------------------------------------------------------------ helpers


def _as_logits(logits: torch.Tensor) -> torch.Tensor:
    logits = torch.as_tensor(logits)
    if logits.dim() != 2:
        raise ValueError(
            f"Expected next-token logits of shape [batch, vocab], got {tuple(logits.shape)}; for model outputs of "
            "shape [batch, seq, vocab] take the position of each prompt's last token first."
        )
    return logits


def _as_choice_ids(choice_ids: ChoiceIds, batch: int, vocab: int) -> torch.Tensor:
    """Choice token ids as a [batch, n_choices] long tensor (one shared row is broadcast)."""
    ids = torch.as_tensor(choice_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0).expand(batch, -1)
    if ids.dim() != 2 or ids.shape[0] != batch:
        raise ValueError(f"choice_ids must be [n_choices] or [batch={batch}, n_choices], got {tuple(ids.shape)}.")
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"choice_ids must lie in [0, {vocab}), got min {int(ids.min())}, max {int(ids.max())}.")
    return ids


def _as_labels(labels: Labels, batch: int) -> list[int]:
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).tolist()
    if len(labels) != batch:
        raise ValueError(f"Got {len(labels)} labels for a batch of {batch}.")
    return labels


# ---------------------------------------------------------------------------------- multiple choice: greedy


def greedy_choice_predictions(logits: torch.Tensor, choice_ids: ChoiceIds) -> list[int]:
    """Index of the choice whose first token is the greedy next token (argmax over the whole vocabulary), or -1
    when the model would emit a token that starts none of the choices."""
    logits = _as_logits(logits)
    ids = _as_choice_ids(choice_ids, logits.shape[0], logits.shape[1])
    top = logits.argmax(dim=-1)  # ties: the lowest token id
    predictions = []
    for row in range(logits.shape[0]):
        hits = (ids[row] == top[row]).nonzero().flatten().tolist()
        predictions.append(hits[0] if hits else -1)
    return predictions


def greedy_choice_correct(logits: torch.Tensor, choice_ids: ChoiceIds, labels: Labels) -> list[bool]:
    """Paper-faithful exact match: correct iff the argmax over the WHOLE vocabulary is the correct choice's first
    token (the model must actually emit the answer)."""
    predictions = greedy_choice_predictions(logits, choice_ids)
    labels = _as_labels(labels, len(predictions))
    return [p == label for p, label in zip(predictions, labels)]


# --------------------------------------------------------------------------- multiple choice: exact match


def normalized_answer(text: str) -> str:
    """What the official code compares: the text stripped of surrounding white space and lower-cased."""
    return text.strip().lower()


def exact_match_predictions(greedy_texts: Sequence[str], choices: Sequence[str]) -> list[int]:
    """Index of the choice whose normalized text equals the normalized greedy text (the decoded greedy token), or
    -1 when it equals none (the first such choice if several normalize alike)."""
    normalized = [normalized_answer(choice) for choice in choices]
    predictions = []
    for text in greedy_texts:
        answer = normalized_answer(text)
        predictions.append(normalized.index(answer) if answer in normalized else -1)
    return predictions


# ------------------------------------------------------------------------------ multiple choice: restricted


def restricted_choice_predictions(logits: torch.Tensor, choice_ids: ChoiceIds) -> list[int]:
    """Index of the choice with the highest first-token logit, looking at the choices' tokens only (ties: the
    first choice)."""
    logits = _as_logits(logits)
    ids = _as_choice_ids(choice_ids, logits.shape[0], logits.shape[1])
    return logits.gather(1, ids).argmax(dim=-1).tolist()


def restricted_choice_correct(logits: torch.Tensor, choice_ids: ChoiceIds, labels: Labels) -> list[bool]:
    """First-token score: correct iff the correct choice's first token has the highest logit among the choices'
    first tokens (e.g. ``" positive"`` vs ``" negative"``), whatever the model would emit otherwise."""
    predictions = restricted_choice_predictions(logits, choice_ids)
    labels = _as_labels(labels, len(predictions))
    return [p == label for p, label in zip(predictions, labels)]


# ---------------------------------------------------------------------------- multiple choice: log-likelihood


def loglik_choice_predictions(option_logprobs: Union[torch.Tensor, Sequence[Sequence[float]]]) -> list[int]:
    """Index of the option with the highest summed log-probability, per example (ties: the first option).

    ``option_logprobs`` is [batch, n_options] (e.g. :func:`continuation_logprobs` of each option, stacked), or a
    list of per-example lists when examples have different numbers of options (user data with per-row choices).
    """
    if not isinstance(option_logprobs, torch.Tensor) and len({len(row) for row in option_logprobs}) > 1:
        if not all(len(row) for row in option_logprobs):
            raise ValueError("Every example needs at least one option to score.")
        return [max(range(len(row)), key=lambda i: float(row[i])) for row in option_logprobs]  # ties: the first
    scores = torch.as_tensor(option_logprobs, dtype=torch.float64)
    if scores.dim() != 2:
        raise ValueError(f"option_logprobs must be [batch, n_options], got {tuple(scores.shape)}.")
    return scores.argmax(dim=-1).tolist()


def loglik_choice_correct(option_logprobs: Union[torch.Tensor, Sequence[Sequence[float]]], labels: Labels
                          ) -> list[bool]:
    """Correct iff the correct option has the highest summed log-probability."""
    predictions = loglik_choice_predictions(option_logprobs)
    labels = _as_labels(labels, len(predictions))
    return [p == label for p, label in zip(predictions, labels)]


# ------------------------------------------------------------------------------------------------ generation

# A number: optional sign (only when the minus is not glued to a preceding word/number, so "10-4" gives 4), then
# digits with optional thousands commas ("1,234") and an optional decimal part, or a bare decimal (".5").
_NUMBER = re.compile(
    r"(?:(?<![\w.)])-)?(?<![\d.])"
    r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
)


def parse_last_number(text: str) -> Optional[float]:
    """The last number in ``text`` as a float, or ``None`` if there is none.

    Handles thousands commas (``"1,234.5"``), negatives (``"-3"``, also the Unicode minus), decimals (``".5"``,
    ``"2."`` -> 2). A minus between two numbers is read as an operator (``"10-4"`` -> 4). Fractions such as
    ``"3/4"`` and scientific notation are not interpreted (they give their last integer).
    """
    if not text:
        return None
    text = text.replace("\u2212", "-")
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return float(matches[-1].replace(",", ""))


def number_matches(text: str, answer: float, tolerance: float = 1e-4, stop: Optional[Sequence[str]] = None) -> bool:
    """Whether the last number of ``text`` equals ``answer`` within ``tolerance`` (absolute).

    ``stop``: optional strings; the text is cut at the first one found (e.g. ``["\\n\\n", "Question:"]`` to drop what
    a model writes after its answer).
    """
    if stop:
        cut = [text.find(s) for s in stop if s and s in text]
        if cut:
            text = text[: min(cut)]
    value = parse_last_number(text)
    return value is not None and abs(value - float(answer)) <= tolerance


def generation_correct(texts: Sequence[str], answers: Sequence[float], tolerance: float = 1e-4,
                       stop: Optional[Sequence[str]] = None) -> list[bool]:
    """:func:`number_matches` for each (generated text, answer) pair."""
    if len(texts) != len(answers):
        raise ValueError(f"Got {len(texts)} texts for {len(answers)} answers.")
    return [number_matches(t, a, tolerance, stop) for t, a in zip(texts, answers)]


# ------------------------------------------------------------------------------------------------ statistics


def accuracy(correct: Sequence[bool]) -> float:
    """Fraction of correct examples."""
    if len(correct) == 0:
        raise ValueError("accuracy of an empty list is undefined.")
    return float(np.mean(np.asarray(correct, dtype=np.float64)))


def bootstrap_ci(correct: Sequence[bool], n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
                 ) -> tuple[float, float, float]:
    """``(mean, low, high)``: the accuracy and its percentile bootstrap confidence interval (95 % by default).

    Deterministic for a given ``seed``: resamples are drawn with ``numpy.random.default_rng(seed)``.
    """
    values = np.asarray(correct, dtype=np.float64)
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one example.")
    if n_resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError("n_resamples must be >= 1 and confidence in (0, 1).")
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, values.size, size=(n_resamples, values.size))
    means = values[samples].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(values.mean()), float(low), float(high)


def paired_test(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> float:
    """Two-sided p-value of the exact McNemar (sign) test: do systems A and B differ on the same examples?

    Only discordant examples count: ``b`` = A right and B wrong, ``c`` = A wrong and B right. Under the null, ``b``
    is Binomial(b + c, 1/2); ``p = min(1, 2 * P(X <= min(b, c)))``. Exact integer arithmetic (no scipy). ``1.0``
    when there is no discordant example.
    """
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired_test needs results on the same examples; got {len(correct_a)} and {len(correct_b)}.")
    b = sum(1 for x, y in zip(correct_a, correct_b) if bool(x) and not bool(y))
    c = sum(1 for x, y in zip(correct_a, correct_b) if not bool(x) and bool(y))
    return min(1.0, 2 * sign_test_greater(max(b, c), min(b, c)))  # P(X <= min) = P(X >= max) by symmetry


def paired_gain_ci(correct: Sequence[bool], baseline: Sequence[bool], n_resamples: int = 1000, seed: int = 0,
                   confidence: float = 0.95) -> tuple[float, float, float]:
    """``(gain, low, high)``: the mean gain of ``correct`` over ``baseline`` on the same examples and its percentile
    bootstrap interval (:func:`bootstrap_ci` of the per-example differences, so the pairing is kept)."""
    if len(correct) != len(baseline):
        raise ValueError(f"paired_gain_ci needs results on the same examples; got {len(correct)} and {len(baseline)}.")
    differences = np.asarray(correct, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    return bootstrap_ci(differences, n_resamples, seed, confidence)


# ------------------------------------------------------------------------------------------------ tokenizer


def choice_token_ids(tokenizer: Any, choices: Sequence[str], prompt: Optional[str] = None) -> list[int]:
    """The first token id of each choice as it follows ``prompt`` (what the model has to emit next).

    Tokenizes ``prompt`` and ``prompt + choice`` without special tokens and takes the first token after the prompt's
    tokens, so leading spaces (``" yes"``) and newlines before the answer (COPA's ``"Answer:\\n"`` then ``"A"``) are
    handled as the model sees them. Pass a real prompt of the task; without one, ``"Answer:"`` is used.

    Raises:
        ValueError: if a choice merges with the end of the prompt (the prompt's tokens change), if a choice adds no
            token, or if two choices share their first token (a one-token score could not tell them apart).
    """
    context = "Answer:" if prompt is None else prompt
    base = _encode(tokenizer, context)
    ids = []
    for choice in choices:
        full = _encode(tokenizer, context + choice)
        if full[: len(base)] != base:
            raise ValueError(
                f"Choice {choice!r} merges with the end of the prompt when tokenized, so no single next token "
                f"stands for it; end the prompt (or start the choice) at a token boundary, e.g. with a space."
            )
        if len(full) == len(base):
            raise ValueError(f"Choice {choice!r} adds no token after the prompt.")
        ids.append(int(full[len(base)]))
    seen: dict[int, str] = {}
    for choice, token in zip(choices, ids):
        if token in seen:
            raise ValueError(
                f"Choices {seen[token]!r} and {choice!r} share their first token (id {token}); one-token scoring "
                f"cannot tell them apart. Reword the choices or score by log-likelihood."
            )
        seen[token] = choice
    return ids


def _encode(tokenizer: Any, text: str) -> list[int]:
    if callable(tokenizer):
        encoded = tokenizer(text, add_special_tokens=False)
        ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    else:
        ids = tokenizer.encode(text, add_special_tokens=False)
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return [int(i) for i in ids]


__all__ = [
    "accuracy",
    "bootstrap_ci",
    "choice_token_ids",
    "continuation_logprobs",
    "exact_match_predictions",
    "generation_correct",
    "greedy_choice_correct",
    "greedy_choice_predictions",
    "loglik_choice_correct",
    "loglik_choice_predictions",
    "normalized_answer",
    "number_matches",
    "paired_test",
    "parse_last_number",
    "restricted_choice_correct",
    "restricted_choice_predictions",
]
