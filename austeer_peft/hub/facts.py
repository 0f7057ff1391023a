"""What an AUSteer model card says, gathered from a live PeftModel or from a saved adapter folder.

Evaluation results and data sets are not configuration, so they do not live in ``AUSteerConfig``: a fit or an
evaluation attaches them with :func:`attach_card_info`, which keeps them on the tuner
(``peft_model.base_model.austeer_card_info``), and every card written afterwards shows them. Separate from the
rendering (``cards.py``) because the CLI's ``inspect`` and the upload of saved folders need the facts, not a card.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import EvalResult, ModelCard

from ..tuner.aus import AU
from ..tuner.config import AUSteerConfig
from ..tuner.layer import AUSteerLayer
from ..tuner.model import AUSteerModel
from ..tuner.table import layers_to_table, table_to_aus
from .models import base_model_source


def package_version() -> str:
    """austeer-peft's version as installed (pyproject.toml is the one source); a source tree that is only on
    ``sys.path`` has no installed metadata and says so."""
    try:
        return version("austeer-peft")
    except PackageNotFoundError:
        return "0+not-installed"

CARD_INFO_ATTRIBUTE = "austeer_card_info"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"


def attach_card_info(peft_model, *, datasets: Optional[list[str]] = None,
                     eval_results: Optional[list[Union[dict, EvalResult]]] = None,
                     adapter_name: Optional[str] = None, prompt_format: Optional[str] = None) -> dict:
    """Record what a fit or an evaluation knows about an adapter, for the cards written from now on.

    Args:
        peft_model: the PeftModel that holds the adapter.
        datasets: Hub ids of the data sets the AUs were chosen on or evaluated on (card metadata ``datasets``).
        eval_results: one entry per score: ``{"task", "metric", "value"}`` plus optionally ``"baseline"`` (the
            unsteered model's score), ``"split"`` and ``"dataset"`` (Hub id of the task's data set); or
            ``huggingface_hub.EvalResult`` objects.
        adapter_name: the adapter they describe (default: the active one).
        prompt_format: how prompts were written when the AUs were chosen, when not plain text (e.g. wrapped in the
            chat template); the card tells users to prompt the same way.

    Returns the adapter's card info (a dict with ``datasets`` and ``eval_results``); later calls add to it.
    """
    tuner = austeer_tuner(peft_model)
    adapter_name = adapter_name or peft_model.active_adapters[0]
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r}; adapters: {sorted(peft_model.peft_config)}.")
    store = tuner.__dict__.setdefault(CARD_INFO_ATTRIBUTE, {})
    info = store.setdefault(adapter_name, {"datasets": [], "eval_results": []})
    if datasets is not None:
        if isinstance(datasets, str):
            datasets = [datasets]
        info["datasets"] = list(dict.fromkeys([*info["datasets"], *datasets]))
    for result in eval_results or []:
        info["eval_results"].append(_eval_row(result))
    if prompt_format is not None:
        info["prompt_format"] = prompt_format
    return info


def get_card_info(peft_model, adapter_name: str) -> dict:
    """The card info attached to an adapter (empty lists when nothing was attached)."""
    store = austeer_tuner(peft_model).__dict__.get(CARD_INFO_ATTRIBUTE) or {}
    info = store.get(adapter_name) or {}
    return {"datasets": list(info.get("datasets", [])),
            "eval_results": [_eval_row(r) for r in info.get("eval_results", [])],
            "prompt_format": info.get("prompt_format")}


def _eval_row(result: Union[dict, EvalResult]) -> dict:
    if isinstance(result, EvalResult):
        return {"task": result.dataset_name, "metric": result.metric_name or result.metric_type,
                "value": result.metric_value, "split": result.dataset_split, "dataset": result.dataset_type,
                "baseline": None}
    if not isinstance(result, dict):
        raise TypeError(f"An evaluation result is a dict or a huggingface_hub.EvalResult, got {type(result).__name__}.")
    missing = [key for key in ("task", "metric", "value") if result.get(key) is None]
    if missing:
        raise ValueError(f"Evaluation result {result!r} lacks {missing}; give at least 'task', 'metric' and 'value'.")
    return {"task": str(result["task"]), "metric": str(result["metric"]), "value": result["value"],
            "split": result.get("split"), "dataset": result.get("dataset"), "baseline": result.get("baseline")}


def austeer_tuner(peft_model) -> AUSteerModel:
    """The AUSteer tuner of a PeftModel (``peft_model.base_model``); raises for any other model."""
    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(tuner, AUSteerModel):
        raise TypeError(f"Expected a PeftModel holding AUSteer adapters, got {type(peft_model).__name__}.")
    return tuner


# ---------------------------------------------------------------------------------------------------- facts


@dataclass
class AdapterFacts:
    """Everything a card says about one adapter, from a live model or from its saved files."""

    name: str
    config: AUSteerConfig
    aus: list[AU]
    file_size: int
    base_model: Optional[str]  # Hub id, local path or alias of the base model, when known
    causal_lm: bool
    base_source: Optional[dict] = None  # GGUF origin of the base weights (AUSteerConfig.base_model_source)
    datasets: list[str] = field(default_factory=list)
    eval_results: list[dict] = field(default_factory=list)
    prompt_format: Optional[str] = None  # how prompts were written, when not plain text (attach_card_info)


def facts_from_model(peft_model, adapter_name: str) -> AdapterFacts:
    """What a live PeftModel knows about one of its adapters."""
    from peft import PeftModelForCausalLM
    from safetensors.torch import save

    tuner = austeer_tuner(peft_model)
    config = peft_model.peft_config[adapter_name]
    layers = {m.candidate.name: m for m in tuner.model.modules() if isinstance(m, AUSteerLayer)}
    table = layers_to_table(layers, config, adapter_name)
    base = config.base_model_name_or_path or getattr(tuner.model, "name_or_path", None) or None
    causal_lm = isinstance(peft_model, PeftModelForCausalLM) or is_causal_lm_class(type(tuner.model).__name__)
    info = get_card_info(peft_model, adapter_name)
    source = config.base_model_source or base_model_source(tuner.model)
    return AdapterFacts(adapter_name, config, peft_model.get_aus(adapter_name),
                        len(save(table, metadata={"format": "pt"})), base, causal_lm, source, info["datasets"],
                        info["eval_results"], info["prompt_format"])


def facts_from_folder(folder: Union[str, os.PathLike], adapter_name: str = "default") -> AdapterFacts:
    """What the saved files of an adapter say about it (used for folders pushed or inspected without a model)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}; it is not a saved adapter (save one with "
                                    "`austeer_peft.save_adapter(peft_model, folder)`).")
    raw = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    if raw.get("peft_type") != "AUSTEER":
        raise ValueError(f"{folder} holds a {raw.get('peft_type')!r} adapter, not an AUSteer adapter.")
    config = AUSteerConfig.from_pretrained(str(folder))
    aus = table_to_aus(load_file(str(folder / ADAPTER_WEIGHTS_NAME)), config)
    base_class = (raw.get("auto_mapping") or {}).get("base_model_class") or ""
    causal_lm = config.task_type == "CAUSAL_LM" or is_causal_lm_class(base_class)
    datasets, eval_results, prompt_format = _card_info_from_readme(folder / CARD_NAME)
    return AdapterFacts(adapter_name, config, aus, (folder / ADAPTER_WEIGHTS_NAME).stat().st_size,
                        config.base_model_name_or_path, causal_lm, config.base_model_source, datasets, eval_results,
                        prompt_format)


def is_causal_lm_class(class_name: str) -> bool:
    """Whether a transformers model class generates text (AutoModelForCausalLM maps to it: LlamaForCausalLM,
    GPT2LMHeadModel, ...); the card then carries the `text-generation` pipeline tag."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        if class_name in ((names,) if isinstance(names, str) else names):
            return True
    return False


def _card_info_from_readme(path: Path) -> tuple[list[str], list[dict], Optional[str]]:
    """Data sets, scores and prompt format from an AUSteer card already in the folder (written with these files)."""
    card = load_austeer_card(path)
    if card is None:
        return [], [], None
    datasets = card.data.datasets or []
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    return datasets, [_eval_row(result) for result in card.data.eval_results or []], \
        card.data.to_dict().get("prompt_format")


def load_austeer_card(path: Union[str, os.PathLike]) -> Optional[ModelCard]:
    """The AUSteer card at ``path``, or None if there is no card there or it is not an AUSteer card."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        card = ModelCard.load(path)
    except Exception:  # a hand-written README with broken metadata is simply not ours
        return None
    return card if "austeer" in (card.data.tags or []) else None
