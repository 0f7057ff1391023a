"""Model cards: written by austeer_peft.save_adapter from the template, parseable, filled, and honest about what is
known; PEFT's own classes and save_pretrained are left as they are."""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
from conftest import FAMILIES, tiny_model
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, PeftModelForCausalLM, get_peft_model

from austeer_peft import AUSteerConfig, adapter_card, attach_card_info, save_adapter
from austeer_peft.hub.cards import adapter_card_from_folder, template_path

PLACEHOLDERS = re.compile(r"More Information Needed|\{\{|\}\}|\{%|%\}|\bTODO\b|\bNone\b|\bnan\b|\[optional\]")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """PEFT looks the base model up on the Hub while saving; these tests never touch the network."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def steered(family="llama", sites=("attention", "ffn"), aus=None, base_id=None, **kwargs):
    base = tiny_model(family, **kwargs)
    if base_id is not None:
        base.name_or_path = base_id
    model = get_peft_model(base, AUSteerConfig(sites=list(sites), k=4, alpha=7.5))
    model.set_aus(aus or [(("attention", 0), 3, 1.5), (("attention", 0), 9, -0.25), (("attention", 1), 7, 2.0),
                          (("ffn", 1), 2, -0.5)])
    return model


def saved_card(model, tmp_path) -> ModelCard:
    save_adapter(model, tmp_path)
    return ModelCard.load(tmp_path / "README.md")


def test_template_is_the_one_in_model_cards():
    assert template_path().parent.name == "model_cards" and template_path().name == "adapter_card.md"


@pytest.mark.parametrize("family", FAMILIES)
def test_save_adapter_writes_the_austeer_card(family, tmp_path):
    card = saved_card(steered(family, base_id="org/tiny-model"), tmp_path)
    assert card.data.library_name == "peft"
    assert card.data.tags == ["austeer", "activation-steering", "peft"]
    assert card.data.base_model == "org/tiny-model"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.datasets is None and card.data.eval_results is None
    text = card.text
    assert not PLACEHOLDERS.search(card.content), PLACEHOLDERS.search(card.content)
    assert "| Sites | `attention`, `ffn` |" in text
    assert "| k (AUs a fit keeps) | 4 |" in text and "| α (steering strength) | 7.5 |" in text
    assert "| Steered activations | 4 activations in 3 modules of 2 layers (layers 0-1) |" in text
    assert "2 AUs promoted (γ > 0), 2 suppressed (γ < 0); from -0.5 to 2" in text
    assert "| 0 | 2 | 0 | 2 |" in text and "| 1 | 1 | 1 | 2 |" in text  # per-layer spread: attention, ffn, total
    assert "## Evaluation" not in text
    assert 'base = AutoModelForCausalLM.from_pretrained(\'org/tiny-model\')' in text
    assert "model = PeftModel.from_pretrained(base, adapter)" in text
    assert "merged = model.merge_and_unload()" in text and "austeer merge --model org/tiny-model" in text
    assert f"- PEFT {__import__('peft').__version__}" in text


def test_card_shows_attached_scores_and_datasets(tmp_path):
    model = steered()
    attach_card_info(model, datasets=["pkavumba/balanced-copa"],
                     eval_results=[{"task": "copa", "metric": "accuracy", "value": 0.8125, "baseline": 0.75,
                                    "split": "test", "dataset": "pkavumba/balanced-copa"}])
    attach_card_info(model, eval_results=[{"task": "sst2", "metric": "accuracy", "value": 0.9}])
    card = saved_card(model, tmp_path)
    assert card.data.datasets == ["pkavumba/balanced-copa"]
    copa, sst2 = card.data.eval_results
    assert (copa.dataset_type, copa.dataset_split, copa.metric_type, copa.metric_value) == \
        ("pkavumba/balanced-copa", "test", "accuracy", 0.8125)
    assert sst2.dataset_name == "sst2" and sst2.metric_value == 0.9
    assert "| copa | test | accuracy | 0.75 | 0.8125 |" in card.text
    assert "| sst2 | - | accuracy | - | 0.9 |" in card.text
    assert "[pkavumba/balanced-copa](https://huggingface.co/datasets/pkavumba/balanced-copa)" in card.text
    assert not PLACEHOLDERS.search(card.content)
    assert model.base_model.austeer_card_info["default"]["datasets"] == ["pkavumba/balanced-copa"]


def test_bad_eval_result_is_refused():
    with pytest.raises(ValueError, match=r"lacks \['value'\]"):
        attach_card_info(steered(), eval_results=[{"task": "copa", "metric": "accuracy"}])
    with pytest.raises(ValueError, match="No adapter named 'nope'"):
        attach_card_info(steered(), datasets=["x/y"], adapter_name="nope")


def test_card_follows_the_adapter_and_replaces_other_readmes(tmp_path):
    generic = "---\nlicense: mit\n---\n# Model Card for Model ID\n\n[More Information Needed]\n"
    (tmp_path / "README.md").write_text(generic)
    model = steered()
    saved_card(model, tmp_path)
    model.set_aus([(("ffn", 0), 1, 3.0)])
    card = saved_card(model, tmp_path)
    assert "1 activation in 1 module of 1 layer (layer 0)" in card.text
    assert "More Information Needed" not in card.content and card.data.license is None


def test_residual_adapter_card_says_it_cannot_be_merged(tmp_path):
    card = saved_card(steered(sites=["attention", "residual"],
                              aus=[(("attention", 0), 1, 1.0), (("residual", 1), 2, 0.5)]), tmp_path)
    assert "cannot be folded into the weights" in card.text and "merge_and_unload" not in card.text
    assert "| 1 | 0 | 1 | 1 |" in card.text


def test_unknown_base_model_is_said_so(tmp_path):
    card = saved_card(steered(), tmp_path)  # built from a config: no name_or_path
    assert card.data.base_model is None
    assert "a `llama` model (not recorded)" in card.text and "austeer merge" not in card.text
    assert not PLACEHOLDERS.search(card.content)


def test_local_and_alias_base_models(tmp_path, monkeypatch):
    monkeypatch.setenv("AUSTEER_CACHE", str(tmp_path / "cache"))
    # An adapter saved before the Hub id was recorded names the alias's cache folder: the card still finds the alias
    # and gives its Hub repository as the base model.
    card = adapter_card(steered(base_id=str(tmp_path / "cache" / "smollm2-135m")))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "load_model('smollm2-135m')" in card.text and "austeer merge --model smollm2-135m" in card.text
    (tmp_path / "my-base").mkdir()
    card = adapter_card(steered(base_id=str(tmp_path / "my-base")))
    assert card.data.base_model is None  # the Hub only accepts repo ids there
    assert f"from_pretrained({str(tmp_path / 'my-base')!r})" in card.text
    assert "base_model_relation" not in card.content


def test_target_modules_adapter_card(tmp_path):
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(target_modules=["up_proj"], position="output"))
    model.set_aus([("model.layers.1.mlp.up_proj", 40, 1.5)])
    card = saved_card(model, tmp_path)
    assert "`target_modules`: the output of the modules matching ['up_proj']" in card.text
    assert "| 1 | 1 | 1 |" in card.text and not PLACEHOLDERS.search(card.content)


def test_card_from_saved_files_matches_the_saved_card(tmp_path):
    model = steered(base_id="org/tiny-model")
    model.add_adapter("other", AUSteerConfig(sites=["ffn"]))
    model.set_aus([(("ffn", 0), 5, 1.0)], adapter_name="other")
    card = saved_card(model, tmp_path)
    assert "This folder also holds the adapters `other`" in card.text
    assert str(adapter_card_from_folder(tmp_path)) == str(card)


def test_peft_models_keep_their_class_and_plain_save_pretrained_still_saves_a_loadable_adapter(tmp_path, input_ids):
    model = steered()
    assert type(model) is PeftModel
    causal = get_peft_model(tiny_model("llama"), AUSteerConfig(task_type="CAUSAL_LM"))
    assert type(causal) is PeftModelForCausalLM
    model.save_pretrained(tmp_path)  # PEFT's own save: its generic card, the AUSteer adapter files
    assert "austeer" not in (ModelCard.load(tmp_path / "README.md").data.tags or [])
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert type(loaded) is PeftModel and loaded.get_aus() == model.get_aus()
    assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
    lora = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(TypeError, match="Expected a PeftModel holding AUSteer adapters"):
        save_adapter(lora, tmp_path / "lora")


def test_save_adapter_passes_save_pretrained_options_and_respects_is_main_process(tmp_path):
    model = steered()
    save_adapter(model, tmp_path / "worker", is_main_process=False)
    assert not (tmp_path / "worker" / "README.md").exists()
    save_adapter(model, tmp_path / "bin", safe_serialization=False, tags=["sentiment"])
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    assert ModelCard.load(tmp_path / "bin" / "README.md").data.tags[-1] == "sentiment"


def test_models_copy_and_pickle(input_ids):
    model = steered()
    want = model(input_ids).logits
    clone = copy.deepcopy(model)
    assert type(clone) is PeftModel and torch.equal(clone(input_ids).logits, want)
    restored = pickle.loads(pickle.dumps(model))
    assert type(restored) is PeftModel and torch.equal(restored(input_ids).logits, want)
