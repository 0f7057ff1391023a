"""Run a model over a task split and score it: the one place that turns (model, tokenizer, split) into per-example
correctness, for the sweep, the baselines, the CLI and the demo alike.

Scoring methods (see :mod:`austeer_peft.evaluate.scoring` for the pure functions):

* ``"restricted"`` -- choice tasks: argmax among the choices' first-token logits at the prompt's last token (one
  forward per batch, logits for the last position only). Equal to ``"loglik"`` when every choice is one token.
* ``"greedy"`` -- choice tasks: the greedy next token over the whole vocabulary must be the correct choice's first
  token. Computed from the same forward as ``"restricted"``.
* ``"exact"`` -- choice tasks, the paper's exact match as the official code applies it: the greedy next token,
  decoded, stripped and lower-cased, must equal the stripped, lower-cased correct choice. Same forward again.
* ``"loglik"`` -- choice tasks: summed log-probability of each option's whole continuation (one sequence per option).
* ``"number"`` -- generation tasks: greedy decoding of ``max_new_tokens``, then exact match of the last number.
* ``"toxicity"`` -- open-generation tasks (detoxification): a continuation per prompt as the task's settings say,
  right when non-toxic and fluent (:mod:`austeer_peft.evaluate.continuations`); split figures in ``metrics``.

Batches are sorted by length and left-padded (:func:`austeer_peft.fitting.inputs.pad`), with position ids counted
from each row's first real token, so a row's result does not depend on what it is batched with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from ..fitting.inputs import base_model, common_prefix_length, input_device, pad, pad_token_id
from ..fitting.logprobs import contiguous_head_input, continuation_logprobs, forward_logits
from .scoring import (
    choice_token_ids,
    exact_match_predictions,
    generation_correct,
    greedy_choice_predictions,
    loglik_choice_predictions,
    restricted_choice_predictions,
)
from .continuations import detox_settings, score_continuations
from .tasks import Task

SCORINGS = ("restricted", "greedy", "exact", "loglik", "number", "toxicity")
FIRST_TOKEN_SCORINGS = ("restricted", "greedy", "exact")  # all three from one forward per batch
KIND_SCORINGS = {"generation": ("number",), "open": ("toxicity",)}  # choice tasks: the others
STOP_STRINGS = ("\n\n", "Question:")  # a generated answer ends where the model starts a new paragraph or problem


@dataclass
class SplitResult:
    """Per-example correctness of one split under one scoring method (and the others its forward gave for free)."""

    scoring: str
    correct: list[bool]
    also: dict[str, list[bool]]  # e.g. {"greedy": [...], "exact": [...]} next to "restricted"
    forwards: int  # model forward (or generate) calls made
    # Choice tasks: the index of the choice each example was answered with under `scoring` (-1: greedy emitted none
    # of them), so a report can show whether a gain is a shifted answer preference. None for generation.
    predicted: Optional[list[int]] = None
    # Open-generation tasks: split-level figures (detoxification rate, perplexity, distinct-n, ...). None otherwise.
    metrics: Optional[dict[str, Any]] = None

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    def predicted_shares(self, choices: Optional[Sequence[str]]) -> Optional[dict[str, float]]:
        """Share of the examples answered with each choice (and "none", when greedy emitted none of them); with
        per-row options (``choices`` None) the options are named by position."""
        if self.predicted is None:
            return None
        choices = choices or [f"option {i + 1}" for i in range(1 + max(self.predicted))]
        names = [*choices, "none"]
        counts = [self.predicted.count(i) for i in range(len(choices))] + [self.predicted.count(-1)]
        return {name: n / len(self.predicted) for name, n in zip(names, counts) if n or name != "none"}


def default_scoring(task: Task) -> str:
    """``"number"`` for generation tasks, ``"toxicity"`` for open-generation ones, ``"restricted"`` when all rows
    share their choices, else ``"loglik"``."""
    if task.kind in KIND_SCORINGS:
        return KIND_SCORINGS[task.kind][0]
    return "restricted" if task.choices is not None else "loglik"


def evaluate_split(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    split: Union[str, Dataset] = "test",
    scoring: Optional[str] = None,
    *,
    batch_size: int = 16,
    max_new_tokens: Optional[int] = None,
    progress: bool = False,
) -> SplitResult:
    """Score ``model`` on a split of ``task`` (a split name or a ``Dataset`` with the task's columns).

    ``max_new_tokens`` is for ``"number"`` (default 12); ``"toxicity"`` generates as the task's ``DetoxSettings``
    say, and refuses it."""
    data = task.split(split) if isinstance(split, str) else split
    if len(data) == 0:
        raise ValueError(f"The {split if isinstance(split, str) else 'given'} split of {task.name} is empty.")
    scoring = scoring or default_scoring(task)
    if scoring not in SCORINGS:
        raise ValueError(f"Unknown scoring {scoring!r}; expected one of {', '.join(SCORINGS)}.")
    allowed = KIND_SCORINGS.get(task.kind, ("restricted", "greedy", "exact", "loglik"))
    if scoring not in allowed:
        expected = " or ".join(repr(name) for name in allowed)
        raise ValueError(f"Scoring {scoring!r} does not fit the {task.kind} task {task.name}; use {expected}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if scoring in FIRST_TOKEN_SCORINGS and task.choices is None:
        raise ValueError(f"Scoring {scoring!r} needs choices shared by every row; {task.name} has per-row choices, "
                         "so use scoring='loglik'.")

    if scoring == "toxicity":
        if max_new_tokens is not None:
            raise ValueError("Scoring 'toxicity' takes its generation length from the task's DetoxSettings; set "
                             "load_detox(max_new_tokens=...) instead of passing max_new_tokens here.")
        with contiguous_head_input(model):  # generate keeps one position's logits, a strided slice
            scored = score_continuations(model, tokenizer, detox_settings(task), data, batch_size, progress)
        return SplitResult("toxicity", scored.correct, {}, scored.forwards, metrics=scored.metrics)
    with torch.inference_mode():
        if scoring == "number":
            with contiguous_head_input(model):  # generate keeps one position's logits, a strided slice
                return _score_generation(model, tokenizer, data, batch_size, max_new_tokens or 12, progress)
        if scoring == "loglik":
            return _score_loglik(model, tokenizer, data, batch_size, progress)
        return _score_first_token(model, tokenizer, task, data, scoring, batch_size, progress)


# ------------------------------------------------------------------------------------------------ first token


def _score_first_token(model, tokenizer, task, data, scoring, batch_size, progress) -> SplitResult:
    choice_ids = choice_token_ids(tokenizer, task.choices, prompt=data[0]["prompt"])
    prompts, labels = list(data["prompt"]), list(data["label"])
    predicted = {name: [0] * len(prompts) for name in FIRST_TOKEN_SCORINGS}
    forwards = 0
    for rows, batch in tqdm(list(_left_padded_batches(tokenizer, prompts, batch_size)), desc="scoring",
                            unit="batch", disable=not progress):
        logits = _next_token_logits(model, batch)
        forwards += 1
        greedy_texts = [tokenizer.decode([token]) for token in logits.argmax(-1).tolist()]
        for i, r, g, e in zip(rows, restricted_choice_predictions(logits, choice_ids),
                              greedy_choice_predictions(logits, choice_ids),
                              exact_match_predictions(greedy_texts, task.choices)):
            predicted["restricted"][i], predicted["greedy"][i], predicted["exact"][i] = r, g, e
    results = {name: [p == label for p, label in zip(values, labels)] for name, values in predicted.items()}
    others = {name: results[name] for name in FIRST_TOKEN_SCORINGS if name != scoring}
    return SplitResult(scoring, results[scoring], others, forwards, predicted[scoring])


def _next_token_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [batch, vocab] at the last position of left-padded inputs."""
    return forward_logits(model, batch, keep=1)[:, -1]


# ------------------------------------------------------------------------------------------------ log-likelihood


def _score_loglik(model, tokenizer, data, batch_size, progress) -> SplitResult:
    sequences, spans, owners = [], [], []  # one sequence per (example, option)
    for example, row in enumerate(data):
        prompt_ids = _encode(tokenizer, row["prompt"])
        for option in row["choices"]:
            full = _encode(tokenizer, row["prompt"] + option)
            shared = common_prefix_length(prompt_ids, full)
            if shared == 0 or shared == len(full):
                raise ValueError(f"Example {example}: option {option!r} cannot be scored after its prompt (it adds no "
                                 "token, or the prompt tokenizes to nothing).")
            sequences.append(full)
            spans.append(shared)
            owners.append(example)
    totals = [0.0] * len(sequences)
    forwards = 0
    order = sorted(range(len(sequences)), key=lambda j: -len(sequences[j]))
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", disable=not progress):
        chunk = order[start:start + batch_size]
        batch = pad([sequences[j] for j in chunk], pad_token_id(tokenizer), "left")
        width = batch["input_ids"].shape[1]
        mask = torch.zeros_like(batch["input_ids"])
        for row, j in enumerate(chunk):
            mask[row, width - len(sequences[j]) + spans[j]:] = 1
        logits = forward_logits(model, batch)
        forwards += 1
        for row, value in zip(chunk, continuation_logprobs(logits, batch["input_ids"], mask).tolist()):
            totals[row] = value
    option_logprobs: list[list[float]] = [[] for _ in range(len(data))]
    for owner, total in zip(owners, totals):
        option_logprobs[owner].append(total)
    predicted = loglik_choice_predictions(option_logprobs)
    correct = [p == label for p, label in zip(predicted, data["label"])]
    return SplitResult("loglik", correct, {}, forwards, predicted)


# ------------------------------------------------------------------------------------------------ generation


def _score_generation(model, tokenizer, data, batch_size, max_new_tokens, progress) -> SplitResult:
    prompts, answers = list(data["prompt"]), list(data["answer"])
    texts = [""] * len(prompts)
    forwards = 0
    pad_id = pad_token_id(tokenizer)
    device = input_device(base_model(model))
    for rows, batch in tqdm(list(_left_padded_batches(tokenizer, prompts, batch_size)), desc="generating",
                            unit="batch", disable=not progress):
        width = batch["input_ids"].shape[1]
        output = model.generate(input_ids=batch["input_ids"].to(device),
                                attention_mask=batch["attention_mask"].to(device), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=pad_id)
        forwards += 1
        for i, tokens in zip(rows, output[:, width:]):
            texts[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    correct = generation_correct(texts, answers, stop=STOP_STRINGS)
    return SplitResult("number", correct, {}, forwards)


# ------------------------------------------------------------------------------------------------ batching


def _left_padded_batches(tokenizer, prompts: Sequence[str], batch_size: int):
    """(row indices, batch) pairs over prompts sorted by length, longest first."""
    encoded = [_encode(tokenizer, prompt, special_tokens=True) for prompt in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad_id = pad_token_id(tokenizer)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield rows, pad([encoded[i] for i in rows], pad_id, "left")


def _encode(tokenizer, text: str, special_tokens: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])
