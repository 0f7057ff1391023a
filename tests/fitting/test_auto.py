"""Automatic (k, α): the held-out margin against a per-pair reference, the choice over folds, and the fold split."""

from __future__ import annotations

import pytest
import torch
from conftest import char_tokenizer, random_pairs, tiny_model

from austeer_peft import compute_momentum, fit_austeer
from austeer_peft.fitting.auto import CRITERIA, _length_batches, _MarginScorer, best_cell, choose_k_alpha, split_folds


def reference_margins(model, tokenizer, pairs) -> torch.Tensor:
    """Per pair, unbatched: summed log-probability of each text's tokens after the common prefix, positive - negative."""
    margins = []
    for positive, negative in pairs:
        ids = [tokenizer(text)["input_ids"] for text in (positive, negative)]
        shared = 0
        while ids[0][shared] == ids[1][shared]:
            shared += 1
        totals = []
        for sequence in ids:
            with torch.no_grad():
                log_probs = torch.log_softmax(model(torch.tensor([sequence])).logits[0].double(), -1)
            totals.append(sum(float(log_probs[t - 1, sequence[t]]) for t in range(max(shared, 1), len(sequence))))
        margins.append(totals[0] - totals[1])
    return torch.tensor(margins, dtype=torch.float64)


def reference_margin(model, tokenizer, pairs) -> float:
    return float(reference_margins(model, tokenizer, pairs).mean())


def reference_preference(model, tokenizer, pairs) -> float:
    return float(torch.nn.functional.logsigmoid(reference_margins(model, tokenizer, pairs)).mean())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_margin_matches_an_unbatched_reference(family):
    model, tokenizer = tiny_model(family), char_tokenizer()
    pairs = random_pairs(7, seed=3)
    scorer = _MarginScorer(model, tokenizer, pairs, batch_size=3)
    torch.testing.assert_close(scorer(model), reference_margins(model, tokenizer, pairs), rtol=1e-4, atol=1e-4)


def fold_reference_margins(scores, folds, k, alpha, model, tokenizer) -> torch.Tensor:
    """Per fold, a fresh adapter counted without that fold, scored pair by pair on it."""
    margins = []
    for fold_counts, pairs in folds:
        fresh = (scores - fold_counts).to_adapter(k, alpha, model)
        margins.append(reference_margins(fresh, tokenizer, pairs))
        model = fresh.unload()
    return torch.cat(margins)


def test_choice_is_the_best_cell_over_folds_and_uses_one_momentum_pass(monkeypatch):
    model, tokenizer = tiny_model("qwen2"), char_tokenizer()
    pairs = [(p + ": yes", p + ": no") for p, _ in random_pairs(40)]
    never_heldout, heldout = split_folds(pairs, folds=2, max_heldout=10)
    assert [len(fold) for fold in heldout] == [5, 5] and len(never_heldout) == 30
    count = lambda chunk: compute_momentum(model, tokenizer, chunk, sites=["attention", "ffn"], progress=False)
    fold_counts = [count(fold) for fold in heldout]
    scores = fold_counts[0] + fold_counts[1] + count(never_heldout)
    folds = list(zip(fold_counts, heldout))
    from austeer_peft.fitting import counter as momentum

    monkeypatch.setattr(momentum.MomentumCounter, "count_batch", lambda *a, **k: pytest.fail("second pass"))
    choice, peft_model = choose_k_alpha(model, tokenizer, scores, folds, ks=[1, 4, 16], alphas=[1.0, 10.0],
                                        criterion="preference", progress=False)
    assert len(choice.cells) == 6 and choice.num_heldout == 10
    best = max(choice.cells, key=lambda cell: cell[2])
    assert (choice.k, choice.alpha, choice.score) == best and choice.criterion == "preference"
    # The model is left steered with the chosen cell, selected from the counts of all pairs, when it passed the
    # no-harm check on the held-out pairs; otherwise with nothing.
    expected = sorted(scores.select(choice.k, choice.alpha)) if choice.shipped else []
    assert [(a.module, a.dim) for a in peft_model.get_aus()] == [(a.module, a.dim) for a in expected]
    assert choice.selection.num_examples == 10 and choice.selection.folds == 5
    # Every cell's held-out margins are kept: each fold scored under the steer counted without it.
    assert sorted(choice.heldout_margins) == sorted((k, a) for k in (1, 4, 16) for a in (1.0, 10.0))
    base = peft_model.unload()
    for cell in [(choice.k, choice.alpha), (16, 10.0)]:
        reference = fold_reference_margins(scores, folds, *cell, base, tokenizer)
        torch.testing.assert_close(torch.tensor(choice.heldout_margins[cell], dtype=torch.float64), reference,
                                   rtol=1e-4, atol=1e-4)
    reference = fold_reference_margins(scores, folds, choice.k, choice.alpha, base, tokenizer)
    assert float(torch.nn.functional.logsigmoid(reference).mean()) == pytest.approx(choice.score, rel=1e-4, abs=1e-4)
    assert float(reference.mean()) == pytest.approx(choice.margin, rel=1e-4, abs=1e-4)
    assert choice.accuracy == float((torch.tensor(choice.heldout_margins[choice.k, choice.alpha]) > 0).double().mean())
    vanilla = torch.cat([reference_margins(base, tokenizer, fold) for fold in heldout])
    assert float(torch.nn.functional.logsigmoid(vanilla).mean()) == pytest.approx(choice.vanilla_score, rel=1e-4,
                                                                                  abs=1e-4)
    assert float(vanilla.mean()) == pytest.approx(choice.vanilla_margin, rel=1e-4, abs=1e-4)
    assert choice.vanilla_accuracy == float((vanilla > 0).double().mean())
    # The plain-margin criterion ranks the same cells by their mean margin.
    by_margin, _ = choose_k_alpha(base, tokenizer, scores, folds, ks=[1, 4, 16], alphas=[1.0, 10.0],
                                  criterion="margin", progress=False)
    assert by_margin.score == by_margin.margin == max(cell[2] for cell in by_margin.cells)
    # Each criterion run on its own chooses the cell that `best` reads off one run's kept margins.
    by_accuracy, _ = choose_k_alpha(base, tokenizer, scores, folds, ks=[1, 4, 16], alphas=[1.0, 10.0],
                                    criterion="accuracy", progress=False)
    assert by_accuracy.score == by_accuracy.accuracy == max(cell[2] for cell in by_accuracy.cells)
    for criterion, chosen in (("preference", choice), ("margin", by_margin), ("accuracy", by_accuracy)):
        assert choice.best(criterion) == by_margin.best(criterion) == (chosen.k, chosen.alpha)
    with pytest.raises(ValueError, match="Unknown criterion 'median'"):
        choose_k_alpha(base, tokenizer, scores, folds, criterion="median")
    with pytest.raises(ValueError, match="not part of these counts"):  # a fold with more pairs than the scores
        choose_k_alpha(base, tokenizer, fold_counts[1], [(fold_counts[0] + fold_counts[1], heldout[0])], ks=[1],
                       alphas=[1.0])


def test_one_pair_at_a_time_scores_each_pair_under_the_steer_counted_on_all_the_others():
    """The default split holds out single pairs: many folds, each one pair, still one counting pass."""
    model, tokenizer = tiny_model("qwen2"), char_tokenizer()
    pairs = [(p + ": yes", p + ": no") for p, _ in random_pairs(24)]
    never_heldout, heldout = split_folds(pairs, max_heldout=4)
    assert [len(fold) for fold in heldout] == [1] * 4 and len(never_heldout) == 20
    count = lambda chunk: compute_momentum(model, tokenizer, chunk, sites=["ffn"], progress=False)
    folds = [(count(fold), fold) for fold in heldout]
    assert all(fold_counts.num_pairs == 1 for fold_counts, _ in folds)
    scores = sum((fold_counts for fold_counts, _ in folds), count(never_heldout))
    choice, peft_model = choose_k_alpha(model, tokenizer, scores, folds, ks=[1, 16], alphas=[10.0], progress=False)
    assert choice.num_heldout == 4
    base = peft_model.unload()
    for cell in [(1, 10.0), (16, 10.0)]:
        torch.testing.assert_close(torch.tensor(choice.heldout_margins[cell], dtype=torch.float64),
                                   fold_reference_margins(scores, folds, *cell, base, tokenizer), rtol=1e-4, atol=1e-4)


def test_criteria_rank_cells_and_break_ties_toward_fewer_aus_then_smaller_alpha():
    margins = {
        (1, 5.0): torch.tensor([3.0, -0.1, -0.1, -0.1]),  # 1 of 4 right, small losses: best preference
        (4, 5.0): torch.tensor([0.1, 0.1, -9.0, -9.0]),  # 2 of 4 right, big losses
        (8, 5.0): torch.tensor([0.2, 0.2, -8.0, -8.0]),  # 2 of 4 right, a better preference than (4, 5)
        (16, 1.0): torch.tensor([30.0, -0.5, -8.0, -8.0]),  # 1 of 4 right, the largest mean margin
    }
    assert best_cell(margins, "preference") == (1, 5.0)
    assert best_cell(margins, "accuracy") == (8, 5.0)  # the tie at 2 of 4 goes to the better preference
    assert best_cell(margins, "margin") == (16, 1.0)
    same = torch.tensor([1.0, -1.0])
    for criterion in CRITERIA:
        assert best_cell({(4, 10.0): same, (2, 20.0): same, (2, 10.0): same, (8, 1.0): same}, criterion) == (2, 10.0)


def test_fold_split_is_deterministic_disjoint_and_checked():
    pairs = random_pairs(50)
    assert split_folds(pairs) == split_folds(pairs)
    never_heldout, folds = split_folds(pairs)
    assert never_heldout == [] and [len(fold) for fold in folds] == [1] * 50  # by default one pair at a time
    assert sorted(sum(folds, [])) == sorted(pairs)
    never_heldout, folds = split_folds(pairs, folds=4)
    assert never_heldout == [] and [len(fold) for fold in folds] == [13, 13, 12, 12]  # all 50 held out once
    assert sorted(sum(folds, [])) == sorted(pairs)
    never_heldout, folds = split_folds(random_pairs(1000))
    assert [len(fold) for fold in folds] == [1] * 128 and len(never_heldout) == 872
    never_heldout, folds = split_folds(random_pairs(1000), folds=5)
    assert [len(fold) for fold in folds] == [26, 26, 26, 25, 25] and len(never_heldout) == 872  # capped at 128
    assert sorted(never_heldout + sum(folds, [])) == sorted(random_pairs(1000))
    assert len(split_folds(pairs[:16], folds=2)[1][0]) == 8  # 8 held out, 8 counted
    with pytest.raises(ValueError, match="at least 16 pairs"):
        split_folds(pairs[:12])
    for folds in (1, 0, True):
        with pytest.raises(ValueError, match="integer >= 2, or None"):
            split_folds(pairs, folds=folds)
    with pytest.raises(ValueError, match="max_heldout"):
        split_folds(pairs, folds=4, max_heldout=3)


def test_folds_keep_the_mix_of_answers_of_all_pairs():
    """70 % of the pairs answer " yes": the held-out pairs are 70 % " yes" (within one pair) and so is every fold
    (within two), whatever the seed."""
    pairs = [(f"q{i}: yes", f"q{i}: no") if i % 10 < 7 else (f"q{i}: no", f"q{i}: yes") for i in range(300)]
    for seed in range(5):
        never_heldout, folds = split_folds(pairs, folds=4, seed=seed)
        assert [len(fold) for fold in folds] == [32] * 4
        for fold in folds:
            assert abs(sum(positive.endswith("yes") for positive, _ in fold) - 0.7 * 32) < 2
        assert abs(sum(positive.endswith("yes") for positive, _ in sum(folds, [])) - 0.7 * 128) < 1
        assert abs(sum(positive.endswith("yes") for positive, _ in never_heldout) - 0.7 * 172) < 1
    assert split_folds(pairs, seed=1) != split_folds(pairs, seed=2)
    # All-different answers (COPA's sentences): a plain random order, still every pair exactly once.
    never_heldout, folds = split_folds(random_pairs(200), max_heldout=40)
    assert sorted(never_heldout + sum(folds, [])) == sorted(random_pairs(200))


def test_length_batches_bound_padding_and_rows():
    lengths = [60, 600, 70, 80, 65, 75, 590, 62]
    batches = _length_batches(lengths, max_rows=4)
    assert sorted(sum(batches, [])) == list(range(8))
    budget = 4 * sum(lengths) / len(lengths)
    for rows in batches:
        assert len(rows) <= 4 and len(rows) * max(lengths[r] for r in rows) <= max(budget, max(lengths[r] for r in rows))
    assert [sorted(lengths[r] for r in rows) for rows in batches] == [[60, 62, 65, 70], [75, 80], [590], [600]]
    assert _length_batches([10] * 5, max_rows=2) == [[0, 1], [2, 3], [4]]  # equal lengths: full batches


def test_pairs_whose_texts_do_not_both_continue_are_skipped_or_refused():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    with pytest.warns(UserWarning, match="1 of 2 held-out pairs are skipped"):
        scorer = _MarginScorer(model, tokenizer, [("abc", "abcd"), ("ab: x", "ab: yz")], batch_size=2)
    torch.testing.assert_close(scorer(model), reference_margins(model, tokenizer, [("ab: x", "ab: yz")]),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="common prefix"):
        _MarginScorer(model, tokenizer, [("abc", "abcd")], batch_size=2)


def test_fit_with_auto_k_and_alpha_keeps_the_counts_of_all_pairs_and_the_choice():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    pairs = [(p + ": yes", p + ": no") for p, _ in random_pairs(40)]
    result = fit_austeer(model, tokenizer, pairs, sites=["attention", "ffn"], k="auto", alpha="auto", progress=False)
    assert result.scores.num_pairs == 40 and result.auto.num_heldout == 40  # every pair held out, one at a time
    assert len(result.auto.cells) == 4 * 5  # the automatic grid: k in 1, 4, 16, 64 and α in 5, 10, 20, 50, 100
    assert result.auto.criterion == "accuracy" and result.auto.score == result.auto.accuracy  # the default
    if result.auto.shipped:
        config = result.peft_model.peft_config["default"]
        assert (config.k, config.alpha) == (result.auto.k, result.auto.alpha)
    assert len(result.peft_model.get_aus()) == (result.auto.k if result.auto.shipped else 0)
    assert result.auto.selection.num_examples == 40
    # The folds were counted one by one, and their sum is the one pass over all pairs.
    whole = compute_momentum(result.peft_model, tokenizer, pairs, sites=["attention", "ffn"], progress=False)
    assert whole.num_pairs == result.scores.num_pairs
    for name in whole.n_pos:
        assert torch.equal(whole.n_pos[name], result.scores.n_pos[name])
        assert torch.equal(whole.n_neg[name], result.scores.n_neg[name])
    # Only alpha automatic: k stays as given; fewer folds, fewer pairs held out.
    fixed = fit_austeer(result.peft_model.unload(), tokenizer, pairs, sites=["ffn"], k=3, alpha="auto",
                        auto_folds=2, auto_heldout=20, progress=False)
    assert {cell[0] for cell in fixed.auto.cells} == {3} and len(fixed.auto.cells) == 5
    assert fixed.auto.num_heldout == 20 and fixed.scores.num_pairs == 40
    with pytest.raises(ValueError, match="alpha"):
        fit_austeer(fixed.peft_model.unload(), tokenizer, pairs, sites=["ffn"], k="auto", alpha=-1.0)


def test_momentum_scores_add_and_subtract_as_counts_of_pair_sets():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    pairs = random_pairs(12, seed=7)
    count = lambda chunk, sites=("ffn",): compute_momentum(model, tokenizer, chunk, sites=list(sites), progress=False)
    first, second, both = count(pairs[:5]), count(pairs[5:]), count(pairs)
    for combined, expected in ((first + second, both), (both - second, first)):
        assert combined.num_pairs == expected.num_pairs
        for name in expected.n_pos:
            assert torch.equal(combined.n_pos[name], expected.n_pos[name])
            assert torch.equal(combined.n_neg[name], expected.n_neg[name])
    assert (both - second).select(4, 10.0) == first.select(4, 10.0)
    with pytest.raises(ValueError, match="not part of these counts"):
        first - both
    with pytest.raises(ValueError, match="other modules"):
        first + count(pairs[:5], sites=("attention",))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_token_answers_are_scored_from_one_forward_of_the_prompt(family):
    """(prompt + " y", prompt + " n") pairs forward the prompt once; mixed with two-text pairs in the same batches,
    every margin still equals the unbatched two-text reference."""
    model, tokenizer = tiny_model(family), char_tokenizer()
    one_token = [(p + ": y", p + ": n") for p, _ in random_pairs(5, seed=4)]
    two_texts = random_pairs(4, seed=5)
    pairs = [pair for group in zip(one_token, two_texts) for pair in group] + one_token[4:]
    scorer = _MarginScorer(model, tokenizer, pairs, batch_size=2)
    margins = scorer(model)
    torch.testing.assert_close(margins, reference_margins(model, tokenizer, pairs), rtol=1e-4, atol=1e-4)
    assert scorer.forwarded_rows == len(one_token) + 2 * len(two_texts)
    assert torch.all(margins != 0)
