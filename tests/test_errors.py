"""Bad input gets a clear error naming the problem and the fix, and nothing is half-applied."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import char_tokenizer, logits, random_pairs, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn


from austeer_peft import AUSteerConfig, AUSteerLayer, compute_momentum


@pytest.mark.parametrize("kwargs, message", [
    ({"sites": "attn"}, "Unknown AUSteer site.*target_modules"),
    ({"sites": []}, "Unknown AUSteer site"),
    ({"sites": "ffn", "target_modules": ["o_proj"]}, "either `sites` or `target_modules`"),
    ({"k": 0}, "positive integer"),
    ({"k": 2.5}, "positive integer"),
    ({"alpha": float("nan")}, "finite number > 0"),
    ({"alpha": float("inf")}, "finite number > 0"),
    ({"alpha": 0}, "finite number > 0"),
    ({"alpha": -1.0}, "finite number > 0"),
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


@pytest.mark.parametrize("damage", [lambda data: data[: len(data) // 2],  # truncated
                                    lambda data: data[:8] + bytes(range(256)) * 4])  # header and data overwritten
def test_truncated_or_corrupt_safetensors_is_refused(tmp_path, damage):
    path = _saved_adapter(tmp_path)
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(damage(data))
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


class _WritesAFile:
    """A pickle payload that creates a file when unpickled, if the reader runs code from the pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickled_adapter_that_would_run_code_is_refused_without_running_it(tmp_path, input_ids):
    """PEFT reads adapter_model.bin with torch.load(weights_only=True), which runs no code from the pickle; AUSteer
    names the problem, and nothing is left behind."""
    folder, marker = tmp_path / "evil", tmp_path / "code-ran"
    _saved_adapter(folder)
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"austeer_table_index": _WritesAFile(marker), "austeer_table_gamma": torch.tensor([1.0])},
               folder / "adapter_model.bin")
    base = tiny_model("llama")
    with pytest.raises(ValueError, match="adapter_model.bin.*holds more than tensors.*weights_only=True.*runs no code"):
        PeftModel.from_pretrained(base, folder)
    assert _unchanged(base) and not marker.exists()
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites="attention"))
    with pytest.raises(ValueError, match="holds more than tensors"):
        model.load_adapter(folder, adapter_name="pickled")
    assert list(model.peft_config) == ["default"] and not marker.exists()  # nothing left behind
    good = _saved_adapter(tmp_path / "good")
    model.load_adapter(good, adapter_name="pickled")  # the name can be used again
    assert model.get_aus("pickled") == PeftModel.from_pretrained(tiny_model("llama"), good).get_aus()


def test_pickled_tensor_adapter_loads_and_steers_like_safetensors(tmp_path, input_ids):
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites="attention"))
    model.set_aus([(("attention", 1), 3, 1.0), (("attention", 0), 7, -0.5)])
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    model.save_pretrained(tmp_path / "safetensors")
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    from_bin = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "bin")
    from_safetensors = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "safetensors")
    assert from_bin.get_aus() == from_safetensors.get_aus() == model.get_aus()
    assert torch.equal(logits(from_bin, input_ids), logits(from_safetensors, input_ids))
    assert torch.equal(logits(from_bin, input_ids), logits(model, input_ids))


def test_pickled_adapters_of_other_methods_still_load(tmp_path):
    model = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path, safe_serialization=False)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key])


def test_loading_into_an_existing_adapter_name_is_refused(tmp_path):
    first = _saved_adapter(tmp_path / "first")
    second = get_peft_model(tiny_model("llama"), AUSteerConfig(sites=["ffn"]))
    second.set_aus([(("ffn", 1), 9, 2.0)])
    second.save_pretrained(tmp_path / "second")
    model = PeftModel.from_pretrained(tiny_model("llama"), first)
    before = model.get_aus()
    for path in (tmp_path / "second", first):
        with pytest.raises(ValueError, match="Adapter 'default' already exists and has AUs.*adapter_name='other'"):
            model.load_adapter(path, adapter_name="default")
        assert model.get_aus() == before and model.peft_config["default"].sites == ["attention", "ffn"]
    model.load_adapter(tmp_path / "second", adapter_name="other")  # a new name is fine
    assert model.get_aus("other") == second.get_aus()


def test_failed_load_adapter_leaves_no_adapter_behind(tmp_path):
    path = _saved_adapter(tmp_path)
    save_file({"austeer_table_index": torch.tensor([[7, 0]], dtype=torch.int32),
               "austeer_table_gamma": torch.tensor([1.0])}, path / "adapter_model.safetensors")
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites="attention"))
    with pytest.raises(ValueError, match="names module #7"):
        model.load_adapter(path, adapter_name="broken")
    assert list(model.peft_config) == ["default"]


def test_deleting_the_active_adapter_activates_the_next_one_everywhere(input_ids):
    only_b = get_peft_model(tiny_model("llama"), AUSteerConfig(sites=["ffn"]))
    only_b.set_aus([(("ffn", 1), 2, 1.5)])
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites=["attention", "ffn"]))
    model.set_aus([(("attention", 0), 1, 1.0)])
    model.add_adapter("b", AUSteerConfig(sites=["ffn"]))
    model.set_aus([(("ffn", 1), 2, 1.5)], adapter_name="b")
    with pytest.warns(UserWarning, match="Adapter 'default' was active and is deleted; adapter 'b' is active now.*"
                                         "set_adapter"):
        model.delete_adapter("default")
    assert model.active_adapters == ["b"]
    assert all(m.active_adapters == ["b"] for m in model.modules() if isinstance(m, AUSteerLayer))
    assert torch.equal(logits(model, input_ids), logits(only_b, input_ids))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.delete_adapter("b")  # the last one: nothing left to activate, nothing to warn about
    assert model.active_adapters == [] and _unchanged(model)


def test_tokenizer_without_pad_token_is_handled():
    model, pairs = tiny_model("llama"), random_pairs(6, seed=2)
    reference = compute_momentum(model, char_tokenizer(), pairs, sites=["ffn"], batch_size=3, progress=False)
    for remove in (["pad_token"], ["pad_token", "eos_token"]):
        tokenizer = char_tokenizer()
        for name in remove:
            setattr(tokenizer, name, None)
        assert tokenizer.pad_token_id is None
        scores = compute_momentum(model, tokenizer, pairs, sites=["ffn"], batch_size=3, progress=False)
        for name in reference.n_pos:
            assert torch.equal(scores.n_pos[name], reference.n_pos[name])
            assert torch.equal(scores.n_neg[name], reference.n_neg[name])


def test_inputs_longer_than_the_context_are_cut_from_the_left_with_a_warning():
    model = tiny_model("llama")  # max_position_embeddings=64; the tokenizer sets no limit
    pairs = [("x" * 90 + p, "y" * 80 + n) for p, n in random_pairs(4, seed=1)]
    with pytest.warns(UserWarning, match="8 of 8 texts are longer than max_length=64 .* truncated from the left"):
        scores = compute_momentum(model, char_tokenizer(), pairs, sites=["ffn"], progress=False)
    cut = compute_momentum(model, char_tokenizer(), [(p[-64:], n[-64:]) for p, n in pairs], sites=["ffn"],
                           progress=False)
    for name in cut.n_pos:
        assert torch.equal(scores.n_pos[name], cut.n_pos[name])
        assert torch.equal(scores.n_neg[name], cut.n_neg[name])


def test_config_from_pretrained_brings_its_table_and_explicit_configs_still_load(tmp_path, input_ids):
    """A config read by AUSteerConfig.from_pretrained carries where it was read from (not saved): the adapter made
    from it reads its AUs there. A config built by hand loads the table when PEFT hands it over, as before."""
    path = _saved_adapter(tmp_path / "saved")
    reference = PeftModel.from_pretrained(tiny_model("llama"), path)
    config = AUSteerConfig.from_pretrained(str(path))
    assert "_table_source" not in config.to_dict()
    made = get_peft_model(tiny_model("llama"), config)
    assert made.get_aus() == reference.get_aus()
    explicit = json.loads((path / "adapter_config.json").read_text())
    hand_made = AUSteerConfig(sites=explicit["sites"], steered_modules=explicit["steered_modules"],
                              base_model_type=explicit["base_model_type"])
    loaded = PeftModel.from_pretrained(tiny_model("llama"), path, config=hand_made)
    assert loaded.get_aus() == reference.get_aus()
    assert torch.equal(logits(loaded, input_ids), logits(reference, input_ids))
