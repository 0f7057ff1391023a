"""Sharing and deployment: save an adapter with its AUSteer card, upload it to the Hub, merge it into a plain
transformers checkpoint, or export it as a stock PEFT IA3 adapter.

``peft_model.save_pretrained`` writes PEFT's generic model card and transformers' ``push_to_hub`` a template card;
neither has a per-method hook, so AUSteer's card is written by :func:`save_adapter` and :func:`push_to_hub` here,
without changing PEFT's classes or models.

An AUSteer factor ``1 + γ`` on one dimension of a linear layer's input or output is exactly what IA3 learns (a
vector that multiplies a linear layer's input, for its "feedforward" modules, or its output, for the others), with
1 everywhere else. So adapters on the ``attention``, ``ffn_inner`` and ``ffn`` sites are also IA3 adapters that
plain ``peft`` loads, with no austeer-peft installed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..tuner.config import AUSteerConfig
from ..tuner.layer import AUSteerLayer
from ..tuner.sites import base_named_modules, is_linear_like, linear_features, merge_slices, unwrap
from .cards import HUB_REPO_ID, adapter_card_from_folder, render_card, save_adapter_card
from .facts import (
    ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, CARD_NAME, austeer_tuner, facts_from_model, load_austeer_card,
    package_version,
)
from .models import base_model_source

PathLike = Union[str, os.PathLike]
IA3_TAGS = ["ia3", "austeer", "activation-steering", "peft"]


# ---------------------------------------------------------------------------------------------------- save and Hub


def save_adapter(peft_model, save_directory: PathLike, *, tags: Optional[list[str]] = None,
                 **save_pretrained_kwargs) -> Path:
    """Save a PeftModel's AUSteer adapters with ``peft_model.save_pretrained(save_directory, ...)`` and write the
    AUSteer model card as ``README.md`` in place of PEFT's generic one (only where ``is_main_process``, as
    ``save_pretrained`` does). Returns the folder."""
    record_base_model_source(peft_model)
    peft_model.save_pretrained(save_directory, **save_pretrained_kwargs)
    if save_pretrained_kwargs.get("is_main_process", True):
        save_adapter_card(peft_model, save_directory, tags=tags)
    return Path(save_directory)


def save_adapter_folder(peft_model, adapter_name: str, folder: PathLike, *, tags: Optional[list[str]] = None) -> Path:
    """Save one adapter of a PeftModel as a folder of its own: its config, table and its own AUSteer card, at the top
    of ``folder`` (``PeftModel.from_pretrained(base, folder)`` loads it as "default"), whatever its name in the model.

    ``save_pretrained(folder, selected_adapters=[name])`` would put a non-default adapter in ``folder/name`` and one
    card for the whole model in ``folder``; several adapters saved that way share, and overwrite, that card.
    """
    austeer_tuner(peft_model)
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r}; adapters: {sorted(peft_model.peft_config)}.")
    record_base_model_source(peft_model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        peft_model.save_pretrained(scratch, selected_adapters=[adapter_name])
        saved = Path(scratch) / adapter_name if adapter_name != "default" else Path(scratch)
        for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
            shutil.copyfile(saved / name, folder / name)
    render_card(facts_from_model(peft_model, adapter_name), tags=tags).save(folder / CARD_NAME)
    return folder


def record_base_model_source(peft_model) -> None:
    """Copy where the base weights came from (a GGUF file, see ``models.base_model_source``) into every adapter's
    config that does not say yet, so that adapter_config.json and the card carry it."""
    source = base_model_source(austeer_tuner(peft_model).model)
    for config in peft_model.peft_config.values():
        if isinstance(config, AUSteerConfig) and config.base_model_source is None and source is not None:
            config.base_model_source = source


def push_to_hub(model_or_folder, repo_id: str, *, commit_message: Optional[str] = None,
                commit_description: Optional[str] = None, private: Optional[bool] = None,
                token: Union[bool, str, None] = None, revision: Optional[str] = None, create_pr: bool = False,
                tags: Optional[list[str]] = None):
    """Upload an AUSteer adapter (a PeftModel, or a folder it was saved to) to the Hub repository ``repo_id``.

    A model is saved with :func:`save_adapter` into a temporary folder; a folder is uploaded as it is, with its card
    (written when it is missing or not an AUSteer card). Either way one commit adds ``adapter_config.json``,
    ``adapter_model.safetensors``, ``README.md`` and the subfolders of further adapters. The repository is created
    if needed. Returns the ``huggingface_hub.CommitInfo``.

    One ``create_commit`` rather than ``HfApi.upload_folder``: the folder's card may come from a temporary folder, and
    ``upload_folder`` also sends README.md to the Hub's YAML validation endpoint, a request more than the commit.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(library_name="austeer-peft", library_version=package_version())
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model_or_folder, (str, os.PathLike)):
            files = _adapter_folder_files(Path(model_or_folder), Path(tmp), tags)
        else:
            save_adapter(model_or_folder, tmp, tags=tags)
            files = {path.relative_to(tmp).as_posix(): path for path in sorted(Path(tmp).rglob("*")) if path.is_file()}
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
        return api.create_commit(repo_id=repo_id, operations=operations,
                                 commit_message=commit_message or "Upload AUSteer adapter",
                                 commit_description=commit_description, token=token, revision=revision,
                                 create_pr=create_pr)


def _adapter_folder_files(folder: Path, tmp: Path, tags: Optional[list[str]]) -> dict[str, Path]:
    """The files of a saved adapter folder to upload (path in repo -> local path); the card goes through ``tmp``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the folder an adapter was saved to.")
    adapters = [folder] + sorted(p for p in folder.iterdir() if (p / ADAPTER_CONFIG_NAME).is_file())
    files: dict[str, Path] = {}
    for adapter in adapters:
        for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
            if not (adapter / name).is_file():
                raise FileNotFoundError(f"{adapter} has no {name}; it is not a saved AUSteer adapter.")
            files[(adapter / name).relative_to(folder).as_posix()] = adapter / name
    card = load_austeer_card(folder / CARD_NAME)
    if card is None or tags:
        card = card or adapter_card_from_folder(folder)
        card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *(tags or [])]))
        card.save(tmp / CARD_NAME)
        files[CARD_NAME] = tmp / CARD_NAME
    else:
        files[CARD_NAME] = folder / CARD_NAME
    return dict(sorted(files.items()))


# ---------------------------------------------------------------------------------------------------- merge


def merge_and_save(model: str, adapter: PathLike, output_dir: PathLike, *, dtype: torch.dtype = torch.float32,
                   safe_merge: bool = True) -> Path:
    """Load a base model and an adapter, fold the adapter into the weights and save a plain transformers checkpoint
    (safetensors weights, config, tokenizer) that loads with ``AutoModelForCausalLM.from_pretrained(output_dir)``
    without austeer-peft. This is ``austeer merge``.

    Args:
        model: the base model: a local folder, a Hub id or an alias of ``austeer_peft.models.MODEL_ALIASES`` (GGUF
            models are unpacked on load and saved as ordinary safetensors).
        adapter: the adapter: a local folder or a Hub id.
        output_dir: where the checkpoint goes.
        dtype: dtype to load, merge and save in. float32 reproduces the steered logits up to float32 rounding
            (factors that are not powers of two round differently in a folded weight).
        safe_merge: check that the merged weights are finite before writing them.
    """
    from peft import PeftModel
    from transformers import GgufConfig

    from .models import MODEL_ALIASES, load_model

    # With the `kernels` package GGUF weights stay packed in their blocks; folding a factor needs dense weights.
    kwargs = {"quantization_config": GgufConfig(dequantize=True)} if model in MODEL_ALIASES else {}
    base, tokenizer = load_model(model, dtype=dtype, **kwargs)
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    return save_merged(peft_model, output_dir, tokenizer=tokenizer, safe_merge=safe_merge)


def save_merged(peft_model, output_dir: PathLike, *, tokenizer=None, safe_merge: bool = True) -> Path:
    """Fold a PeftModel's AUSteer adapter into its base model (in place, as ``merge_and_unload`` does) and save the
    plain model, and the tokenizer if given, with ``save_pretrained``."""
    austeer_tuner(peft_model)
    merged = peft_model.merge_and_unload(safe_merge=safe_merge)
    drop_gguf_quantizer(merged)
    output_dir = Path(output_dir)
    merged.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir


def drop_gguf_quantizer(model: nn.Module) -> None:
    """Forget that a dense model came from a GGUF file, so ``save_pretrained`` writes plain safetensors.

    transformers keeps the GGUF quantizer on the model even after it unpacked every weight, and refuses to save such
    a model ("quantized with gguf and is not serializable"); the weights themselves are ordinary tensors.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if getattr(method, "value", method) != "gguf":
        return
    packed = [name for name, module in model.named_modules() if type(module).__name__.lower().startswith("gguf")]
    if packed:
        raise ValueError(f"{len(packed)} layers (e.g. {packed[0]}) still hold packed GGUF blocks; load the model with "
                         "`quantization_config=GgufConfig(dequantize=True)` to merge and save it.")
    quantizer.remove_quantization_config(model)


# ---------------------------------------------------------------------------------------------------- IA3


def to_ia3(peft_model, output_dir: PathLike, adapter_name: Optional[str] = None) -> Path:
    """Write an AUSteer adapter as a stock PEFT IA3 adapter that gives the same outputs, for deployments that only
    have ``peft`` (IA3 is built into PEFT and into serving stacks that support PEFT).

    Each steered module becomes one IA3 vector: 1 everywhere, ``1 + γ`` at the AUs. ``attention`` (input of the
    attention output projection) and ``ffn_inner`` (input of the MLP's down projection) become IA3
    ``feedforward_modules`` (input scaling); ``ffn`` (the MLP's output, which its down projection produces) becomes
    output scaling of the down projection. ``residual`` and modules that are not Linear/Conv1D layers cannot be
    expressed and raise ``ValueError`` before anything is written.

    Args:
        peft_model: a PeftModel holding the AUSteer adapter.
        output_dir: folder for ``adapter_config.json``, ``adapter_model.safetensors`` and ``README.md``.
        adapter_name: the adapter to export (default: the active one).
    """
    from peft import IA3Config

    tuner = austeer_tuner(peft_model)
    adapter_name = adapter_name or peft_model.active_adapters[0]
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r}; adapters: {sorted(peft_model.peft_config)}.")
    config: AUSteerConfig = peft_model.peft_config[adapter_name]
    base_model = tuner.model
    names_of = {id(unwrap(module)): name for name, module in base_named_modules(base_model).items()}

    vectors: dict[str, torch.Tensor] = {}
    feedforward: dict[str, bool] = {}
    conv1d: dict[str, bool] = {}
    for layer in tuner._layers().values():
        if adapter_name not in layer.austeer_index:
            continue
        targets, side = _ia3_targets(layer)
        is_input = side == "input"
        for target in targets:
            name = names_of[id(target)]
            if name in feedforward and feedforward[name] != is_input:
                raise ValueError(
                    f"IA3 cannot express this adapter: it steers both the input (`ffn_inner`) and the output (`ffn`) "
                    f"of {name}, and IA3 holds one scaling vector per module, for its input or for its output. "
                    "Export an adapter that uses one of the two sites."
                )
            in_features, out_features = linear_features(target)
            vector = vectors.get(name, torch.ones(in_features if is_input else out_features, dtype=torch.float32))
            index = layer.austeer_index[adapter_name].cpu()
            vector[index] = vector[index] * (1.0 + layer.austeer_gamma[adapter_name].cpu())
            vectors[name], feedforward[name] = vector, is_input
            conv1d[name] = not isinstance(target, nn.Linear)

    if not vectors:
        raise ValueError(f"Adapter {adapter_name!r} has no AUs to export; set them with `set_aus` or a fit first.")
    if len(set(conv1d.values())) > 1:
        raise ValueError("IA3 exports need all steered layers of one kind (all nn.Linear or all GPT-2 Conv1D).")

    ia3_config = IA3Config(
        target_modules=sorted(vectors), feedforward_modules=sorted(n for n, ff in feedforward.items() if ff),
        fan_in_fan_out=next(iter(conv1d.values())), base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision, task_type=config.task_type, inference_mode=True,
    )
    config_dict = ia3_config.to_dict()
    for key in ("target_modules", "feedforward_modules"):  # sets in the config; sorted for a stable file
        config_dict[key] = sorted(config_dict[key])
    if config.task_type is None:  # as PeftModel.save_pretrained does, so that AutoPeftModel finds the base class
        config_dict["auto_mapping"] = {"base_model_class": type(base_model).__name__,
                                       "parent_library": type(base_model).__module__}
    weights = {}
    for name, vector in vectors.items():
        shape = (1, -1) if feedforward[name] else (-1, 1)  # IA3Layer: [1, in] for input scaling, [out, 1] for output
        weights[f"base_model.model.{name}.ia3_l"] = vector.reshape(shape).contiguous()

    return write_stock_adapter(output_dir, config_dict, weights, config.base_model_name_or_path, IA3_TAGS, _IA3_CARD,
                               n_modules=len(vectors), n_aus=len(peft_model.get_aus(adapter_name)))


def write_stock_adapter(output_dir: PathLike, config_dict: dict, weights: dict[str, torch.Tensor],
                        base_model_name_or_path: Optional[str], tags: list[str], card_template: str,
                        **card_values) -> Path:
    """Write an adapter of a stock PEFT method (the IA3 and LoRA exports): its config, its weights, and a short card
    whose ``base_model`` is the base's Hub id when it has one (a local path would mislead the Hub)."""
    from huggingface_hub import ModelCard, ModelCardData
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / ADAPTER_CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    save_file(weights, str(output_dir / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    base = base_model_name_or_path
    hub_base = base if base and HUB_REPO_ID.match(base) and not os.path.exists(base) else None
    card_data = ModelCardData(library_name="peft", tags=tags, base_model=hub_base)
    ModelCard.from_template(card_data, template_str=card_template, **card_values).save(output_dir / CARD_NAME)
    return output_dir


_IA3_CARD = """---
{{ card_data }}
---

# IA3 export of an AUSteer adapter

An AUSteer activation-steering adapter ({{ n_aus }} steered activations in {{ n_modules }} modules) written as a stock
PEFT IA3 adapter: each IA3 vector is 1 except at the steered dimensions, where it holds the AUSteer factor `1 + γ`.
It loads with plain `peft` (`PeftModel.from_pretrained(base, adapter)`) and gives the same outputs as the AUSteer
adapter; `merge_and_unload()` folds it into the weights.
"""


def _ia3_targets(layer: AUSteerLayer) -> tuple[list[nn.Module], str]:
    """The linear modules an AUSteerLayer's scale belongs to, and their side, if IA3 can express it.

    An ``ffn`` scale belongs to the MLP's down projection, or to every expert's down projection of a MoE block whose
    experts are separate modules (scaling each summand's output scales the sum).
    """
    candidate = layer.candidate
    if candidate.site == "residual":
        raise ValueError(
            "IA3 cannot express AUs on the `residual` site: they scale a decoder layer's output (the residual stream), "
            "and IA3 only scales the input or output of a linear layer. Keep this adapter in AUSteer form."
        )
    base = unwrap(layer.base_layer)
    if is_linear_like(base):
        return [base], candidate.position
    if candidate.site is None or candidate.position != "output":
        raise ValueError(
            f"IA3 cannot express AUs on {candidate.name} ({type(base).__name__}): IA3 scales the input or output of "
            "Linear or GPT-2 Conv1D layers only. Keep this adapter in AUSteer form."
        )
    try:
        slices = merge_slices(layer.base_layer, candidate)
    except ValueError as error:
        raise ValueError(f"IA3 cannot express AUs on {candidate.name}: {error}") from None
    if not all(s.name == "weight" and is_linear_like(s.owner) for s in slices):
        raise ValueError(
            f"IA3 cannot express AUs on {candidate.name}: its output comes from fused expert weights (one 3D "
            "parameter), not from Linear layers that IA3 can wrap. Keep this adapter in AUSteer form."
        )
    return [s.owner for s in slices], "output"
