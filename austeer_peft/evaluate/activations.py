"""Last-token activations of contrastive pairs at AUSteer's sites: what the baselines that are not counts need.

AUSteer keeps only sign counts (:class:`~austeer_peft.fitting.scores.MomentumScores`). ITI trains probes on head
activations, SADI ranks heads by their mean activation difference, and two of the paper's ablations rank or shift AUs
by that difference; they all read the same thing -- each pair's positive and negative activation at the last token of
every candidate module -- so one pass over the pairs, with the fit's batching and last-token rule, serves them all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..fitting import inputs
from ..fitting.pairs import as_text_pairs
from ..tuner.config import AUSteerConfig
from ..tuner.sites import SiteModule, base_named_modules, candidate_modules, text_config


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
    on the side AUSteer steers (the attention site: the output projection's input, the heads' concatenated outputs).
    """
    base = inputs.base_model(model)
    modules = candidate_modules(base, AUSteerConfig(sites=list(sites)))
    named = base_named_modules(base)
    token_pairs = inputs.tokenize_pairs(tokenizer, as_text_pairs(pairs, tokenizer),
                                        max_length=inputs.resolve_max_length(max_length, tokenizer, base))
    batches = list(inputs.make_batches(token_pairs, batch_size, inputs.pad_token_id(tokenizer),
                                       getattr(tokenizer, "padding_side", "right")))
    positive = {m.name: torch.zeros(len(token_pairs), m.width) for m in modules}
    negative = {m.name: torch.zeros(len(token_pairs), m.width) for m in modules}
    current: dict[str, Any] = {}

    def store(name: str, activation: torch.Tensor) -> None:
        rows = torch.arange(activation.shape[0], device=activation.device)
        last = activation[rows, current["last_token"].to(activation.device)].float().cpu()  # [2B, width]
        half = last.shape[0] // 2
        positive[name][current["pairs"]] = last[:half]
        negative[name][current["pairs"]] = last[half:]

    def input_hook(name):
        return lambda module, args: store(name, args[0])

    def output_hook(name):
        return lambda module, args, output: store(name, output if torch.is_tensor(output) else output[0])

    device = inputs.input_device(base)
    accepts_position_ids = inputs.accepts(base, "position_ids")
    with contextlib.ExitStack() as stack:
        stack.enter_context(inputs.unsteered(model))
        stack.enter_context(inputs.eval_mode(base))
        stack.enter_context(torch.inference_mode())
        handles = [named[m.name].register_forward_pre_hook(input_hook(m.name)) if m.position == "input" else
                   named[m.name].register_forward_hook(output_hook(m.name)) for m in modules]
        stack.callback(lambda: [handle.remove() for handle in handles])
        for batch in tqdm(batches, desc="pair activations", unit="batch", disable=not progress):
            current["last_token"], current["pairs"] = batch.last_token, torch.tensor(batch.pair_indices)
            base(**batch.model_inputs(device, position_ids=accepts_position_ids))
    return PairActivations(modules, positive, negative, attention_head_dim(model))
