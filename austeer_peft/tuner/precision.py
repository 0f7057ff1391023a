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
    """Per steered module: which of its dimensions have overflowed since its factors were prepared (a device
    tensor)."""

    version: int  # the layer's factor_version the flags belong to; new factors (set_aus, set_adapter, ...) start over
    overflowed: torch.Tensor  # bool [width]
    forwards: int = 0
    warned: bool = False


def check_fp16_overflow(layer: nn.Module, x: torch.Tensor, scaled: torch.Tensor, steers) -> None:
    """Warn, naming the AUs, when steering the float16 activation ``x`` ([..., width]) into ``scaled`` overflowed.

    Only float16 is checked (the layer calls this only then): bfloat16 and float32 reach 3.4e38, so a factor ``1 + γ``
    of a few hundred cannot overflow them where the unsteered model is finite. Float16 stops at 65504: at α = 100
    (factor up to 101) any activation above ~649 overflows, and real models have such "massive activations" on a few
    dimensions (e.g. in the residual stream). Every float16 forward adds a few small device ops that mark the
    dimensions whose steered value is not finite although the activation was; the marks are read on the host (a
    device sync) only on forwards 1, 2, 4, ..., 64 and then every 64th, so no overflow is missed but one may be
    reported up to 64 forwards late. The warning names the AUs of each adapter (``steers``: the ``SparseSteer`` of
    each adapter steering) at those dimensions. After warning, a module is not checked again until its factors change.
    """
    watch = layer.__dict__.get("_austeer_fp16_watch")
    if watch is None or watch.version != layer.factor_version or watch.overflowed.device != x.device:
        watch = layer.__dict__["_austeer_fp16_watch"] = _Watch(
            layer.factor_version, torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device))
    if watch.warned:
        return
    overflowed = torch.isfinite(x) & ~torch.isfinite(scaled)  # finite before: the AU's doing
    watch.overflowed |= overflowed.reshape(-1, x.shape[-1]).any(0)
    watch.forwards += 1
    if watch.forwards % READ_EVERY and watch.forwards & (watch.forwards - 1):
        return
    if not bool(watch.overflowed.any()):
        return
    watch.warned = True
    name = getattr(getattr(layer, "candidate", None), "name", type(layer).__name__)
    for steer in steers:
        hit = watch.overflowed.to(steer.index.device)[steer.index]
        if bool(hit.any()):
            _warn(steer.name, name, steer.index[hit].tolist(), (1.0 + steer.gamma[hit.to(steer.gamma.device)]).tolist())


def _warn(adapter: str, name: str, dims: list[int], factors: list[float]) -> None:
    aus = ", ".join(f"{name}[{d}] (factor 1 + γ = {f:.4g}: " + (
        f"any |activation| above {FLOAT16_MAX / abs(f):.4g} overflows)" if abs(f) <= FLOAT16_MAX else
        "the factor itself is beyond float16)") for d, f in list(zip(dims, factors))[:3])
    more = f" and {len(dims) - 3} more" if len(dims) > 3 else ""
    warnings.warn(
        f"AUSteer adapter {adapter!r} overflowed float16 (max {FLOAT16_MAX:.0f}) at {aus}{more}: these activations "
        "became inf and later NaN. Run the model in bfloat16 or float32, or lower γ (α) for these AUs.",
        stacklevel=3,
    )
