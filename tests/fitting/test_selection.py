"""The rule that decides which steer ships (austeer_peft.fitting.selection), on plain per-example result lists."""

from __future__ import annotations

import math

import numpy as np
import pytest

from austeer_peft.fitting.selection import (
    NO_STEER_NOTE, Candidate, guarded_choice, one_standard_error_choice, sign_test_greater,
)


def flips(vanilla, wins, losses, rng):
    """``vanilla`` with ``wins`` wrong answers made right and ``losses`` right answers made wrong, at random rows."""
    right = np.array(vanilla, dtype=bool)
    wrong_rows, right_rows = np.flatnonzero(~right), np.flatnonzero(right)
    right[rng.choice(wrong_rows, wins, replace=False)] = True
    right[rng.choice(right_rows, losses, replace=False)] = False
    return right.tolist()


def test_sign_test_is_the_binomial_tail():
    assert sign_test_greater(0, 0) == 1.0
    assert sign_test_greater(5, 0) == 1 / 32
    assert sign_test_greater(0, 5) == 1.0
    assert sign_test_greater(7, 3) == pytest.approx(sum(math.comb(10, i) for i in range(7, 11)) / 1024)


def test_one_standard_error_takes_the_simplest_cell_near_the_best():
    diffs = {"simple": np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0]),  # gain 0.2
             "complex": np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0]),  # gain 0.3, standard error ~0.15
             "useless": np.zeros(10, dtype=int)}
    order = [Candidate("useless", [], (0,)), Candidate("simple", [], (1,)), Candidate("complex", [], (2,))]
    assert one_standard_error_choice(order, diffs, np.arange(10)) == "simple"  # useless has no gain: never chosen
    diffs["simple"] = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, -1])  # gain 0: out
    assert one_standard_error_choice(order, diffs, np.arange(10)) == "complex"
    diffs = {key: -np.abs(value) for key, value in diffs.items()}
    assert one_standard_error_choice(order, diffs, np.arange(10)) is None


def test_the_luckiest_of_many_noisy_cells_does_not_ship():
    """56 cells that each swap a few answers at random on 50 examples: the most accurate is 'better' than vanilla,
    as in the SST-2 sweeps, but its choice does not survive the folds it did not see."""
    rng = np.random.default_rng(0)
    vanilla = (rng.random(50) < 0.8).tolist()
    cells = [Candidate((k, a), flips(vanilla, rng.integers(0, 6), rng.integers(0, 6), rng), (k, a))
             for k in range(8) for a in range(7)]
    selection = guarded_choice(cells, vanilla)
    most_accurate = next(c for c in cells if c.key == selection.most_accurate)
    assert sum(most_accurate.correct) > sum(vanilla)  # the old rule would ship a "gain"
    assert not selection.shipped and selection.chosen is None and selection.gain == 0.0
    assert NO_STEER_NOTE in selection.note and selection.p_value >= selection.level


def test_a_real_gain_ships_the_simplest_cell_that_carries_it():
    rng = np.random.default_rng(1)
    vanilla = (rng.random(200) < 0.5).tolist()
    strong = flips(vanilla, 50, 5, rng)
    cells = [Candidate((1, 5.0), flips(vanilla, 3, 3, rng), (1, 5.0)),
             Candidate((16, 10.0), strong, (16, 10.0)),
             Candidate((64, 10.0), flips(strong, 1, 0, rng), (64, 10.0))]  # one example better, four times the AUs
    selection = guarded_choice(cells, vanilla)
    assert selection.shipped and selection.chosen == (16, 10.0) and selection.most_accurate == (64, 10.0)
    assert selection.gain == pytest.approx(45 / 200) and selection.p_value < 1e-6
    assert selection.as_dict()["shipped"] is True and "shipped" in selection.note


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="same examples"):
        guarded_choice([Candidate("a", [True, False], (0,))], [True, False, True])
    with pytest.raises(ValueError, match="folds"):
        guarded_choice([Candidate("a", [True] * 10, (0,))], [False] * 10, folds=1)
    with pytest.raises(ValueError, match="larger validation split"):
        guarded_choice([Candidate("a", [True], (0,))], [False])
    # Fewer examples than folds: one example per fold; four wins cannot reach p < 0.05 (1/16), five can (1/32).
    assert guarded_choice([Candidate("a", [True] * 4, (0,))], [False] * 4).folds == 4
    assert not guarded_choice([Candidate("a", [True] * 4, (0,))], [False] * 4).shipped
    assert guarded_choice([Candidate("a", [True] * 5, (0,))], [False] * 5).shipped
    with pytest.raises(ValueError, match="at least one"):
        guarded_choice([], [True])


def test_a_given_choice_rule_is_checked_out_of_fold():
    """``choose`` replaces the one-standard-error step (the automatic (k, α) passes its criterion): the check scores
    what that rule picks without each fold."""
    rng = np.random.default_rng(3)
    vanilla = (rng.random(100) < 0.5).tolist()
    good, bad = Candidate("good", flips(vanilla, 30, 0, rng), (1,)), Candidate("bad", flips(vanilla, 0, 30, rng), (0,))
    seen = []

    def always(name):
        return lambda rows: seen.append(len(rows)) or name

    assert guarded_choice([good, bad], vanilla, choose=always("good")).chosen == "good"
    assert sorted(set(seen)) == [80, 100]  # four fifths of the examples per fold, then all of them
    assert not guarded_choice([good, bad], vanilla, choose=always("bad")).shipped
