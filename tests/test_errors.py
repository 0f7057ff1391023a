"""Bad input gets a clear error naming the problem and the fix, and nothing is half-applied."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from austeer_peft import AUSteerConfig, AUSteerLayer


@pytest.mark.parametrize("kwargs, message", [
    ({"sites": "attn"}, "Unknown AUSteer site.*target_modules"),
    ({"sites": []}, "Unknown AUSteer site"),
    ({"sites": "ffn", "target_modules": ["o_proj"]}, "either `sites` or `target_modules`"),
    ({"k": 0}, "positive integer"),
    ({"k": 2.5}, "positive integer"),
    ({"alpha": float("nan")}, "finite number > 0"),
    ({"alpha": float("inf")}, "finite number > 0"),
    ({"alpha": 0}, "finite number > 0"),
    ({"target_modules": ["o_proj"], "position": "middle"}, "'input' or 'output'"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AUSteerConfig(**kwargs)


def test_site_missing_on_architecture_names_site_paths_and_fix():
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.feed = layer.mlp
        del layer.mlp
    with pytest.raises(ValueError, match=r"Site 'ffn'.*'mlp'.*target_modules=.*position='output'"):
        get_peft_model(model, AUSteerConfig(sites="ffn"))


def test_unknown_target_module():
    with pytest.raises(ValueError, match="No module of LlamaForCausalLM matches target_modules"):
        get_peft_model(tiny_model("llama"), AUSteerConfig(target_modules=["nonexistent_proj"]))


@pytest.mark.parametrize("aus, message", [
    ([(("attention", 5), 0, 1.0)], r"No candidate module for \(site, layer\)"),
    ([("model.layers.0.mlp", 0, 1.0)], "not a candidate of this adapter's sites"),
    ([(("attention", 0), 32, 1.0)], "out of range.*32 dimensions"),
    ([(("attention", 0), -1, 1.0)], "out of range"),
    ([(("attention", 0), 1, float("nan"))], "must be finite"),
    ([(("attention", 0), 1, 1.0), (("attention", 0), 1, 2.0)], "given twice"),
    ([("only-two", 1)], "An AU is"),
])
def test_bad_aus_change_nothing(aus, message):
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites="attention"))
    model.set_aus([(("attention", 1), 3, 1.0)])
    with pytest.raises((ValueError, TypeError), match=message):
        model.set_aus([(("attention", 0), 4, 1.0), *aus])
    assert model.get_aus() == [("model.layers.1.self_attn.o_proj", 3, 1.0)]


def _saved_adapter(tmp_path, family="llama", **model_kwargs):
    model = get_peft_model(tiny_model(family, **model_kwargs), AUSteerConfig(sites=["attention", "ffn"]))
    model.set_aus([(("attention", 1), 3, 1.0), (("ffn", 0), 7, -0.5)])
    model.save_pretrained(tmp_path)
    return tmp_path


def _unchanged(model):
    return not any(isinstance(m, AUSteerLayer) for m in model.modules())


@pytest.mark.parametrize("other, message", [
    (lambda: tiny_model("mistral"), "made for a 'llama' model, but the base model is 'mistral'"),
    (lambda: tiny_model("llama", layers=1), r"steers model.layers.1.self_attn.o_proj with width 32.*no such module"),
])
def test_adapter_for_another_model_is_refused_before_any_change(tmp_path, other, message):
    path = _saved_adapter(tmp_path)
    base = other()
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, path)
    assert _unchanged(base)


def test_adapter_for_another_width_names_both_shapes(tmp_path):
    path = _saved_adapter(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["steered_modules"] = {k: 64 for k in config["steered_modules"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    base = tiny_model("llama")
    with pytest.raises(ValueError, match="with width 64, the model has width 32"):
        PeftModel.from_pretrained(base, path)
    assert _unchanged(base)


@pytest.mark.parametrize("corrupt, message", [
    (lambda t: {**t, "austeer_table_index": torch.tensor([[5, 0]], dtype=torch.int32),
                "austeer_table_gamma": torch.tensor([1.0])}, "names module #5"),
    (lambda t: {**t, "austeer_table_index": torch.tensor([[0, 99]], dtype=torch.int32),
                "austeer_table_gamma": torch.tensor([1.0])}, "dimension 99"),
    (lambda t: {**t, "austeer_table_gamma": torch.tensor([1.0, 2.0, 3.0])}, "Malformed AUSteer adapter table"),
    (lambda t: {"lora_A.weight": torch.zeros(2)}, "not an AUSteer adapter table"),
])
def test_bad_adapter_table_is_refused_before_any_change(tmp_path, corrupt, message):
    path = _saved_adapter(tmp_path)
    table = load_file(path / "adapter_model.safetensors")
    save_file(corrupt(table), path / "adapter_model.safetensors")
    base = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, path)
    assert _unchanged(base)


def test_truncated_safetensors_is_refused(tmp_path):
    path = _saved_adapter(tmp_path)
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    base = tiny_model("llama")
    with pytest.raises(Exception, match="(?i)safetensor|header|incomplete|invalid"):
        PeftModel.from_pretrained(base, path)
    assert _unchanged(base)


def test_setting_aus_of_merged_adapter_is_refused():
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites="attention"))
    model.set_aus([(("attention", 1), 3, 1.0)])
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged; call `unmerge_adapter\\(\\)`"):
        model.set_aus([(("attention", 1), 4, 1.0)])


def test_unknown_adapter_name():
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites="attention"))
    with pytest.raises(ValueError, match="No adapter named 'nope'"):
        model.set_aus([], adapter_name="nope")


def test_quantized_like_weight_cannot_be_merged_silently():
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites="attention"))
    model.set_aus([(("attention", 1), 3, 1.0)])
    o_proj = model.get_base_model().model.layers[1].self_attn.o_proj.base_layer
    o_proj.weight = nn.Parameter(o_proj.weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="not as floating point"):
        model.merge_and_unload()
