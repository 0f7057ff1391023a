"""The AU type: one steered atomic unit, and the checks that turn what users pass to ``set_aus`` into AUs.

Separate from the tuner because fitting, baselines, evaluation and cards all speak in AUs, and none of them needs
the PEFT machinery to do so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple, Union

import torch

from .sites import SiteModule


class AU(NamedTuple):
    """One steered atomic unit: a dimension of a module's input or output, and its γ (the factor is ``1 + γ``)."""

    module: str
    dim: int
    gamma: float


AULike = Union[AU, tuple, dict]


def group_aus(aus: Iterable[AULike], candidates: list[SiteModule]) -> dict[str, dict[int, float]]:
    """Check AUs against the candidate modules and group them as module name -> {dim: gamma}."""
    if isinstance(aus, (str, bytes)) or not isinstance(aus, Iterable):
        raise TypeError(f"`aus` must be a list of AUs, got {type(aus).__name__}.")
    by_name = {c.name: c for c in candidates}
    by_site_layer = {(c.site, c.layer): c for c in candidates if c.site is not None}
    grouped: dict[str, dict[int, float]] = {}
    for au in aus:
        module, dim, gamma = au_fields(au)
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


def au_fields(au: Any) -> tuple[Any, Any, float]:
    if isinstance(au, dict):
        module = au.get("module", (au.get("site"), au.get("layer")))
        return module, au["dim"], float(au["gamma"])
    if isinstance(au, (tuple, list)) and len(au) == 3:
        module, dim, gamma = au
        return module, int(dim) if isinstance(dim, torch.Tensor) else dim, float(gamma)
    raise TypeError(f"An AU is (module, dim, gamma) or a dict with those keys; got {au!r}.")
