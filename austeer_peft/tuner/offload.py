"""Models dispatched by accelerate (``device_map``, CPU/disk offload): where a module computes, and how to load and
write back the offloaded weights a merge folds into.

Separate from the tuner because it speaks accelerate's hook API (``_hf_hook``, ``AlignDevicesHook``) and nothing
else in the tuner needs to.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from .layer import AUSteerLayer
from .sites import merge_slices


def execution_device(module: nn.Module) -> Optional[torch.device]:
    """The device a module computes on when accelerate dispatched it (``device_map``, offload), else None (its
    parameters' device then). Offloaded weights sit on the meta device between forwards, so only the hook knows."""
    for submodule in module.modules():
        device = getattr(vars(submodule).get("_hf_hook"), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def offloaded_owners(layer: AUSteerLayer) -> list[nn.Module]:
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

    owners = offloaded_owners(layer)
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
