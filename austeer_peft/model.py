"""AUSteerModel: the PEFT tuner. Puts AUSteerLayers exactly on the modules that carry AUs, and stores all AUs of an
adapter as one compact table in ``adapter_model.safetensors``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from tqdm import tqdm

from .config import AUSteerConfig
from .layer import AUSteerLayer
from .sites import SiteModule, base_named_modules, candidate_modules

# The adapter file: one row per AU. `index[:, 0]` is the position of the AU's module in
# `sorted(config.steered_modules)` (JSON sorts keys, so sorted order is the one that survives a round trip),
# `index[:, 1]` its dimension; `gamma` its γ. (Keys have no "." so that PEFT's adapter-name
# handling leaves them alone.)
TABLE_INDEX_KEY = "austeer_table_index"  # int32 [n, 2]
TABLE_GAMMA_KEY = "austeer_table_gamma"  # float32 [n]


class AU(NamedTuple):
    """One steered atomic unit: a dimension of a module's input or output, and its γ (the factor is ``1 + γ``)."""

    module: str
    dim: int
    gamma: float


AULike = Union[AU, tuple, dict]


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

    # ----------------------------------------------------------------------------------------------- injection

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> None:
        """Register an adapter: check its sites against the model, wrap nothing until AUs are set."""
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        check_adapter_matches_model(model, config, candidate_modules(model, config))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)

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

    def _wrap(self, candidate: SiteModule, adapter_name: str) -> AUSteerLayer:
        modules = base_named_modules(self.model)
        target = modules[candidate.name]
        if not isinstance(target, AUSteerLayer):
            parent_name, _, child_name = candidate.name.rpartition(".")
            parent = modules[parent_name] if parent_name else self.model
            if isinstance(parent, AUSteerLayer):
                parent = parent.get_base_layer()
            self._create_and_replace(self.peft_config[adapter_name], adapter_name, target, child_name, parent,
                                     candidate.name, candidate=candidate)
        return base_named_modules(self.model)[candidate.name]

    def _unwrap(self, layer: AUSteerLayer) -> None:
        modules = base_named_modules(self.model)
        parent_name, _, child_name = layer.candidate.name.rpartition(".")
        parent = modules[parent_name] if parent_name else self.model
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
        grouped = _group_aus(aus, candidates)
        layers = self._layers()
        if any(adapter_name in layer.merged_adapters for layer in layers.values()):
            raise ValueError(f"Adapter {adapter_name!r} is merged; call `unmerge_adapter()` before setting its AUs.")

        for name, layer in layers.items():
            if name not in grouped and adapter_name in layer.austeer_index:
                layer.delete_adapter(adapter_name)
                if not layer.austeer_index:
                    self._unwrap(layer)
        for candidate in candidates:
            if candidate.name in grouped:
                dims = sorted(grouped[candidate.name])
                gammas = [grouped[candidate.name][d] for d in dims]
                layer = self._wrap(candidate, adapter_name)
                layer.update_layer(adapter_name, torch.tensor(dims), torch.tensor(gammas))
        config.steered_modules = {c.name: c.width for c in sorted(candidates, key=lambda c: c.name) if c.name in grouped}
        config.base_model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        self.targeted_module_names = list(self._layers())

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

    # ----------------------------------------------------------------------------------------------- adapters

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self._adapters_disabled = not enabled
        super()._enable_adapter_layers(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for layer in self._layers().values():
            if not layer.austeer_index:
                self._unwrap(layer)

    def _check_mergeable(self, adapter_names: Optional[list[str]]) -> None:
        adapter_names = adapter_names or self.active_adapters
        for layer in self._layers().values():
            if any(a in layer.austeer_index for a in adapter_names):
                layer.check_mergeable()  # raises with the reason

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None) -> nn.Module:
        if merge:
            self._check_mergeable(adapter_names)
        # Innermost first, so a wrapper inside another wrapper's base layer is also removed.
        layers = list(reversed(list(self._layers().values())))
        for layer in tqdm(layers, disable=not progressbar, desc="Unloading " + ("and merging " if merge else "")):
            if merge:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            self._unwrap(layer)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    # ----------------------------------------------------------------------------------------------- adapter files

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: AUSteerConfig, adapter_name: str,
                                state_dict: dict, unwanted_adapter_names: list[str]) -> dict[str, torch.Tensor]:
        """All AUs of the adapter as one table (module id, dim, γ): ~12 bytes per AU plus one small header."""
        layers = {m.candidate.name: m for m in model.modules() if isinstance(m, AUSteerLayer)}
        index_rows, gammas = [], []
        for module_id, name in enumerate(sorted(config.steered_modules)):
            layer = layers[name]
            dims = layer.austeer_index[adapter_name].cpu()
            index_rows.append(torch.stack([torch.full_like(dims, module_id), dims], dim=1))
            gammas.append(layer.austeer_gamma[adapter_name].cpu())
        index = torch.cat(index_rows) if index_rows else torch.zeros(0, 2, dtype=torch.int64)
        gamma = torch.cat(gammas) if gammas else torch.zeros(0)
        return {TABLE_INDEX_KEY: index.to(torch.int32).contiguous(), TABLE_GAMMA_KEY: gamma.float().contiguous()}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: AUSteerConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hand each layer its slice of the table (via ``set_aus``); nothing is left for ``load_state_dict``."""
        tuner = getattr(model, "base_model", None)
        if not isinstance(tuner, AUSteerModel):
            raise TypeError("AUSteer adapters load through a PeftModel (PeftModel.from_pretrained / load_adapter).")
        tuner.set_aus(table_to_aus(state_dict, config), adapter_name=adapter_name)
        return {k: v for k, v in state_dict.items() if k not in (TABLE_INDEX_KEY, TABLE_GAMMA_KEY)}


def table_to_aus(state_dict: dict[str, torch.Tensor], config: AUSteerConfig) -> list[AU]:
    """Decode and check the adapter table of an ``adapter_model.safetensors``."""
    missing = [k for k in (TABLE_INDEX_KEY, TABLE_GAMMA_KEY) if k not in state_dict]
    if missing:
        raise ValueError(
            f"The adapter weights have no {missing} entries, so they are not an AUSteer adapter table (keys found: "
            f"{sorted(state_dict)[:5]}). Re-save the adapter with austeer_peft."
        )
    index, gamma = state_dict[TABLE_INDEX_KEY], state_dict[TABLE_GAMMA_KEY]
    if index.ndim != 2 or index.shape[1] != 2 or gamma.ndim != 1 or len(gamma) != len(index):
        raise ValueError(
            f"Malformed AUSteer adapter table: index has shape {tuple(index.shape)} and gamma {tuple(gamma.shape)}; "
            "expected [n, 2] and [n]. The file is corrupt or was not written by austeer_peft."
        )
    if index.dtype.is_floating_point or not gamma.dtype.is_floating_point:
        raise ValueError(f"Malformed AUSteer adapter table: index dtype {index.dtype}, gamma dtype {gamma.dtype}.")
    modules = sorted(config.steered_modules)
    widths = [config.steered_modules[name] for name in modules]
    aus = []
    for (module_id, dim), g in zip(index.tolist(), gamma.tolist()):
        if not 0 <= module_id < len(modules):
            raise ValueError(
                f"AUSteer adapter table names module #{module_id}, but adapter_config.json lists {len(modules)} "
                "steered modules; the adapter files do not belong together."
            )
        if not 0 <= dim < widths[module_id]:
            raise ValueError(
                f"AUSteer adapter table has dimension {dim} for {modules[module_id]}, which has "
                f"{widths[module_id]} dimensions in adapter_config.json; the adapter file is corrupt."
            )
        aus.append(AU(modules[module_id], dim, g))
    return aus


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


def _group_aus(aus: Iterable[AULike], candidates: list[SiteModule]) -> dict[str, dict[int, float]]:
    """Check AUs against the candidate modules and group them as module name -> {dim: gamma}."""
    if isinstance(aus, (str, bytes)) or not isinstance(aus, Iterable):
        raise TypeError(f"`aus` must be a list of AUs, got {type(aus).__name__}.")
    by_name = {c.name: c for c in candidates}
    by_site_layer = {(c.site, c.layer): c for c in candidates if c.site is not None}
    grouped: dict[str, dict[int, float]] = {}
    for au in aus:
        module, dim, gamma = _au_fields(au)
        if isinstance(module, (tuple, list)) and len(module) == 2:
            candidate = by_site_layer.get(tuple(module))
            if candidate is None:
                raise ValueError(f"No candidate module for (site, layer)={tuple(module)}; this adapter's sites are "
                                 f"{sorted({c.site for c in candidates if c.site})} over layers "
                                 f"{sorted({c.layer for c in candidates if c.layer is not None})}.")
        else:
            name = str(module).removeprefix("base_model.model.")
            candidate = by_name.get(name)
            if candidate is None:
                raise ValueError(f"Module {module!r} is not a candidate of this adapter's sites/target_modules; "
                                 f"candidates are e.g. {list(by_name)[:3]} ({len(by_name)} in all).")
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < candidate.width:
            raise ValueError(f"AU dimension {dim!r} is out of range for {candidate.name} ({candidate.position} has "
                             f"{candidate.width} dimensions).")
        if not math.isfinite(gamma):
            raise ValueError(f"AU gamma must be finite, got {gamma!r} for {candidate.name}[{dim}].")
        dims = grouped.setdefault(candidate.name, {})
        if dim in dims:
            raise ValueError(f"AU {candidate.name}[{dim}] is given twice; give each AU once.")
        dims[dim] = gamma
    return grouped


def _au_fields(au: Any) -> tuple[Any, Any, float]:
    if isinstance(au, dict):
        module = au.get("module", (au.get("site"), au.get("layer")))
        return module, au["dim"], float(au["gamma"])
    if isinstance(au, (tuple, list)) and len(au) == 3:
        module, dim, gamma = au
        return module, int(dim) if isinstance(dim, torch.Tensor) else dim, float(gamma)
    raise TypeError(f"An AU is (module, dim, gamma) or a dict with those keys; got {au!r}.")
