"""Automatic (k, α): the held-out margin against a per-pair reference, the choice, and the hold-out split."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_fit import char_tokenizer, random_pairs

from austeer_peft import compute_momentum, fit_austeer
from austeer_peft.auto import CRITERIA, _MarginScorer, best_cell, choose_k_alpha, split_holdout


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


def test_choice_is_the_best_cell_and_uses_one_momentum_pass(monkeypatch):
    model, tokenizer = tiny_model("qwen2"), char_tokenizer()
    pairs = [(p + ": yes", p + ": no") for p, _ in random_pairs(40)]
    counted, heldout = split_holdout(pairs, share=0.25)
    assert len(heldout) == 10 and len(counted) == 30
    scores = compute_momentum(model, tokenizer, counted, sites=["attention", "ffn"], progress=False)
    from austeer_peft import momentum

    monkeypatch.setattr(momentum.MomentumCounter, "count_batch", lambda *a, **k: pytest.fail("second pass"))
    choice, peft_model = choose_k_alpha(model, tokenizer, scores, heldout, ks=[1, 4, 16], alphas=[1.0, 10.0],
                                        criterion="preference", progress=False)
    assert len(choice.cells) == 6 and choice.num_heldout == 10
    best = max(choice.cells, key=lambda cell: cell[2])
    assert (choice.k, choice.alpha, choice.score) == best and choice.criterion == "preference"
    # The model is left steered with the chosen cell; its margin is reproduced from scratch.
    assert [(a.module, a.dim) for a in peft_model.get_aus()] == \
        [(a.module, a.dim) for a in sorted(scores.select(choice.k, choice.alpha))]
    fresh = scores.to_adapter(choice.k, choice.alpha, peft_model.unload())
    assert reference_preference(fresh, tokenizer, heldout) == pytest.approx(choice.score, rel=1e-4, abs=1e-4)
    assert reference_margin(fresh, tokenizer, heldout) == pytest.approx(choice.margin, rel=1e-4, abs=1e-4)
    # Every cell's held-out margins are kept; the chosen cell's are the fresh adapter's.
    assert sorted(choice.heldout_margins) == sorted((k, a) for k in (1, 4, 16) for a in (1.0, 10.0))
    torch.testing.assert_close(torch.tensor(choice.heldout_margins[choice.k, choice.alpha], dtype=torch.float64),
                               reference_margins(fresh, tokenizer, heldout), rtol=1e-4, atol=1e-4)
    assert choice.accuracy == float((torch.tensor(choice.heldout_margins[choice.k, choice.alpha]) > 0).double().mean())
    unsteered = fresh.unload()
    assert reference_preference(unsteered, tokenizer, heldout) == pytest.approx(choice.vanilla_score, rel=1e-4,
                                                                                abs=1e-4)
    assert reference_margin(unsteered, tokenizer, heldout) == pytest.approx(choice.vanilla_margin, rel=1e-4, abs=1e-4)
    assert choice.vanilla_accuracy == float((reference_margins(unsteered, tokenizer, heldout) > 0).double().mean())
    # The plain-margin criterion ranks the same cells by their mean margin.
    by_margin, _ = choose_k_alpha(fresh, tokenizer, scores, heldout, ks=[1, 4, 16], alphas=[1.0, 10.0],
                                  criterion="margin", progress=False)
    assert by_margin.score == by_margin.margin == max(cell[2] for cell in by_margin.cells)
    # Each criterion run on its own chooses the cell that `best` reads off one run's kept margins.
    by_accuracy, _ = choose_k_alpha(fresh, tokenizer, scores, heldout, ks=[1, 4, 16], alphas=[1.0, 10.0],
                                    criterion="accuracy", progress=False)
    assert by_accuracy.score == by_accuracy.accuracy == max(cell[2] for cell in by_accuracy.cells)
    for criterion, chosen in (("preference", choice), ("margin", by_margin), ("accuracy", by_accuracy)):
        assert choice.best(criterion) == by_margin.best(criterion) == (chosen.k, chosen.alpha)
    with pytest.raises(ValueError, match="Unknown criterion 'median'"):
        choose_k_alpha(fresh, tokenizer, scores, heldout, criterion="median")


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


def test_holdout_split_is_deterministic_and_checked():
    pairs = random_pairs(50)
    assert split_holdout(pairs) == split_holdout(pairs)
    counted, heldout = split_holdout(pairs)
    assert len(heldout) == 10 and sorted(counted + heldout) == sorted(pairs)
    assert len(split_holdout(random_pairs(1000))[1]) == 32  # capped: each cell scores them once
    with pytest.raises(ValueError, match="at least 16 pairs"):
        split_holdout(pairs[:12])
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_holdout(pairs, share=1.5)


def test_pairs_whose_texts_do_not_both_continue_are_skipped_or_refused():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    with pytest.warns(UserWarning, match="1 of 2 held-out pairs are skipped"):
        scorer = _MarginScorer(model, tokenizer, [("abc", "abcd"), ("ab: x", "ab: yz")], batch_size=2)
    torch.testing.assert_close(scorer(model), reference_margins(model, tokenizer, [("ab: x", "ab: yz")]),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="common prefix"):
        _MarginScorer(model, tokenizer, [("abc", "abcd")], batch_size=2)


def test_fit_with_auto_k_and_alpha_counts_on_the_rest_and_keeps_the_choice():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    pairs = [(p + ": yes", p + ": no") for p, _ in random_pairs(40)]
    result = fit_austeer(model, tokenizer, pairs, sites=["attention", "ffn"], k="auto", alpha="auto", progress=False)
    assert result.scores.num_pairs == 32 and result.auto.num_heldout == 8
    assert len(result.auto.cells) == 8 * 7  # the sweep grid (2 sites x 2 layers x 32 dims = 128 AUs >= 100)
    assert result.auto.criterion == "accuracy" and result.auto.score == result.auto.accuracy  # the default
    config = result.peft_model.peft_config["default"]
    assert (config.k, config.alpha) == (result.auto.k, result.auto.alpha)
    assert len(result.peft_model.get_aus()) == result.auto.k
    # Only alpha automatic: k stays as given.
    fixed = fit_austeer(result.peft_model.unload(), tokenizer, pairs, sites=["ffn"], k=3, alpha="auto",
                        progress=False)
    assert {cell[0] for cell in fixed.auto.cells} == {3} and len(fixed.auto.cells) == 7
    with pytest.raises(ValueError, match="alpha"):
        fit_austeer(fixed.peft_model.unload(), tokenizer, pairs, sites=["ffn"], k="auto", alpha=-1.0)


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
