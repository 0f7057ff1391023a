"""Automatic (k, α) without a labelled validation set: hold out the pairs one at a time, count momentum on the others,
and pick the cell under which the held-out pairs' positive continuations gain most over their negative ones.

Holding out costs no extra pass: each held-out pair and the pairs never held out are counted once, and since counts
are sums over pairs, a held-out pair's steer comes from ``all counts - its counts`` (:class:`MomentumScores` adds and
subtracts). Up to 128 pairs are held out, with the mix of answers of all pairs; the chosen cell's adapter uses the
counts of all pairs.

One pair at a time is the default because a steer at large α can hang on single AUs, and folds of many pairs change
many of them. On SmolLM2 BoolQ ffn at (k, α) = (64, 20), the steers counted without a fold of 32 pairs (4 folds)
kept only 36 to 45 of the shipped 64 AUs and scored 39.5 to 50 % on test against the shipped steer's 55 %, and
swapping 1 or 2 AUs for others of equal score moved it to between 45.5 and 55.5 %. Held-out scores of such steers
cannot rank the cells of the one that ships. Leaving out one pair moves each count by at most one, and the held-out
steers kept a median 62 of the 64 AUs; the held-out accuracy of that cell was 59.4 % against 59.0 % on test. ``folds``
still takes a number of folds.

Per held-out pair the margin is ``m = log p(positive continuation) - log p(negative continuation)``, the continuation
being what follows the two texts' common token prefix (the answer, for ``(prompt, chosen, rejected)`` pairs). Three
criteria over the pairs:

* ``"accuracy"`` (default): the share of held-out pairs with ``m > 0``, ties broken by the preference below. It
  counts only pairs the steer gets right, and is coarse with few held-out pairs.
* ``"preference"``: the mean of ``log σ(m)``, the held-out log-likelihood that the positive continuation is preferred
  (Bradley–Terry). A steer that helps some pairs a lot and hurts others a lot gains little, but shrinking a confident
  wrong margin without flipping it gains much (−3 → 0 gains 2.4, 0 → +3 only 0.6).
* ``"margin"``: the plain mean of ``m``. It can be raised by pushing every pair toward one answer when the held-out
  pairs' answers are unbalanced; on SST-2 with SmolLM2 it chose such a steer (attention k=4, α=50: 60.1 % test
  accuracy against 78.6 % unsteered).

The default is the criterion whose chosen cells score best on the labelled validation splits of SmolLM2 SST-2, COPA
and BoolQ (attention and ffn), which the choice itself never sees: 61.3 % against 59.7 % for the preference and
54.0 % for the margin. Its cells are on average 1.2 points above the labelled sweep's on test (bench/RESULTS.md).

Every cell reuses the one counting pass, and every cell's held-out margins are kept, so one run answers every
criterion (:meth:`AutoChoice.best`); ties go to fewer AUs, then to the smaller α. The grid (k in 1, 4, 16, 64; α in
5..100) is coarser than the sweep's because each cell scores every held-out pair.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import inputs
from .logprobs import continuation_logprobs, forward_logits
from .scores import MomentumScores, check_alpha
from .selection import Candidate, Selection, guarded_choice

MAX_HELDOUT_PAIRS = 128  # every cell scores each held-out pair once, so this bounds the cost
MIN_PAIRS_PER_SIDE = 8
# Coarser than the sweep's 8 x 7 grid: each cell costs one scoring of up to 128 pairs instead of a lookup.
AUTO_KS = (1, 4, 16, 64)
AUTO_ALPHAS = (5, 10, 20, 50, 100)


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
    selection: Optional[Selection] = None  # whether (k, α) shipped: the no-harm check on the held-out pairs

    @property
    def shipped(self) -> bool:
        return self.selection is None or self.selection.shipped

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


def split_folds(text_pairs: Sequence[tuple[str, str]], folds: Optional[int] = None,
                max_heldout: int = MAX_HELDOUT_PAIRS, seed: int = 0) -> tuple[list, list[list]]:
    """(pairs never held out, the held-out folds): a seeded order that keeps the mix of answers; its first
    ``min(N, max_heldout)`` pairs are cut into ``folds`` near-equal folds, each held out once while the counts come
    from all other pairs. ``folds=None`` (the default) holds out one pair at a time (leave-one-out)."""
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 2):
        raise ValueError(f"The number of folds must be an integer >= 2, or None for one fold per held-out pair; got "
                         f"{folds!r}.")
    if isinstance(max_heldout, bool) or not isinstance(max_heldout, int) or max_heldout < (folds or 2):
        raise ValueError(f"At most `max_heldout` pairs are held out, one fold at a time; it must be an integer of at "
                         f"least the number of folds ({folds or 2}), got {max_heldout!r}.")
    n = len(text_pairs)
    n_heldout = min(n, max_heldout)
    folds = folds or n_heldout
    largest_fold = -(-n_heldout // folds)
    if n < 2 * MIN_PAIRS_PER_SIDE or n - largest_fold < MIN_PAIRS_PER_SIDE:
        raise ValueError(f"Automatic (k, α) needs at least {2 * MIN_PAIRS_PER_SIDE} pairs (each fold held out is "
                         f"scored while at least {MIN_PAIRS_PER_SIDE} others are counted); got {n}. Give more pairs "
                         "or set k and alpha.")
    order = _stratified_order(text_pairs, np.random.default_rng(seed))
    heldout = np.array_split(np.array(order[:n_heldout]), folds)  # consecutive stretches keep the mix too
    return [text_pairs[i] for i in order[n_heldout:]], [[text_pairs[i] for i in fold] for fold in heldout]


def _stratified_order(text_pairs: Sequence[tuple[str, str]], rng: np.random.Generator) -> list[int]:
    """A random order of the pairs in which every prefix keeps the mix of positive answers of all pairs (within one).

    A steer often works by moving the model toward one answer; held-out pairs with another mix of answers than the
    task's would score that move wrongly (a plain draw of 128 of SmolLM2's 300 BoolQ fit pairs held out 50 % "yes"
    against 62 % of all). Pairs are grouped by their positive continuation (the text after the common prefix);
    each group is spread evenly over the order (systematic sampling with a random offset). Pairs whose continuations
    are all different (COPA's sentences) get a plain random order."""
    groups: dict[str, list[int]] = {}
    for i, (positive, negative) in enumerate(text_pairs):
        groups.setdefault(positive[inputs.common_prefix_length(positive, negative):], []).append(i)
    keys = np.empty(len(text_pairs))
    for members in groups.values():
        keys[rng.permutation(members)] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.argsort(keys, kind="stable").tolist()


def choose_k_alpha(model: nn.Module, tokenizer: Any, scores: MomentumScores,
                   folds: Sequence[tuple[MomentumScores, Sequence[tuple[str, str]]]],
                   ks: Sequence[int] = AUTO_KS, alphas: Sequence[float] = AUTO_ALPHAS, *,
                   criterion: str = DEFAULT_CRITERION, batch_size: int = 16, adapter_name: str = "default",
                   progress: bool = True):
    """Score every (k, α) cell on the held-out folds by ``criterion`` and leave the best one set from ``scores``.

    ``scores`` are the counts of all pairs; each fold is ``(its own pairs' counts, its pairs)``, and its pairs are
    scored under an adapter selected from ``scores - fold counts``, so no pair is scored by a steer counted on it.
    Returns ``(AutoChoice, peft_model)``; ``model`` is the base model the scores were counted on (or a PeftModel
    holding it)."""
    _check_criterion(criterion)  # before any forward pass
    ks = sorted({k for k in ks if k <= scores.num_aus})
    alphas = [check_alpha(alpha) for alpha in alphas]
    if not ks:
        raise ValueError(f"No k of the grid fits the {scores.num_aus} candidate AUs; use smaller values of k.")
    counted = [scores - fold_counts for fold_counts, _ in folds]  # refuses a fold with more pairs or counts
    scorers = [_MarginScorer(model, tokenizer, pairs, batch_size) for _, pairs in folds]
    peft_model = scores.to_adapter(ks[0], alphas[0], model, adapter_name=adapter_name)

    def margins_of(select: Any) -> torch.Tensor:
        per_fold = []
        for fold_scores, margin_of in zip(counted, scorers):
            if select is not None:
                peft_model.set_aus(select(fold_scores), adapter_name=adapter_name)
            per_fold.append(margin_of(peft_model))
        return torch.cat(per_fold)

    with inputs.unsteered(peft_model):
        vanilla = margins_of(None)
    margins = {}
    for k, alpha in tqdm([(k, a) for k in ks for a in alphas], desc="automatic (k, α)", unit="cell",
                         disable=not progress):
        margins[k, alpha] = margins_of(lambda fold_scores: fold_scores.select(k, alpha))
    k, alpha = best_cell(margins, criterion)
    # No harm: the criterion's choice ships only if, made without each fold of held-out pairs in turn, it gets more
    # of that fold's pairs right than the unsteered model (austeer_peft.fitting.selection).
    selection = guarded_choice(
        [Candidate(cell, (m > 0).tolist(), cell) for cell, m in margins.items()], (vanilla > 0).tolist(),
        choose=lambda rows: best_cell({cell: m[torch.as_tensor(rows)] for cell, m in margins.items()}, criterion))
    if selection.shipped:
        peft_model.set_aus(scores.select(k, alpha), adapter_name=adapter_name)
        config = peft_model.peft_config[adapter_name]
        config.k, config.alpha = k, alpha
    else:
        peft_model.set_aus([], adapter_name=adapter_name)
        warnings.warn(f"Automatic (k, α): {selection.note}; the adapter steers nothing. The held-out pairs' "
                      "margins of every cell are in FitResult.auto.", stacklevel=3)
    choice = AutoChoice(k, alpha, criterion, len(vanilla), {cell: m.tolist() for cell, m in margins.items()},
                        vanilla.tolist(), selection)
    return choice, peft_model


class _MarginScorer:
    """Held-out margins of a model, one per pair: the pairs are tokenized and batched once, then scored per cell.

    A pair whose two continuations are one token each (" yes" / " no", " A" / " B") is scored from one forward of
    the common prefix, reading both tokens' log-probabilities at its last position; in a causal model that equals
    scoring the two full texts, at half the cost. Other pairs forward both texts."""

    def __init__(self, model: nn.Module, tokenizer: Any, heldout: Sequence[tuple[str, str]], batch_size: int):
        base = inputs.base_model(model)
        token_pairs = inputs.tokenize_pairs(tokenizer, list(heldout),
                                            max_length=inputs.resolve_max_length(None, tokenizer, base))
        # Per forwarded sequence: its tokens, where its scored continuation starts, and for a shared prefix the
        # (positive, negative) next tokens. Per pair: the rows of its positive and negative texts (one row twice
        # for a shared prefix).
        sequences, starts, next_tokens, pair_rows, skipped = [], [], [], [], 0
        for positive, negative in token_pairs:
            shared = max(inputs.common_prefix_length(positive, negative), 1)  # no logit predicts the first token
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
        self.sequences, self.starts, self.next_tokens = sequences, starts, next_tokens
        self.batches = _length_batches([len(sequence) for sequence in sequences], 2 * batch_size)
        self.positive_rows = torch.tensor([rows[0] for rows in pair_rows])
        self.negative_rows = torch.tensor([rows[1] for rows in pair_rows])
        self.two_texts = self.positive_rows != self.negative_rows
        self.pad_id = inputs.pad_token_id(tokenizer)
        self.forwarded_rows = 0  # sequences run through the model so far (tests count them)

    @torch.inference_mode()
    def __call__(self, model: nn.Module) -> torch.Tensor:
        # Per row: a text's summed continuation log-probability, or for a shared prefix the margin itself.
        values = torch.zeros(len(self.sequences), dtype=torch.float64)
        for rows in self.batches:
            batch = inputs.pad([self.sequences[r] for r in rows], self.pad_id, "left")
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


def _length_batches(lengths: list[int], max_rows: int) -> list[list[int]]:
    """Row indices in batches of similar length: sorted by length, at most ``max_rows`` rows, and at most as many
    padded tokens as ``max_rows`` rows of the mean length (BoolQ's passages run from ~60 to ~600 tokens; one batch
    of 32 padded to the longest was 2.5 times the real tokens)."""
    budget = max_rows * sum(lengths) / len(lengths)
    batches, current = [], []
    for row in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and (len(current) == max_rows or (len(current) + 1) * lengths[row] > budget):
            batches.append(current)
            current = []
        current.append(row)
    return batches + [current]
