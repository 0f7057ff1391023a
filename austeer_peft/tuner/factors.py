"""Dense factor vectors: what an AUSteerLayer multiplies its activation by, prepared when the AUs change.

An adapter stores its AUs sparsely (a few dimensions and their γ). Indexing them at every forward costs a gather, a
multiply and a scatter per module; a multiply by a dense vector of the module's width (``1 + γ`` at the AUs, 1
elsewhere) costs one op and gives the same numbers, since ``x * 1`` is exact. So the layer turns its sparse AUs into
dense vectors whenever the AUs, the steering adapters, their scopes or the dtype change, and a forward only multiplies.

Several active adapters fold into one vector where their AUs are disjoint. Where two of them share an AU, the result
must stay what multiplying adapter after adapter gives, rounding after each (``x · f₁ · f₂``, not ``x · (f₁f₂)``), so
each AU's second factor goes into a second vector (a second "stage"), and so on: one multiply per stage, and as many
stages as the most adapters sharing one AU of this module (one, unless active adapters overlap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .scope import ScopeKey


@dataclass(frozen=True)
class SparseSteer:
    """The AUs of one adapter on one module: dims ``index`` (int64) get factor ``1 + gamma`` (float32)."""

    name: str
    index: torch.Tensor
    gamma: torch.Tensor
    scope: Optional[ScopeKey] = None  # None: every token


@dataclass(frozen=True)
class Stage:
    """One multiply. ``factor`` holds the factors of the adapters that steer every token (1 elsewhere); ``scoped``
    those of adapters that steer some tokens, per scope: the first one's vector already multiplied by ``factor`` (its
    dims are disjoint from ``factor``'s, so the product is exact), so the stage's factor at a token is
    ``where(mask₁, scoped₁, factor)``, then ``where(maskᵢ, f · scopedᵢ, f)`` for the others."""

    factor: torch.Tensor
    scoped: tuple[tuple[ScopeKey, torch.Tensor], ...] = ()


@dataclass(frozen=True)
class Plan:
    """Everything a forward multiplies by, for the adapters steering now, in one dtype and on one device."""

    stages: tuple[Stage, ...]
    adapters: tuple[SparseSteer, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def single(self) -> Optional[torch.Tensor]:
        """The one vector that is the whole steer (one stage, every token), else None."""
        if len(self.stages) == 1 and not self.stages[0].scoped:
            return self.stages[0].factor
        return None


def build_plan(steers: list[SparseSteer], width: int, dtype: torch.dtype, device: torch.device,
               shape: Optional[tuple[int, ...]] = None) -> Optional[Plan]:
    """Dense stages (see the module docstring) for ``steers`` in order, each ``[width]`` (or reshaped to ``shape``),
    computed in float32 and cast to ``dtype``. None when nothing steers."""
    steers = [s for s in steers if s.index.numel()]
    if not steers:
        return None
    uses = torch.zeros(width, dtype=torch.int64, device=device)  # adapters so far with an AU at each dim
    every: list[torch.Tensor] = []  # per stage: factors of the every-token adapters, [width] float32
    scoped: list[dict[ScopeKey, torch.Tensor]] = []  # per stage and scope: factors of those adapters
    for steer in steers:
        index = steer.index.to(device)
        factor = 1.0 + steer.gamma.to(device=device, dtype=torch.float32)
        level = uses[index]  # the stage each AU of this adapter lands in
        uses[index] += 1
        for stage in level.unique().tolist():
            while len(every) <= stage:
                every.append(torch.ones(width, device=device))
                scoped.append({})
            chosen = level == stage
            target = every[stage] if steer.scope is None else scoped[stage].setdefault(
                steer.scope, torch.ones(width, device=device))
            target[index[chosen]] = factor[chosen]

    def cast(vector: torch.Tensor) -> torch.Tensor:
        return vector.to(dtype).reshape(shape if shape is not None else (width,))

    stages = []
    for factor, by_scope in zip(every, scoped):
        parts = list(by_scope.items())
        if parts:  # the first scope's vector times the every-token factors: disjoint dims, so exact
            parts[0] = (parts[0][0], parts[0][1] * factor)
        stages.append(Stage(cast(factor), tuple((key, cast(vector)) for key, vector in parts)))
    return Plan(tuple(stages), tuple(steers), dtype, torch.device(device))


def row_table(steers: dict[str, SparseSteer], order: tuple[str, ...], width: int, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """Per-row factors for a batch whose rows use different adapters: ``[1 + len(order), width]``; row 0 is the
    unsteered row (all 1), row ``i + 1`` the factors of adapter ``order[i]`` alone (all 1 if it has no AU here)."""
    table = torch.ones(1 + len(order), width, device=device)
    for row, name in enumerate(order, start=1):
        steer = steers.get(name)
        if steer is not None:
            table[row, steer.index.to(device)] = 1.0 + steer.gamma.to(device=device, dtype=torch.float32)
    return table.to(dtype)
