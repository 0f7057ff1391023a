"""ITI, SADI-HEAD, the Table 3 ablations, the additive steering hooks and exact-match scoring, each against a
brute-force reference on a tiny model (one unpadded text at a time, plain loops, or an independent weight edit)."""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch
from conftest import char_tokenizer, random_pairs, tiny_model
from test_sweep import toy_task

from austeer_peft import compute_momentum
from austeer_peft.evaluate import exact_match_predictions, load_user_task
from austeer_peft.evaluate.ablations import (
    fixed_strength_aus,
    fixed_vector,
    mean_difference_aus,
    mean_difference_ranking,
    random_aus,
)
from austeer_peft.evaluate.activations import pair_activations
from austeer_peft.evaluate.baselines import added_vectors
from austeer_peft.evaluate.compare import BASELINES, compare_methods
from austeer_peft.evaluate.heads import iti_probes, sadi_head_aus, sadi_head_ranking
from austeer_peft.evaluate.runner import evaluate_split
from austeer_peft.fitting.scores import adaptive_gamma
from austeer_peft.tuner.config import AUSteerConfig
from austeer_peft.tuner.sites import base_named_modules, candidate_modules

HEAD_DIM, HEADS = 8, 4  # the tiny llama: hidden 32, 4 heads of 8


def brute_force_activations(model, tokenizer, pairs, sites):
    """{module: ([N, width] positive, [N, width] negative)}: one unpadded text at a time, last token, plain hooks."""
    candidates = candidate_modules(model, AUSteerConfig(sites=sites))
    modules = base_named_modules(model)
    seen = {}
    handles = [modules[c.name].register_forward_pre_hook(lambda m, a, name=c.name: seen.__setitem__(name, a[0][0, -1]))
               if c.position == "input" else
               modules[c.name].register_forward_hook(lambda m, a, out, name=c.name: seen.__setitem__(name, out[0, -1]))
               for c in candidates]
    rows = {c.name: ([], []) for c in candidates}
    for pair in pairs:
        for side, text in enumerate(pair):
            with torch.no_grad():
                model(torch.tensor([tokenizer(text)["input_ids"]]))
            for name in rows:
                rows[name][side].append(seen[name].clone())
    for handle in handles:
        handle.remove()
    return {name: (torch.stack(pos), torch.stack(neg)) for name, (pos, neg) in rows.items()}


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    pairs = [pair for pair in random_pairs(40) if pair[0] != pair[1]][:30]
    activations = pair_activations(model, tokenizer, pairs, ["attention", "ffn"], batch_size=7, progress=False)
    reference = brute_force_activations(model, tokenizer, pairs, ["attention", "ffn"])
    scores = compute_momentum(model, tokenizer, pairs, sites=["attention"], batch_size=7, progress=False)
    return model, tokenizer, pairs, activations, reference, scores


def test_pair_activations_match_one_text_at_a_time(setup):
    model, tokenizer, pairs, activations, reference, _ = setup
    assert activations.head_dim == HEAD_DIM and activations.num_pairs == len(pairs)
    assert set(activations.positive) == set(reference)
    for name, (positive, negative) in reference.items():
        torch.testing.assert_close(activations.positive[name], positive, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(activations.negative[name], negative, rtol=1e-4, atol=1e-5)


def test_pair_activations_read_through_the_fits_reader_with_shared_prompts(setup, monkeypatch):
    """The pass is the fit's (read_pair_activations): pairs sharing their prompt run it once from a KV cache, and
    the rows land at their pairs whatever order the batches hold them in."""
    from austeer_peft.fitting import inputs

    model, tokenizer, pairs, _, reference, _ = setup
    prompt_runs = []
    original = inputs.SharedPromptBatch.prompt_inputs
    monkeypatch.setattr(inputs.SharedPromptBatch, "prompt_inputs",
                        lambda self, *a, **k: prompt_runs.append(len(self.pair_indices)) or original(self, *a, **k))
    activations = pair_activations(model, tokenizer, list(reversed(pairs)), ["attention"], batch_size=4,
                                   progress=False)
    assert sum(prompt_runs) == len(pairs)  # every pair here shares its prompt
    for name in activations.positive:
        torch.testing.assert_close(activations.positive[name], reference[name][0].flip(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(activations.negative[name], reference[name][1].flip(0), rtol=1e-4, atol=1e-5)


def test_iti_probes_heads_and_shift_match_a_per_head_reference(setup):
    from sklearn.linear_model import LogisticRegression

    _, _, pairs, activations, reference, _ = setup
    probes = iti_probes(activations, seed=3)
    n = len(pairs)
    order = np.random.default_rng(3).permutation(n)
    validation, train = order[:6], order[6:]  # 20 % of 30 pairs
    names = [m.name for m in activations.on_site("attention")]
    expected_accuracy = np.zeros((len(names), HEADS))
    for i, name in enumerate(names):
        positive, negative = (x.double().numpy() for x in reference[name])
        for head in range(HEADS):
            block = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            probe = LogisticRegression(random_state=3, max_iter=1000).fit(
                np.concatenate([positive[train, block], negative[train, block]]), [1] * 24 + [0] * 24)
            predicted = probe.predict(np.concatenate([positive[validation, block], negative[validation, block]]))
            expected_accuracy[i, head] = np.mean(predicted == np.array([1] * 6 + [0] * 6))
            direction = positive[:, block].mean(0) - negative[:, block].mean(0)
            direction /= np.linalg.norm(direction)
            sigma = np.std(np.concatenate([positive[:, block], negative[:, block]]) @ direction)
            np.testing.assert_allclose(probes.directions[i, head].numpy(), direction, rtol=1e-3, atol=1e-4)
            assert probes.sigma[i, head].item() == pytest.approx(sigma, rel=1e-3)
    np.testing.assert_allclose(probes.accuracy.numpy(), expected_accuracy)
    ranked = sorted(((-expected_accuracy[i, h], i * HEADS + h) for i in range(len(names)) for h in range(HEADS)))
    top = [divmod(flat, HEADS) for _, flat in ranked[:3]]
    assert probes.top_heads(3) == top
    vectors = probes.vectors(3, 15.0)
    for module, head in top:
        shift = vectors[names[module]][1][head * HEAD_DIM:(head + 1) * HEAD_DIM]
        torch.testing.assert_close(shift, 15.0 * probes.sigma[module, head] * probes.directions[module, head])
    assert sum(int(v.count_nonzero()) for _, v in vectors.values()) == 3 * HEAD_DIM


def with_o_proj_bias(model, vectors):
    """Reference for an added o_proj input ``v``: a copy whose o_proj gets the bias ``W_o v`` (linear algebra)."""
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    for name, (side, vector) in vectors.items():
        assert side == "input"
        linear = modules[name]
        bias = linear.weight.detach() @ vector
        linear.bias = torch.nn.Parameter(bias if linear.bias is None else linear.bias + bias)
    return reference


def test_added_vectors_on_the_heads_equal_an_output_projection_bias(setup):
    model, tokenizer, _, activations, _, _ = setup
    vectors = iti_probes(activations).vectors(2, 10.0)
    input_ids = torch.tensor([tokenizer("red sun? cat dog")["input_ids"]])
    with torch.no_grad(), added_vectors(model, vectors, "all"):
        steered = model(input_ids).logits
    with torch.no_grad():
        expected = with_o_proj_bias(model, vectors)(input_ids).logits
        plain = model(input_ids).logits
    torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered, plain)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, plain)  # the hooks are gone


def test_generated_scope_steers_the_last_prompt_token_and_each_new_token(setup):
    """Reference: the prefix run unsteered into a KV cache, then the last token run alone with the vector added."""
    model, tokenizer, _, activations, _, _ = setup
    vectors = iti_probes(activations).vectors(2, 10.0)
    input_ids = torch.tensor([tokenizer("red sun? cat dog")["input_ids"]])
    with torch.no_grad():
        with added_vectors(model, vectors, "generated"):
            steered = model(input_ids).logits
        prefix = model(input_ids[:, :-1], use_cache=True)
        with added_vectors(model, vectors, "all"):
            last = model(input_ids[:, -1:], past_key_values=prefix.past_key_values).logits
    torch.testing.assert_close(steered[:, :-1], prefix.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steered[:, -1:], last, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Unknown scope"):
        with added_vectors(model, vectors, "prompt"):
            pass


def test_sadi_head_ranking_and_steer_match_a_reference(setup):
    model, tokenizer, _, activations, reference, scores = setup
    names = [m.name for m in activations.on_site("attention")]
    means = [(reference[name][0] - reference[name][1]).reshape(-1, HEADS, HEAD_DIM).mean(dim=(0, 2)) for name in names]
    expected = sorted(((-float(means[i][h]), i, h) for i in range(len(names)) for h in range(HEADS)))
    assert sadi_head_ranking(activations) == [(names[i], h) for _, i, h in expected]
    ranking = sadi_head_ranking(activations)
    aus = sadi_head_aus(ranking, 2, 5.0, HEAD_DIM)
    assert len(aus) == 2 * HEAD_DIM and {au.gamma for au in aus} == {4.0}
    # Reference: the chosen heads' columns of W_o multiplied by the strength (every token, as scope "all").
    plain = copy.deepcopy(model)
    edited = copy.deepcopy(model)
    modules = dict(edited.named_modules())
    with torch.no_grad():
        for module, head in ranking[:2]:
            modules[module].weight[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] *= 5.0
    peft_model = scores.to_adapter(1, 1.0, plain, adapter_name="sadi")
    peft_model.set_aus(aus, adapter_name="sadi")
    input_ids = torch.tensor([tokenizer("blue tree? road")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids).logits, edited(input_ids).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="number of heads"):
        sadi_head_aus(ranking, 0, 5.0, HEAD_DIM)


def test_the_four_ablations_change_one_part_of_austeer(setup):
    model, tokenizer, pairs, activations, reference, scores = setup
    num_pairs = scores.num_pairs
    everything = [(m.name, d) for m in scores.modules for d in range(m.width)]
    # Random AUs: a seeded draw, nested in k, with AUSteer's γ from their own counts.
    drawn = random_aus(scores, 5, 10.0, seed=1)
    assert drawn[:3] == random_aus(scores, 3, 10.0, seed=1) and drawn != random_aus(scores, 5, 10.0, seed=2)
    order = torch.randperm(len(everything), generator=torch.Generator().manual_seed(1))[:5].tolist()
    assert [(au.module, au.dim) for au in drawn] == [everything[i] for i in order]
    for au in drawn:
        pos, neg = int(scores.n_pos[au.module][au.dim]), int(scores.n_neg[au.module][au.dim])
        assert au.gamma == adaptive_gamma(pos, neg, num_pairs, 10.0)
    # Mean-difference AUs: ranked by |mean(x_pos - x_neg)| over the reference activations.
    differences = [(reference[name][0] - reference[name][1]).mean(0)[dim].abs().item() for name, dim in everything]
    top = sorted(range(len(everything)), key=lambda i: -differences[i])[:4]
    aus = mean_difference_aus(scores, mean_difference_ranking(scores, activations), 4, 2.0)
    assert {(au.module, au.dim) for au in aus} == {everything[i] for i in top}
    # Fixed strength: AUSteer's AUs and signs, |γ| = α.
    austeer = scores.select(6, 20.0)
    assert [(au.module, au.dim, au.gamma) for au in fixed_strength_aus(scores, 6, 20.0)] == \
        [(au.module, au.dim, 20.0 if au.gamma > 0 else -20.0) for au in austeer]
    # Fixed vector: AUSteer's AUs shifted by α · mean difference, the same for every input (an o_proj bias).
    vectors = fixed_vector(scores, activations, 6, 3.0)
    for au in austeer:
        expected = 3.0 * (reference[au.module][0] - reference[au.module][1]).mean(0)[au.dim]
        assert vectors[au.module][1][au.dim].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert sum(int(v.count_nonzero()) for _, v in vectors.values()) == 6
    input_ids = torch.tensor([tokenizer("hot cold? sea")["input_ids"]])
    with torch.no_grad(), added_vectors(model, vectors, "all"):
        steered = model(input_ids).logits
    with torch.no_grad():
        torch.testing.assert_close(steered, with_o_proj_bias(model, vectors)(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_exact_match_normalizes_like_the_official_code():
    assert exact_match_predictions([" Yes", "no\n", "maybe", " A"], [" yes", " no"]) == [0, 1, -1, -1]
    # On a model: the decoded greedy token, stripped and lower-cased, against each choice (one token: "X" / "y").
    model, tokenizer = tiny_model("llama", seed=4), char_tokenizer()
    task = load_user_task([{"text": t, "label": i % 2} for i, t in enumerate(["ab", "cde", "f", "abc", "dd", "e"] * 3)],
                          "{text}:", choices=["X", "y"], n_test=8, n_validation=4)
    result = evaluate_split(model, tokenizer, task, "test", "exact", batch_size=3)
    expected = []
    for row in task.test:
        with torch.no_grad():
            token = int(model(torch.tensor([tokenizer(row["prompt"])["input_ids"]])).logits[0, -1].argmax())
        expected.append(tokenizer.decode([token]).strip().lower() == ["x", "y"][row["label"]])
    assert result.scoring == "exact" and result.correct == expected
    assert set(result.also) == {"restricted", "greedy"}


def test_compare_methods_runs_every_baseline_and_counts_what_it_steers(tmp_path):
    model, tokenizer, task = tiny_model("llama"), char_tokenizer(), toy_task()
    comparison = compare_methods(model, tokenizer, task, ks=[1, 4], alphas=[1.0, 10.0], caa_multipliers=[1.0],
                                 baselines=BASELINES, iti_heads=[1, 2], iti_alphas=[5.0], sadi_heads=[1, 2],
                                 sadi_strengths=[2.0], scope="generated", output_dir=tmp_path, progress=False,
                                 selection="most-accurate")
    rows = {row["method"]: row for row in comparison.table()}
    # The ablations run on the site of the best AUSteer sweep, whose blocks block-level steers.
    best = max(comparison.sweeps[:2], key=lambda s: (s.chosen is not None, (s.chosen or s.best).accuracy))
    site = best.method.removeprefix("AUSteer-")
    assert all(module.startswith("model.layers.") for module in rows["block-level"]["settings"]["blocks"])
    assert list(rows) == ["vanilla", "AUSteer-attention", "AUSteer-ffn", "block-level", "CAA", "ITI", "SADI-HEAD",
                          *(f"ablation {name} ({site})" for name in ["random AUs", "mean-diff AUs", "fixed vector",
                                                                      "fixed strength"])]
    assert rows["ITI"]["steered"] == rows["ITI"]["settings"]["heads"] * HEAD_DIM
    assert rows["SADI-HEAD"]["steered"] == rows["SADI-HEAD"]["settings"]["heads"] * HEAD_DIM
    for name, row in rows.items():
        if name.startswith("ablation"):
            assert row["steered"] == row["settings"]["k"]
        assert {"also_greedy", "also_exact"} <= set(row)
    assert comparison.scope == "generated" and "scope generated" in comparison.format_table()
    with open(tmp_path / "sweep.csv") as handle:
        methods = [row["method"] for row in csv.DictReader(handle)]
    assert methods.count("ITI") == 2 and methods.count("SADI-HEAD") == 2
    assert all(methods.count(name) == 4 for name in rows if name.startswith("ablation"))
    with pytest.raises(ValueError, match="Unknown scope"):
        compare_methods(model, tokenizer, task, scope="prompt")
    with pytest.raises(ValueError, match="add 'attention'"):
        compare_methods(tiny_model("llama"), tokenizer, task, sites=["ffn"], baselines=["iti"])
