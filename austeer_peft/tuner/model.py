"""AUSteerModel: the PEFT tuner. Puts AUSteerLayers exactly on the modules that carry AUs, reads and writes an
adapter's AUs as one table (``table.py``), and tells scoped adapters where each call's tokens sit (``scope.py``).

The tuner is what PEFT calls; the pieces it delegates to (the file codec, token positions, offloaded weights,
combining adapters) live in their own modules so that each can be read, and changed, alone.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable
from typing import Any, Optional

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from tqdm import tqdm

from .aus import AU, AULike, group_aus
from .combine import COMBINATION_TYPES, combine_aus, combined_config
from .config import AUSteerConfig
from .layer import AUSteerLayer
from .offload import execution_device, offloaded_owners, onloaded_weights
from .scope import (RowAdapters, TokenPositions, call_inputs, check_adapter_names, input_width,
                    position_reading_hook)
from .sites import SiteModule, base_named_modules, candidate_modules, find_decoder_layers
from .table import (TABLE_KEYS, adapter_aus_to_inject, aus_to_config_entry, layers_to_table, same_table,
                    table_to_aus)

__all__ = ["AUSteerModel", "check_adapter_matches_model", "execution_device"]


class AUSteerModel(BaseTuner):
    """Fine-grained activation steering (AUSteer) as a PEFT tuner.

    Unlike most PEFT methods nothing is wrapped when the adapter is created: AUs are data, set by ``set_aus`` (which
    the fit and adapter loading both use), and only modules that carry an AU are wrapped.

    Example:
        ```py
        >>> import austeer_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, austeer_peft.AUSteerConfig(sites="attention"))
        >>> model.set_aus([(("attention", 27), 7 * 64 + 84, 15.0)])  # dim 84 of head 7 at layer 27
        ```
    """

    prefix: str = "austeer_"
    tuner_layer_cls = AUSteerLayer
    target_module_mapping: dict[str, list[str]] = {}
    _token_positions: Optional[TokenPositions] = None  # only while an adapter has a scope other than "all"
    _token_positions_hook: Any = None
    _row_adapters: Optional[RowAdapters] = None  # which adapter each row uses, in calls with `adapter_names`

    # ----------------------------------------------------------------------------------------------- injection

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, low_cpu_mem_usage: bool = False,
                 state_dict: Optional[dict] = None) -> None:
        # PeftModel passes {name: config} and keeps this tuner, which later receives the weights table; peft's
        # inject_adapter_in_model (transformers' load_adapter, from_pretrained(adapter), pipeline) passes one config and
        # keeps only the wrapped model, so the AUs must come with the config (see table.adapter_aus_to_inject).
        self.__dict__["_standalone_injection"] = isinstance(peft_config, PeftConfig)
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> None:
        """Register an adapter: check its sites against the model, and set the AUs it already carries.

        The AUs come from the weights table when the config was read by ``AUSteerConfig.from_pretrained`` (as
        ``PeftModel.from_pretrained`` and ``PeftModel.load_adapter`` do), else from ``config.aus`` (what
        ``save_pretrained`` writes into adapter_config.json); when both exist they must agree. They are set here, not
        later when PEFT loads the weights: PEFT's ``add_adapter`` removes the adapter again if this raises, so a
        missing, corrupt or refused file, or a table that does not fit the model, leaves no adapter behind.
        """
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        candidates = candidate_modules(model, config)
        check_adapter_matches_model(model, config, candidates)
        table, aus = adapter_aus_to_inject(config, standalone=self.__dict__.get("_standalone_injection", False))
        if aus is not None:
            group_aus(aus, candidates)  # every check of set_aus, before anything changes
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)
        if aus is not None:
            self.set_aus(aus, adapter_name=adapter_name)
            self.__dict__.setdefault("_tables_loaded", set()).add(adapter_name)
            self.__dict__.setdefault("_tables_read_early", {})[adapter_name] = (
                table if table is not None else layers_to_table(self._layers(), config, adapter_name))

    def _create_and_replace(self, peft_config: AUSteerConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **kwargs) -> None:
        candidate: SiteModule = kwargs["candidate"]
        if isinstance(target, AUSteerLayer):
            return
        layer = AUSteerLayer(target, candidate, adapter_name)
        layer.set_adapter(self.active_adapters)
        layer.enable_adapters(not getattr(self, "_adapters_disabled", False))
        setattr(parent, target_name, layer)

    def _layers(self) -> dict[str, AUSteerLayer]:
        return {m.candidate.name: m for m in self.model.modules() if isinstance(m, AUSteerLayer)}

    def _module_at(self, name: str) -> nn.Module:
        """The outermost module at ``name`` (a name without PEFT's ``.base_layer`` hops), found along the path
        rather than by listing every module: setting k AUs on a 70B model walks k paths, not k times the model."""
        module = self.model
        for part in filter(None, name.split(".")):
            while part not in module._modules and hasattr(module, "base_layer"):
                module = module.base_layer
            module = module._modules[part]
        return module

    def _wrap(self, candidate: SiteModule, adapter_name: str) -> AUSteerLayer:
        target = self._module_at(candidate.name)
        if not isinstance(target, AUSteerLayer):
            parent_name, _, child_name = candidate.name.rpartition(".")
            parent = self._module_at(parent_name)
            if isinstance(parent, AUSteerLayer):
                parent = parent.get_base_layer()
            self._create_and_replace(self.peft_config[adapter_name], adapter_name, target, child_name, parent,
                                     candidate.name, candidate=candidate)
        return self._module_at(candidate.name)

    def _unwrap(self, layer: AUSteerLayer) -> None:
        parent_name, _, child_name = layer.candidate.name.rpartition(".")
        parent = self._module_at(parent_name)
        if isinstance(parent, AUSteerLayer):
            parent = parent.get_base_layer()
        setattr(parent, child_name, layer.base_layer)

    # ----------------------------------------------------------------------------------------------- AUs

    def set_aus(self, aus: Iterable[AULike], adapter_name: str = "default") -> None:
        """Set (replace) the AUs of an adapter.

        Each AU is an ``AU``, a ``(module, dim, gamma)`` tuple or a ``{"module", "dim", "gamma"}`` dict, where
        ``module`` is a full module name or a ``(site, layer)`` pair, ``dim`` a dimension of the site's input or
        output, and ``gamma`` the steering coefficient (the activation becomes ``(1 + gamma) * x``). Everything is
        checked before any module changes.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}.")
        config = self.peft_config[adapter_name]
        candidates = candidate_modules(self.model, config)
        grouped = group_aus(aus, candidates)
        layers = self._layers()
        if any(adapter_name in layer.merged_adapters for layer in layers.values()):
            raise ValueError(f"Adapter {adapter_name!r} is merged; call `unmerge_adapter()` before setting its AUs.")

        for name, layer in layers.items():
            if name not in grouped and adapter_name in layer.austeer_index:
                # Only the AUs: the layer's delete_adapter would also switch its active adapters.
                layer.drop_aus(adapter_name)
                if not layer.austeer_index:
                    self._unwrap(layer)
        for candidate in candidates:
            if candidate.name in grouped:
                dims = sorted(grouped[candidate.name])
                gammas = [grouped[candidate.name][d] for d in dims]
                layer = self._wrap(candidate, adapter_name)
                layer.update_layer(adapter_name, torch.tensor(dims), torch.tensor(gammas))
                layer._move_adapter_to_device_of_base_layer(adapter_name, device=execution_device(layer.base_layer))
        config.steered_modules = {c.name: c.width for c in sorted(candidates, key=lambda c: c.name) if c.name in grouped}
        config.base_model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        config.aus = aus_to_config_entry(grouped)
        self.targeted_module_names = list(self._layers())
        self._sync_token_positions()

    def get_aus(self, adapter_name: Optional[str] = None) -> list[AU]:
        """The AUs of an adapter (default: the active one), in model order and by dimension."""
        adapter_name = adapter_name or self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}.")
        aus = []
        for name, layer in self._layers().items():
            if adapter_name in layer.austeer_index:
                dims = layer.austeer_index[adapter_name].tolist()
                gammas = layer.austeer_gamma[adapter_name].tolist()
                aus.extend(AU(name, d, g) for d, g in zip(dims, gammas))
        return aus

    def set_scope(self, scope: str, scope_position: Optional[int] = None, adapter_name: str = "default") -> None:
        """Change which token positions an adapter steers (``AUSteerConfig.scope``), e.g. of a fitted adapter."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}.")
        AUSteerConfig(scope=scope, scope_position=scope_position)  # checks the pair, with the usual messages
        if scope != "all" and any(adapter_name in layer.merged_adapters for layer in self._layers().values()):
            raise ValueError(f"Adapter {adapter_name!r} is merged; call `unmerge_adapter()` before giving it a scope.")
        config = self.peft_config[adapter_name]
        config.scope, config.scope_position = scope, scope_position
        self._sync_token_positions()

    # ----------------------------------------------------------------------------------------------- adapters

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self._adapters_disabled = not enabled
        if not enabled:  # a disabled layer unmerges on its next forward; do it now, with offloaded weights loaded
            self.unmerge_adapter()
        super()._enable_adapter_layers(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter. If it was active, the other active adapters stay active, or else the first remaining
        adapter becomes active (with a warning), on every layer alike."""
        was_active = adapter_name in self.active_adapters
        active = [a for a in self.active_adapters if a != adapter_name]
        with warnings.catch_warnings():
            # Layers that held only this adapter would each pick a successor of their own; one is chosen below.
            warnings.filterwarnings("ignore", message=".* was active which is now deleted")
            super().delete_adapter(adapter_name)
        for layer in self._layers().values():
            if not layer.austeer_index:
                self._unwrap(layer)
        self.__dict__.get("_tables_loaded", set()).discard(adapter_name)
        self.__dict__.get("_tables_read_early", {}).pop(adapter_name, None)
        if was_active:
            if not active and self.peft_config:
                active = [next(iter(self.peft_config))]
                warnings.warn(f"Adapter {adapter_name!r} was active and is deleted; adapter {active[0]!r} is active "
                              "now. Choose another with `set_adapter(name)`.", stacklevel=2)
            self.set_adapter(active)
        self._sync_token_positions()

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "multiply") -> None:
        """Combine AUSteer adapters into a new adapter ``adapter_name`` (saved and loaded like any other; not
        activated).

        ``"multiply"``: each AU's factor is the product of the adapters' factors raised to their weights,
        ``1 + γ = Π (1 + γ_i) ** w_i``. With all weights 1 this is the same model as activating the adapters
        together, and merging it equals merging them one after another. A factor ``1 + γ_i <= 0`` takes integer
        weights only (and ``0`` no negative weight).
        ``"union"``: each AU keeps the γ of the adapter with the largest ``|w_i · γ_i|`` (weights scale γ first;
        ties go to the earlier adapter), as ``w_i · γ_i``.
        The adapters must share the base model type, the scope, and either all use ``sites`` or all use the same kind
        of ``target_modules`` and ``position``.
        """
        if combination_type not in COMBINATION_TYPES:
            raise ValueError(f"combination_type must be 'multiply' or 'union', got {combination_type!r}.")
        if isinstance(adapters, str) or not adapters or len(set(adapters)) != len(adapters):
            raise ValueError(f"`adapters` must be a non-empty list of distinct adapter names, got {adapters!r}.")
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"No adapter named {missing}; adapters: {sorted(self.peft_config)}.")
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} exists already; pick a new name.")
        if isinstance(weights, (str, bytes)) or len(weights) != len(adapters) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
            raise ValueError(f"`weights` must be {len(adapters)} finite numbers, one per adapter; got {weights!r}.")
        config = combined_config([self.peft_config[a] for a in adapters], adapters)
        aus = combine_aus({a: self.get_aus(a) for a in adapters}, dict(zip(adapters, weights)), combination_type)
        config.k = max(len(aus), 1)
        self.peft_config[adapter_name] = config
        self.inject_adapter(self.model, adapter_name)
        self.set_aus(aus, adapter_name=adapter_name)

    def _check_mergeable(self, adapter_names: Optional[list[str]]) -> None:
        adapter_names = adapter_names or self.active_adapters
        for name in adapter_names:
            scope = getattr(self.peft_config.get(name), "scope", "all")
            if scope != "all":
                raise ValueError(
                    f"Adapter {name!r} has scope={scope!r}: it steers only some token positions, which no change of "
                    "the weights can reproduce, so only scope='all' adapters can be merged. Keep it unmerged."
                )
        for layer in self._layers().values():
            if any(a in layer.austeer_index for a in adapter_names):
                layer.check_mergeable()  # raises with the reason
                offloaded_owners(layer)  # raises if a weight is offloaded where it cannot be loaded

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_merge_allowed()
        self._check_mergeable(adapter_names)
        for layer in self._layers().values():
            with onloaded_weights(layer):
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for layer in self._layers().values():
            if layer.merged_adapters:
                with onloaded_weights(layer):
                    layer.unmerge()

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None) -> nn.Module:
        if merge:
            self._check_mergeable(adapter_names)
        # Innermost first, so a wrapper inside another wrapper's base layer is also removed.
        layers = list(reversed(list(self._layers().values())))
        for layer in tqdm(layers, disable=not progressbar, desc="Unloading " + ("and merging " if merge else "")):
            if merge:
                with onloaded_weights(layer):
                    layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            self._unwrap(layer)
        self._remove_token_positions()
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    # ----------------------------------------------------------------------------------------------- token scope

    def _sync_token_positions(self) -> None:
        """While some adapter steers only some token positions, read the positions of every forward (a pre-forward
        hook on the decoder stack); otherwise remove it, so that ``scope="all"`` costs nothing."""
        scopes = self._scopes()
        if not scopes:
            self._remove_token_positions()
        elif self._token_positions is None:
            positions = TokenPositions()
            stack = self._decoder_stack()
            hook = position_reading_hook(positions, stack)
            self._token_positions_hook = stack.register_forward_pre_hook(hook, with_kwargs=True)
            self._token_positions = positions
        if self._token_positions is not None:
            self._token_positions.scopes = scopes
        for layer in self._layers().values():
            layer.token_positions = self._token_positions

    def _scopes(self) -> dict[str, tuple[str, Optional[int]]]:
        """(scope, scope_position) of each adapter that steers only some token positions."""
        return {name: (config.scope, config.scope_position) for name, config in self.peft_config.items()
                if getattr(config, "scope", "all") != "all"}

    def _remove_token_positions(self) -> None:
        if self._token_positions is None:
            return
        self._token_positions_hook.remove()
        self._token_positions = self._token_positions_hook = None
        for layer in self._layers().values():
            layer.token_positions = None

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """One call of ``PeftModel.forward`` or ``PeftModel.generate`` (PEFT enters this once per call, with the
        call's arguments).

        While an adapter has a token scope, the width of the call's input is recorded as the prompt width: the first
        forward of the call follows the plain-forward rule, and the later ones (the further steps of ``generate``)
        know where the prompt ended, with or without a KV cache. With ``adapter_names`` (one adapter name per row,
        ``"__base__"`` for an unsteered row, as for PEFT's LoRA), each row is steered by its own adapter alone."""
        positions = self._token_positions
        record = positions is not None and not positions.in_call  # not a call inside a call
        names = kwargs.get("adapter_names")
        rows = self._start_rows(names, args, kwargs) if names is not None else None
        if record:
            positions.start_call(input_width(args, kwargs))
        try:
            yield
        finally:
            if record:
                positions.end_call()
            if rows is not None:
                rows.end_call()

    def _start_rows(self, names: Any, args: tuple, kwargs: dict) -> Optional[RowAdapters]:
        """Check ``adapter_names`` and hand each layer the rows' adapters; None for a call inside such a call."""
        if self._row_adapters is not None and self._row_adapters.names is not None:
            return None
        if self.model.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode: per-row adapters are "
                             "for inference. Call `model.eval()` first.")
        layers = list(self._layers().values())
        merged = sorted({a for layer in layers for a in layer.merged_adapters})
        if merged:
            raise ValueError(f"Cannot pass `adapter_names` while adapters are merged into the weights ({merged}): "
                             "merged weights steer every row. Call `unmerge_adapter()` first.")
        inputs = call_inputs(args, kwargs)
        check_adapter_names(names, list(self.peft_config), inputs)
        if self._row_adapters is None:
            self._row_adapters = RowAdapters()
        rows = self._row_adapters
        device = inputs.device if isinstance(inputs, torch.Tensor) else torch.device("cpu")
        rows.start_call(list(names), tuple(self.peft_config), self._scopes(), device)
        for layer in layers:
            layer.prepare_rows(rows)
        return rows

    def _decoder_stack(self) -> nn.Module:
        """The module that runs the decoder layers (e.g. ``model.model``): every forward passes through it."""
        try:
            stack_name = find_decoder_layers(self.model)[0].rpartition(".")[0]
        except ValueError:
            return self.model
        return base_named_modules(self.model)[stack_name] if stack_name else self.model

    # ----------------------------------------------------------------------------------------------- adapter files

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: AUSteerConfig, adapter_name: str,
                                state_dict: dict, unwanted_adapter_names: list[str]) -> dict[str, torch.Tensor]:
        """All AUs of the adapter as one table (module id, dim, γ): ~12 bytes per AU plus one small header."""
        layers = {m.candidate.name: m for m in model.modules() if isinstance(m, AUSteerLayer)}
        return layers_to_table(layers, config, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: AUSteerConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hand each layer its slice of the table (via ``set_aus``); nothing is left for ``load_state_dict``.

        When ``inject_adapter`` already read this table (a config from ``AUSteerConfig.from_pretrained``), only
        check that PEFT hands over the same table."""
        tuner = getattr(model, "base_model", None)
        if not isinstance(tuner, AUSteerModel):
            raise TypeError("AUSteer adapters load through a PeftModel (PeftModel.from_pretrained / load_adapter).")
        rest = {k: v for k, v in state_dict.items() if k not in TABLE_KEYS}
        read_early = tuner.__dict__.get("_tables_read_early", {}).pop(adapter_name, None)
        if read_early is not None and same_table(read_early, state_dict):
            return rest
        # A table indexes into the adapter_config.json saved with it, so it only loads into a new, empty adapter.
        loaded = tuner.__dict__.setdefault("_tables_loaded", set())
        if adapter_name in loaded or tuner.get_aus(adapter_name):
            raise ValueError(
                f"Adapter {adapter_name!r} already exists and has AUs; loading another adapter file into it would "
                "decode that file against this adapter's config. Load it under a new name "
                f"(`load_adapter(path, adapter_name='other')`) or call `delete_adapter({adapter_name!r})` first."
            )
        try:
            tuner.set_aus(table_to_aus(state_dict, config), adapter_name=adapter_name)
        except Exception:
            tuner.delete_adapter(adapter_name)  # registered for this file by PEFT: leave no empty adapter behind
            raise
        loaded.add(adapter_name)
        return rest


def check_adapter_matches_model(model: nn.Module, config: AUSteerConfig, candidates: list[SiteModule]) -> None:
    """Refuse, before any module changes, an adapter made for another architecture, width or depth."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.base_model_type and model_type and config.base_model_type != model_type:
        raise ValueError(
            f"This AUSteer adapter was made for a {config.base_model_type!r} model, but the base model is "
            f"{model_type!r}. Load it onto the architecture it was fitted on."
        )
    available = {c.name: c.width for c in candidates}
    for name, width in config.steered_modules.items():
        if available.get(name) != width:
            have = f"width {available[name]}" if name in available else "no such module"
            layers = sorted({c.layer for c in candidates if c.layer is not None})
            shape = f"{len(layers)} layers, site widths {sorted(set(available.values()))}"
            raise ValueError(
                f"AUSteer adapter does not match the base model: it steers {name} with width {width}, the model has "
                f"{have} ({shape}; adapter: {len(config.steered_modules)} steered modules, widths "
                f"{sorted(set(config.steered_modules.values()))}). Load it onto the model it was fitted on."
            )
