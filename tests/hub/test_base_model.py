"""Adapters others can load from the Hub: the base model is recorded by its Hub id (an alias's public repository,
the repository of a Hub cache snapshot), a GGUF origin as extra metadata, and the card places the adapter in the base
model's tree (`base_model:` with `base_model_relation: adapter`)."""

from __future__ import annotations

import json

import pytest
from conftest import char_tokenizer, tiny_model
from huggingface_hub import ModelCard
from peft import get_peft_model

from austeer_peft import AUSteerConfig, save_adapter
from austeer_peft.hub.cards import adapter_card
from austeer_peft.hub.models import MODEL_ALIASES, base_model_source, canonical_hub_id, load_model


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_canonical_hub_id(tmp_path):
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "0123abc"
    assert canonical_hub_id(snapshot) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert canonical_hub_id("google/gemma-3-270m") == "google/gemma-3-270m"
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    assert canonical_hub_id(tmp_path / "org" / "model") is None  # a local folder
    assert canonical_hub_id("just-a-name") is None


def test_every_alias_names_its_public_repository_and_quantization():
    for alias, spec in MODEL_ALIASES.items():
        assert canonical_hub_id(spec.hub_id) == spec.hub_id, alias
        assert spec.quantization.startswith("Q"), alias


def test_model_loaded_from_the_hub_cache_records_its_hub_id(tmp_path):
    """A model read from a Hub cache snapshot folder is recorded by its repository, in adapter_config.json and in
    the card's front matter, not by the folder of the machine that fitted it."""
    snapshot = tmp_path / "models--org--tiny-llama" / "snapshots" / "0123abc"
    tiny_model("llama").save_pretrained(snapshot)
    char_tokenizer().save_pretrained(snapshot)
    model, _ = load_model(str(snapshot))
    assert model.name_or_path == "org/tiny-llama" and base_model_source(model) is None
    peft_model = get_peft_model(model, AUSteerConfig(sites="attention"))
    peft_model.set_aus([(("attention", 1), 3, 2.0)])
    save_adapter(peft_model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-llama" and config["base_model_source"] is None
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.base_model == "org/tiny-llama"
    assert card.data.to_dict()["base_model_relation"] == "adapter"
    assert "from_pretrained('org/tiny-llama')" in card.text


def test_card_of_an_adapter_fitted_on_an_alias(tmp_path):
    """What load_model records for an alias (its Hub id, and the GGUF file as the weights' source) gives a card
    with the Hub repository as base_model, the GGUF origin in the text, and the alias as the exact way to load."""
    spec = MODEL_ALIASES["smollm2-135m"]
    base = tiny_model("llama")
    base.name_or_path = spec.hub_id
    peft_model = get_peft_model(base, AUSteerConfig(sites="attention"))
    peft_model.set_aus([(("attention", 1), 3, 2.0)])
    peft_model.peft_config["default"].base_model_source = {
        "alias": "smollm2-135m", "gguf_file": spec.gguf_file, "quantization": spec.quantization,
        "packages": list(spec.packages)}
    card = adapter_card(peft_model)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.to_dict()["base_model_relation"] == "adapter"
    assert f"the GGUF file {spec.gguf_file} (Q4_1" in card.text
    assert "load_model('smollm2-135m')" in card.text and "austeer merge --model smollm2-135m" in card.text
    save_adapter(peft_model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["base_model_source"]["gguf_file"] == spec.gguf_file


@pytest.mark.real
def test_real_alias_records_hub_id_and_gguf_origin(smollm2, tmp_path):
    model, _ = smollm2
    spec = MODEL_ALIASES["smollm2-135m"]
    assert model.name_or_path == spec.hub_id
    assert base_model_source(model) == {"alias": "smollm2-135m", "gguf_file": spec.gguf_file,
                                        "quantization": "Q4_1", "packages": list(spec.packages)}
    peft_model = get_peft_model(model, AUSteerConfig(sites="attention"))
    try:
        peft_model.set_aus([(("attention", 3), 5, 2.0)])
        save_adapter(peft_model, tmp_path)
    finally:
        peft_model.unload()  # the session's model is shared by the other real tests
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == spec.hub_id
    assert config["base_model_source"]["quantization"] == "Q4_1"
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == spec.hub_id and card.data.to_dict()["base_model_relation"] == "adapter"
