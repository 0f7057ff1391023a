"""Merging into bitsandbytes-quantized weights: dequantize, scale the k slices, re-quantize.

Re-quantizing changes the quantization blocks that contain a scaled slice, so a merge into 4-bit weights is close
to, not equal to, the unmerged steered model (tests report the logit error). Unmerging puts the original packed
parameter back, so it is exact. 8-bit (LLM.int8) weights keep their quantization state on the layer as well as on
the parameter; merging into them is refused rather than risk a model that silently ignores the adapter.
"""

from __future__ import annotations

import copy

import torch
from peft.utils.integrations import get_bnb_param_type


def quantization_kind(param: torch.Tensor):
    """False for plain tensors, "4bit" or "8bit" for bitsandbytes parameters."""
    return get_bnb_param_type(param)


def dequantized_4bit(param: torch.Tensor) -> torch.Tensor:
    """The dense weight of a Params4bit, also after bitsandbytes repacked it for its CPU kernels (which it does in
    place on the first eval forward on CPUs with AVX512-BF16; its own save path undoes that with the same private
    helper).

    The repacking stores the block scales (absmax) transposed, ``[in / blocksize, out]``, in bfloat16. bitsandbytes
    0.50's inverse restores that layout only for nested (double-quantized) scales; plain ones stay transposed, which
    scrambles every weight row with more than one block. They are put back here, as the kernel uses them (bfloat16).
    """
    import bitsandbytes.functional as F

    data, state = param.data, param.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = F._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        if not state.nested and state.absmax.ndim == 2:  # still [in / blocksize, out]
            state.absmax = state.absmax.T.reshape(-1).float()
    return F.dequantize_4bit(data, state)


def scaled_4bit_weight(param: torch.Tensor, axis: int, index: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """A new Params4bit equal to `param` with the slices `index` along `axis` multiplied by `factor`."""
    import bitsandbytes as bnb

    dense = dequantized_4bit(param)
    shape = [1] * dense.ndim
    shape[axis] = -1
    scaled = dense.index_select(axis, index).float() * factor.view(shape)
    dense = dense.index_copy(axis, index, scaled.to(dense.dtype))
    kwargs = {k: v for k, v in param.__dict__.items() if not k.startswith("_") and k not in ("data", "quant_state")}
    kwargs.update(bnb_quantized=False, requires_grad=False)
    return bnb.nn.Params4bit(dense.to("cpu"), **kwargs).to(param.device)


def refuse_8bit(name: str) -> None:
    raise ValueError(
        f"Cannot merge into {name}: it is a bitsandbytes 8-bit layer, whose quantization state also lives on the "
        "layer. Keep the adapter unmerged on the 8-bit model (it steers it correctly), or merge into the fp16/fp32 "
        "model and quantize afterwards."
    )
