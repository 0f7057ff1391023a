"""AUSteerModel: the PEFT tuner. Puts AUSteerLayers exactly on the modules that carry AUs, and stores all AUs of an
adapter as one compact table in ``adapter_model.safetensors``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import warnings
from collections.abc import Iterable
from functools import partial
from typing import Any, NamedTuple, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from tqdm import tqdm

from .config import AUSteerConfig
from .layer import AUSteerLayer, TokenPositions
from .aus import AU, AULike, group_aus
from .sites import SiteModule, base_named_modules, candidate_modules, find_decoder_layers, merge_slices

# The adapter file: one row per AU. `index[:, 0]` is the position of the AU's module in
# `sorted(config.steered_modules)` (JSON sorts keys, so sorted order is the one that survives a round trip),
# `index[:, 1]` its dimension; `gamma` its γ. (Keys have no "." so that PEFT's adapter-name
# handling leaves them alone.)
TABLE_INDEX_KEY = "austeer_table_index"  # int32 [n, 2]
TABLE_GAMMA_KEY = "austeer_table_gamma"  # float32 [n]


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
        grouped = group_aus(aus, candidates)
        layers = self._layers()
        if any(adapter_name in layer.merged_adapters for layer in layers.values()):
            raise ValueError(f"Adapter {adapter_name!r} is merged; call `unmerge_adapter()` before setting its AUs.")

        for name, layer in layers.items():
            if name not in grouped and adapter_name in layer.austeer_index:
                # Only the buffers: the layer's delete_adapter would also switch its active adapters.
                del layer.austeer_index[adapter_name], layer.austeer_gamma[adapter_name]
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
        if combination_type not in ("multiply", "union"):
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
        config = _combined_config([self.peft_config[a] for a in adapters], adapters)

        entries: dict[tuple[str, int], list[tuple[str, float, float]]] = {}
        for adapter, weight in zip(adapters, weights):
            for au in self.get_aus(adapter):
                entries.setdefault((au.module, au.dim), []).append((adapter, au.gamma, float(weight)))
        aus = []
        for (module, dim), steers in entries.items():
            if combination_type == "union":
                _, gamma, weight = max(steers, key=lambda steer: abs(steer[2] * steer[1]))  # first of equals wins
                aus.append(AU(module, dim, weight * gamma))
                continue
            factor = 1.0
            for adapter, gamma, weight in steers:
                if (1 + gamma <= 0 and weight != int(weight)) or (1 + gamma == 0 and weight < 0):
                    raise ValueError(
                        f"AU {module}[{dim}] of adapter {adapter!r} has factor 1 + γ = {1 + gamma:g}, which cannot be "
                        f"raised to the weight {weight:g} (a factor <= 0 takes integer weights only, 0 no negative "
                        "ones). Use integer weights for this adapter, or combination_type='union'."
                    )
                factor *= (1 + gamma) ** weight
            if not math.isfinite(factor):
                raise ValueError(f"Combining AU {module}[{dim}] gives the non-finite factor {factor}; use smaller "
                                 "weights.")
            aus.append(AU(module, dim, factor - 1))

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
                _offloaded_owners(layer)  # raises if a weight is offloaded where it cannot be loaded

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
        hook on the decoder stack) and the prompt width of ``generate``; otherwise remove both, so that
        ``scope="all"`` costs nothing."""
        scopes = {name: (config.scope, config.scope_position) for name, config in self.peft_config.items()
                  if getattr(config, "scope", "all") != "all"}
        if not scopes:
            self._remove_token_positions()
        elif self._token_positions is None:
            positions = TokenPositions()
            stack = self._decoder_stack()
            hook = partial(_read_token_positions, positions, inspect.signature(stack.forward))
            self._token_positions_hook = stack.register_forward_pre_hook(hook, with_kwargs=True)
            if hasattr(type(self.model), "generate"):
                self.model.generate = partial(_generate_with_prompt_width, self.model, positions)
            self._token_positions = positions
        if self._token_positions is not None:
            self._token_positions.scopes = scopes
        for layer in self._layers().values():
            layer.token_positions = self._token_positions

    def _remove_token_positions(self) -> None:
        if self._token_positions is None:
            return
        self._token_positions_hook.remove()
        self.model.__dict__.pop("generate", None)  # back to the class's generate
        self._token_positions = self._token_positions_hook = None
        for layer in self._layers().values():
            layer.token_positions = None

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
        return {k: v for k, v in state_dict.items() if k not in (TABLE_INDEX_KEY, TABLE_GAMMA_KEY)}


ALLOW_PICKLE_ENV = "AUSTEER_ALLOW_PICKLE"


def _refuse_pickled_adapters() -> None:
    """PEFT falls back to ``adapter_model.bin``, a pickle read with ``torch.load``, when a folder or Hub repository
    has no ``adapter_model.safetensors``. Pickles can run code when read and AUSteer always writes safetensors, so an
    AUSteer adapter stored as a pickle is refused unless ``AUSTEER_ALLOW_PICKLE=1``; other methods' files pass."""
    from peft.utils import save_and_load

    original = getattr(save_and_load, "torch_load", None)
    if getattr(original, "_austeer_guard", False):
        return
    if not callable(original) or "torch_load" not in save_and_load.load_peft_weights.__code__.co_names:
        raise ImportError("peft.utils.save_and_load no longer reads pickled adapters through `torch_load`, so "
                          "austeer_peft cannot refuse pickled AUSteer adapters; install the peft version that "
                          "pyproject.toml pins.")

    def torch_load(filename, *args, **kwargs):
        config_file = os.path.join(os.path.dirname(os.fspath(filename)), "adapter_config.json")
        if os.environ.get(ALLOW_PICKLE_ENV) != "1" and os.path.isfile(config_file):
            with open(config_file) as handle:
                peft_type = json.load(handle).get("peft_type")
            if peft_type == "AUSTEER":
                raise ValueError(
                    f"{filename} is a pickle and its folder has no adapter_model.safetensors. Pickles can run code "
                    "when read, and AUSteer adapters are always saved as safetensors, so it is refused. If you trust "
                    f"its source, set the environment variable {ALLOW_PICKLE_ENV}=1 (it is then read with "
                    "torch.load(weights_only=True)) and save it again with save_pretrained() to get safetensors."
                )
        return original(filename, *args, **kwargs)

    torch_load._austeer_guard = True
    save_and_load.torch_load = torch_load


def _roll_back_failed_loads() -> None:
    """``PeftModel.load_adapter`` registers the adapter's config before it reads the weights; when reading fails (a
    refused pickle, a corrupt file) an AUSteer adapter would stay behind with no AUs. Remove it again: AUSteer wraps
    nothing before its AUs are set, so the config is all there is to undo."""
    from peft import PeftModel

    original = PeftModel.load_adapter
    if getattr(original, "_austeer_rollback", False):
        return

    @functools.wraps(original)
    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        existed = adapter_name in self.peft_config
        try:
            return original(self, model_id, adapter_name, *args, **kwargs)
        except Exception:
            if not existed and isinstance(self.peft_config.get(adapter_name), AUSteerConfig):
                self.peft_config.pop(adapter_name, None)
            raise

    load_adapter._austeer_rollback = True
    PeftModel.load_adapter = load_adapter


_refuse_pickled_adapters()
_roll_back_failed_loads()


# ---------------------------------------------------------------------------------------------------- dispatched models


def execution_device(module: nn.Module) -> Optional[torch.device]:
    """The device a module computes on when accelerate dispatched it (``device_map``, offload), else None (its
    parameters' device then). Offloaded weights sit on the meta device between forwards, so only the hook knows."""
    for submodule in module.modules():
        device = getattr(vars(submodule).get("_hf_hook"), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def _offloaded_owners(layer: AUSteerLayer) -> list[nn.Module]:
    """The modules owning the weights ``layer`` merges into whose weights accelerate offloads (meta between forwards),
    each with its own offloading hook. Raises for an offloaded weight that no such hook loads."""
    from accelerate.hooks import AlignDevicesHook

    try:
        slices = merge_slices(layer.base_layer, layer.candidate)
    except ValueError:
        return []  # nothing to fold into: merge() raises the reason itself
    owners = []
    for weight_slice in slices:
        owner = weight_slice.owner
        hook = vars(owner).get("_hf_hook")
        if isinstance(hook, AlignDevicesHook) and hook.offload:
            if all(owner is not other for other in owners):
                owners.append(owner)
        elif getattr(owner, weight_slice.name).device.type == "meta":
            raise ValueError(
                f"Cannot merge into {layer.candidate.name}: the weight {weight_slice.name!r} of "
                f"{type(owner).__name__} is on the meta device and no accelerate offload hook on that module loads it. "
                "Keep the adapter unmerged, or load the model without offloading to merge."
            )
    return owners


@contextlib.contextmanager
def onloaded_weights(layer: AUSteerLayer):
    """Load the offloaded weights that ``layer`` merges into, and offload the changed values afterwards.

    With accelerate offload (``device_map`` with ``"cpu"``/``"disk"`` entries, ``cpu_offload``) a module's weights
    are loaded from its hook's weights map for each forward. PEFT's ``onload_layer`` writes back only the wrapped
    module's own weights, but the ``ffn`` site folds into a child (the MLP's down projection); so the owners of the
    folded weights are loaded here and their weights maps rebuilt from the new values (in CPU memory, as PEFT does).
    """
    from accelerate.utils import named_module_tensors

    owners = _offloaded_owners(layer)
    for owner in owners:
        owner._hf_hook.pre_forward(owner)
    try:
        yield
    finally:
        for owner in owners:
            hook = owner._hf_hook
            hook.weights_map = {name: tensor.to("cpu") for name, tensor in named_module_tensors(
                owner, include_buffers=hook.offload_buffers, recurse=hook.place_submodules)}
            hook.post_forward(owner, None)


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


def _read_token_positions(positions: TokenPositions, signature: inspect.Signature, module: nn.Module,
                           args: tuple, kwargs: dict) -> None:
    arguments = signature.bind_partial(*args, **kwargs).arguments
    inputs = arguments.get("input_ids")
    inputs = arguments.get("inputs_embeds") if inputs is None else inputs
    if inputs is None:
        raise ValueError(f"{type(module).__name__} got neither input_ids nor inputs_embeds, so an AUSteer adapter "
                         "with a token scope cannot tell the token positions. Pass input_ids or inputs_embeds.")
    positions.read_forward(inputs, arguments.get("attention_mask"), arguments.get("past_key_values"))


def _generate_with_prompt_width(model: nn.Module, positions: TokenPositions, *args: Any, **kwargs: Any) -> Any:
    """``model.generate`` that tells the layers where the prompt ends (for scope="generated", also without a cache)."""
    prompt = kwargs.get("input_ids", args[0] if args else None)
    prompt = kwargs.get("inputs_embeds") if prompt is None else prompt
    positions.prompt_width = None if prompt is None else prompt.shape[1]
    try:
        return type(model).generate(model, *args, **kwargs)
    finally:
        positions.prompt_width = None


def _combined_config(configs: list[AUSteerConfig], names: list[str]) -> AUSteerConfig:
    """The config of a combination of adapters: their sites (or target modules) together; the rest must agree."""
    first = configs[0]
    for name, config in zip(names[1:], configs[1:]):
        for field in ("base_model_type", "scope", "scope_position"):
            if getattr(config, field) != getattr(first, field):
                raise ValueError(
                    f"Adapters {names[0]!r} and {name!r} cannot be combined: {field} is {getattr(first, field)!r} "
                    f"vs {getattr(config, field)!r}. Combine adapters made for the same base model and scope."
                )
        if _module_choice(config) != _module_choice(first):
            raise ValueError(
                f"Adapters {names[0]!r} and {name!r} cannot be combined: one config cannot hold both of their module "
                f"choices (sites={first.sites!r}/{config.sites!r}, target_modules={first.target_modules!r}/"
                f"{config.target_modules!r}, position={first.position!r}/{config.position!r})."
            )
    if first.target_modules is None:
        sites = list(dict.fromkeys(site for config in configs for site in config.sites))
        return dataclasses.replace(first, sites=sites, steered_modules={})
    target_modules = first.target_modules if isinstance(first.target_modules, str) else list(
        dict.fromkeys(module for config in configs for module in config.target_modules))
    return dataclasses.replace(first, target_modules=target_modules, steered_modules={})


def _module_choice(config: AUSteerConfig) -> tuple:
    """Configs with equal choices can be joined: sites (union), target_modules lists (union), or one regex."""
    if config.target_modules is None:
        return ("sites",)
    if isinstance(config.target_modules, str):
        return ("regex", config.target_modules, config.position)
    return ("names", config.position)


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
