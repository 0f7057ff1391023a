"""What a causal LM's logits say about continuations: the forward that returns them (:func:`forward_logits`) and the
summed log-probability of marked continuation tokens (:func:`continuation_logprobs`).

The automatic (k, α) of a fit scores held-out pairs with them and evaluation scores tasks with them. They live in
fitting, the lower layer, so that evaluation imports them from here and fitting never imports evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import torch
from torch import nn

from .inputs import accepts, base_model, input_device


@contextlib.contextmanager
def contiguous_head_input(model: nn.Module) -> Iterator[None]:
    """Inside the block, the LM head gets a contiguous input.

    With ``logits_to_keep``, transformers hands the head a strided slice of the hidden states ([B, 1, H] of
    [B, T, H]); PyTorch's CPU matmul takes a slow path on such a 3-d strided input (bfloat16 [16, 1, 640] x
    Gemma-3's 262k-word head: 23 s instead of 0.04 s; float32 about 10x slower; pytorch/pytorch#151934), so one
    last-token logit cost more than the whole model. Copying the [B, 1, H] slice costs nothing. The hook lives only
    for the block."""
    base = base_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor], keep: Optional[int] = None) -> torch.Tensor:
    """Float32 CPU logits of the last ``keep`` positions (all when None) of a padded batch (``input_ids``,
    ``attention_mask``, ``position_ids``); the LM head runs on those positions only where the model allows it."""
    base = base_model(model)
    inputs = dict(batch)
    if not accepts(base, "position_ids"):
        inputs.pop("position_ids")
    device = input_device(base)
    inputs = {name: value.to(device) for name, value in inputs.items()}
    if keep is not None and accepts(base, "logits_to_keep"):
        inputs["logits_to_keep"] = keep
    with contiguous_head_input(model):
        logits = model(**inputs, use_cache=False).logits
    return (logits if keep is None else logits[:, -keep:]).float().cpu()


def continuation_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, continuation_mask: torch.Tensor
                          ) -> torch.Tensor:
    """Summed log-probability of the continuation tokens of each sequence, shape [batch].

    Args:
        logits: causal LM logits, [batch, seq, vocab]; ``logits[:, t]`` predicts ``input_ids[:, t + 1]``.
        input_ids: [batch, seq], prompt followed by the option's tokens (padding anywhere outside the mask).
        continuation_mask: [batch, seq], 1 on the option's tokens. Position 0 cannot be scored (nothing predicts
            it), so it must be 0.
    """
    logits = torch.as_tensor(logits)
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    mask = torch.as_tensor(continuation_mask).bool()
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or mask.shape != input_ids.shape:
        raise ValueError(f"Shapes must be logits [B, T, V], input_ids [B, T], mask [B, T]; got "
                         f"{tuple(logits.shape)}, {tuple(input_ids.shape)}, {tuple(mask.shape)}.")
    if mask[:, 0].any():
        raise ValueError("continuation_mask is set at position 0, which no logit predicts; prepend the prompt.")
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, T-1, V]
    targets = input_ids[:, 1:].unsqueeze(-1)  # [B, T-1, 1]
    token_log_probs = log_probs.gather(-1, targets).squeeze(-1)  # [B, T-1]
    return (token_log_probs * mask[:, 1:]).sum(dim=-1)
