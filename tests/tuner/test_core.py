"""The core contract on tiny random models of every supported family: steering, files, merge, adapters."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import (
    FAMILIES, MERGEABLE_SITES, assert_merge_exact_and_unmerge_restores, assert_only_dim_scaled, logits, spread_aus,
    steered_and_plain, tiny_model,
)
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from austeer_peft import AUSteerConfig, AUSteerLayer
from austeer_peft.tuner.sites import SITES, candidate_modules


@pytest.mark.parametrize("site", list(SITES))
def test_sites_resolve_on_every_family(family, site):
    model = tiny_model(family)
    candidates = candidate_modules(model, AUSteerConfig(sites=[site]))
    assert [c.layer for c in candidates] == [0, 1]
    expected_width = 128 if (site == "ffn_inner" and family == "gpt2") else (64 if site == "ffn_inner" else 32)
    assert [c.width for c in candidates] == [expected_width] * 2


def test_zero_gamma_is_identity(family, input_ids):
    base = tiny_model(family)
    reference = logits(base, input_ids)
    model = get_peft_model(base, AUSteerConfig(sites=list(SITES)))
    aus = spread_aus(base, list(SITES), 20)
    model.set_aus([(m, d, 0.0) for m, d, _ in aus])
    assert any(isinstance(m, AUSteerLayer) for m in model.modules())
    assert torch.equal(logits(model, input_ids), reference)


@pytest.mark.parametrize("site", list(SITES))
def test_hand_set_au_changes_exactly_that_dimension(family, site, input_ids):
    model = get_peft_model(tiny_model(family), AUSteerConfig(sites=[site]))
    candidate = candidate_modules(model.get_base_model(), AUSteerConfig(sites=[site]))[0]
    dim, gamma = 5, 2.5
    model.set_aus([((site, 0), dim, gamma)])
    layer = dict(model.named_modules())["base_model.model." + candidate.name]
    assert isinstance(layer, AUSteerLayer)
    steered, plain = steered_and_plain(model, layer, input_ids)
    assert steered.shape[-1] == candidate.width
    assert_only_dim_scaled(steered, plain, dim, 1 + gamma)


def test_only_modules_with_aus_are_wrapped(family):
    model = get_peft_model(tiny_model(family), AUSteerConfig(sites=["attention", "ffn"]))
    assert not any(isinstance(m, AUSteerLayer) for m in model.modules())
    model.set_aus([(("ffn", 1), 3, 1.0)])
    wrapped = [m.candidate.name for m in model.modules() if isinstance(m, AUSteerLayer)]
    assert len(wrapped) == 1 and wrapped[0].endswith("1.mlp")
    model.set_aus([(("attention", 0), 3, 1.0)])  # replaces: the mlp is unwrapped again
    wrapped = [m.candidate.name for m in model.modules() if isinstance(m, AUSteerLayer)]
    assert len(wrapped) == 1 and wrapped[0].startswith(("model.layers.0", "transformer.h.0"))
    layer = next(m for m in model.modules() if isinstance(m, AUSteerLayer))
    assert layer.austeer_index["default"].dtype == torch.int64
    assert layer.austeer_gamma["default"].dtype == torch.float32


def test_save_load_round_trip(family, input_ids, tmp_path):
    model = get_peft_model(tiny_model(family), AUSteerConfig(sites=list(SITES), k=12))
    aus = spread_aus(model.get_base_model(), list(SITES), 12)
    model.set_aus(aus)
    steered = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in tmp_path.iterdir()}

    loaded = PeftModel.from_pretrained(tiny_model(family), tmp_path)
    assert torch.equal(logits(loaded, input_ids), steered)
    assert sorted(loaded.get_aus()) == sorted(model.get_aus())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "AUSTEER" and config["sites"] == list(SITES) and config["k"] == 12
    assert len(config["steered_modules"]) == len({m for m, _, _ in aus})


def test_auto_peft_model_loads_from_base_path(family, input_ids, tmp_path):
    tiny_model(family).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model = get_peft_model(base, AUSteerConfig(sites=["attention", "ffn"]))
    model.set_aus(spread_aus(base, ["attention", "ffn"], 8))
    steered = logits(model, input_ids)
    model.save_pretrained(tmp_path / "adapter")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.equal(logits(auto.eval(), input_ids), steered)


@pytest.mark.parametrize("k", [100])
def test_adapter_file_is_tiny(family, tmp_path, k):
    base = tiny_model(family, layers=12)
    model = get_peft_model(base, AUSteerConfig(sites=MERGEABLE_SITES, k=k))
    model.set_aus(spread_aus(base, MERGEABLE_SITES, k))
    assert len({m for m, _, _ in model.get_aus()}) >= 30  # spread over dozens of modules
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").stat().st_size <= 4096


def test_merge_matches_unmerged_and_unmerge_is_exact(family, input_ids):
    base = tiny_model(family)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, AUSteerConfig(sites=MERGEABLE_SITES))
    model.set_aus(spread_aus(base, MERGEABLE_SITES, 30))
    assert_merge_exact_and_unmerge_restores(model, original, input_ids)


def test_merge_and_unload_gives_plain_model(family, input_ids, tmp_path):
    base = tiny_model(family)
    model = get_peft_model(base, AUSteerConfig(sites=MERGEABLE_SITES))
    model.set_aus(spread_aus(base, MERGEABLE_SITES, 30))
    steered = logits(model, input_ids)
    merged = model.merge_and_unload()
    assert type(merged) is type(base)
    assert not any(isinstance(m, AUSteerLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), steered, rtol=0, atol=1e-5)


def test_merged_checkpoint_reloads_without_austeer(tmp_path, input_ids):
    """Merge, save with save_pretrained, reload with plain transformers in a process that never imports us."""
    for family in FAMILIES:
        base = tiny_model(family)
        model = get_peft_model(base, AUSteerConfig(sites=MERGEABLE_SITES))
        model.set_aus(spread_aus(base, MERGEABLE_SITES, 30))
        torch.save(logits(model, input_ids), tmp_path / f"{family}.pt")
        model.merge_and_unload().save_pretrained(tmp_path / family)
    torch.save(input_ids, tmp_path / "input_ids.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load({str(tmp_path / 'input_ids.pt')!r})
for family in {FAMILIES!r}:
    model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + '/' + family).eval()
    with torch.no_grad():
        got = model(ids).logits
    want = torch.load({str(tmp_path)!r} + '/' + family + '.pt')
    err = (got - want).abs().max().item()
    assert err <= 1e-5, (family, err)
    print(family, err)
assert 'austeer_peft' not in sys.modules
print('ok')
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_residual_cannot_be_merged(input_ids):
    base = tiny_model("llama")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, AUSteerConfig(sites=["attention", "residual"]))
    model.set_aus([(("attention", 0), 1, 1.0), (("residual", 1), 2, 1.0)])
    with pytest.raises(ValueError, match="residual.*cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="residual.*cannot be merged"):
        model.merge_adapter()
    for key, value in base.state_dict().items():  # nothing half-merged
        assert torch.equal(value, original[key.replace(".base_layer", "")])


def test_disable_adapter_gives_base_outputs(family, input_ids):
    base = tiny_model(family)
    reference = logits(base, input_ids)
    model = get_peft_model(base, AUSteerConfig(sites=list(SITES)))
    model.set_aus(spread_aus(base, list(SITES), 20))
    assert not torch.equal(logits(model, input_ids), reference)
    with model.disable_adapter():
        assert torch.equal(logits(model, input_ids), reference)
    assert not torch.equal(logits(model, input_ids), reference)


def test_two_adapters_switch_and_delete(family, input_ids):
    aus_a = spread_aus(tiny_model(family), ["attention", "ffn"], 10, seed=1)
    aus_b = spread_aus(tiny_model(family), ["ffn", "residual"], 10, seed=2)
    only_a = get_peft_model(tiny_model(family), AUSteerConfig(sites=["attention", "ffn"]))
    only_a.set_aus(aus_a)
    only_b = get_peft_model(tiny_model(family), AUSteerConfig(sites=["ffn", "residual"]))
    only_b.set_aus(aus_b)

    model = get_peft_model(tiny_model(family), AUSteerConfig(sites=["attention", "ffn"]))
    model.set_aus(aus_a)
    model.add_adapter("b", AUSteerConfig(sites=["ffn", "residual"]))
    model.set_aus(aus_b, adapter_name="b")
    assert torch.equal(logits(model, input_ids), logits(only_a, input_ids))  # "default" is still active
    model.set_adapter("b")
    assert torch.equal(logits(model, input_ids), logits(only_b, input_ids))
    model.set_adapter("default")
    assert torch.equal(logits(model, input_ids), logits(only_a, input_ids))
    assert sorted(model.get_aus("b")) == sorted(only_b.get_aus())

    model.delete_adapter("b")
    assert "b" not in model.peft_config
    assert all("b" not in m.austeer_index for m in model.modules() if isinstance(m, AUSteerLayer))
    assert torch.equal(logits(model, input_ids), logits(only_a, input_ids))


def test_nested_wrappers_unload_completely(input_ids):
    """A decoder layer (residual) and a projection inside it (attention) can both carry AUs."""
    base = tiny_model("llama")
    reference = logits(base, input_ids)
    model = get_peft_model(base, AUSteerConfig(sites=["attention", "residual", "ffn_inner"]))
    model.set_aus([(("attention", 0), 1, 1.0), (("residual", 0), 2, 1.0), (("ffn_inner", 0), 3, 2.0)])
    assert sum(isinstance(m, AUSteerLayer) for m in model.modules()) == 3
    plain = model.unload()
    assert not any(isinstance(m, AUSteerLayer) for m in plain.modules())
    assert torch.equal(logits(plain, input_ids), reference)


def test_target_modules_and_position(input_ids):
    base = tiny_model("llama")
    model = get_peft_model(base, AUSteerConfig(target_modules=["up_proj"], position="output"))
    model.set_aus([("model.layers.1.mlp.up_proj", 40, 1.5)])
    assert model.get_aus()[0].module == "model.layers.1.mlp.up_proj"
    steered = logits(model, input_ids)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, input_ids), steered, rtol=0, atol=1e-5)


def test_print_trainable_parameters_reports_nothing_trainable(capsys):
    model = get_peft_model(tiny_model("llama"), AUSteerConfig())
    model.set_aus([(("attention", 0), 1, 1.0)])
    model.print_trainable_parameters()
    assert "trainable params: 0 " in capsys.readouterr().out
    assert "AUSteerLayer(input, aus={'default': 1})" in repr(model)
