"""Activation momentum's table (paper Section 4.1): :class:`MomentumScores`, per-AU sign counts of
``x_pos - x_neg`` over contrastive pairs, and everything derived from them without the model: scores, the top-k,
AUSteer's adaptive γ, adding and subtracting counts, and the scores file.

It is the only product of a fit pass (:mod:`austeer_peft.fitting.counter` makes it); every adapter, for any
``(k, α)``, comes from it. Building the PeftModel itself is :mod:`austeer_peft.fitting.adapter`.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..tuner.aus import AU
from ..tuner.config import AUSteerConfig
from ..tuner.sites import SiteModule
from .adapter import steered_model
from . import inputs

SCORES_FORMAT = "austeer-momentum"
SCORES_FORMAT_VERSION = "2"  # 2: all metadata in one entry (1: one entry per field)


@dataclass(eq=False)
class MomentumScores:
    """The full activation-momentum table of a fit: for every candidate AU, how often its positive activation was
    above (``n_pos``) and below (``n_neg``) the negative one over ``num_pairs`` pairs.

    ``r_pos = n_pos / N``, ``r_neg = n_neg / N`` and the discriminative score ``s = max(r_pos, r_neg)``. Because counts
    are kept for all AUs, an adapter for any ``(k, α)`` comes from :meth:`select` / :meth:`to_adapter` without
    another forward pass.

    Attributes:
        modules: the candidate modules, in model order (name, site, layer, position, width).
        n_pos, n_neg: module name -> int64 tensor ``[width]`` of sign counts.
        num_pairs: N, the number of contrastive pairs counted (ties count here only).
        model_type: ``config.model_type`` of the model the counts come from.
        sites, target_modules, position: how the candidates were chosen, to rebuild the adapter config.
    """

    modules: list[SiteModule]
    n_pos: dict[str, torch.Tensor]
    n_neg: dict[str, torch.Tensor]
    num_pairs: int
    model_type: Optional[str] = None
    sites: Optional[list[str]] = None
    target_modules: Optional[Union[list[str], str]] = None
    position: str = "output"
    _flat_cache: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [m.name for m in self.modules]
        for counts, label in ((self.n_pos, "n_pos"), (self.n_neg, "n_neg")):
            if list(counts) != names:
                raise ValueError(f"MomentumScores.{label} must have one entry per module, in module order.")
            for module in self.modules:
                tensor = counts[module.name]
                if tensor.shape != (module.width,) or tensor.dtype != torch.int64:
                    raise ValueError(f"{label}[{module.name!r}] must be an int64 tensor of shape [{module.width}].")
        if self.num_pairs <= 0:
            raise ValueError(f"MomentumScores needs num_pairs > 0, got {self.num_pairs}.")

    # ------------------------------------------------------------------------------------------------ views

    @property
    def num_aus(self) -> int:
        """Number of candidate AUs (all dimensions of all counted modules)."""
        return sum(m.width for m in self.modules)

    def r_pos(self, module: str) -> torch.Tensor:
        return self.n_pos[module].double() / self.num_pairs

    def r_neg(self, module: str) -> torch.Tensor:
        return self.n_neg[module].double() / self.num_pairs

    def score(self, module: str) -> torch.Tensor:
        """Discriminative score ``s = max(r_pos, r_neg)`` of every AU of a module."""
        return torch.maximum(self.n_pos[module], self.n_neg[module]).double() / self.num_pairs

    def _flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All AUs in model order: (module index, dim, n_pos, n_neg)."""
        if self._flat_cache is None:
            module_index = torch.cat([torch.full((m.width,), i, dtype=torch.int64) for i, m in enumerate(self.modules)])
            dims = torch.cat([torch.arange(m.width) for m in self.modules])
            n_pos = torch.cat([self.n_pos[m.name] for m in self.modules])
            n_neg = torch.cat([self.n_neg[m.name] for m in self.modules])
            self._flat_cache = (module_index, dims, n_pos, n_neg)
        return self._flat_cache

    def _top(self, k: int) -> torch.Tensor:
        """Flat positions of the top-k AUs.

        Ranking: higher ``s`` first; among equal ``s``, the module that comes first in the model, then the lower
        dimension. (AUs are laid out in exactly that order, so a stable sort on ``-s`` implements the tie-break.)
        """
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"`k` must be a positive integer (the number of AUs to steer), got {k!r}.")
        if k > self.num_aus:
            raise ValueError(
                f"k={k} is larger than the number of candidate AUs ({self.num_aus} over {len(self.modules)} modules); "
                f"use k <= {self.num_aus} or add sites."
            )
        _, _, n_pos, n_neg = self._flat()
        s = torch.maximum(n_pos, n_neg)  # integer numerator of s: ranks exactly like s, with no float ties
        return torch.sort(-s, stable=True).indices[:k]

    def select(self, k: int, alpha: float) -> list[AU]:
        """The top-k AUs with their γ, best first: ``γ = α·r_pos`` if ``r_pos > r_neg``, else ``-α·r_neg``."""
        alpha = check_alpha(alpha)
        top = self._top(k)
        module_index, dims, n_pos, n_neg = self._flat()
        aus = []
        for position in top.tolist():
            module = self.modules[int(module_index[position])]
            pos, neg = int(n_pos[position]), int(n_neg[position])
            aus.append(AU(module.name, int(dims[position]), adaptive_gamma(pos, neg, self.num_pairs, alpha)))
        top_counts = torch.maximum(n_pos[top], n_neg[top])
        if int(top_counts[0]) == 0:
            raise ValueError(
                "No AU separates positives from negatives (every activation momentum is zero: each pair's two texts "
                "give identical activations). Check that the positive and negative texts of each pair differ."
            )
        silent = int((top_counts == 0).sum())
        if silent:
            warnings.warn(
                f"{silent} of the k={k} selected AUs never separated a pair (s = 0, γ = 0); only {k - silent} AUs "
                "will steer. Use a smaller k or more (and more varied) pairs.",
                stacklevel=2,
            )
        return aus

    def layer_distribution(self, k: int) -> dict[tuple[str, Optional[int]], int]:
        """How many of the top-k AUs sit at each (site, layer), for every candidate (site, layer) including empty
        ones: sites in the order they were requested, then layers in order.

        Modules chosen by ``target_modules`` have no site; their key is (module name, layer), in model order.
        """
        module_index = self._flat()[0]
        chosen = Counter(int(module_index[p]) for p in self._top(k).tolist())
        distribution: dict[tuple[str, Optional[int]], int] = {}
        for i, module in enumerate(self.modules):
            key = (module.site or module.name, module.layer)
            distribution[key] = distribution.get(key, 0) + chosen.get(i, 0)
        if self.sites:
            site_rank = {site: rank for rank, site in enumerate(self.sites)}

            def site_then_layer(item):
                (site, layer), _ = item
                return site_rank.get(site, len(site_rank)), -1 if layer is None else layer

            distribution = dict(sorted(distribution.items(), key=site_then_layer))
        return distribution

    def __repr__(self) -> str:
        sites = self.sites if self.sites is not None else f"target_modules={self.target_modules!r}"
        return (f"MomentumScores(num_pairs={self.num_pairs}, modules={len(self.modules)}, aus={self.num_aus}, "
                f"sites={sites}, model_type={self.model_type!r})")

    def __add__(self, other: "MomentumScores") -> "MomentumScores":
        """The counts of both sets of pairs together (counts are sums over pairs, so this equals one pass over both)."""
        return self._combined(other, 1)

    def __sub__(self, other: "MomentumScores") -> "MomentumScores":
        """The counts without ``other``'s pairs, which must be part of these (e.g. a held-out fold)."""
        return self._combined(other, -1)

    def _combined(self, other: "MomentumScores", sign: int) -> "MomentumScores":
        if not isinstance(other, MomentumScores):
            return NotImplemented
        if other.modules != self.modules or other.model_type != self.model_type:
            raise ValueError("These MomentumScores were counted on other modules or another model "
                             f"({other!r} vs {self!r}); only counts of the same candidates can be added or subtracted.")
        n_pos = {name: counts + sign * other.n_pos[name] for name, counts in self.n_pos.items()}
        n_neg = {name: counts + sign * other.n_neg[name] for name, counts in self.n_neg.items()}
        num_pairs = self.num_pairs + sign * other.num_pairs
        if num_pairs == 0:
            raise ValueError(f"Subtracting {other!r} from {self!r} leaves no pairs to count on.")
        if num_pairs < 0 or any(bool((c < 0).any()) for c in (*n_pos.values(), *n_neg.values())):
            raise ValueError(f"Cannot subtract {other!r} from {self!r}: its pairs are not part of these counts.")
        return replace(self, n_pos=n_pos, n_neg=n_neg, num_pairs=num_pairs)

    # ------------------------------------------------------------------------------------------------ adapters

    def adapter_config(self, k: int, alpha: float) -> AUSteerConfig:
        """The AUSteerConfig these counts were taken for, with the given k and α."""
        if self.target_modules is not None:
            return AUSteerConfig(target_modules=self.target_modules, position=self.position, k=k, alpha=alpha)
        return AUSteerConfig(sites=list(self.sites), k=k, alpha=alpha)

    def to_adapter(self, k: int, alpha: float, model: nn.Module, adapter_name: str = "default"):
        """An AUSteer adapter with the top-k AUs at strength α, without another forward pass.

        ``model`` is the base model the counts come from (it gets wrapped in place by ``get_peft_model``, as with
        any PEFT method), or a PeftModel with AUSteer adapters: then the adapter is added (or, if ``adapter_name``
        exists with the same sites, its AUs are replaced) and made the active adapter. Returns the PeftModel.
        """
        config = self.adapter_config(k, alpha)
        aus = self.select(k, alpha)
        return steered_model(model, config, aus, adapter_name, counted_modules=self.modules,
                             counted_model_type=self.model_type)

    # ------------------------------------------------------------------------------------------------ files

    def save(self, path: Union[str, Path], is_main_process: Optional[bool] = None) -> None:
        """Write the counts to one safetensors file; what they count (modules, N, sites) goes in one JSON metadata
        entry, since safetensors writes several entries in an arbitrary order and the file should be reproducible.

        After a distributed fit every process holds the same scores, and only the main one writes (accelerate's
        main process, i.e. rank 0; any process without a process group) unless ``is_main_process`` says otherwise,
        as in PEFT's ``save_pretrained(..., is_main_process=...)``. Other processes return at once; one that reads
        the file must wait for the main process first (e.g. ``torch.distributed.barrier()``).
        """
        from safetensors.torch import save_file

        if is_main_process is None:
            is_main_process = inputs.is_main_process()
        if not is_main_process:
            return
        tensors = {}
        for module in self.modules:
            tensors[f"n_pos/{module.name}"] = self.n_pos[module.name].contiguous()
            tensors[f"n_neg/{module.name}"] = self.n_neg[module.name].contiguous()
        header = {
            "version": SCORES_FORMAT_VERSION,
            "num_pairs": self.num_pairs,
            "model_type": self.model_type,
            "sites": self.sites,
            "target_modules": self.target_modules,
            "position": self.position,
            "modules": [[m.name, m.site, m.layer, m.position, m.width] for m in self.modules],
        }
        save_file(tensors, str(path), metadata={SCORES_FORMAT: json.dumps(header)})

    @classmethod
    def load(cls, path: Union[str, Path]) -> "MomentumScores":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if SCORES_FORMAT in metadata:
                header = json.loads(metadata[SCORES_FORMAT])
            elif metadata.get("format") == SCORES_FORMAT:  # version 1: one entry per field, most JSON-encoded
                header = {k: v if k in ("version", "position") else json.loads(v)
                          for k, v in metadata.items() if k != "format"}
            else:
                raise ValueError(f"{path} is not an AUSteer momentum-scores file (no {SCORES_FORMAT!r} metadata).")
            if header.get("version") not in ("1", SCORES_FORMAT_VERSION):
                raise ValueError(f"{path} has scores format version {header.get('version')!r}; this austeer_peft "
                                 f"reads versions 1 and {SCORES_FORMAT_VERSION}. Update austeer_peft.")
            modules = [SiteModule(name, site, layer, position, width)
                       for name, site, layer, position, width in header["modules"]]
            n_pos = {m.name: handle.get_tensor(f"n_pos/{m.name}") for m in modules}
            n_neg = {m.name: handle.get_tensor(f"n_neg/{m.name}") for m in modules}
        return cls(modules=modules, n_pos=n_pos, n_neg=n_neg, num_pairs=int(header["num_pairs"]),
                   model_type=header["model_type"], sites=header["sites"], target_modules=header["target_modules"],
                   position=header["position"])


def adaptive_gamma(n_pos: int, n_neg: int, num_pairs: int, alpha: float) -> float:
    """AUSteer's adaptive γ of one AU: ``α·r_pos`` if ``r_pos > r_neg``, else ``-α·r_neg``."""
    return alpha * n_pos / num_pairs if n_pos > n_neg else -alpha * n_neg / num_pairs


def check_alpha(alpha: Any) -> float:
    """``alpha`` as a float, or a clear error unless it is a finite number > 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"`alpha` must be a finite number > 0 (typical range 1..100), got {alpha!r}.")
    return float(alpha)
