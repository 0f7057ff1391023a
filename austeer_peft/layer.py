"""AUSteerLayer: multiplies a few dimensions of a module's input or output by fixed factors ``1 + γ``."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .sites import SiteModule, merge_target


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

    def _steering_adapters(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [a for a in self.active_adapters if a in self.austeer_index and a not in self.merged_adapters]

    def _scale_(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        for adapter in adapters:
            index = self.austeer_index[adapter]
            factor = (1.0 + self.austeer_gamma[adapter]).to(x.dtype)
            x[..., index] *= factor
        return x

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters and self.merged:
            self.unmerge()
        adapters = self._steering_adapters()
        if not adapters:
            return self.base_layer(*args, **kwargs)
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

    def _merge_target(self) -> tuple[nn.Module, str, int]:
        target, side = merge_target(self.base_layer, self.candidate)
        return target, side, _weight_axis(target, side)

    def check_mergeable(self) -> None:
        """Raise, with the reason, if this layer's scale cannot be folded into a weight."""
        target, _, _ = self._merge_target()
        if not target.weight.dtype.is_floating_point:
            raise ValueError(
                f"Cannot merge into {self.candidate.name}: its weight is stored as {target.weight.dtype} "
                f"({type(target).__name__}), not as floating point. Keep the adapter unmerged."
            )

    def _fold(self, adapter: str, safe_merge: bool = False) -> None:
        self.check_mergeable()
        target, side, axis = self._merge_target()
        weight, bias = target.weight, (target.bias if side == "output" else None)
        index = self.austeer_index[adapter].to(weight.device)
        factor = 1.0 + self.austeer_gamma[adapter].to(weight.device)
        shape = [1, 1]
        shape[axis] = -1
        old_weight = weight.data.index_select(axis, index)
        new_weight = (old_weight.float() * factor.view(shape)).to(weight.dtype)
        old_bias = bias.data.index_select(0, index) if bias is not None else None
        new_bias = (old_bias.float() * factor).to(bias.dtype) if bias is not None else None
        if safe_merge and not (torch.isfinite(new_weight).all() and (bias is None or torch.isfinite(new_bias).all())):
            raise ValueError(f"Merging adapter {adapter!r} into {self.candidate.name} gives non-finite weights.")
        weight.data.index_copy_(axis, index, new_weight)
        if bias is not None:
            bias.data.index_copy_(0, index, new_bias)
        self._merge_backups[adapter] = (old_weight, old_bias)
        _merge_stack(weight).append((self, adapter))

    def _unfold(self, adapter: str) -> None:
        # Two layers can fold into the same weight (`ffn` rows and `ffn_inner` columns of one down projection).
        # Snapshots restore exactly only in reverse merge order, so later folds into this weight are undone first
        # and folded again afterwards.
        target, side, axis = self._merge_target()
        stack = _merge_stack(target.weight)
        later = []
        while stack[-1] != (self, adapter):
            later.append(stack[-1])
            stack[-1][0]._restore(stack[-1][1])
        self._restore(adapter)
        for layer, other in reversed(later):
            layer._fold(other)

    def _restore(self, adapter: str) -> None:
        target, side, axis = self._merge_target()
        old_weight, old_bias = self._merge_backups.pop(adapter)
        index = self.austeer_index[adapter].to(target.weight.device)
        target.weight.data.index_copy_(axis, index, old_weight)
        if old_bias is not None:
            target.bias.data.index_copy_(0, index, old_bias)
        _merge_stack(target.weight).pop()

    def __repr__(self) -> str:
        n = {a: len(i) for a, i in self.austeer_index.items()}
        return f"austeer.AUSteerLayer({self.position}, aus={n})(\n  {self.base_layer!r}\n)"


def _weight_axis(module: nn.Module, side: str) -> int:
    """Weight axis of input features / output features: Linear stores [out, in], Conv1D stores [in, out]."""
    if isinstance(module, Conv1D):
        return 0 if side == "input" else 1
    return 1 if side == "input" else 0


def _merge_stack(weight: torch.Tensor) -> list[tuple[AUSteerLayer, str]]:
    """The (layer, adapter) folds applied to a weight, oldest first; kept on the weight itself."""
    if not hasattr(weight, "_austeer_merges"):
        weight._austeer_merges = []
    return weight._austeer_merges


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")
