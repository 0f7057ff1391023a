"""The evaluation runner, the (k, α) sweep (one momentum pass, counted forwards), the baselines and the comparison."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import random

import pytest
import torch
from conftest import char_tokenizer, tiny_model
from peft import PeftModel

from austeer_peft import AU, compute_momentum, fit_austeer
from austeer_peft.fitting import fit as fit_module
from austeer_peft.evaluate.baselines import block_level_aus, caa_layers, caa_steering, caa_vectors
from austeer_peft.evaluate.compare import compare_methods
from austeer_peft.evaluate import load_user_task
from austeer_peft.evaluate.runner import evaluate_split
from austeer_peft.tuner.sites import find_decoder_layers
from austeer_peft.evaluate.sweep import scores_for_sites, sweep_k_alpha

SITES = ["attention", "ffn"]


def toy_task(n: int = 40, n_test: int = 12, n_validation: int = 10, seed: int = 0):
    """A two-choice task over random letter strings: answers 'x' / 'y' (distinct first tokens for any tokenizer)."""
    rng = random.Random(seed)
    rows = [{"text": "".join(rng.choice("abcdef") for _ in range(rng.randint(2, 9))), "label": rng.randint(0, 1)}
            for _ in range(n)]
    return load_user_task(rows, "{text}:", choices=["x", "y"], n_test=n_test, n_validation=n_validation)


class ForwardCounter:
    """Counts calls of a module's forward (a pre-hook), e.g. the decoder's, to see how many passes a job makes."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1


# ---------------------------------------------------------------------------------------------------- runner


def test_restricted_and_greedy_match_a_per_example_reference():
    model, tokenizer, task = tiny_model("llama"), char_tokenizer(), toy_task()
    result = evaluate_split(model, tokenizer, task, "test", batch_size=5)
    x, y = tokenizer.convert_tokens_to_ids(["x", "y"])
    restricted, greedy, answers = [], [], []
    for row in task.test:
        with torch.no_grad():
            last = model(torch.tensor([tokenizer(row["prompt"])["input_ids"]])).logits[0, -1]
        correct_id = (x, y)[row["label"]]
        answers.append(int(last[[x, y]].argmax()))
        restricted.append(answers[-1] == row["label"])
        greedy.append(int(last.argmax()) == correct_id)
    assert result.scoring == "restricted" and result.correct == restricted
    assert result.also["greedy"] == greedy
    assert result.forwards == 3  # 12 examples in batches of 5
    assert result.predicted == answers
    shares = result.predicted_shares(["x", "y"])
    assert shares == {"x": answers.count(0) / 12, "y": answers.count(1) / 12}
    # Under greedy scoring an answer that is neither choice counts as "none".
    greedy_result = evaluate_split(model, tokenizer, task, "test", "greedy", batch_size=5)
    assert [p == row["label"] for p, row in zip(greedy_result.predicted, task.test)] == greedy
    assert sum(greedy_result.predicted_shares(["x", "y"]).values()) == pytest.approx(1.0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_results_do_not_depend_on_batching(family):
    model, tokenizer, task = tiny_model(family), char_tokenizer(), toy_task()
    one = evaluate_split(model, tokenizer, task, "test", batch_size=1)
    many = evaluate_split(model, tokenizer, task, "test", batch_size=7)
    assert one.correct == many.correct and one.also == many.also


def test_loglik_equals_restricted_for_one_token_choices():
    model, tokenizer, task = tiny_model("qwen2"), char_tokenizer(), toy_task()
    restricted = evaluate_split(model, tokenizer, task, "test", "restricted", batch_size=4)
    loglik = evaluate_split(model, tokenizer, task, "test", "loglik", batch_size=4)
    assert loglik.correct == restricted.correct and loglik.predicted == restricted.predicted


def test_generation_scoring_reads_the_last_number():
    rows = [{"q": f"{a}+{b}=", "answer": a + b} for a in range(3) for b in range(3)]
    task = load_user_task(rows, "{q}", answer_column="answer", n_test=5, n_validation=1)
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    result = evaluate_split(model, tokenizer, task, "test", batch_size=2, max_new_tokens=3)
    texts = []
    for row in task.test:
        ids = torch.tensor([tokenizer(row["prompt"])["input_ids"]])
        output = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        texts.append(tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True))
    from austeer_peft.evaluate import generation_correct

    assert result.scoring == "number" and result.correct == generation_correct(texts, task.test["answer"],
                                                                                stop=["\n\n", "Question:"])


def test_runner_rejects_a_scoring_that_does_not_fit_the_task():
    model, tokenizer, task = tiny_model("llama"), char_tokenizer(), toy_task()
    with pytest.raises(ValueError, match="does not fit the choice task"):
        evaluate_split(model, tokenizer, task, "test", "number")
    with pytest.raises(ValueError, match="Unknown scoring"):
        evaluate_split(model, tokenizer, task, "test", "bleu")


# ---------------------------------------------------------------------------------------------------- sweep


def test_sweep_reuses_one_momentum_pass_and_counts_its_forwards(monkeypatch):
    model, tokenizer, task = tiny_model("llama"), char_tokenizer(), toy_task()
    scores = compute_momentum(model, tokenizer, task.pairs("fit"), sites=SITES, progress=False)

    def no_pass(*args, **kwargs):
        raise AssertionError("the sweep must not run another momentum pass")

    monkeypatch.setattr(fit_module, "compute_momentum", no_pass)
    monkeypatch.setattr(fit_module.MomentumCounter, "count_batch", no_pass)
    counter = ForwardCounter(model.model)
    ks, alphas = [1, 2, 4, 8], [1.0, 5.0, 50.0]
    sweep, peft_model = sweep_k_alpha(model, tokenizer, scores, task, "validation", ks, alphas, batch_size=4,
                                      progress=False)
    batches = -(-len(task.validation) // 4)
    assert len(sweep.cells) == len(ks) * len(alphas)
    assert counter.calls == (1 + len(ks) * len(alphas)) * batches  # vanilla + one evaluation per cell, nothing more
    # The model is left steered by the cell that ships (or by nothing), and a fresh evaluation reproduces its score.
    chosen = sweep.chosen
    expected = [] if chosen is None else scores.select(chosen.k, chosen.alpha)
    steered = peft_model.get_aus()
    assert [(au.module, au.dim) for au in steered] == [(au.module, au.dim) for au in sorted(expected)]
    assert [au.gamma for au in steered] == pytest.approx([au.gamma for au in sorted(expected)], rel=1e-6)
    shipped_accuracy = sweep.vanilla.accuracy if chosen is None else chosen.accuracy
    assert evaluate_split(peft_model, tokenizer, task, "validation").accuracy == shipped_accuracy
    if chosen is not None:
        config = peft_model.peft_config["default"]
        assert (config.k, config.alpha) == (chosen.k, chosen.alpha)


def test_each_cell_equals_a_separately_built_adapter():
    model, tokenizer, task = tiny_model("gemma3_text"), char_tokenizer(), toy_task()
    scores = compute_momentum(model, tokenizer, task.pairs("fit"), sites=SITES, progress=False)
    sweep, peft_model = sweep_k_alpha(model, tokenizer, scores, task, "validation", [2, 8], [1.0, 20.0],
                                      progress=False)
    base = peft_model.unload()
    for cell in sweep.cells:
        fresh = scores.to_adapter(cell.k, cell.alpha, base)
        assert evaluate_split(fresh, tokenizer, task, "validation").correct == cell.correct
        base = fresh.unload()


def test_best_cell_prefers_fewer_aus_then_smaller_alpha():
    from austeer_peft.evaluate.sweep import SweepCell, SweepResult

    cells = [SweepCell(4, 1.0, 0.7, 4, []), SweepCell(1, 50.0, 0.7, 1, []), SweepCell(1, 5.0, 0.7, 1, []),
             SweepCell(8, 1.0, 0.6, 8, [])]
    assert SweepResult("m", cells, None, "restricted", 10, 0.0).best is cells[2]


def test_grid_values_of_k_above_the_number_of_aus_are_dropped():
    model, tokenizer, task = tiny_model("llama"), char_tokenizer(), toy_task()
    scores = compute_momentum(model, tokenizer, task.pairs("fit"), sites=["attention"], progress=False)
    sweep, _ = sweep_k_alpha(model, tokenizer, scores, task, "validation", [1, scores.num_aus + 1], [1.0],
                             progress=False)
    assert [cell.k for cell in sweep.cells] == [1]


def test_scores_for_sites_keeps_one_sites_counts():
    model, tokenizer, task = tiny_model("llama"), char_tokenizer(), toy_task()
    scores = compute_momentum(model, tokenizer, task.pairs("fit"), sites=SITES, progress=False)
    ffn = scores_for_sites(scores, "ffn")
    alone = compute_momentum(tiny_model("llama"), tokenizer, task.pairs("fit"), sites=["ffn"], progress=False)
    assert [m.name for m in ffn.modules] == [m.name for m in alone.modules]
    assert all(torch.equal(ffn.n_pos[m], alone.n_pos[m]) and torch.equal(ffn.n_neg[m], alone.n_neg[m])
               for m in alone.n_pos)
    with pytest.raises(ValueError, match="counted on sites"):
        scores_for_sites(ffn, "attention")


# ---------------------------------------------------------------------------------------------------- baselines


def test_block_level_steers_every_dimension_with_the_austeer_rule():
    model, tokenizer, task = tiny_model("llama"), char_tokenizer(), toy_task()
    scores = compute_momentum(model, tokenizer, task.pairs("fit"), sites=["ffn"], progress=False)
    name = scores.modules[1].name
    aus = block_level_aus(scores, [name], alpha=10.0)
    assert [au.dim for au in aus] == list(range(scores.modules[1].width))
    for au in aus:
        pos, neg = int(scores.n_pos[name][au.dim]), int(scores.n_neg[name][au.dim])
        expected = 10.0 * pos / scores.num_pairs if pos > neg else -10.0 * neg / scores.num_pairs
        assert au == AU(name, au.dim, expected)
    with pytest.raises(ValueError, match="no momentum counts"):
        block_level_aus(scores, ["model.layers.9.mlp"], 1.0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_caa_vector_is_the_mean_last_token_difference(family):
    model, tokenizer, task = tiny_model(family), char_tokenizer(), toy_task()
    pairs = task.pairs("fit")[:9]
    vectors = caa_vectors(model, tokenizer, pairs, batch_size=4, progress=False)
    _, layers = find_decoder_layers(model)
    reference = torch.zeros_like(vectors.vectors, dtype=torch.float64)
    for pair in pairs:
        for sign, text in ((1, pair.positive), (-1, pair.negative)):
            outputs = model(torch.tensor([tokenizer(text)["input_ids"]]), output_hidden_states=True)
            # hidden_states[i + 1] is layer i's output (the last one after the final norm, so read it by hook below)
            for i in range(len(layers) - 1):
                reference[i] += sign * outputs.hidden_states[i + 1][0, -1].double()
    reference /= len(pairs)
    torch.testing.assert_close(vectors.vectors[:-1].double(), reference[:-1], atol=1e-5, rtol=1e-4)
    assert vectors.num_pairs == len(pairs)


def test_caa_steering_adds_the_vector_at_every_position_and_is_removed():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    ids = torch.tensor([tokenizer("abc: x")["input_ids"]])
    _, layers = find_decoder_layers(model)
    seen = []
    handle = layers[1].register_forward_hook(lambda m, a, out: seen.append(out if torch.is_tensor(out) else out[0]))
    vector = torch.randn(model.config.hidden_size)
    plain = model(ids).logits
    with caa_steering(model, 0, vector, 2.0):
        steered = model(ids).logits
    again = model(ids).logits
    handle.remove()
    assert not torch.allclose(plain, steered) and torch.equal(plain, again)
    assert len(seen) == 3
    with pytest.raises(ValueError, match="out of range"):
        with caa_steering(model, 7, vector, 1.0):
            pass
    assert caa_layers(30) == [7, 12, 14, 17, 22] and caa_layers(2) == [0, 1]


# ---------------------------------------------------------------------------------------------------- comparison


def test_compare_methods_writes_the_table_and_reloadable_adapters(tmp_path):
    model, tokenizer, task = tiny_model("llama"), char_tokenizer(), toy_task()
    comparison = compare_methods(model, tokenizer, task, ks=[1, 4], alphas=[1.0, 10.0], caa_multipliers=[1.0],
                                 output_dir=tmp_path, progress=False)
    table = comparison.table()
    assert [row["method"] for row in table] == ["vanilla", "AUSteer-attention", "AUSteer-ffn", "block-level", "CAA"]
    assert all(0 <= row["ci_low"] <= row["test_accuracy"] <= row["ci_high"] <= 100 for row in table)
    # How often each choice was the answer, consistent with the accuracy and the labels.
    labels = task.test["label"]
    for row, method in zip(table, comparison.methods):
        assert set(row["predicted"]) <= {"x", "y"} and sum(row["predicted"].values()) == pytest.approx(100, abs=0.2)
        answered_x = sum((ok and label == 0) or (not ok and label == 1)
                         for ok, label in zip(method.test.correct, labels))
        assert row["predicted"].get("x", 0.0) == round(100 * answered_x / len(labels), 1)
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["results"] == json.loads(json.dumps(table))
    with open(tmp_path / "sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 2 + 2 + len(caa_layers(2))  # two sites x grid, block-level alphas, CAA layers
    assert {(tmp_path / f).exists() for f in ["heatmap_attention.png", "heatmap_ffn.png", "au_locations.png"]} == {True}
    # Each saved AUSteer adapter reloads onto a fresh base model and reproduces its test accuracy; a method that
    # shipped no steer saves no adapter and reports the unsteered model.
    for row in table[1:4]:
        name = {"AUSteer-attention": "austeer_attention", "AUSteer-ffn": "austeer_ffn"}.get(row["method"],
                                                                                             "block_level")
        if not row["shipped"]:
            assert not (tmp_path / "adapters" / name).exists()
            assert (row["test_accuracy"], row["steered"], row["gain"]) == (table[0]["test_accuracy"], 0, 0.0)
            assert "no steer beats vanilla on this data" in row["note"]
            continue
        reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapters" / name)
        accuracy = evaluate_split(reloaded, tokenizer, task, "test").accuracy
        assert round(100 * accuracy, 2) == row["test_accuracy"]
        assert row["adapter_bytes"] == (tmp_path / "adapters" / name / "adapter_model.safetensors").stat().st_size


# ---------------------------------------------------------------------------------------------------- selection


def labelled_by(model, tokenizer, task, steer=None):
    """``task`` with its validation and test labels replaced by the answers of ``model`` (steered by ``steer``, a
    ``(scores, k, alpha)`` triple, or unsteered): a task on which that steer is exactly right. Returns the plain
    model and the task."""
    peft_model = None if steer is None else steer[0].to_adapter(steer[1], steer[2], model, adapter_name="labeller")
    splits = {}
    for split in ("validation", "test"):
        data = task.split(split)
        result = evaluate_split(peft_model or model, tokenizer, task, split)
        labels = [label if ok else 1 - label for ok, label in zip(result.correct, data["label"])]
        splits[split] = data.remove_columns("label").add_column("label", labels)
    if peft_model is not None:
        model = peft_model.unload()
    return model, dataclasses.replace(task, **splits)


def test_a_task_no_cell_helps_ships_no_steer():
    """Labels = the unsteered model's own answers: every cell can only lose, so the sweep ships nothing."""
    tokenizer = char_tokenizer()
    model, task = labelled_by(tiny_model("llama"), tokenizer, toy_task(n=120, n_test=30, n_validation=60))
    scores = compute_momentum(model, tokenizer, task.pairs("fit"), sites=SITES, progress=False)
    sweep, peft_model = sweep_k_alpha(model, tokenizer, scores, task, "validation", [1, 4, 16], [5.0, 50.0],
                                      progress=False)
    assert sweep.vanilla.accuracy == 1.0 and sweep.chosen is None and not sweep.selection.shipped
    assert "no steer beats vanilla on this data" in sweep.selection.note
    assert peft_model.get_aus() == []
    assert sweep.selection.most_accurate == (sweep.best.k, sweep.best.alpha)  # the old rule's cell, for reference


def test_a_planted_effect_ships_the_steer_that_carries_it():
    """Labels = the answers under one cell of the grid: that cell is right everywhere and vanilla is not, so a steer
    ships, as good as the planted one on validation, and it beats vanilla on test."""
    tokenizer = char_tokenizer()
    base, task = tiny_model("llama"), toy_task(n=200, n_test=60, n_validation=100)
    scores = compute_momentum(base, tokenizer, task.pairs("fit"), sites=SITES, progress=False)
    model, task = labelled_by(base, tokenizer, task, steer=(scores, 64, 20.0))
    sweep, peft_model = sweep_k_alpha(model, tokenizer, scores, task, "validation", [4, 16, 64], [5.0, 20.0],
                                      progress=False)
    planted = next(cell for cell in sweep.cells if (cell.k, cell.alpha) == (64, 20.0))
    assert planted.accuracy == 1.0 and sweep.vanilla.accuracy < 0.9  # the plant moved enough answers to be seen
    assert sweep.selection.shipped and sweep.chosen.accuracy >= planted.accuracy - 0.05
    with peft_model.disable_adapter():
        vanilla_test = evaluate_split(peft_model, tokenizer, task, "test").accuracy
    assert evaluate_split(peft_model, tokenizer, task, "test").accuracy > vanilla_test


def test_the_fit_command_writes_no_steer_that_does_not_beat_vanilla_on_validation():
    """`austeer fit`'s check: on a task where the plain model is always right, the fitted steer is removed (the
    command then writes no adapter); asked for the old rule, it is kept."""
    from austeer_peft.cli.fit import check_on_validation

    tokenizer = char_tokenizer()
    model, task = labelled_by(tiny_model("llama"), tokenizer, toy_task(n=120, n_test=30, n_validation=60))
    result = fit_austeer(model, tokenizer, task.pairs("fit"), sites=SITES, k=64, alpha=20.0, progress=False)
    fitted = result.peft_model.get_aus()
    kept = check_on_validation(result, tokenizer, task, argparse.Namespace(scoring=None, batch_size=16,
                                                                           selection="most-accurate"))
    assert kept.shipped and result.peft_model.get_aus() == fitted and "unchecked" in kept.note
    check = check_on_validation(result, tokenizer, task, argparse.Namespace(scoring=None, batch_size=16,
                                                                            selection="guarded"))
    assert not check.shipped and "no steer beats vanilla" in check.note and result.peft_model.get_aus() == []


def test_each_saved_adapter_has_its_own_card(tmp_path):
    """adapters/<name>/ holds each shipped adapter with a card about that adapter (its AUs, file size and test score
    next to the plain model's); no shared adapters/README.md describes whichever was saved last."""
    from huggingface_hub import ModelCard

    model, tokenizer, task = tiny_model("llama"), char_tokenizer(), toy_task()
    comparison = compare_methods(model, tokenizer, task, ks=[1, 4], alphas=[10.0], baselines=["block"],
                                 output_dir=tmp_path, progress=False, selection="most-accurate")
    rows = {row["method"]: row for row in comparison.table()}
    assert not (tmp_path / "adapters" / "README.md").exists()
    names = {"AUSteer-attention": "austeer_attention", "AUSteer-ffn": "austeer_ffn", "block-level": "block_level"}
    sizes = set()
    for method, name in names.items():
        folder = tmp_path / "adapters" / name
        aus = PeftModel.from_pretrained(tiny_model("llama"), folder).get_aus()
        assert len(aus) == rows[method]["steered"]
        card = ModelCard.load(folder / "README.md")
        assert "austeer" in card.data.tags
        size = (folder / "adapter_model.safetensors").stat().st_size
        assert f"{size:,} bytes" in card.text or f"{size / 1024:,.1f} KiB" in card.text
        steered = f"{len(aus)} activation{'s' if len(aus) != 1 else ''} in"
        assert steered in card.text
        [result] = card.data.eval_results
        assert (result.dataset_name, result.dataset_split) == (task.name, "test")
        assert round(100 * result.metric_value, 2) == rows[method]["test_accuracy"]
        sizes.add(size)
    assert len(sizes) > 1  # the block-level adapter is much larger: the cards cannot all be one card
