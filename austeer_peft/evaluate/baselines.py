"""Baselines AUSteer is compared against, in the same harness and on the same splits.

* Block-level steering (paper Appendix J): every dimension of the blocks AUSteer chose, with AUSteer's own γ rule --
  the "steer more" control. It is an ordinary AUSteer adapter with many AUs.
* CAA (Rimsky et al., 2024): the mean difference of the last-token residual stream between positive and negative
  texts, added (times a multiplier) to one decoder layer's output at every position.

The additive methods (CAA here, ITI in :mod:`.heads`, the fixed-vector ablation in :mod:`.ablations`) share
:func:`added_vectors`, which adds fixed vectors to module inputs or outputs under either token scope.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..fitting import inputs
from ..fitting.activations import read_pair_activations
from ..fitting.scores import MomentumScores, adaptive_gamma, check_alpha
from ..tuner.aus import AU
from ..tuner.sites import SiteModule, base_named_modules, find_decoder_layers, hidden_size

ADDITIVE_SCOPES = ("all", "generated")
CAA_MULTIPLIERS = (0.5, 1.0, 2.0, 4.0, 8.0)
CAA_LAYER_FRACTIONS = (0.25, 0.4, 0.5, 0.6, 0.75)  # depths swept, as fractions of the number of layers


def block_level_aus(scores: MomentumScores, modules: Sequence[str], alpha: float) -> list[AU]:
    """Every AU of ``modules`` with AUSteer's adaptive γ (``α·r_pos`` if ``r_pos > r_neg`` else ``-α·r_neg``)."""
    alpha = check_alpha(alpha)
    known = {m.name for m in scores.modules}
    unknown = [name for name in modules if name not in known]
    if unknown:
        raise ValueError(f"Modules {unknown} have no momentum counts; counted modules: {sorted(known)[:4]}...")
    aus = []
    for name in modules:
        n_pos, n_neg = scores.n_pos[name].tolist(), scores.n_neg[name].tolist()
        for dim, (pos, neg) in enumerate(zip(n_pos, n_neg)):
            aus.append(AU(name, dim, adaptive_gamma(pos, neg, scores.num_pairs, alpha)))
    return aus


# ---------------------------------------------------------------------------------------------------- CAA


@dataclass
class CAAVectors:
    """Per decoder layer, the mean over pairs of ``h_pos - h_neg`` at the last token of the layer's output."""

    vectors: torch.Tensor  # float32 [num_layers, hidden]
    num_pairs: int

    def save(self, path: Union[str, Path], layer: int) -> int:
        """Write one layer's vector as safetensors (what a CAA "adapter" is); returns the file size in bytes."""
        from safetensors.torch import save_file

        save_file({"caa_vector": self.vectors[layer].contiguous()}, str(path),
                  metadata={"layer": str(layer), "num_pairs": str(self.num_pairs)})
        return Path(path).stat().st_size


def caa_vectors(model: nn.Module, tokenizer: Any, pairs: Any, *, batch_size: int = 16,
                max_length: Optional[int] = None, progress: bool = True, share_prompts: bool = True) -> CAAVectors:
    """One pass over the pairs (the unsteered model, adapters disabled) reading every decoder layer's last-token
    output, through the AUSteer fit's reader (same batching, last-token rule and shared prompts)."""
    base = inputs.base_model(model)
    name, layers = find_decoder_layers(base)
    width = hidden_size(base)
    targets = [SiteModule(f"{name}.{i}", None, i, "output", width) for i in range(len(layers))]
    sums = torch.zeros(len(layers), width)

    def add(activations: list[torch.Tensor], pair_indices: list[int]) -> None:  # a sum: the pairs' order is moot
        for index, last in enumerate(activations):  # [2B, hidden]: B positives, then their B negatives
            half = last.shape[0] // 2
            sums[index] += (last[:half].float() - last[half:].float()).sum(0).cpu()

    num_pairs = read_pair_activations(model, tokenizer, pairs, targets, add, batch_size=batch_size,
                                      max_length=max_length, share_prompts=share_prompts, progress=progress,
                                      desc="CAA vectors")
    return CAAVectors(sums / num_pairs, num_pairs)


# Hook-based steering (CAA, ITI, the fixed-vector ablation) is invisible to PEFT's disable_adapter; a pass that must
# see the unsteered model while such a steer is active (the detox task's fluency, measured under the unsteered model)
# pauses it with `hooks_paused()`.
_HOOKS_PAUSED = contextvars.ContextVar("austeer_steering_hooks_paused", default=False)


@contextlib.contextmanager
def hooks_paused() -> Iterator[None]:
    """Inside the block, the steering hooks of this module leave every output unchanged."""
    token = _HOOKS_PAUSED.set(True)
    try:
        yield
    finally:
        _HOOKS_PAUSED.reset(token)


@contextlib.contextmanager
def added_vectors(model: nn.Module, vectors: dict[str, tuple[str, torch.Tensor]], scope: str = "all"
                  ) -> Iterator[None]:
    """Add ``vector`` to the ``side`` ("input" or "output") of each named module, for ``vectors = {name: (side,
    vector)}``, inside the block.

    ``scope="all"`` adds at every position; ``scope="generated"`` at the last column of each forward only: the last
    prompt token of a left-padded batch, then each new token of a KV-cached ``generate`` (ITI's ``"lt"`` rule, and the
    rule of AUSteer's ``scope="generated"`` for these two kinds of forward).
    """
    if scope not in ADDITIVE_SCOPES:
        raise ValueError(f"Unknown scope {scope!r}; choose from {list(ADDITIVE_SCOPES)}.")
    named = base_named_modules(inputs.base_model(model))
    missing = [name for name in vectors if name not in named]
    if missing:
        raise ValueError(f"Modules {missing} are not in the model; steer modules of the model the vectors came from.")

    def added(hidden: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        if _HOOKS_PAUSED.get():
            return hidden
        vector = vector.to(device=hidden.device, dtype=hidden.dtype)
        if scope == "all":
            return hidden + vector
        hidden = hidden.clone()
        hidden[:, -1] += vector  # [batch, tokens, width]: the last column of this forward
        return hidden

    def pre_hook(vector):
        return lambda module, args: (added(args[0], vector), *args[1:])

    def hook(vector):
        def add_to_output(module, args, output):
            if torch.is_tensor(output):
                return added(output, vector)
            return (added(output[0], vector), *output[1:])
        return add_to_output

    handles = []
    try:
        for name, (side, vector) in vectors.items():
            if side not in ("input", "output"):
                raise ValueError(f"Side of {name!r} must be 'input' or 'output', got {side!r}.")
            module = named[name]
            handles.append(module.register_forward_pre_hook(pre_hook(vector)) if side == "input" else
                           module.register_forward_hook(hook(vector)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def caa_steering(model: nn.Module, layer: int, vector: torch.Tensor, multiplier: float, scope: str = "all"):
    """Add ``multiplier * vector`` to the output of decoder layer ``layer`` (every position, or the last column of
    each forward under ``scope="generated"``), inside the block."""
    prefix, layers = find_decoder_layers(inputs.base_model(model))
    if not 0 <= layer < len(layers):
        raise ValueError(f"CAA layer {layer} is out of range; the model has {len(layers)} decoder layers.")
    return added_vectors(model, {f"{prefix}.{layer}": ("output", multiplier * vector)}, scope)


def caa_layers(num_layers: int, fractions: Sequence[float] = CAA_LAYER_FRACTIONS) -> list[int]:
    """Distinct layer indices at the given relative depths."""
    return sorted({min(num_layers - 1, max(0, round(f * (num_layers - 1)))) for f in fractions})
