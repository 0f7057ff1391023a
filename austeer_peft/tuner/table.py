"""The adapter file codec: all AUs of an adapter as one compact table in ``adapter_model.safetensors``.

One row per AU: ``index[:, 0]`` is the position of the AU's module in ``sorted(config.steered_modules)`` (JSON sorts
keys, so sorted order is the one that survives a round trip), ``index[:, 1]`` its dimension; ``gamma`` its γ. Keys
have no "." so that PEFT's adapter-name handling leaves them alone. Separate from the tuner because the hub reads
saved tables without a model, and because the format is public: it must not change when the tuner does.

``adapter_config.json`` carries the same AUs as ``aus`` (``{module: [[dim, γ], ...]}``), for the loaders that read the
config and then load weights by parameter name, which no table key matches: transformers' ``load_adapter``,
``from_pretrained(adapter_dir)`` and ``pipeline`` (through ``peft.inject_adapter_in_model``).
"""

from __future__ import annotations

import os
import pickle
from typing import Optional, Union

import numpy as np
import torch

from .aus import AU
from .config import AUSteerConfig
from .layer import AUSteerLayer

TABLE_INDEX_KEY = "austeer_table_index"  # int32 [n, 2]
TABLE_GAMMA_KEY = "austeer_table_gamma"  # float32 [n]
TABLE_KEYS = (TABLE_INDEX_KEY, TABLE_GAMMA_KEY)


def layers_to_table(layers: dict[str, AUSteerLayer], config: AUSteerConfig,
                    adapter_name: str) -> dict[str, torch.Tensor]:
    """Encode the AUs of ``adapter_name`` held by ``layers`` (module name -> layer): ~12 bytes per AU."""
    index_rows, gammas = [], []
    for module_id, name in enumerate(sorted(config.steered_modules)):
        layer = layers[name]
        dims = layer.austeer_index[adapter_name].cpu()
        index_rows.append(torch.stack([torch.full_like(dims, module_id), dims], dim=1))  # [n_module, 2]
        gammas.append(layer.austeer_gamma[adapter_name].cpu())
    index = torch.cat(index_rows) if index_rows else torch.zeros(0, 2, dtype=torch.int64)
    gamma = torch.cat(gammas) if gammas else torch.zeros(0)
    return {TABLE_INDEX_KEY: index.to(torch.int32).contiguous(), TABLE_GAMMA_KEY: gamma.float().contiguous()}


def table_to_aus(state_dict: dict[str, torch.Tensor], config: AUSteerConfig) -> list[AU]:
    """Decode and check the adapter table of an ``adapter_model.safetensors``."""
    missing = [k for k in TABLE_KEYS if k not in state_dict]
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


def aus_to_config_entry(grouped: dict[str, dict[int, float]]) -> dict[str, list[list[float]]]:
    """The ``aus`` entry of ``adapter_config.json`` for AUs grouped as module -> {dim: γ}: dims sorted, each γ as
    the shortest decimal that reads back as the same float32 (the precision the layers and the table keep)."""
    return {name: [[int(dim), float(str(np.float32(dims[dim])))] for dim in sorted(dims)]
            for name, dims in sorted(grouped.items())}


def config_to_aus(config: AUSteerConfig) -> list[AU]:
    """The AUs stored in ``config.aus``, checked against ``config.steered_modules`` as a table is."""
    aus = []
    for name, rows in (config.aus or {}).items():
        if name not in config.steered_modules:
            raise ValueError(f"adapter_config.json has AUs for {name}, which is not in its steered_modules; the file "
                             "was edited or is corrupt. Re-save the adapter with austeer_peft.")
        for dim, gamma in rows:
            if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < config.steered_modules[name]:
                raise ValueError(f"adapter_config.json has dimension {dim!r} for {name}, which has "
                                 f"{config.steered_modules[name]} dimensions; the file is corrupt.")
            aus.append(AU(name, dim, float(gamma)))
    return aus


def adapter_aus_to_inject(config: AUSteerConfig, standalone: bool) -> tuple[Optional[dict], Optional[list[AU]]]:
    """(table, AUs) an adapter brings when it is injected, or (None, None) when they come later.

    From the weights table when the config was read by ``AUSteerConfig.from_pretrained`` (``PeftModel.from_pretrained``
    and ``load_adapter``), checked against ``config.aus`` if both exist; else from ``config.aus``. ``standalone``:
    injected by ``peft.inject_adapter_in_model``, after which no table ever comes, so a config without AUs is refused.
    """
    source = config.__dict__.pop("_table_source", None)  # read once, for the first adapter made from the config
    if source is not None:
        table = read_table(source[0], **source[1])
        aus = table_to_aus(table, config)
        if config.aus is not None and not same_aus(aus, config_to_aus(config)):
            raise ValueError(f"The AUs in {source[0]}/adapter_config.json differ from its weights table; the files do "
                             "not belong together. Re-save the adapter with austeer_peft.")
        return table, aus
    if config.aus is not None:
        return None, config_to_aus(config)
    if standalone:
        refuse_injection_without_aus(config)
    return None, None


def refuse_injection_without_aus(config: AUSteerConfig) -> None:
    """``inject_adapter_in_model`` with a config that carries no AUs would leave a model that steers nothing."""
    if config.steered_modules:
        raise ValueError(
            "This AUSteer adapter_config.json has no `aus` entry (it was saved by an older austeer-peft), so a loader "
            "that reads only the config and loads weights by parameter name (transformers' model.load_adapter, "
            "AutoModelForCausalLM.from_pretrained(adapter_dir), pipeline(model=adapter_dir), "
            "peft.inject_adapter_in_model) cannot set its AUs. Use `import austeer_peft; "
            "PeftModel.from_pretrained(model, adapter_dir)`, or load it that way once and save it again to make it "
            "loadable by transformers too."
        )
    raise ValueError(
        "An AUSteerConfig without AUs steers nothing, and peft.inject_adapter_in_model (also what transformers' "
        "model.add_adapter calls) keeps no tuner to set them on later. AUs are data: use "
        "`peft_model = get_peft_model(model, config)` and then `peft_model.set_aus(...)`, or "
        "`austeer_peft.fit_austeer(...)`; load saved adapters with `PeftModel.from_pretrained` or `model.load_adapter`."
    )


def same_aus(a: list[AU], b: list[AU]) -> bool:
    """Whether two AU lists steer the same (module, dim) by the same float32 γ, in any order."""
    def key(aus: list[AU]) -> list[tuple[str, int, float]]:
        return sorted((au.module, au.dim, float(np.float32(au.gamma))) for au in aus)
    return key(a) == key(b)


def same_table(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(k in a and k in b and torch.equal(a[k].cpu(), b[k].cpu()) for k in TABLE_KEYS)


def read_table(model_id: Union[str, os.PathLike], **hf_hub_download_kwargs) -> dict[str, torch.Tensor]:
    """The adapter weights saved at ``model_id`` (a folder or Hub id), read by PEFT's own ``load_peft_weights``.

    That reads ``adapter_model.safetensors``, or else ``adapter_model.bin`` with ``torch.load(weights_only=True)``,
    which only rebuilds tensors and plain containers and never runs code from the pickle; a pickle holding anything
    else is refused here with the reason.
    """
    from peft.utils import load_peft_weights

    try:
        return load_peft_weights(str(model_id), device="cpu", **hf_hub_download_kwargs)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"The adapter weights at {model_id} are a pickle (adapter_model.bin) that holds more than tensors, so "
            "they were not loaded: pickles are read with torch.load(weights_only=True), which runs no code from the "
            "file. AUSteer adapters are tables of tensors; save the adapter again with austeer_peft to get "
            f"adapter_model.safetensors. ({str(error).splitlines()[0]})"
        ) from error
