"""Exact LoRA export: an AUSteer adapter written as an ordinary PEFT LoRA adapter, for engines that serve LoRA per
request from one base model (vLLM, SGLang, llama.cpp's server, PEFT's mixed batches).

Steering the AU set ``S`` of a linear layer by factors ``1 + γ_S`` changes its weight by a rank-``|S|`` matrix:

- input AUs (``attention``: columns of ``o_proj``; ``ffn_inner``: columns of ``down_proj``):
  ``ΔW = W[:, S]·diag(γ_S)``, so ``B = W[:, S]·diag(γ_S)`` and ``A = E_Sᵀ`` (``E_S``: the identity's columns ``S``);
- output AUs (``ffn``: rows of ``down_proj``): ``ΔW = diag(γ_S)·W[S, :]``, so ``B = E_S`` and
  ``A = diag(γ_S)·W[S, :]``; the bias row ``b_S`` also gains ``γ_S·b_S``, which is LoRA's ``lora_bias`` (a bias on
  ``lora_B``).

A weight with both (``ffn`` rows and ``ffn_inner`` columns of one down projection) stacks the two:
``diag(1+γ_o) W diag(1+γ_i) - W = D_o·W·diag(1+γ_i) + W·D_i``, rank ``|S_o| + |S_i|``. Every module keeps its own
rank (``rank_pattern``) and ``lora_alpha = r`` (``alpha_pattern``), so the LoRA scaling is 1 and no factor needs
folding. The update is built from the weight the model computes with (bitsandbytes 4-bit weights dequantized), so
on that model the LoRA adds exactly what steering adds, where merging would re-quantize.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..tuner.bnb import dequantized_4bit, quantization_kind
from ..tuner.sites import base_named_modules, candidate_modules, merge_slices, unwrap
from .export import write_stock_adapter
from .facts import austeer_tuner

PathLike = Union[str, os.PathLike]
LORA_TAGS = ["lora", "austeer", "activation-steering", "peft"]


@dataclass
class _SteeredWeight:
    """One weight that absorbs AUs: its owner module, parameter name, and the factors on each side."""

    owner: nn.Module
    param_name: str
    bias_name: Optional[str] = None
    inputs: list[tuple[torch.Tensor, torch.Tensor, bool]] = field(default_factory=list)  # (dims, γ, flat expert AUs)
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (dims, γ)


@dataclass
class LoraUpdate:
    """The LoRA factors of one weight: ``ΔW_e = B[e] @ A[e]`` per expert (one for a 2D weight), in the
    ``[out, in]`` orientation of ``nn.Linear``, and the ``lora_B`` bias (None when no bias changes)."""

    B: torch.Tensor  # [experts, out, r]
    A: torch.Tensor  # [experts, r, in]
    bias: Optional[torch.Tensor]  # [out]
    fused: bool  # a 3D expert parameter (PEFT `target_parameters`)
    conv1d: bool  # a GPT-2 Conv1D (PEFT `fan_in_fan_out`)

    @property
    def rank(self) -> int:
        return self.A.shape[1]


def to_lora(peft_model, output_dir: PathLike, adapter_name: Optional[str] = None, *, max_rank: Optional[int] = None,
            uniform_rank: bool = False) -> Path:
    """Write an AUSteer adapter as a stock PEFT LoRA adapter that reproduces it exactly (``austeer export --format
    lora``). It loads with plain ``peft`` (``PeftModel.from_pretrained(base, output_dir)``), no austeer-peft needed.

    Each steered weight gets a LoRA of rank equal to its number of AUs (``rank_pattern``), with ``lora_alpha`` equal
    to that rank (scaling 1, ``use_rslora=False``). ``r`` and ``lora_alpha`` of the config are the largest rank, so an
    engine that reads only those (vLLM, SGLang: one ``lora_alpha / r`` for the whole adapter, ranks from the tensor
    shapes) also scales by 1. Fused MoE expert weights (PEFT ``target_parameters``, one rank for all experts of a
    weight) take the largest rank, zero-padded.

    Args:
        peft_model: a PeftModel holding the AUSteer adapter (not merged).
        output_dir: folder for ``adapter_config.json``, ``adapter_model.safetensors`` and ``README.md``.
        adapter_name: the adapter to export (default: the active one).
        max_rank: refuse (before writing anything) when a module needs a larger rank, naming it: engines cap LoRA rank
            (vLLM's ``--max-lora-rank``), and a rank-``|S|`` update cannot be split over one request's single LoRA
            nor truncated without changing the outputs.
        uniform_rank: give every module the largest rank (zero-padded). llama.cpp scales each tensor by
            ``lora_alpha / (that tensor's rank)``, so it needs one rank throughout; the file grows accordingly.

    Refused with the reason: the ``residual`` site and modules whose output no single weight produces, a ``scope``
    other than ``"all"`` (a weight acts on every token), a merged adapter, 8-bit or offloaded weights, and a bias
    change on fused MoE experts (PEFT's ``target_parameters`` has no ``lora_bias``).
    """
    from peft import LoraConfig

    tuner = austeer_tuner(peft_model)
    adapter_name = adapter_name or peft_model.active_adapters[0]
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r}; adapters: {sorted(peft_model.peft_config)}.")
    if isinstance(max_rank, bool) or max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"`max_rank` must be a positive integer or None, got {max_rank!r}.")
    config = peft_model.peft_config[adapter_name]
    updates = lora_updates(peft_model, adapter_name)
    ranks = {name: update.rank for name, update in updates.items()}
    largest = max(ranks.values())
    if max_rank is not None and largest > max_rank:
        over = sorted((r, n) for n, r in ranks.items() if r > max_rank)[::-1]
        raise ValueError(
            f"The LoRA export needs rank {largest} on {over[0][1]} ({len(over)} module(s) above max_rank={max_rank}: "
            f"{', '.join(f'{n} {r}' for r, n in over[:3])}). A module's rank is its number of AUs, and the update is "
            "exact only at that rank: raise the engine's LoRA rank limit (vLLM: --max-lora-rank), fit with a smaller "
            "k, or serve this adapter merged."
        )
    fused = sorted(name for name, update in updates.items() if update.fused)
    # Fused expert weights take the config's `r`: PEFT 0.21.2 applies `rank_pattern` to `target_parameters` but warns
    # that such keys "matched no targeted module and were ignored" (it checks module names only).
    padded = set(ranks) if uniform_rank else set(fused)
    updates = {name: _padded(update, largest) if name in padded else update for name, update in updates.items()}
    ranks = {name: update.rank for name, update in updates.items()}

    lora_bias = any(update.bias is not None for update in updates.values())
    if lora_bias and fused:
        raise ValueError(
            f"LoRA cannot express this adapter: it changes a bias, which needs `lora_bias`, and it steers fused MoE "
            f"experts ({fused[0]}), which PEFT adapts through `target_parameters`, and PEFT's parameter LoRA does not "
            "support `lora_bias`. Keep this adapter in AUSteer form or serve it merged."
        )
    conv1d = {update.conv1d for update in updates.values() if not update.fused}
    # A pattern key is a regex matched against the end of a module name; escape the dots of full names.
    patterns = {re.escape(name): rank for name, rank in sorted(ranks.items()) if name not in fused}
    lora_config = LoraConfig(
        r=largest, lora_alpha=largest, rank_pattern=patterns, alpha_pattern=dict(patterns), use_rslora=False,
        target_modules=sorted(n for n in updates if n not in fused) or None, target_parameters=fused or None,
        lora_dropout=0.0, bias="none", lora_bias=lora_bias, fan_in_fan_out=True in conv1d,
        base_model_name_or_path=config.base_model_name_or_path, revision=config.revision,
        task_type=config.task_type, inference_mode=True,
    )
    config_dict = lora_config.to_dict()
    for key in ("target_modules", "target_parameters"):  # sets in the config; sorted for a stable file
        if config_dict.get(key) is not None:
            config_dict[key] = sorted(config_dict[key])
    if config.task_type is None:  # as PeftModel.save_pretrained does, so that AutoPeftModel finds the base class
        base_model = tuner.model
        config_dict["auto_mapping"] = {"base_model_class": type(base_model).__name__,
                                       "parent_library": type(base_model).__module__}
    return write_stock_adapter(output_dir, config_dict, _state_dict(updates, fused, lora_bias),
                               config.base_model_name_or_path, LORA_TAGS, _LORA_CARD,
                               n_aus=len(peft_model.get_aus(adapter_name)), n_modules=len(ranks),
                               largest=max(ranks.values()), uniform=len(set(ranks.values())) == 1)


def lora_updates(peft_model, adapter_name: str) -> dict[str, LoraUpdate]:
    """The LoRA factors of every weight the adapter steers, keyed by PEFT target name (a module name, or
    ``module.parameter`` for fused expert weights); raises with the reason when LoRA cannot express the adapter."""
    tuner = austeer_tuner(peft_model)
    config = peft_model.peft_config[adapter_name]
    if config.scope != "all":
        raise ValueError(
            f"Adapter {adapter_name!r} has scope={config.scope!r}: it steers only some token positions, and a LoRA "
            "adds its update at every position. Only scope='all' adapters export to LoRA; keep this one in AUSteer "
            "form."
        )
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) and adapter_name in m.merged_adapters for m in peft_model.modules()):
        raise ValueError(f"Adapter {adapter_name!r} is merged into the weights; call `unmerge_adapter()` before "
                         "exporting it (the LoRA is built from the original weights).")
    aus = peft_model.get_aus(adapter_name)
    if not aus:
        raise ValueError(f"Adapter {adapter_name!r} has no AUs to export; set them with `set_aus` or a fit first.")
    base_model = tuner.model
    modules = base_named_modules(base_model)
    names_of = {id(unwrap(module)): name for name, module in modules.items()}
    candidates = {c.name: c for c in candidate_modules(base_model, config)}
    grouped: dict[str, tuple[list[int], list[float]]] = {}
    for au in aus:
        dims, gammas = grouped.setdefault(au.module, ([], []))
        dims.append(au.dim)
        gammas.append(au.gamma)

    weights: dict[tuple[str, str], _SteeredWeight] = {}
    for module_name, (dims, gammas) in grouped.items():
        candidate = candidates[module_name]
        for piece in _slices(modules[module_name], candidate):
            key = (names_of[id(piece.owner)], piece.name)
            weight = weights.setdefault(key, _SteeredWeight(piece.owner, piece.name, piece.bias_name))
            index, gamma = torch.tensor(dims), torch.tensor(gammas, dtype=torch.float32)
            if candidate.position == "input":
                weight.inputs.append((index, gamma, piece.experts))
            else:
                weight.outputs.append((index, gamma))
    updates = {}
    for (owner_name, param_name), weight in sorted(weights.items()):
        update = _low_rank(weight, owner_name)
        updates[f"{owner_name}.{param_name}" if update.fused else owner_name] = update
    return updates


def _slices(module: nn.Module, candidate):
    """The weights that absorb a module's AUs, or a LoRA-specific refusal."""
    if candidate.site == "residual":
        raise ValueError(
            "LoRA cannot express AUs on the `residual` site: they scale a decoder layer's output, the residual stream, "
            "which also carries every earlier layer's contribution through the skip connections, so no weight update "
            "produces it. Keep this adapter in AUSteer form, or fit on the `attention`, `ffn` or `ffn_inner` sites."
        )
    try:
        return merge_slices(module, candidate)
    except ValueError as error:
        raise ValueError(f"LoRA cannot express AUs on {candidate.name}: {error}") from None


def _dense_weight(weight: _SteeredWeight, owner_name: str) -> torch.Tensor:
    """The weight as the model computes with it, float32, as ``[experts, out, in]`` (one expert for 2D weights)."""
    param = getattr(weight.owner, weight.param_name)
    if param.device.type == "meta":
        raise ValueError(f"{owner_name}.{weight.param_name} is offloaded (on the meta device); load the model without "
                         "offloading to export a LoRA built from its weights.")
    kind = quantization_kind(param)
    if kind == "8bit":
        raise ValueError(
            f"{owner_name} is a bitsandbytes 8-bit layer: LLM.int8 multiplies with quantized activations, so no LoRA "
            "built from its weight reproduces steering exactly. Export from the fp32/fp16 model (the LoRA then applies "
            "to the 8-bit model with that model's quantization error) or keep the adapter in AUSteer form."
        )
    dense = (dequantized_4bit(param) if kind == "4bit" else param.detach()).float().cpu()
    if dense.ndim == 2:
        return (dense.T if isinstance(weight.owner, Conv1D) else dense)[None]  # Conv1D stores [in, out]
    # fused experts: [E, out, in], or [E, in, out] when `is_transposed`
    return dense.transpose(1, 2) if getattr(weight.owner, "is_transposed", False) else dense


def _low_rank(weight: _SteeredWeight, owner_name: str) -> LoraUpdate:
    """``B, A`` with ``B[e] @ A[e] = diag(1+γ_o)·W_e·diag(1+γ_i) - W_e`` for every expert ``e``."""
    dense = _dense_weight(weight, owner_name)  # [E, out, in]
    experts, out_features, in_features = dense.shape
    in_factor, in_steered = torch.ones(experts, in_features), torch.zeros(experts, in_features, dtype=torch.bool)
    out_factor, out_steered = torch.ones(out_features), torch.zeros(out_features, dtype=torch.bool)
    for index, gamma, flat in weight.inputs:
        # fused experts: AU d is column d % in of expert d // in; otherwise column d of the (one) weight
        where = (index // in_features, index % in_features) if flat else (slice(None), index)
        in_factor[where] *= 1 + gamma
        in_steered[where] = True
    for index, gamma in weight.outputs:
        out_factor[index] *= 1 + gamma
        out_steered[index] = True
    rows = torch.nonzero(out_steered).flatten()  # S_o, shared by every expert
    columns = [torch.nonzero(in_steered[e]).flatten() for e in range(experts)]  # S_i per expert
    rank = len(rows) + max(len(c) for c in columns)
    B = torch.zeros(experts, out_features, rank)
    A = torch.zeros(experts, rank, in_features)
    n_rows = len(rows)
    for e in range(experts):
        # output rows: B = E_So, A = D_o[So] * (W diag(1+γ_i))[So, :]
        B[e, rows, torch.arange(n_rows)] = 1.0
        A[e, :n_rows] = (out_factor[rows] - 1)[:, None] * (dense[e, rows] * in_factor[e])
        # input columns: B = W[:, Si] * D_i[Si], A = E_Siᵀ
        n_cols = len(columns[e])
        B[e, :, n_rows:n_rows + n_cols] = dense[e][:, columns[e]] * (in_factor[e, columns[e]] - 1)
        A[e, torch.arange(n_rows, n_rows + n_cols), columns[e]] = 1.0
    bias = None
    if weight.bias_name is not None and len(rows):
        base_bias = getattr(weight.owner, weight.bias_name).detach().float().cpu()
        if dense.shape[0] > 1 or base_bias.ndim > 1:
            if torch.any(base_bias != 0):
                raise ValueError(
                    f"LoRA cannot express the `ffn` AUs on {owner_name}: they also scale the experts' down projection "
                    "biases, and PEFT's parameter LoRA (`target_parameters`) has no `lora_bias`. Serve it merged."
                )
        else:
            bias = (out_factor - 1) * base_bias  # [out]
    fused = getattr(weight.owner, weight.param_name).ndim == 3
    return LoraUpdate(B, A, bias, fused, isinstance(weight.owner, Conv1D))


def _padded(update: LoraUpdate, rank: int) -> LoraUpdate:
    """The same update at a larger rank: zero columns of B and zero rows of A."""
    extra = rank - update.rank
    B = torch.nn.functional.pad(update.B, (0, extra))
    A = torch.nn.functional.pad(update.A, (0, 0, 0, extra))
    return LoraUpdate(B, A, update.bias, update.fused, update.conv1d)


def _state_dict(updates: dict[str, LoraUpdate], fused: list[str], lora_bias: bool) -> dict[str, torch.Tensor]:
    """PEFT's saved layout: ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_B.bias``)."""
    state = {}
    for name, update in updates.items():
        module = name.rpartition(".")[0] if name in fused else name
        prefix = f"base_model.model.{module}"
        experts, out_features, rank = update.B.shape
        if name in fused:
            # PEFT's ParamWrapper: lora_A [r * E, in] is (E, r, in) flattened; lora_B [out, r * E] is (out, r, E).
            state[f"{prefix}.lora_A.weight"] = update.A.reshape(experts * rank, -1)
            state[f"{prefix}.lora_B.weight"] = update.B.permute(1, 2, 0).reshape(out_features, rank * experts)
        else:
            state[f"{prefix}.lora_A.weight"] = update.A[0]
            state[f"{prefix}.lora_B.weight"] = update.B[0]
            if lora_bias:
                bias = update.bias if update.bias is not None else torch.zeros(out_features)
                state[f"{prefix}.lora_B.bias"] = bias
    return {key: value.contiguous() for key, value in state.items()}


_LORA_CARD = """---
{{ card_data }}
---

# LoRA export of an AUSteer adapter

An AUSteer activation-steering adapter ({{ n_aus }} steered activations in {{ n_modules }} weights) written as a stock
PEFT LoRA adapter. Scaling activation dimensions `S` of a linear layer by `1 + γ` changes its weight by a rank-`|S|`
matrix, so each weight's LoRA has rank equal to its number of steered activations ({% if uniform %}padded to one rank,
{{ largest }}, throughout{% else %}`rank_pattern`; the largest is {{ largest }}{% endif %}), with `lora_alpha` equal to
the rank (scaling 1). It loads with plain `peft` (`PeftModel.from_pretrained(base, adapter)`) and reproduces the
AUSteer adapter's outputs up to float rounding; it serves per request in multi-LoRA engines.
"""
