"""The adapter file codec: all AUs of an adapter as one compact table in ``adapter_model.safetensors``.

One row per AU: ``index[:, 0]`` is the position of the AU's module in ``sorted(config.steered_modules)`` (JSON sorts
keys, so sorted order is the one that survives a round trip), ``index[:, 1]`` its dimension; ``gamma`` its γ. Keys
have no "." so that PEFT's adapter-name handling leaves them alone. Separate from the tuner because the hub reads
saved tables without a model, and because the format is public: it must not change when the tuner does.
"""

from __future__ import annotations

import os
import pickle
from typing import Union

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
