"""Token scope: which token positions of the current forward an adapter with ``scope`` other than ``"all"`` steers.

Separate from the layer and the tuner because it is the one piece of state that follows calls rather than modules:
the tuner fills it, per call, through PEFT's per-call context (``_enable_peft_forward_hooks``, entered once by
``PeftModel.forward`` and ``PeftModel.generate``) and a forward pre-hook on the decoder stack; the layers only read
masks from it.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import nn


class TokenPositions:
    """Where the tokens of the current forward sit, for adapters that steer only some positions.

    AUSteerModel fills it from a pre-forward hook on the decoder stack, installed only while such an adapter exists,
    so ``scope="all"`` costs nothing. Positions come from the 2D attention mask (each row's own left padding, past
    tokens of the KV cache included) or, without one, from the KV cache length.

    Rules for ``scope="generated"``: the first forward of a call (a plain ``model(...)``, or the first step of
    ``generate``) steers each row's last real token if it starts a sequence, and all its tokens if it continues a KV
    cache. Later forwards of the same call (the further steps of ``generate``) steer the columns from the last prompt
    column on, which also holds without a KV cache, where every step recomputes the whole sequence.
    """

    def __init__(self) -> None:
        self.scopes: dict[str, tuple[str, Optional[int]]] = {}  # adapter -> (scope, scope_position), not "all"
        self.prompt_width: Optional[int] = None  # columns of the call's input, while a call runs
        self.in_call = False  # inside PeftModel.forward / generate
        self.forwards_in_call = 0  # decoder-stack forwards seen since the call started
        self._shape: Optional[tuple[int, int]] = None
        self._masks: dict[tuple[str, Optional[int]], torch.Tensor] = {}

    def start_call(self, prompt_width: Optional[int]) -> None:
        self.in_call, self.prompt_width, self.forwards_in_call = True, prompt_width, 0

    def end_call(self) -> None:
        self.in_call, self.prompt_width, self.forwards_in_call = False, None, 0

    def read_forward(self, inputs: torch.Tensor, attention_mask: Optional[torch.Tensor], past_key_values: Any) -> None:
        """Record the positions of the `inputs` ([batch, tokens, ...]) of the forward that is starting."""
        batch, tokens = inputs.shape[:2]
        steps = torch.arange(tokens, device=inputs.device)
        if attention_mask is not None and attention_mask.ndim == 2:
            self._past = attention_mask.shape[1] - tokens
            real = attention_mask[:, self._past:].bool()
            # Index among the row's real tokens (left padding not counted); padding itself gets -1.
            self._positions = (attention_mask.long().cumsum(-1)[:, self._past:] - 1).masked_fill(~real, -1)
            last = (real.long() * (steps + 1)).argmax(-1)  # each row's last real token
        else:
            self._past = past_key_values.get_seq_length() if past_key_values is not None else 0
            self._positions = (self._past + steps).expand(batch, tokens)
            last = torch.full((batch,), tokens - 1, device=inputs.device)
        self._columns = self._past + steps
        self._last = steps == last[:, None]
        self._shape = (batch, tokens)
        self._masks = {}
        if self.in_call:
            self.forwards_in_call += 1

    def mask(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask over the token positions of `x` ([batch, tokens, width]): True where `adapter` steers."""
        if self._shape is None or x[..., 0].numel() != self._shape[0] * self._shape[1]:
            raise RuntimeError(
                f"AUSteer adapter {adapter!r} steers only some token positions (scope={self.scopes[adapter][0]!r}), "
                f"but the positions of this activation (shape {tuple(x.shape)}) are unknown: they are read when the "
                f"model's decoder stack runs (last forward: batch x tokens = {self._shape}). Call the model, not one "
                "of its submodules."
            )
        key = self.scopes[adapter]
        if key not in self._masks:
            scope, first = key
            if scope == "from_position":
                keep = self._positions >= first
            elif self.forwards_in_call > 1 and self.prompt_width is not None:  # later steps of generate
                keep = (self._columns >= self.prompt_width - 1).expand(self._shape)
            elif self._past == 0:  # a forward that starts a sequence: the token that predicts the next one
                keep = self._last
            else:  # a forward that continues a KV cache: all its tokens are generated
                keep = torch.ones(self._shape, dtype=torch.bool, device=self._columns.device)
            self._masks[key] = keep
        return self._masks[key].reshape(x.shape[:-1]).to(x.device)


def input_width(args: tuple, kwargs: dict) -> Optional[int]:
    """Columns of a call's input: ``input_ids`` or ``inputs_embeds``, as the first positional argument or a keyword."""
    inputs = kwargs.get("input_ids", args[0] if args else None)
    inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
    return inputs.shape[1] if isinstance(inputs, torch.Tensor) and inputs.ndim >= 2 else None


def position_reading_hook(positions: TokenPositions, stack: nn.Module):
    """A forward pre-hook (``with_kwargs=True``) for the decoder stack that records each forward's positions."""
    signature = inspect.signature(stack.forward)

    def read_token_positions(module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = signature.bind_partial(*args, **kwargs).arguments
        inputs = arguments.get("input_ids")
        inputs = arguments.get("inputs_embeds") if inputs is None else inputs
        if inputs is None:
            raise ValueError(f"{type(module).__name__} got neither input_ids nor inputs_embeds, so an AUSteer adapter "
                             "with a token scope cannot tell the token positions. Pass input_ids or inputs_embeds.")
        positions.read_forward(inputs, arguments.get("attention_mask"), arguments.get("past_key_values"))

    return read_token_positions
