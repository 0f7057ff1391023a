"""Last-token activations of contrastive pairs at AUSteer's sites: what the baselines that are not counts need.

AUSteer keeps only sign counts (:class:`~austeer_peft.fitting.scores.MomentumScores`). ITI trains probes on head
activations, SADI ranks heads by their mean activation difference, and two of the paper's ablations rank or shift AUs
by that difference; they all read the same thing -- each pair's positive and negative activation at the last token of
every candidate module -- so one pass over the pairs, with the fit's batching and last-token rule, serves them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..fitting import inputs
from ..fitting.activations import read_pair_activations
from ..fitting.pairs import as_text_pairs
from ..tuner.config import AUSteerConfig
from ..tuner.sites import SiteModule, candidate_modules, text_config


@dataclass
class PairActivations:
    """Per candidate module, the last-token activations of the positive and of the negative text of every pair."""

    modules: list[SiteModule]
    positive: dict[str, torch.Tensor]  # module name -> float32 [num_pairs, width]
    negative: dict[str, torch.Tensor]  # module name -> float32 [num_pairs, width]
    head_dim: Optional[int] = None  # width of one attention head (the attention site's AUs come in heads of it)

    @property
    def num_pairs(self) -> int:
        return next(iter(self.positive.values())).shape[0]

    def mean_difference(self, module: str) -> torch.Tensor:
        """``mean_j (x_pos_j - x_neg_j)`` of every AU of ``module``: [width]."""
        return (self.positive[module] - self.negative[module]).mean(0)

    def on_site(self, site: str) -> list[SiteModule]:
        modules = [m for m in self.modules if m.site == site]
        if not modules:
            raise ValueError(f"These activations were read on sites {sorted({m.site for m in self.modules})}, "
                             f"not on {site!r}.")
        return modules

    def heads(self, module: str, positive: bool) -> torch.Tensor:
        """The activations of ``module`` split into heads: [num_pairs, num_heads, head_dim]."""
        if self.head_dim is None:
            raise ValueError("The model's config gives no head width, so its attention AUs cannot be split into heads.")
        values = (self.positive if positive else self.negative)[module]
        return values.reshape(values.shape[0], -1, self.head_dim)  # [N, width] -> [N, heads, head_dim]


def attention_head_dim(model: nn.Module) -> Optional[int]:
    """Width of one attention head (``config.head_dim``, else ``hidden_size / num_attention_heads``)."""
    config = text_config(inputs.base_model(model))
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    return hidden // heads if heads and hidden else None


def pair_activations(model: nn.Module, tokenizer: Any, pairs: Any, sites: Sequence[str], *, batch_size: int = 16,
                     max_length: Optional[int] = None, progress: bool = True) -> PairActivations:
    """One pass over ``pairs`` (adapters disabled) reading the last-token activation of every module of ``sites``,
    on the side AUSteer steers (the attention site: the output projection's input, the heads' concatenated outputs),
    through the fit's reader (:func:`~austeer_peft.fitting.activations.read_pair_activations`: shared prompts,
    early stop, memory back-off)."""
    base = inputs.base_model(model)
    modules = candidate_modules(base, AUSteerConfig(sites=list(sites)))
    text_pairs = as_text_pairs(pairs, tokenizer)  # a list, so the result can be allocated before the pass
    positive = {m.name: torch.zeros(len(text_pairs), m.width) for m in modules}
    negative = {m.name: torch.zeros(len(text_pairs), m.width) for m in modules}

    def keep(activations: list[torch.Tensor], pair_indices: list[int]) -> None:
        rows, half = torch.tensor(pair_indices), len(pair_indices)
        for module, last in zip(modules, activations):  # [2B, width]: the B positives, then their negatives
            positive[module.name][rows] = last[:half].float().cpu()
            negative[module.name][rows] = last[half:].float().cpu()

    read_pair_activations(model, tokenizer, text_pairs, modules, keep, batch_size=batch_size, max_length=max_length,
                          progress=progress)
    return PairActivations(modules, positive, negative, attention_head_dim(model))
