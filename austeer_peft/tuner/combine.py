"""``add_weighted_adapter`` for AUSteer: how the AUs and configs of several adapters combine into one adapter.

Separate from the tuner because it is pure arithmetic on AU lists and configs (no modules), and it is where the
rules for combining factors live.
"""

from __future__ import annotations

import dataclasses
import math

from .aus import AU
from .config import AUSteerConfig

COMBINATION_TYPES = ("multiply", "union")


def combine_aus(steers_of: dict[str, list[AU]], weights: dict[str, float], combination_type: str) -> list[AU]:
    """Combine the AUs of several adapters (adapter -> its AUs, adapter -> weight); see ``add_weighted_adapter``."""
    entries: dict[tuple[str, int], list[tuple[str, float, float]]] = {}
    for adapter, aus in steers_of.items():
        for au in aus:
            entries.setdefault((au.module, au.dim), []).append((adapter, au.gamma, float(weights[adapter])))
    combined = []
    for (module, dim), steers in entries.items():
        if combination_type == "union":
            _, gamma, weight = max(steers, key=lambda steer: abs(steer[2] * steer[1]))  # first of equals wins
            combined.append(AU(module, dim, weight * gamma))
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
        combined.append(AU(module, dim, factor - 1))
    return combined


def combined_config(configs: list[AUSteerConfig], names: list[str]) -> AUSteerConfig:
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
        return dataclasses.replace(first, sites=sites, steered_modules={}, aus=None)
    target_modules = first.target_modules if isinstance(first.target_modules, str) else list(
        dict.fromkeys(module for config in configs for module in config.target_modules))
    return dataclasses.replace(first, target_modules=target_modules, steered_modules={}, aus=None)


def _module_choice(config: AUSteerConfig) -> tuple:
    """Configs with equal choices can be joined: sites (union), target_modules lists (union), or one regex."""
    if config.target_modules is None:
        return ("sites",)
    if isinstance(config.target_modules, str):
        return ("regex", config.target_modules, config.position)
    return ("names", config.position)
