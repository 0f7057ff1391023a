"""AUSteerLayer: multiplies a few dimensions of a module's input or output by fixed factors ``1 + γ``.

The one module PEFT puts into the model; it applies, merges and unmerges a sparse scale and knows nothing about
fitting, adapter files or where a call's tokens sit (it asks ``scope.TokenPositions`` for a mask).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .bnb import quantization_kind, refuse_8bit, scaled_4bit_weight
from .precision import check_fp16_overflow
from .experts import fused_experts_axis, put_columns_, steered_forward, take_columns
from .scope import TokenPositions
from .sites import SiteModule, WeightSlice, merge_slices


class AUSteerLayer(nn.Module, BaseTunerLayer):
    """Wraps any module (Linear, Conv1D, bitsandbytes Linear4bit, an MLP block, a decoder layer).

    Per adapter it holds its AUs sparsely: ``austeer_index`` (int64 [n], dimensions of the input or output) and
    ``austeer_gamma`` (float32 [n]). At every token position, ``x[..., index] *= 1 + gamma``; the factor is computed in
    float32 and applied in the activation's dtype. Several active adapters multiply. The layer knows nothing about
    fitting; it applies and merges a sparse scale.
    """

    adapter_layer_names: tuple[str, ...] = ()  # nothing trainable
    other_param_names: tuple[str, ...] = ("austeer_index", "austeer_gamma")

    def __init__(self, base_layer: nn.Module, candidate: SiteModule, adapter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.candidate = candidate
        # Not persistent: the adapter file stores all AUs of a model as one compact table (see AUSteerModel).
        self.austeer_index = BufferDict(persistent=False)
        self.austeer_gamma = BufferDict(persistent=False)
        self.merged_adapters: list[str] = []
        self._merge_backups: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.token_positions: Optional[TokenPositions] = None  # set by AUSteerModel while an adapter has a scope

    def __getattr__(self, name: str) -> Any:
        # Model code reads attributes of the module it calls (e.g. `decoder_layer.attention_type`).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def position(self) -> str:
        return self.candidate.position

    def update_layer(self, adapter_name: str, index: torch.Tensor, gamma: torch.Tensor) -> None:
        """Set the AUs of one adapter on this module (replaces what it had)."""
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged into {self.candidate.name}; unmerge it first.")
        device = _module_device(self.base_layer)
        self.austeer_index[adapter_name] = index.to(device=device, dtype=torch.int64)
        self.austeer_gamma[adapter_name] = gamma.to(device=device, dtype=torch.float32)

    def _get_available_adapters(self) -> set[str]:
        return set(self.austeer_index.keys())

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # Only the device follows the base layer: indices stay int64 and γ stays float32 whatever the model dtype.
        device = device or _module_device(self.base_layer)
        for buffers in (self.austeer_index, self.austeer_gamma):
            if adapter_name in buffers:
                buffers[adapter_name] = buffers[adapter_name].to(device)

    def _apply(self, fn, recurse: bool = True):
        # `model.half()` / `.to(torch.bfloat16)` cast every floating buffer; γ keeps float32 and only moves device.
        gammas = dict(self.austeer_gamma.items())
        module = super()._apply(fn, recurse)
        for name, gamma in gammas.items():
            self.austeer_gamma[name] = gamma.to(self.austeer_gamma[name].device)
        return module

    def _steering_adapters(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [a for a in self.active_adapters if a in self.austeer_index and a not in self.merged_adapters]

    def _scale_(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        positions = self.token_positions
        for adapter in adapters:
            index = self.austeer_index[adapter]
            factor = (1.0 + self.austeer_gamma[adapter]).to(x.dtype)
            if positions is not None and adapter in positions.scopes:
                # Steer only some token positions: factor 1 elsewhere.
                factor = torch.where(positions.mask(adapter, x)[..., None], factor, 1.0)
            check_fp16_overflow(self, adapter, x, index, factor)
            x[..., index] *= factor
        return x

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters and self.merged:
            self.unmerge()
        adapters = self._steering_adapters()
        if not adapters:
            return self.base_layer(*args, **kwargs)
        if self.position == "input" and fused_experts_axis(self.base_layer) is not None:
            # Expert-level AUs live inside the module: run it with scaled down_proj columns (see experts.py).
            positions = getattr(self, "token_positions", None)
            if positions is not None and any(a in positions.scopes for a in adapters):
                raise ValueError(f"Expert-level AUs ({self.candidate.name}) scale expert weights, so they steer every "
                                 "token; an adapter with a token scope cannot use them. Use scope='all' here.")
            scales = [(self.austeer_index[a], 1.0 + self.austeer_gamma[a]) for a in adapters]
            return steered_forward(self.base_layer, scales, args, kwargs)
        if self.position == "input":
            # The caller may still hold its tensor: scale a copy.
            if args:
                args = (self._scale_(args[0].clone(), adapters), *args[1:])
            else:
                kwargs["hidden_states"] = self._scale_(kwargs["hidden_states"].clone(), adapters)
            return self.base_layer(*args, **kwargs)
        output = self.base_layer(*args, **kwargs)
        # The output was just made by the base layer and nobody else holds it yet, so scale it in place.
        if isinstance(output, tuple):
            return (self._scale_(output[0], adapters), *output[1:])
        return self._scale_(output, adapters)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the scale into weights: columns of a linear input, rows (and bias) of a linear output."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in self.austeer_index:
                self._fold(adapter, safe_merge)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Restore the saved weight slices, newest merge first, so weights come back bit-exactly."""
        while self.merged_adapters:
            self._unfold(self.merged_adapters.pop())

    def _merge_slices(self) -> list[WeightSlice]:
        """The weights this layer folds into, after checking each can take the fold."""
        slices = merge_slices(self.base_layer, self.candidate)
        for weight_slice in slices:
            weight = getattr(weight_slice.owner, weight_slice.name)
            kind = quantization_kind(weight)
            if kind == "8bit":
                refuse_8bit(self.candidate.name)
            if not kind and not weight.dtype.is_floating_point:
                raise ValueError(
                    f"Cannot merge into {self.candidate.name}: its weight is stored as {weight.dtype} "
                    f"({type(weight_slice.owner).__name__}), not as floating point. Keep the adapter unmerged."
                )
        return slices

    def check_mergeable(self) -> None:
        """Raise, with the reason, if this layer's scale cannot be folded into weights."""
        self._merge_slices()

    def _fold(self, adapter: str, safe_merge: bool = False) -> None:
        backups = []
        for weight_slice in self._merge_slices():
            owner, axis = weight_slice.owner, weight_slice.axis
            weight = getattr(owner, weight_slice.name)
            index = self.austeer_index[adapter].to(weight.device)
            factor = 1.0 + self.austeer_gamma[adapter].to(weight.device)
            if quantization_kind(weight) == "4bit":
                setattr(owner, weight_slice.name, scaled_4bit_weight(weight, axis, index, factor))
                old_weight = weight  # the whole packed parameter: restoring it is exact
            elif weight_slice.experts:  # one column of one fused expert per AU, taken as [n, hidden]
                old_weight = take_columns(weight.data, axis, index)
                put_columns_(weight.data, axis, index, _scaled(old_weight, 0, factor))
            else:
                old_weight = weight.data.index_select(axis, index)
                new_weight = _scaled(old_weight, axis, factor)
                if safe_merge and not torch.isfinite(new_weight).all():
                    raise ValueError(f"Merging adapter {adapter!r} into {self.candidate.name} gives non-finite weights.")
                weight.data.index_copy_(axis, index, new_weight)
            old_bias = None
            if weight_slice.bias_name is not None:
                bias = getattr(owner, weight_slice.bias_name)
                old_bias = bias.data.index_select(bias.ndim - 1, index)
                bias.data.index_copy_(bias.ndim - 1, index, _scaled(old_bias, bias.ndim - 1, factor))
            backups.append((weight_slice, old_weight, old_bias))
            _merge_stack(weight_slice).append((self, adapter))
        self._merge_backups[adapter] = backups

    def _unfold(self, adapter: str) -> None:
        # Two layers can fold into the same weight (`ffn` rows and `ffn_inner` columns of one down projection).
        # Snapshots restore exactly only in reverse merge order, so later folds into these weights are undone first
        # and folded again afterwards.
        later = []
        for weight_slice, _, _ in self._merge_backups[adapter]:
            stack = _merge_stack(weight_slice)
            while stack[-1] != (self, adapter):
                layer, other = stack[-1]
                layer._restore(other)
                later.append((layer, other))
        self._restore(adapter)
        for layer, other in reversed(later):
            layer._fold(other)

    def _restore(self, adapter: str) -> None:
        for weight_slice, old_weight, old_bias in reversed(self._merge_backups.pop(adapter)):
            owner, axis = weight_slice.owner, weight_slice.axis
            weight = getattr(owner, weight_slice.name)
            index = self.austeer_index[adapter].to(weight.device)
            if quantization_kind(old_weight) == "4bit":
                setattr(owner, weight_slice.name, old_weight)
            elif weight_slice.experts:
                put_columns_(weight.data, axis, index, old_weight)
            else:
                weight.data.index_copy_(axis, index, old_weight)
            if old_bias is not None:
                bias = getattr(owner, weight_slice.bias_name)
                bias.data.index_copy_(bias.ndim - 1, index, old_bias)
            _merge_stack(weight_slice).remove((self, adapter))

    def __repr__(self) -> str:
        n = {a: len(i) for a, i in self.austeer_index.items()}
        return f"austeer.AUSteerLayer({self.position}, aus={n})(\n  {self.base_layer!r}\n)"


def _scaled(values: torch.Tensor, axis: int, factor: torch.Tensor) -> torch.Tensor:
    """`values` (slices along `axis`) times one float32 factor per slice, back in the values' dtype."""
    shape = [1] * values.ndim
    shape[axis] = -1
    dtype = torch.promote_types(values.dtype, torch.float32)  # at least float32; float64 weights keep float64
    return (values.to(dtype) * factor.view(shape).to(dtype)).to(values.dtype)


def _merge_stack(weight_slice: WeightSlice) -> list[tuple[AUSteerLayer, str]]:
    """The (layer, adapter) folds applied to one weight, oldest first; kept on the module that owns the weight
    (a quantized weight is replaced on merge, so the weight object itself cannot hold it)."""
    stacks = weight_slice.owner.__dict__.setdefault("_austeer_merges", {})
    return stacks.setdefault(weight_slice.name, [])


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")
