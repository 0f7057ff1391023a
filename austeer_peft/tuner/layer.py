"""AUSteerLayer: multiplies a few dimensions of a module's input or output by fixed factors ``1 + γ``.

The one module PEFT puts into the model; it applies, merges and unmerges a sparse scale and knows nothing about
fitting, adapter files or where a call's tokens sit (it asks ``scope.TokenPositions`` for a mask, and
``scope.RowAdapters`` for each row's adapter).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .bnb import quantization_kind, refuse_8bit, scaled_4bit_weight
from .experts import fused_experts_axis, put_columns_, steered_forward, take_columns
from .factors import Plan, SparseSteer, build_plan, row_table
from .precision import check_fp16_overflow
from .scope import RowAdapters, TokenPositions
from .sites import SiteModule, WeightSlice, merge_slices


class AUSteerLayer(nn.Module, BaseTunerLayer):
    """Wraps any module (Linear, Conv1D, bitsandbytes Linear4bit, an MLP block, a decoder layer).

    Per adapter it holds its AUs sparsely: ``austeer_index`` (int64 [n], dimensions of the input or output) and
    ``austeer_gamma`` (float32 [n]). At every token position, ``x[..., index] *= 1 + gamma``; the factor is computed in
    float32 and applied in the activation's dtype. Several active adapters multiply. Whenever the AUs, the active
    adapters, their scopes, a merge or the device change, the layer prepares dense factor vectors (``factors.py``),
    so a forward with ``scope="all"`` adapters is one multiply. The layer knows nothing about fitting.
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
        self._token_positions: Optional[TokenPositions] = None  # set by AUSteerModel while an adapter has a scope
        self._experts_axis = fused_experts_axis(base_layer) if candidate.position == "input" else None
        self._plan: Optional[Plan] = None  # the dense factors of the adapters steering now; None: nothing steers
        self._row_adapters: Optional[RowAdapters] = None  # set by AUSteerModel for calls with `adapter_names`
        self._row_table: Optional[torch.Tensor] = None  # [1 + adapters, width] factors, one row per adapter
        self._row_order: tuple[str, ...] = ()
        self.factor_version = 0  # counts preparations: what the float16 overflow watch belongs to

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

    @property
    def token_positions(self) -> Optional[TokenPositions]:
        return self._token_positions

    @token_positions.setter
    def token_positions(self, positions: Optional[TokenPositions]) -> None:
        self._token_positions = positions  # which adapters have a scope comes with it: prepare again
        self.prepare_factors()

    # ------------------------------------------------------------------------------------------- adapters and AUs

    def update_layer(self, adapter_name: str, index: torch.Tensor, gamma: torch.Tensor) -> None:
        """Set the AUs of one adapter on this module (replaces what it had)."""
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged into {self.candidate.name}; unmerge it first.")
        device = _module_device(self.base_layer)
        self.austeer_index[adapter_name] = index.to(device=device, dtype=torch.int64)
        self.austeer_gamma[adapter_name] = gamma.to(device=device, dtype=torch.float32)
        self._row_table = None  # the per-row table holds every adapter's AUs: build it again on the next call
        self.prepare_factors()

    def drop_aus(self, adapter_name: str) -> None:
        """Remove one adapter's AUs from this module, leaving which adapters are active as it is."""
        del self.austeer_index[adapter_name], self.austeer_gamma[adapter_name]
        self._row_table = None
        self.prepare_factors()

    def _get_available_adapters(self) -> set[str]:
        return set(self.austeer_index.keys())

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self.prepare_factors()

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self.prepare_factors()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._row_table = None
        self.prepare_factors()

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # Only the device follows the base layer: indices stay int64 and γ stays float32 whatever the model dtype.
        device = device or _module_device(self.base_layer)
        for buffers in (self.austeer_index, self.austeer_gamma):
            if adapter_name in buffers:
                buffers[adapter_name] = buffers[adapter_name].to(device)
        self._row_table = None
        self.prepare_factors()

    def _apply(self, fn, recurse: bool = True):
        # `model.half()` / `.to(torch.bfloat16)` cast every floating buffer; γ keeps float32 and only moves device.
        gammas = dict(self.austeer_gamma.items())
        module = super()._apply(fn, recurse)
        for name, gamma in gammas.items():
            self.austeer_gamma[name] = gamma.to(self.austeer_gamma[name].device)
        self._row_table = None
        self.prepare_factors()
        return module

    def _steering_adapters(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [a for a in self.active_adapters if a in self.austeer_index and a not in self.merged_adapters]

    def _sparse(self, adapter: str) -> SparseSteer:
        positions = self._token_positions
        scope = positions.scopes.get(adapter) if positions is not None else None
        return SparseSteer(adapter, self.austeer_index[adapter], self.austeer_gamma[adapter], scope)

    def prepare_factors(self, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> None:
        """Turn the AUs of the adapters steering now into dense factors (in `dtype`, default: the dtype the
        activations are expected in), so that a forward only multiplies. Called on every change that can alter them;
        a forward whose activation has another dtype or device calls it again for that."""
        self.factor_version += 1
        steers = [self._sparse(a) for a in self._steering_adapters()]
        if not steers:
            self._plan = None
            return
        weight = next(self.base_layer.parameters(), None)
        waits = device is None and weight is not None and weight.device.type == "meta"
        device = device or steers[0].gamma.device
        if device.type == "meta" or waits:
            # AUs placed where nothing is computed (offloaded weights, a model built on the meta device): the dense
            # vectors (k modules x width) wait for a forward on a real device, which prepares them there (or fails
            # loudly moving meta values), so attaching and loading adapters on a 70B model stays O(k) in memory
            self._plan = Plan((), tuple(steers), dtype or torch.float32, torch.device("meta"))  # never a forward's
            return
        if self._experts_axis is not None:  # the factors scale down_proj's columns, in float32
            self._plan = build_plan(steers, self.candidate.width, torch.float32, device, self._experts_shape())
            return
        self._plan = build_plan(steers, self.candidate.width, dtype or _activation_dtype(self.base_layer), device)

    def _experts_shape(self) -> tuple[int, ...]:
        """Expert-level factors [E * I] as they broadcast over down_proj [E, H, I] (or [E, I, H])."""
        experts = self.base_layer.down_proj.shape[0]
        return (experts, 1, -1) if self._experts_axis == 2 else (experts, -1, 1)

    def prepare_rows(self, rows: RowAdapters) -> None:
        """Before a call whose rows use different adapters: the per-row factor table for ``rows.order``."""
        self._row_adapters = rows
        if self._row_table is None or self._row_order is not rows.order:
            self._row_rebuild(rows.order, _activation_dtype(self.base_layer), None)

    def _row_rebuild(self, order: tuple[str, ...], dtype: torch.dtype, device: Optional[torch.device]) -> None:
        steers = {a: SparseSteer(a, self.austeer_index[a], self.austeer_gamma[a]) for a in self.austeer_index}
        device = device or next(iter(self.austeer_gamma.values())).device
        self._row_table = row_table(steers, order, self.candidate.width, dtype, device)
        self._row_order = order

    # ------------------------------------------------------------------------------------------- forward

    def _scaled(self, x: torch.Tensor, in_place: bool) -> torch.Tensor:
        """`x` ([..., width]) times the steering factors; in place only where the caller allows it."""
        rows = self._row_adapters
        if rows is not None and rows.rows is not None:
            return self._scaled_rows(x, rows)
        plan = self._plan
        if plan.dtype != x.dtype or plan.device != x.device:
            self.prepare_factors(x.dtype, x.device)
            plan = self._plan
        factor = plan.single
        if factor is not None and x.dtype != torch.float16:
            return x.mul_(factor) if in_place else x * factor  # the one op of a steered module
        scaled = x
        for stage in plan.stages:  # one multiply per stage: AUs shared by active adapters take two (factors.py)
            factor = stage.factor
            for i, (scope, vector) in enumerate(stage.scoped):  # factor 1 at the tokens a scope does not steer
                mask = self._token_positions.mask(scope, x)  # [..., 1]
                factor = torch.where(mask, vector, factor) if i == 0 else torch.where(mask, factor * vector, factor)
            scaled = scaled * factor
        if x.dtype == torch.float16:
            check_fp16_overflow(self, x, scaled, plan.adapters)
        return scaled

    def _scaled_rows(self, x: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """Each row of the batch times the factors of its own adapter: one gather from the per-row table."""
        table = self._row_table
        if table.dtype != x.dtype or table.device != x.device:
            self._row_rebuild(rows.order, x.dtype, x.device)
            table = self._row_table
        if x.ndim != 3:
            raise ValueError(
                f"Rows with different adapters (`adapter_names`) need the activations of {self.candidate.name} as "
                f"[batch, tokens, width]; this module sees shape {tuple(x.shape)}. Run one adapter at a time here."
            )
        factor = table[rows.rows_for(x.shape[0], table.device)]  # [batch, 1, width]
        positions = self._token_positions
        if positions is not None:
            mask = positions.row_mask(rows, x)  # [batch, tokens, 1] or None
            if mask is not None:
                factor = torch.where(mask, factor, 1.0)
        if x.dtype == torch.float16:
            scaled = x * factor
            used = [a for a in dict.fromkeys(rows.names) if a in self.austeer_index]
            check_fp16_overflow(self, x, scaled, tuple(self._sparse(a) for a in used))
            return scaled
        return x * factor

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._disable_adapters and self.merged_adapters:
            self.unmerge()
        rows = self._row_adapters
        if self._plan is None and (rows is None or rows.rows is None):
            return self.base_layer(*args, **kwargs)
        if self._experts_axis is not None:
            # Expert-level AUs live inside the module: run it with scaled down_proj columns (see experts.py).
            return steered_forward(self.base_layer, self._expert_factors(rows), args, kwargs)
        if self.position == "input":
            # The caller may still hold its tensor: scale out of place (a new tensor, as the old copy was).
            if args:
                args = (self._scaled(args[0], in_place=False), *args[1:])
            else:
                kwargs["hidden_states"] = self._scaled(kwargs["hidden_states"], in_place=False)
            return self.base_layer(*args, **kwargs)
        output = self.base_layer(*args, **kwargs)
        # The output was just made by the base layer and nobody else holds it yet, so scale it in place.
        if isinstance(output, tuple):
            return (self._scaled(output[0], in_place=True), *output[1:])
        return self._scaled(output, in_place=True)

    def _expert_factors(self, rows: Optional[RowAdapters]) -> list[torch.Tensor]:
        """The float32 factors (shaped like down_proj) that expert-level AUs scale the experts' weights by."""
        if rows is not None and rows.rows is not None:
            used = {a for a in rows.names if a in self.austeer_index}
            if not used:
                return []
            if len(set(rows.names)) > 1:
                raise ValueError(
                    f"Expert-level AUs ({self.candidate.name}) scale the experts' weights, which all rows of a batch "
                    f"share, so rows with different adapters ({sorted(set(rows.names))}) cannot use them. Run these "
                    "rows as separate batches, or steer the `ffn` site of this model instead."
                )
            adapter = used.pop()
            plan = build_plan([self._sparse(adapter)], self.candidate.width, torch.float32,
                              self.austeer_gamma[adapter].device, self._experts_shape())
        else:
            plan = self._plan
        if plan is None:
            return []
        if any(stage.scoped for stage in plan.stages):
            raise ValueError(f"Expert-level AUs ({self.candidate.name}) scale expert weights, so they steer every "
                             "token; an adapter with a token scope cannot use them. Use scope='all' here.")
        return [stage.factor for stage in plan.stages]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the scale into weights: columns of a linear input, rows (and bias) of a linear output."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in self.austeer_index:
                self._fold(adapter, safe_merge)
                self.merged_adapters.append(adapter)
        self.prepare_factors()  # merged adapters no longer steer at run time

    def unmerge(self) -> None:
        """Restore the saved weight slices, newest merge first, so weights come back bit-exactly."""
        while self.merged_adapters:
            self._unfold(self.merged_adapters.pop())
        self.prepare_factors()

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


def _activation_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module's activations are expected in: that of its first floating-point weight (float32 when it has
    none, e.g. only packed 4-bit weights); a forward in another dtype prepares the factors again for it."""
    for tensor in module.parameters():
        if tensor.dtype.is_floating_point:
            return tensor.dtype
    return torch.float32


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")
