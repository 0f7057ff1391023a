"""Float16 overflow of steered activations: found where it happens, reported with the AU that causes it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

FLOAT16_MAX = torch.finfo(torch.float16).max  # 65504
READ_EVERY = 64  # after forwards 1, 2, 4, ..., 64 the flags are read every 64 forwards


@dataclass
class _Watch:
    """Per steered module and adapter: which AUs have overflowed since the AUs were set (a device tensor)."""

    gamma: torch.Tensor  # the γ buffer the flags belong to; a new one (set_aus, load) starts over
    overflowed: torch.Tensor  # bool [n]
    forwards: int = 0
    warned: bool = False


def check_fp16_overflow(layer: nn.Module, adapter: str, x: torch.Tensor, index: torch.Tensor,
                        factor: torch.Tensor) -> None:
    """Warn, naming the AUs, when multiplying float16 activations ``x[..., index]`` by ``factor`` overflows.

    Only float16 is checked: bfloat16 and float32 reach 3.4e38, so a factor ``1 + γ`` of a few hundred cannot overflow
    them where the unsteered model is finite. Float16 stops at 65504: at α = 100 (factor up to 101) any activation
    above ~649 overflows, and real models have such "massive activations" on a few dimensions (e.g. in the residual
    stream). Every float16 forward adds a few small device ops that mark the AUs whose product is not finite although
    the activation was; the marks are read on the host (a device sync) only on forwards 1, 2, 4, ..., 64 and then every
    64th, so no overflow is missed but one may be reported up to 64 forwards late. After warning, a module and adapter
    are not checked again until the adapter's AUs change.
    """
    if x.dtype != torch.float16 or index.numel() == 0:
        return
    watches = layer.__dict__.setdefault("_austeer_fp16_watch", {})
    gamma = layer.austeer_gamma[adapter]
    watch = watches.get(adapter)
    if watch is None or watch.gamma is not gamma or watch.overflowed.device != x.device:
        watch = watches[adapter] = _Watch(gamma, torch.zeros(index.shape, dtype=torch.bool, device=x.device))
    if watch.warned:
        return
    values = x[..., index]
    overflowed = torch.isfinite(values) & ~torch.isfinite(values * factor)  # finite before: the AU's doing
    watch.overflowed |= overflowed.reshape(-1, values.shape[-1]).any(0)
    watch.forwards += 1
    if watch.forwards % READ_EVERY and watch.forwards & (watch.forwards - 1):
        return
    if not bool(watch.overflowed.any()):
        return
    watch.warned = True
    dims = index[watch.overflowed.to(index.device)].tolist()
    factors = (1.0 + gamma[watch.overflowed.to(gamma.device)]).tolist()
    name = getattr(getattr(layer, "candidate", None), "name", type(layer).__name__)
    aus = ", ".join(f"{name}[{d}] (factor 1 + γ = {f:.4g}: " + (
        f"any |activation| above {FLOAT16_MAX / abs(f):.4g} overflows)" if abs(f) <= FLOAT16_MAX else
        "the factor itself is beyond float16)") for d, f in list(zip(dims, factors))[:3])
    more = f" and {len(dims) - 3} more" if len(dims) > 3 else ""
    warnings.warn(
        f"AUSteer adapter {adapter!r} overflowed float16 (max {FLOAT16_MAX:.0f}) at {aus}{more}: these activations "
        "became inf and later NaN. Run the model in bfloat16 or float32, or lower γ (α) for these AUs.",
        stacklevel=2,
    )
