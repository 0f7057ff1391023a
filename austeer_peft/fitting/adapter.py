"""From chosen AUs to a steered model: wrap a base model with a new AUSteer adapter, or add one to (or replace the AUs
of) an AUSteer PeftModel, after checking that the model is the one the AUs were counted on.

This is the only place in fitting that builds PEFT models; :class:`~austeer_peft.fitting.scores.MomentumScores`
chooses the AUs and calls it, so the counts themselves stay free of any model.
"""

from __future__ import annotations

from typing import Optional

from peft import PeftModel, get_peft_model
from torch import nn

from ..tuner.aus import AU
from ..tuner.config import AUSteerConfig
from ..tuner.sites import SiteModule, candidate_modules


def steered_model(model: nn.Module, config: AUSteerConfig, aus: list[AU], adapter_name: str = "default", *,
                  counted_modules: list[SiteModule], counted_model_type: Optional[str] = None) -> PeftModel:
    """``model`` steered by ``aus`` through the adapter ``adapter_name`` (made active); returns the PeftModel.

    ``model`` is a base model (wrapped in place by ``get_peft_model``, as with any PEFT method) or a PeftModel with
    AUSteer adapters: then the adapter is added, or, if it exists with the same sites, its AUs and (k, α) replaced.
    ``counted_modules`` / ``counted_model_type`` describe the model the AUs were counted on; another is refused.
    """
    if isinstance(model, PeftModel):
        check_counted_model(model.get_base_model(), config, counted_modules, counted_model_type)
        existing = model.peft_config.get(adapter_name)
        if existing is None:
            model.add_adapter(adapter_name, config)
        elif not isinstance(existing, AUSteerConfig):
            raise ValueError(
                f"Adapter {adapter_name!r} of this PeftModel is a {existing.peft_type} adapter, not AUSteer. Pass "
                "another `adapter_name`, or the base model (`merge_and_unload()` first)."
            )
        elif (existing.sites, existing.target_modules, existing.position) != \
                (config.sites, config.target_modules, config.position):
            raise ValueError(
                f"Adapter {adapter_name!r} steers sites={existing.sites} target_modules={existing.target_modules},"
                f" but these scores were counted on sites={config.sites} target_modules={config.target_modules}. "
                "Pass another `adapter_name`."
            )
        else:
            existing.k, existing.alpha = config.k, config.alpha
        model.set_aus(aus, adapter_name=adapter_name)
        model.set_adapter(adapter_name)
        return model
    check_counted_model(model, config, counted_modules, counted_model_type)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    peft_model.set_aus(aus, adapter_name=adapter_name)
    return peft_model


def check_counted_model(model: nn.Module, config: AUSteerConfig, counted_modules: list[SiteModule],
                        counted_model_type: Optional[str] = None) -> None:
    """Refuse a base model whose type or candidate modules differ from those the counts were taken on."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if counted_model_type and model_type and model_type != counted_model_type:
        raise ValueError(
            f"These momentum scores were counted on a {counted_model_type!r} model, not on this {model_type!r} model."
        )
    expected = [(m.name, m.width) for m in counted_modules]
    found = [(m.name, m.width) for m in candidate_modules(model, config)]
    if found != expected:
        raise ValueError(
            f"The model's candidate modules do not match the scores' ({len(found)} vs {len(expected)} modules, "
            f"e.g. {found[:1]} vs {expected[:1]}); use the model the scores were counted on."
        )
