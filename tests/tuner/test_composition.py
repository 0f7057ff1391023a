"""Several AUSteer adapters together: active at once (factors multiply) and combined by add_weighted_adapter."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MERGEABLE_SITES, assert_only_dim_scaled, logits, spread_aus, steered_and_plain, tiny_model
from peft import PeftModel, get_peft_model

from austeer_peft import AUSteerConfig, AUSteerLayer


def two_adapters(family, shared=6, seed=0):
    """Adapters "task" and "style" with 12 AUs each, `shared` of them on the same AUs with other γ."""
    base = tiny_model(family)
    aus_a = spread_aus(base, MERGEABLE_SITES, 12, seed=seed)
    others = [au for au in spread_aus(base, MERGEABLE_SITES, 40, seed=seed + 1)
              if (au[0], au[1]) not in {(m, d) for m, d, _ in aus_a}]
    aus_b = [(m, d, -g * (1 if i % 2 else 0.25)) for i, (m, d, g) in enumerate(aus_a[:shared])]
    aus_b += others[:12 - shared]
    model = get_peft_model(base, AUSteerConfig(sites=MERGEABLE_SITES), adapter_name="task")
    model.set_aus(aus_a, adapter_name="task")
    model.add_adapter("style", AUSteerConfig(sites=MERGEABLE_SITES))
    model.set_aus(aus_b, adapter_name="style")
    return model


def gammas(model, adapter):
    return {(au.module, au.dim): au.gamma for au in model.get_aus(adapter)}


def test_active_adapters_on_one_au_multiply(input_ids):
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites=["ffn"]), adapter_name="task")
    model.set_aus([(("ffn", 0), 5, 2.0)], adapter_name="task")
    model.add_adapter("style", AUSteerConfig(sites=["ffn"]))
    model.set_aus([(("ffn", 0), 5, -0.75)], adapter_name="style")
    model.base_model.set_adapter(["task", "style"])
    layer = next(m for m in model.modules() if isinstance(m, AUSteerLayer))
    steered, plain = steered_and_plain(model, layer, input_ids)
    assert_only_dim_scaled(steered, plain, 5, (1 + 2.0) * (1 - 0.75))


def test_replacing_aus_keeps_what_each_layer_has_active(input_ids):
    """set_aus that drops an adapter from a module must not switch that module to another adapter."""
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites=["ffn"]), adapter_name="task")
    model.set_aus([(("ffn", 0), 5, 2.0), (("ffn", 1), 5, 2.0)], adapter_name="task")
    model.add_adapter("style", AUSteerConfig(sites=["ffn"]))
    model.set_aus([(("ffn", 1), 3, 5.0)], adapter_name="style")
    model.set_aus([(("ffn", 0), 5, 2.0)], adapter_name="task")
    assert all(m.active_adapters == ["task"] for m in model.modules() if isinstance(m, AUSteerLayer))
    only_task = get_peft_model(tiny_model("llama"), AUSteerConfig(sites=["ffn"]))
    only_task.set_aus([(("ffn", 0), 5, 2.0)])
    assert torch.equal(logits(model, input_ids), logits(only_task, input_ids))


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_multiply_equals_both_active_and_merges_like_sequential_merges(family, input_ids):
    model = two_adapters(family)
    model.base_model.add_weighted_adapter(["task", "style"], [1, 1], "both")
    assert sorted(gammas(model, "both")) == sorted(set(gammas(model, "task")) | set(gammas(model, "style")))

    model.base_model.set_adapter(["task", "style"])
    both = logits(model, input_ids)
    model.merge_adapter(["task", "style"])  # task, then style folded into the weights
    merged_in_turn = logits(model, input_ids)
    model.unmerge_adapter()

    model.base_model.set_adapter("both")
    combined = logits(model, input_ids)
    model.merge_adapter()
    merged_combined = logits(model, input_ids)
    model.unmerge_adapter()

    with model.disable_adapter():
        assert not torch.allclose(logits(model, input_ids), combined)
    torch.testing.assert_close(combined, both, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged_combined, merged_in_turn, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged_combined, combined, rtol=0, atol=1e-5)


def test_multiply_weights_are_exponents_of_the_factors(input_ids):
    model = two_adapters("llama")
    a, b = gammas(model, "task"), gammas(model, "style")
    model.base_model.add_weighted_adapter(["task", "style"], [2, -1], "both")
    for key, gamma in gammas(model, "both").items():
        want = (1 + a.get(key, 0.0)) ** 2 * (1 + b.get(key, 0.0)) ** -1 - 1
        assert gamma == pytest.approx(want, rel=1e-6, abs=1e-6), key

    # A factor > 0 takes any real weight; a weight of 0 removes the adapter's steering.
    model.base_model.set_aus([(("ffn", 1), 4, 3.0)], adapter_name="task")
    model.base_model.add_weighted_adapter(["task"], [0.5], "root")
    model.base_model.add_weighted_adapter(["task", "style"], [0, 1], "only_style")
    assert model.get_aus("root")[0].gamma == pytest.approx(math.sqrt(4.0) - 1)
    model.base_model.set_adapter("root")
    layer = next(m for m in model.modules() if isinstance(m, AUSteerLayer) and "root" in m.austeer_index)
    steered, plain = steered_and_plain(model, layer, input_ids)
    assert_only_dim_scaled(steered, plain, 4, 2.0)
    assert {k: g for k, g in gammas(model, "only_style").items() if g != 0} == pytest.approx(b)


def test_multiply_refuses_fractional_powers_of_non_positive_factors():
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites=["ffn"]), adapter_name="task")
    model.set_aus([(("ffn", 0), 5, -1.5), (("ffn", 1), 2, -1.0)], adapter_name="task")
    model.base_model.add_weighted_adapter(["task"], [3], "cube")  # integer powers of a negative factor are fine
    assert model.get_aus("cube")[0].gamma == pytest.approx((-0.5) ** 3 - 1)
    with pytest.raises(ValueError, match=r"AU model\.layers\.0\.mlp\[5\] of adapter 'task' has factor 1 \+ γ = -0\.5.*"
                                         r"weight 0\.5.*integer weights"):
        model.base_model.add_weighted_adapter(["task"], [0.5], "root")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\[2\] .* factor 1 \+ γ = 0, .* weight -1"):
        model.base_model.add_weighted_adapter(["task"], [-1], "inverse")
    assert set(model.peft_config) == {"task", "cube"}  # nothing half-added


def test_union_keeps_the_stronger_weighted_gamma():
    model = two_adapters("llama")
    a, b = gammas(model, "task"), gammas(model, "style")
    model.base_model.add_weighted_adapter(["task", "style"], [1.0, 2.0], "u", combination_type="union")
    union = gammas(model, "u")
    assert set(union) == set(a) | set(b)
    for key, gamma in union.items():
        candidates = [g for g in (a.get(key), None if key not in b else 2.0 * b[key]) if g is not None]
        assert gamma == pytest.approx(max(candidates, key=abs), rel=1e-6), key
    assert any(key in b and abs(2 * b[key]) > abs(a[key]) for key in a)  # both branches of the choice are taken
    assert any(key in b and abs(2 * b[key]) < abs(a[key]) for key in a)


def test_combined_adapter_saves_and_loads(tmp_path, input_ids):
    model = two_adapters("gpt2")
    model.base_model.add_weighted_adapter(["task", "style"], [0.5, 1], "both")
    model.base_model.set_adapter("both")
    want = logits(model, input_ids)
    model.save_pretrained(tmp_path, selected_adapters=["both"])
    loaded = PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path / "both")
    assert torch.equal(logits(loaded, input_ids), want)
    assert sorted(loaded.get_aus()) == sorted(model.get_aus("both"))


def test_combination_joins_sites_and_keeps_the_scope():
    config = AUSteerConfig(sites=["attention"], scope="generated")
    model = get_peft_model(tiny_model("llama"), config, adapter_name="task")
    model.set_aus([(("attention", 0), 1, 1.0)], adapter_name="task")
    model.add_adapter("style", AUSteerConfig(sites=["ffn", "residual"], scope="generated"))
    model.set_aus([(("residual", 1), 2, 1.0)], adapter_name="style")
    model.base_model.add_weighted_adapter(["task", "style"], [1, 1], "both")
    config = model.peft_config["both"]
    assert config.sites == ["attention", "ffn", "residual"] and config.scope == "generated" and config.k == 2
    assert sorted(config.steered_modules) == ["model.layers.0.self_attn.o_proj", "model.layers.1"]


def test_incompatible_adapters_and_bad_arguments_are_refused():
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites=["ffn"]), adapter_name="task")
    model.set_aus([(("ffn", 0), 5, 1.0)], adapter_name="task")
    model.add_adapter("scoped", AUSteerConfig(sites=["ffn"], scope="from_position", scope_position=2))
    model.set_aus([(("ffn", 0), 5, 1.0)], adapter_name="scoped")
    model.add_adapter("named", AUSteerConfig(target_modules=["up_proj"], position="output"))
    model.set_aus([("model.layers.0.mlp.up_proj", 3, 1.0)], adapter_name="named")
    model.add_adapter("other", AUSteerConfig(sites=["ffn"]))
    model.set_aus([(("ffn", 1), 5, 1.0)], adapter_name="other")
    model.peft_config["other"].base_model_type = "gpt2"  # as if its file came from another architecture
    tuner = model.base_model

    with pytest.raises(ValueError, match="'task' and 'scoped' cannot be combined: scope is 'all' vs 'from_position'"):
        tuner.add_weighted_adapter(["task", "scoped"], [1, 1], "x")
    with pytest.raises(ValueError, match="'task' and 'named' cannot be combined: one config cannot hold both"):
        tuner.add_weighted_adapter(["task", "named"], [1, 1], "x")
    with pytest.raises(ValueError, match="base_model_type is 'llama' vs 'gpt2'.*same base model"):
        tuner.add_weighted_adapter(["task", "other"], [1, 1], "x")
    with pytest.raises(ValueError, match="combination_type must be 'multiply' or 'union'"):
        tuner.add_weighted_adapter(["task"], [1], "x", combination_type="svd")
    with pytest.raises(ValueError, match=r"No adapter named \['nope'\]"):
        tuner.add_weighted_adapter(["task", "nope"], [1, 1], "x")
    with pytest.raises(ValueError, match="'task' exists already"):
        tuner.add_weighted_adapter(["scoped"], [1], "task")
    with pytest.raises(ValueError, match="`weights` must be 2 finite numbers"):
        tuner.add_weighted_adapter(["task", "other"], [1], "x")
    with pytest.raises(ValueError, match="distinct adapter names"):
        tuner.add_weighted_adapter(["task", "task"], [1, 1], "x")
    assert "x" not in model.peft_config
