"""transformers' own adapter API on AUSteer adapters: ``model.load_adapter``, ``from_pretrained(adapter_dir)``,
``pipeline(model=adapter_dir)`` steer exactly as ``PeftModel.from_pretrained``; ``add_adapter`` and adapters that
cannot be loaded that way refuse loudly. Verified with transformers 5.24 and peft 0.21.2.

These loaders call ``peft.inject_adapter_in_model`` with the config and then load weights by parameter name, so the
AUs reach the model through ``adapter_config.json``'s ``aus`` entry (``AUSteerModel.inject_adapter``)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from transformers import AutoModelForCausalLM, pipeline

from austeer_peft import AUSteerConfig
from austeer_peft.tuner.layer import AUSteerLayer

from conftest import char_tokenizer, logits, tiny_model

AUS = [(("attention", 1), 5, 5.0), (("attention", 0), 17, -0.75), (("ffn", 1), 3, 2.5)]


@pytest.fixture
def saved(tmp_path):
    """A tiny Llama base (with a tokenizer) saved as a folder, and an adapter for it whose config names that folder."""
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), AUSteerConfig(sites=["attention", "ffn"]))
    peft_model.set_aus(AUS)
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    return base, tmp_path / "adapter"


def reference(base, adapter):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


def steered_modules(model) -> list[str]:
    return sorted(name for name, module in model.named_modules() if isinstance(module, AUSteerLayer))


def test_load_adapter_steers_as_peft_model(saved, input_ids):
    base, adapter = saved
    model = AutoModelForCausalLM.from_pretrained(base)
    plain = logits(model, input_ids)
    model.load_adapter(str(adapter))
    expected = logits(reference(base, adapter), input_ids)
    assert steered_modules(model) == ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp",
                                      "model.layers.1.self_attn.o_proj"]
    assert (logits(model, input_ids) - expected).abs().max() <= 1e-6
    assert (expected - plain).abs().max() > 1e-3  # the adapter does steer


def test_from_pretrained_of_the_adapter_folder_steers_as_peft_model(saved, input_ids):
    base, adapter = saved
    model = AutoModelForCausalLM.from_pretrained(adapter)  # the base comes from base_model_name_or_path
    assert steered_modules(model)
    assert (logits(model, input_ids) - logits(reference(base, adapter), input_ids)).abs().max() <= 1e-6


def test_pipeline_of_the_adapter_folder_steers_as_peft_model(saved, input_ids):
    base, adapter = saved
    generator = pipeline("text-generation", model=str(adapter), device="cpu")
    peft_model = reference(base, adapter)
    assert (logits(generator.model, input_ids) - logits(peft_model, input_ids)).abs().max() <= 1e-6
    tokenizer = char_tokenizer()
    prompt = "the cat sat"
    text = generator(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = tokenizer(prompt, return_tensors="pt")
    expected = peft_model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert text == tokenizer.decode(expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_scoped_adapter_generates_as_peft_model(saved):
    """scope="generated": transformers' generate runs plain forwards, whose rule (first call: last token; cached
    calls: every token) is what PeftModel.generate does."""
    base, adapter = saved
    peft_model = reference(base, adapter)
    peft_model.set_scope("generated")
    peft_model.save_pretrained(adapter.parent / "scoped")
    model = AutoModelForCausalLM.from_pretrained(base)
    model.load_adapter(str(adapter.parent / "scoped"))
    ids = char_tokenizer()(["the cat sat", "a dog"], return_tensors="pt", padding=True, padding_side="left")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    got, expected = model.generate(**ids, **kwargs), peft_model.generate(**ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(got.scores, expected.scores)) <= 1e-6


def test_add_adapter_refuses_loudly(saved):
    """transformers 5.24 wants peft >= 0.22 for add_adapter (0.21.2 is the newest on PyPI); and where it would reach
    PEFT, injecting a config without AUs is refused with the calls to use, never an adapter that steers nothing."""
    base, _ = saved
    model = AutoModelForCausalLM.from_pretrained(base)
    with pytest.raises(ValueError, match="version >= 0.22"):
        model.add_adapter(AUSteerConfig(sites="attention"))
    with pytest.raises(ValueError, match=r"get_peft_model\(model, config\).*set_aus"):
        inject_adapter_in_model(AUSteerConfig(sites="attention"), model)
    assert not steered_modules(model)


def test_adapter_without_aus_in_its_config_is_refused_by_transformers_and_loads_with_peft(saved, input_ids):
    """Adapters saved before adapter_config.json carried the AUs: transformers' path refuses with the call to use."""
    base, adapter = saved
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["aus"]
    config_path.write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(base)
    with pytest.raises(ValueError, match=r"no `aus` entry.*PeftModel.from_pretrained\(model, adapter_dir\)"):
        model.load_adapter(str(adapter))
    assert not steered_modules(model)
    loaded = reference(base, adapter)
    assert sorted((au.module, au.dim) for au in loaded.get_aus()) == [
        ("model.layers.0.self_attn.o_proj", 17), ("model.layers.1.mlp", 3), ("model.layers.1.self_attn.o_proj", 5)]


def test_config_aus_that_disagree_with_the_table_are_refused(saved):
    base, adapter = saved
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["aus"]["model.layers.1.mlp"] = [[3, 2.0]]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="differ from its weights table"):
        reference(base, adapter)


def test_config_aus_round_trip_float32_exactly(tmp_path, input_ids):
    """γ is written as the shortest decimal of its float32 value, so any γ reads back bit for bit."""
    torch.manual_seed(3)
    peft_model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites="attention"))
    gammas = (torch.randn(20) * 7).tolist()
    peft_model.set_aus([(("attention", 1), dim, gamma) for dim, gamma in enumerate(gammas)])
    peft_model.save_pretrained(tmp_path)
    model = tiny_model("llama")
    model.load_adapter(str(tmp_path))
    layer = model.model.layers[1].self_attn.o_proj
    assert torch.equal(layer.austeer_gamma["default"], torch.tensor(gammas, dtype=torch.float32))
    assert torch.equal(logits(model, input_ids), logits(peft_model, input_ids))
