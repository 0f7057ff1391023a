"""Which steer ships: the rule that picks one cell of a sweep, or none, from per-example results against vanilla.

A sweep compares dozens of cells on a small labelled split; the most accurate cell is then mostly the luckiest one,
and on tasks where the unsteered model is decent it is often worse than no steer on test. This module holds the rule
that replaces "ship the most accurate cell", for every method alike (AUSteer's (k, α), block-level's α, CAA's layer
and multiplier, and the held-out pairs of the automatic (k, α)). It sees only lists of per-example right/wrong
results (validation examples, or held-out pairs scored right when they prefer their positive continuation) and a
simplicity order of the cells, so it knows nothing about models and is tested on plain lists.

The rule, fixed before any test split was looked at (the reasons are in bench/RESULTS.md, "Selection"):

1. **One standard error.** Each cell's gain is the mean paired difference ``right(cell) - right(vanilla)`` over the
   examples. Among the cells with a positive gain no more than one standard error (of the best cell's gain) below
   the best gain, take the simplest (fewest steered units, then the smaller strength). No cell with a positive
   gain: no steer.
2. **Does the choice survive examples it did not see?** Step 1 is run ``folds`` times, each time on all examples but
   one fold, and its choice is scored on that fold; each example is scored once, by a choice that did not see it.
   Only if these out-of-fold results beat vanilla by an exact one-sided sign test at ``level`` (default 0.05) does the
   choice of step 1 on all examples ship. Otherwise nothing ships: "no steer beats vanilla on this data".

Step 2 accounts for both the noise of a small split and the selection among many cells, which a plain paired test
of the chosen cell on the examples that chose it does not. It costs no forward pass: every cell is already scored
on every example.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

SELECTION_FOLDS = 5
SELECTION_LEVEL = 0.05
NO_STEER_NOTE = "no steer beats vanilla on this data"


@dataclass(frozen=True)
class Candidate:
    """One cell: its settings (``key``), its per-example results, and its place in the simplicity order (``cost``:
    smaller is simpler, e.g. ``(num_aus, alpha)``)."""

    key: Hashable
    correct: Sequence[bool] = field(repr=False)
    cost: tuple


@dataclass
class Selection:
    """What the rule decided and the figures it decided on (all gains are fractions of the examples)."""

    chosen: Optional[Hashable]  # the key of the cell that ships; None: no steer
    most_accurate: Hashable  # the old rule's cell (highest accuracy; ties to the simpler), for reference
    num_examples: int
    gain: float  # chosen cell's mean gain over vanilla on all examples (0 when nothing ships)
    out_of_fold_gain: float  # step 2: mean gain of the out-of-fold choices
    wins: int  # step 2: examples the out-of-fold choices got right and vanilla wrong
    losses: int  # ... and wrong where vanilla was right
    p_value: float  # step 2: one-sided exact sign test of wins against losses
    folds: int
    level: float
    rule: str = "guarded"  # "most-accurate": the old rule, asked for explicitly; the checks are then only reported

    @property
    def shipped(self) -> bool:
        return self.chosen is not None

    @property
    def note(self) -> str:
        if self.rule == "most-accurate":
            return (f"shipped unchecked (selection='most-accurate'): the guarded rule would "
                    f"{'also ship a steer' if self.p_value < self.level else 'ship no steer'} (out-of-fold gain "
                    f"{100 * self.out_of_fold_gain:+.1f} points, p = {self.p_value:.2g})")
        if self.shipped:
            return (f"shipped: out-of-fold gain {100 * self.out_of_fold_gain:+.1f} points over vanilla "
                    f"({self.wins} wins, {self.losses} losses, p = {self.p_value:.2g} < {self.level})")
        return (f"not shipped: {NO_STEER_NOTE} (out-of-fold gain {100 * self.out_of_fold_gain:+.1f} points, "
                f"{self.wins} wins, {self.losses} losses, p = {self.p_value:.2g}, needs < {self.level})")

    def as_dict(self) -> dict:
        return {"shipped": self.shipped, "chosen": self.chosen, "most_accurate": self.most_accurate,
                "num_examples": self.num_examples, "gain": round(self.gain, 6),
                "out_of_fold_gain": round(self.out_of_fold_gain, 6), "wins": self.wins, "losses": self.losses,
                "p_value": self.p_value, "folds": self.folds, "level": self.level, "rule": self.rule,
                "note": self.note}


SELECTION_RULES = ("guarded", "most-accurate")


def guarded_choice(candidates: Sequence[Candidate], vanilla: Sequence[bool], *,
                   choose: Optional[Callable[[np.ndarray], Optional[Hashable]]] = None, folds: int = SELECTION_FOLDS,
                   level: float = SELECTION_LEVEL, seed: int = 0, rule: str = "guarded") -> Selection:
    """Apply the rule of this module to ``candidates`` scored on the same examples as ``vanilla``.

    ``choose`` replaces step 1: given example indices it returns the key of the cell it would pick from those
    examples alone (or None). The automatic (k, α) passes its own criterion here, so step 2 checks that criterion.
    ``rule="most-accurate"`` ships the most accurate cell whatever the checks say (the rule before this module, for
    comparisons and tests); the checks are still computed and reported."""
    if rule not in SELECTION_RULES:
        raise ValueError(f"Unknown selection rule {rule!r}; choose 'guarded' (the default: no steer unless it beats "
                         "vanilla out of fold) or 'most-accurate' (the most accurate cell, unchecked).")
    if not candidates:
        raise ValueError("guarded_choice needs at least one candidate cell.")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"`folds` must be an integer >= 2 (the rule scores its choice out of fold), got {folds!r}.")
    if not 0 < level < 1:
        raise ValueError(f"`level` must be a significance level between 0 and 1, got {level!r}.")
    base = np.asarray(vanilla, dtype=np.int8)
    diffs = {}
    for candidate in candidates:
        right = np.asarray(candidate.correct, dtype=np.int8)
        if right.shape != base.shape:
            raise ValueError(f"Cell {candidate.key!r} has {right.size} results but vanilla has {base.size}; score "
                             "every cell on the same examples.")
        diffs[candidate.key] = right - base  # [n] in {-1, 0, 1}
    if base.size < 2:
        raise ValueError(f"{base.size} example(s) cannot show that a steer beats vanilla; use a larger validation "
                         "split (hundreds of examples where the data allow).")
    folds = min(folds, int(base.size))  # fewer examples than folds: one example per fold

    order = sorted(candidates, key=lambda c: c.cost)  # simplest first
    if choose is None:
        choose = functools.partial(one_standard_error_choice, order, diffs)
    everything = np.arange(base.size)
    chosen = choose(everything)

    held_out = np.zeros(base.size, dtype=np.int8)  # out-of-fold paired differences
    permutation = np.random.default_rng(seed).permutation(base.size)
    for fold in np.array_split(permutation, folds):
        inner = np.setdiff1d(everything, fold)
        fold_choice = choose(inner)
        if fold_choice is not None:
            held_out[fold] = diffs[fold_choice][fold]
    wins, losses = int((held_out > 0).sum()), int((held_out < 0).sum())
    p_value = sign_test_greater(wins, losses)
    most_accurate = max(enumerate(order), key=lambda item: (int(diffs[item[1].key].sum()), -item[0]))[1].key
    if rule == "most-accurate":
        chosen = most_accurate
    elif chosen is not None and p_value >= level:
        chosen = None
    return Selection(chosen, most_accurate, int(base.size), 0.0 if chosen is None else float(diffs[chosen].mean()),
                     float(held_out.mean()), wins, losses, p_value, folds, level, rule)


def one_standard_error_choice(order: Sequence[Candidate], diffs: dict, rows: np.ndarray) -> Optional[Hashable]:
    """Step 1 on the examples ``rows``: the simplest cell (``order`` is simplest first) with a positive mean gain
    within one standard error of the best gain; None when no cell gains."""
    gains = {c.key: float(diffs[c.key][rows].mean()) for c in order}
    best = max(order, key=lambda c: gains[c.key])  # max keeps the first (simplest) of equal gains
    if gains[best.key] <= 0:
        return None
    best_diffs = diffs[best.key][rows].astype(np.float64)
    standard_error = float(best_diffs.std(ddof=1) / math.sqrt(rows.size)) if rows.size > 1 else 0.0
    threshold = gains[best.key] - standard_error
    return next(c.key for c in order if gains[c.key] > 0 and gains[c.key] >= threshold)


def sign_test_greater(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(X >= wins) for X ~ Binomial(wins + losses, 1/2); 1.0 with no discordant example."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(wins, n + 1)) / (1 << n)  # int / int: correctly rounded
