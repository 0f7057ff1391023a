"""Expert-level AUs on fused MoE experts (transformers 5): one input column of one expert's down projection.

A fused experts module stores all experts' down projections in one 3D parameter, ``down_proj`` ``[E, H, I]`` (or
``[E, I, H]`` when ``is_transposed``). The ``ffn_inner`` site on such a module has ``E * I`` AUs; AU ``d`` is column
``i = d % I`` of expert ``e = d // I``. No module sees that activation, so it is steered at the parameter level (as
PEFT's LoRA ``target_parameters`` does): the module runs with a copy of ``down_proj`` whose columns ``W[e, :, i]`` are
scaled. By linearity this equals scaling the expert's inner activation, and merging writes the same scaled columns
into the parameter, so the merged model equals the steered one bit for bit.

The activation a fit reads for AU ``(e, i)`` at a token is ``w_e * h_e[i]``: the expert's routing weight times its
inner activation, i.e. the coefficient of the weight column ``W[e, :, i]`` in the block's output (just as ``h[i]`` is
the coefficient of ``W[:, i]`` in a dense MLP's output). It is exactly 0 when the token is not routed to expert ``e``,
so pairs routed differently still compare like with like.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


def fused_experts_axis(module: nn.Module) -> Optional[int]:
    """The axis of the inner (intermediate) dimension of a fused experts module's ``down_proj``, or None when the
    module is not fused experts."""
    down = getattr(module, "down_proj", None)
    if not isinstance(down, torch.Tensor) or down.ndim != 3 or isinstance(module, nn.ModuleList):
        return None
    if not (hasattr(module, "gate_up_proj") or hasattr(module, "up_proj")):
        return None
    return 1 if getattr(module, "is_transposed", False) else 2


def num_expert_units(module: nn.Module) -> int:
    """Number of expert-level AUs of a fused experts module: experts times inner width."""
    down = module.down_proj
    return down.shape[0] * down.shape[fused_experts_axis(module)]


def _split(weight: torch.Tensor, axis: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inner = weight.shape[axis]
    return torch.div(index, inner, rounding_mode="floor"), index % inner


def take_columns(weight: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """The columns ``W[e, :, i]`` of flat AU indices ``index``, as ``[n, H]``."""
    expert, inner = _split(weight, axis, index)
    return weight[expert, :, inner] if axis == 2 else weight[expert, inner]


def put_columns_(weight: torch.Tensor, axis: int, index: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values`` (``[n, H]``) into the columns of flat AU indices ``index``, in place."""
    expert, inner = _split(weight, axis, index)
    if axis == 2:
        weight[expert, :, inner] = values
    else:
        weight[expert, inner] = values


def steered_forward(module: nn.Module, factors: list[torch.Tensor], args: tuple, kwargs: dict) -> Any:
    """Run fused experts with ``down_proj`` times dense float32 factors (one per stage, shaped to broadcast over
    it: 1 except at the AUs' columns), on a new tensor (the parameter itself is untouched, so autograd and other
    callers see the original). The product is computed in at least float32, as merging computes it."""
    if not factors:
        return module(*args, **kwargs)
    weight = module.down_proj
    if weight.device.type == "meta":
        raise ValueError("Expert-level AUs (`ffn_inner` on fused MoE experts) need the experts' weights in memory; "
                         "they cannot steer an offloaded experts module. Load the model without offloading.")
    dtype = torch.promote_types(weight.dtype, torch.float32)
    scaled = weight
    for factor in factors:
        factor = factor.to(weight.device)
        scaled = scaled * factor if weight.dtype == dtype else (scaled.to(dtype) * factor.to(dtype)).to(weight.dtype)
    return torch.func.functional_call(module, {"down_proj": scaled}, args, kwargs)


def read_expert_units(module: nn.Module, args: tuple, kwargs: dict, rows: torch.Tensor) -> torch.Tensor:
    """The expert-level AU activations ``w_e * h_e[i]`` of the token rows ``rows``, as ``[len(rows), E * I]``.

    Read from the experts module's inputs (``hidden_states [tokens, H], top_k_index, top_k_weights``) by recomputing
    each routed expert's inner activation for those rows only, with the module's own gate function; experts a row
    is not routed to read 0.
    """
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[name] for name in names[len(args):] if name in kwargs]
    if len(values) < 3 or getattr(module, "has_post_expert_norm", False):
        raise ValueError(
            f"Cannot read expert-level AUs from {type(module).__name__}: expected a transformers fused experts module "
            "called as experts(hidden_states, top_k_index, top_k_weights) without a post-expert norm. Use the `ffn` "
            "site (the whole MoE block output) on this model."
        )
    hidden_states, top_k_index, top_k_weights = values[:3]
    hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])[rows]
    top_k_index = top_k_index.reshape(-1, top_k_index.shape[-1])[rows]
    top_k_weights = top_k_weights.reshape(-1, top_k_weights.shape[-1])[rows]
    num_experts, inner = module.down_proj.shape[0], module.down_proj.shape[fused_experts_axis(module)]
    out = hidden_states.new_zeros(len(rows), num_experts, inner)
    transposed = getattr(module, "is_transposed", False)
    has_gate = getattr(module, "has_gate", hasattr(module, "gate_up_proj"))
    for expert in top_k_index.unique().tolist():
        if not 0 <= expert < num_experts:  # expert-parallel sentinel: not on this rank
            continue
        row, slot = torch.where(top_k_index == expert)
        weight = module.gate_up_proj[expert] if has_gate else module.up_proj[expert]
        projected = hidden_states[row] @ weight if transposed else nn.functional.linear(hidden_states[row], weight)
        if getattr(module, "has_bias", False):
            projected = projected + (module.gate_up_proj_bias if has_gate else module.up_proj_bias)[expert]
        inner_activation = module._apply_gate(projected) if has_gate else module.act_fn(projected)
        out[row, expert] = inner_activation * top_k_weights[row, slot, None].to(inner_activation.dtype)
    return out.reshape(len(rows), num_experts * inner)
