"""PEFT's common contract (the checks PEFT's own test suite runs for every method), for AUSteer on every family:
saving and loading several adapters, from_pretrained options, merging, disabling, switching, deleting, unloading,
trainable-parameter counts and the PEFT state-dict functions. What test_core.py already covers is not repeated."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import logits, spread_aus, tiny_model
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from austeer_peft import AUSteerConfig, AUSteerLayer

SITES_A = ["attention", "ffn", "ffn_inner"]
SITES_B = ["ffn", "ffn_inner"]


def two_adapter_model(family):
    """A model with adapter "default" (active) and adapter "other", both mergeable, sharing some modules."""
    base = tiny_model(family)
    model = get_peft_model(base, AUSteerConfig(sites=SITES_A))
    model.set_aus(spread_aus(base, SITES_A, 12, seed=1))
    model.add_adapter("other", AUSteerConfig(sites=SITES_B))
    model.set_aus(spread_aus(base, SITES_B, 8, seed=2), adapter_name="other")
    return model


def no_austeer_layers(model):
    return not any(isinstance(m, AUSteerLayer) for m in model.modules())


def test_save_and_load_contract(family, input_ids, tmp_path):
    model = two_adapter_model(family)
    steered = logits(model, input_ids)
    model.save_pretrained(tmp_path / "all")
    for folder in (tmp_path / "all", tmp_path / "all" / "other"):  # extra adapters go to a subfolder each
        names = {p.name for p in folder.iterdir() if p.is_file()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        assert not names & {"adapter_model.bin", "model.safetensors", "config.json"}

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_model(family), tmp_path / "all", low_cpu_mem_usage=True)
    assert not any("missing adapter keys" in str(w.message) for w in record)
    assert loaded.peft_config["default"].inference_mode  # is_trainable=False is the default
    result = loaded.load_adapter(tmp_path / "all" / "other", adapter_name="other", low_cpu_mem_usage=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    again = loaded.load_adapter(tmp_path / "all", adapter_name="yet-another")  # one folder, several names
    assert again.missing_keys == []
    assert loaded.get_aus("yet-another") == loaded.get_aus("default") == model.get_aus("default")
    assert loaded.get_aus("other") == model.get_aus("other")
    assert torch.equal(logits(loaded, input_ids), steered)

    loaded.save_pretrained(tmp_path / "resaved", selected_adapters=["default"])
    assert (tmp_path / "resaved" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "all" / "adapter_model.safetensors").read_bytes()  # save -> load -> save is byte-identical
    only_default = PeftModel.from_pretrained(tiny_model(family), tmp_path / "resaved")
    assert list(only_default.peft_config) == ["default"]

    config = copy.deepcopy(model.peft_config["default"])
    trainable = PeftModel.from_pretrained(tiny_model(family), tmp_path / "all", is_trainable=True, config=config)
    assert trainable.peft_config["default"] is config and not config.inference_mode
    assert torch.equal(logits(trainable, input_ids), steered)


def test_merge_contract(family, input_ids):
    model = two_adapter_model(family)
    only_default = logits(model, input_ids)
    model.base_model.set_adapter(["default", "other"])
    both = logits(model, input_ids)
    model.set_adapter("default")

    model.merge_adapter()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), only_default, rtol=0, atol=1e-5)
    model.unmerge_adapter()

    for adapter_names, want in ((["default"], only_default), (["other", "default"], both)):
        merged = copy.deepcopy(model).merge_and_unload(adapter_names=adapter_names, safe_merge=True)
        assert no_austeer_layers(merged) and not hasattr(merged, "peft_config")
        torch.testing.assert_close(logits(merged, input_ids), want, rtol=0, atol=1e-5)

    broken = copy.deepcopy(model)
    layer = next(m for m in broken.modules() if isinstance(m, AUSteerLayer) and "default" in m.austeer_gamma)
    layer.austeer_gamma["default"][0] = float("inf")  # only possible by editing the buffer: set_aus refuses it
    with pytest.raises(ValueError, match="non-finite weights"):
        broken.merge_adapter(safe_merge=True)


def test_adapter_management_contract(family, input_ids):
    base_logits = logits(tiny_model(family), input_ids)
    model = two_adapter_model(family)
    only_default = logits(model, input_ids)
    with model.disable_adapter():
        assert torch.equal(logits(model, input_ids), base_logits)
    model.set_adapter("other")
    only_other = logits(model, input_ids)
    assert not torch.equal(only_other, only_default)

    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 0 and total == sum(p.numel() for p in tiny_model(family).parameters())

    # PEFT's state-dict functions carry the adapter table between models built with the same config.
    state = get_peft_model_state_dict(model, adapter_name="other")
    assert set(state) == {"austeer_table_index", "austeer_table_gamma"}
    fresh = get_peft_model(tiny_model(family), copy.deepcopy(model.peft_config["other"]))
    set_peft_model_state_dict(fresh, state)
    assert fresh.get_aus() == model.get_aus("other")
    assert torch.equal(logits(fresh, input_ids), only_other)

    with pytest.warns(UserWarning, match="'other' was active and is deleted; adapter 'default' is active now"):
        model.delete_adapter("other")
    assert model.active_adapters == ["default"] and list(model.peft_config) == ["default"]
    assert torch.equal(logits(model, input_ids), only_default)

    plain = model.unload()
    assert no_austeer_layers(plain) and type(plain) is type(tiny_model(family))
    assert torch.equal(logits(plain, input_ids), base_logits)
