"""Automatic (k, α) without a labelled validation set: hold out a share of the pairs, count momentum on the rest, and
pick the cell under which the held-out pairs' positive continuations gain most over their negative ones.

Per held-out pair the margin is ``m = log p(positive continuation) - log p(negative continuation)``, the continuation
being what follows the two texts' common token prefix (the answer, for ``(prompt, chosen, rejected)`` pairs). Three
criteria over the pairs:

* ``"accuracy"`` (default): the share of held-out pairs with ``m > 0``, ties broken by the preference below. It
  counts only pairs the steer gets right, and is coarse with few held-out pairs (32 at most: steps of 3 points).
* ``"preference"``: the mean of ``log σ(m)``, the held-out log-likelihood that the positive continuation is preferred
  (Bradley–Terry). A steer that helps some pairs a lot and hurts others a lot gains little, but shrinking a confident
  wrong margin without flipping it gains much (−3 → 0 gains 2.4, 0 → +3 only 0.6).
* ``"margin"``: the plain mean of ``m``. It can be raised by pushing every pair toward one answer when the held-out
  pairs' answers are unbalanced; on SST-2 with SmolLM2 it chose such a steer (attention k=8, α=100: 50.9 % test
  accuracy against 78.6 % unsteered).

The default is the criterion whose chosen cells scored best on the labelled validation splits of SmolLM2 SST-2, COPA
and BoolQ (attention and ffn), which the choice itself never sees; it was only just ahead of the preference (57.3 %
against 57.0 % mean validation accuracy), and neither came within a point of the labelled sweep on test
(bench/RESULTS.md).

Every cell reuses the one momentum table, and every cell's held-out margins are kept, so one pass answers every
criterion (:meth:`AutoChoice.best`); ties go to fewer AUs, then to the smaller α.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .evaluate.scoring import continuation_logprobs
from .evaluate.runner import _pad_left, forward_logits
from .fit import _base_model, _max_length, _pad_token_id, tokenize_pairs
from .momentum import MomentumScores, _check_alpha
from .sweep import DEFAULT_ALPHAS, DEFAULT_KS

DEFAULT_HOLDOUT = 0.2
MIN_HOLDOUT_PAIRS = 8
MAX_HOLDOUT_PAIRS = 32  # every cell scores them once, so this bounds the cost (about one 64-example evaluation)


CRITERIA = ("accuracy", "preference", "margin")
DEFAULT_CRITERION = "accuracy"


@dataclass
class AutoChoice:
    """The chosen cell, the criterion that chose it, and every cell's held-out margins (one per scored pair) next to
    the unsteered model's; the criterion values, accuracies and mean margins are read off them."""

    k: int
    alpha: float
    criterion: str
    num_heldout: int
    heldout_margins: dict[tuple[int, float], list[float]]
    vanilla_margins: list[float]

    @property
    def score(self) -> float:
        return criterion_key(self._chosen, self.criterion)[0]

    @property
    def vanilla_score(self) -> float:
        return criterion_key(self._vanilla, self.criterion)[0]

    @property
    def accuracy(self) -> float:
        return _accuracy(self._chosen)

    @property
    def vanilla_accuracy(self) -> float:
        return _accuracy(self._vanilla)

    @property
    def margin(self) -> float:
        return float(self._chosen.mean())

    @property
    def vanilla_margin(self) -> float:
        return float(self._vanilla.mean())

    @property
    def cells(self) -> list[tuple[int, float, float]]:
        """Every cell as ``(k, α, criterion value)``."""
        return [(k, alpha, criterion_key(_as_tensor(margins), self.criterion)[0])
                for (k, alpha), margins in self.heldout_margins.items()]

    def best(self, criterion: str) -> tuple[int, float]:
        """The cell ``criterion`` would choose from the same held-out margins (no forward pass)."""
        return best_cell({cell: _as_tensor(m) for cell, m in self.heldout_margins.items()}, criterion)

    @property
    def _chosen(self) -> torch.Tensor:
        return _as_tensor(self.heldout_margins[self.k, self.alpha])

    @property
    def _vanilla(self) -> torch.Tensor:
        return _as_tensor(self.vanilla_margins)


def _as_tensor(margins: list[float]) -> torch.Tensor:
    return torch.tensor(margins, dtype=torch.float64)  # as scored: the ranking sees the same values


def best_cell(margins: dict[tuple[int, float], torch.Tensor], criterion: str) -> tuple[int, float]:
    """The ``(k, α)`` whose held-out margins rank highest by ``criterion``; ties go to fewer AUs, then smaller α."""
    return max(margins, key=lambda cell: (*criterion_key(margins[cell], criterion), -cell[0], -cell[1]))


def criterion_key(margins: torch.Tensor, criterion: str) -> tuple[float, ...]:
    """What ``criterion`` maximises over one cell's held-out margins; its first entry is the reported value."""
    _check_criterion(criterion)
    preference = float(torch.nn.functional.logsigmoid(margins).mean())
    if criterion == "margin":
        return (float(margins.mean()),)
    if criterion == "accuracy":
        return (_accuracy(margins), preference)
    return (preference,)


def _check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"Unknown criterion {criterion!r}; expected one of {', '.join(CRITERIA)}.")


def _accuracy(margins: torch.Tensor) -> float:
    return float((margins > 0).double().mean())


def split_holdout(text_pairs: Sequence[tuple[str, str]], share: float = DEFAULT_HOLDOUT, seed: int = 0
                  ) -> tuple[list, list]:
    """(pairs to count on, held-out pairs): a seeded permutation; ``share`` of the pairs (8 to 32) are held out."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"The held-out share must be between 0 and 1, got {share!r}.")
    n = len(text_pairs)
    n_heldout = min(MAX_HOLDOUT_PAIRS, max(MIN_HOLDOUT_PAIRS, round(share * n)))
    if n - n_heldout < MIN_HOLDOUT_PAIRS:
        raise ValueError(f"Automatic (k, α) needs at least {2 * MIN_HOLDOUT_PAIRS} pairs ({MIN_HOLDOUT_PAIRS} held out "
                         f"and {MIN_HOLDOUT_PAIRS} to count on); got {n}. Give more pairs or set k and alpha.")
    order = np.random.default_rng(seed).permutation(n).tolist()
    return [text_pairs[i] for i in order[n_heldout:]], [text_pairs[i] for i in order[:n_heldout]]


def choose_k_alpha(model: nn.Module, tokenizer: Any, scores: MomentumScores, heldout: Sequence[tuple[str, str]],
                   ks: Sequence[int] = DEFAULT_KS, alphas: Sequence[float] = DEFAULT_ALPHAS, *,
                   criterion: str = DEFAULT_CRITERION, batch_size: int = 16, adapter_name: str = "default",
                   progress: bool = True):
    """Score every (k, α) cell on the held-out pairs by ``criterion`` and leave the best one set. Returns
    ``(AutoChoice, peft_model)``; ``model`` is the base model the scores were counted on (or a PeftModel holding it)."""
    _check_criterion(criterion)  # before any forward pass
    ks = sorted({k for k in ks if k <= scores.num_aus})
    alphas = [_check_alpha(alpha) for alpha in alphas]
    if not ks:
        raise ValueError(f"No k of the grid fits the {scores.num_aus} candidate AUs; use smaller values of k.")
    margin_of = _MarginScorer(model, tokenizer, heldout, batch_size)
    peft_model = scores.to_adapter(ks[0], alphas[0], model, adapter_name=adapter_name)
    with peft_model.disable_adapter():
        vanilla = margin_of(peft_model)
    margins = {}
    for k, alpha in tqdm([(k, a) for k in ks for a in alphas], desc="automatic (k, α)", unit="cell",
                         disable=not progress):
        peft_model.set_aus(scores.select(k, alpha), adapter_name=adapter_name)
        margins[k, alpha] = margin_of(peft_model)
    k, alpha = best_cell(margins, criterion)
    peft_model.set_aus(scores.select(k, alpha), adapter_name=adapter_name)
    config = peft_model.peft_config[adapter_name]
    config.k, config.alpha = k, alpha
    choice = AutoChoice(k, alpha, criterion, len(heldout), {cell: m.tolist() for cell, m in margins.items()},
                        vanilla.tolist())
    return choice, peft_model


class _MarginScorer:
    """Held-out margins of a model, one per pair: the pairs are tokenized and batched once, then scored per cell.

    A pair whose two continuations are one token each (" yes" / " no", " A" / " B") is scored from one forward of
    the common prefix, reading both tokens' log-probabilities at its last position; in a causal model that equals
    scoring the two full texts, at half the cost. Other pairs forward both texts."""

    def __init__(self, model: nn.Module, tokenizer: Any, heldout: Sequence[tuple[str, str]], batch_size: int):
        base = _base_model(model)
        token_pairs = tokenize_pairs(tokenizer, list(heldout), max_length=_max_length(None, tokenizer, base))
        # Per forwarded sequence: its tokens, where its scored continuation starts, and for a shared prefix the
        # (positive, negative) next tokens. Per pair: the rows of its positive and negative texts (one row twice
        # for a shared prefix).
        sequences, starts, next_tokens, pair_rows, skipped = [], [], [], [], 0
        for positive, negative in token_pairs:
            shared = 0
            while shared < min(len(positive), len(negative)) and positive[shared] == negative[shared]:
                shared += 1
            shared = max(shared, 1)  # the first token has no logit predicting it
            if shared >= len(positive) or shared >= len(negative):
                skipped += 1  # one text is a prefix of the other: no two continuations to compare
                continue
            if len(positive) == len(negative) == shared + 1:
                pair_rows.append((len(sequences), len(sequences)))
                sequences.append(positive[:shared])
                starts.append(shared)
                next_tokens.append((positive[shared], negative[shared]))
            else:
                pair_rows.append((len(sequences), len(sequences) + 1))
                sequences += [positive, negative]
                starts += [shared, shared]
                next_tokens += [None, None]
        if not sequences:
            raise ValueError("In no held-out pair do both texts continue past their common prefix (one is a prefix of "
                             "the other); use (prompt, chosen, rejected) pairs with different non-empty answers.")
        if skipped:
            warnings.warn(f"{skipped} of {len(token_pairs)} held-out pairs are skipped: one text is a prefix of the "
                          "other, so there are no two continuations to compare.", stacklevel=3)
        self.sequences, self.starts, self.next_tokens, self.batch_size = sequences, starts, next_tokens, batch_size
        self.positive_rows = torch.tensor([rows[0] for rows in pair_rows])
        self.negative_rows = torch.tensor([rows[1] for rows in pair_rows])
        self.two_texts = self.positive_rows != self.negative_rows
        self.pad_id = _pad_token_id(tokenizer)
        self.forwarded_rows = 0  # sequences run through the model so far (tests count them)

    @torch.inference_mode()
    def __call__(self, model: nn.Module) -> torch.Tensor:
        # Per row: a text's summed continuation log-probability, or for a shared prefix the margin itself.
        values = torch.zeros(len(self.sequences), dtype=torch.float64)
        for start in range(0, len(self.sequences), 2 * self.batch_size):
            rows = list(range(start, min(start + 2 * self.batch_size, len(self.sequences))))
            batch = _pad_left([self.sequences[r] for r in rows], self.pad_id)
            width = batch["input_ids"].shape[1]
            # The continuation plus the position before it; a shared prefix needs its last position only.
            window = max(1 if self.next_tokens[r] else len(self.sequences[r]) - self.starts[r] + 1 for r in rows)
            continuation = torch.zeros_like(batch["input_ids"])
            for i, r in enumerate(rows):
                if self.next_tokens[r] is None:
                    continuation[i, width - len(self.sequences[r]) + self.starts[r]:] = 1
            logits = forward_logits(model, batch, keep=window)
            self.forwarded_rows += len(rows)
            totals = continuation_logprobs(logits, batch["input_ids"][:, -window:], continuation[:, -window:])
            last = torch.log_softmax(logits[:, -1].double(), dim=-1)
            for i, r in enumerate(rows):
                if self.next_tokens[r] is None:
                    values[r] = totals[i]
                else:
                    chosen, rejected = self.next_tokens[r]
                    values[r] = last[i, chosen] - last[i, rejected]
        return values[self.positive_rows] - torch.where(self.two_texts, values[self.negative_rows], 0.0)
