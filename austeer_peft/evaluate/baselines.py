"""Baselines AUSteer is compared against, in the same harness and on the same splits.

* Block-level steering (paper Appendix J): every dimension of the blocks AUSteer chose, with AUSteer's own γ rule --
  the "steer more" control. It is an ordinary AUSteer adapter with many AUs.
* CAA (Rimsky et al., 2024): the mean difference of the last-token residual stream between positive and negative
  texts, added (times a multiplier) to one decoder layer's output at every position.
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
from tqdm.auto import tqdm

from ..fitting import inputs
from ..fitting.pairs import as_text_pairs
from ..fitting.scores import MomentumScores, adaptive_gamma, check_alpha
from ..tuner.aus import AU
from ..tuner.sites import find_decoder_layers

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
                max_length: Optional[int] = None, progress: bool = True) -> CAAVectors:
    """One pass over the pairs (the unsteered model, adapters disabled) reading every decoder layer's last-token
    output; the same batching and last-token rule as the AUSteer fit."""
    base = inputs.base_model(model)
    _, layers = find_decoder_layers(base)
    text_pairs = as_text_pairs(pairs, tokenizer)
    token_pairs = inputs.tokenize_pairs(tokenizer, text_pairs,
                                        max_length=inputs.resolve_max_length(max_length, tokenizer, base))
    batches = list(inputs.make_batches(token_pairs, batch_size, inputs.pad_token_id(tokenizer),
                                       getattr(tokenizer, "padding_side", "right")))
    sums: list[Optional[torch.Tensor]] = [None] * len(layers)
    current: dict[str, torch.Tensor] = {}

    def reader(index: int):
        def hook(module, args, output):
            hidden = output if torch.is_tensor(output) else output[0]
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            last = hidden[rows, current["last_token"].to(hidden.device)].float()
            half = last.shape[0] // 2
            difference = (last[:half] - last[half:]).sum(0).cpu()
            sums[index] = difference if sums[index] is None else sums[index] + difference
        return hook

    device = inputs.input_device(base)
    accepts_position_ids = inputs.accepts(base, "position_ids")
    with contextlib.ExitStack() as stack:
        stack.enter_context(inputs.unsteered(model))
        stack.enter_context(inputs.eval_mode(base))
        stack.enter_context(torch.inference_mode())
        handles = [layer.register_forward_hook(reader(i)) for i, layer in enumerate(layers)]
        stack.callback(lambda: [handle.remove() for handle in handles])
        for batch in tqdm(batches, desc="CAA vectors", unit="batch", disable=not progress):
            current["last_token"] = batch.last_token
            batch_inputs = batch.model_inputs(device, position_ids=accepts_position_ids)
            getattr(base, "base_model", base)(**batch_inputs)  # the backbone: no LM head needed
    return CAAVectors(torch.stack(sums) / len(token_pairs), len(token_pairs))


# Hook-based steering (CAA) is invisible to PEFT's disable_adapter; a pass that must see the unsteered model while such
# a steer is active (the detox task's fluency, measured under the unsteered model) pauses it with `hooks_paused()`.
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
def caa_steering(model: nn.Module, layer: int, vector: torch.Tensor, multiplier: float) -> Iterator[None]:
    """Add ``multiplier * vector`` to the output of decoder layer ``layer`` at every position, inside the block."""
    _, layers = find_decoder_layers(inputs.base_model(model))
    if not 0 <= layer < len(layers):
        raise ValueError(f"CAA layer {layer} is out of range; the model has {len(layers)} decoder layers.")

    def hook(module, args, output):
        if _HOOKS_PAUSED.get():
            return output
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
