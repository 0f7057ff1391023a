"""Baselines AUSteer is compared against, in the same harness and on the same splits.

* Block-level steering (paper Appendix J): every dimension of the blocks AUSteer chose, with AUSteer's own γ rule --
  the "steer more" control. It is an ordinary AUSteer adapter with many AUs.
* CAA (Rimsky et al., 2024): the mean difference of the last-token residual stream between positive and negative
  texts, added (times a multiplier) to one decoder layer's output at every position.
"""

from __future__ import annotations

import contextlib
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
from ..tuner.sites import SiteModule, find_decoder_layers, hidden_size

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

    def add(activations: list[torch.Tensor]) -> None:
        for index, last in enumerate(activations):  # [2B, hidden]: B positives, then their B negatives
            half = last.shape[0] // 2
            sums[index] += (last[:half].float() - last[half:].float()).sum(0).cpu()

    num_pairs = read_pair_activations(model, tokenizer, pairs, targets, add, batch_size=batch_size,
                                      max_length=max_length, share_prompts=share_prompts, progress=progress,
                                      desc="CAA vectors")
    return CAAVectors(sums / num_pairs, num_pairs)


@contextlib.contextmanager
def caa_steering(model: nn.Module, layer: int, vector: torch.Tensor, multiplier: float) -> Iterator[None]:
    """Add ``multiplier * vector`` to the output of decoder layer ``layer`` at every position, inside the block."""
    _, layers = find_decoder_layers(inputs.base_model(model))
    if not 0 <= layer < len(layers):
        raise ValueError(f"CAA layer {layer} is out of range; the model has {len(layers)} decoder layers.")

    def hook(module, args, output):
        hidden = output if torch.is_tensor(output) else output[0]
        steered = hidden + (multiplier * vector).to(device=hidden.device, dtype=hidden.dtype)
        return steered if torch.is_tensor(output) else (steered, *output[1:])

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def caa_layers(num_layers: int, fractions: Sequence[float] = CAA_LAYER_FRACTIONS) -> list[int]:
    """Distinct layer indices at the given relative depths."""
    return sorted({min(num_layers - 1, max(0, round(f * (num_layers - 1)))) for f in fractions})
