"""Per-call state: which token positions of the current forward an adapter with ``scope`` other than ``"all"``
steers (``TokenPositions``), and which adapter each row of the batch uses (``RowAdapters``, PEFT's
``adapter_names``).

Separate from the layer and the tuner because it is the state that follows calls rather than modules: the tuner fills
it, per call, through PEFT's per-call context (``_enable_peft_forward_hooks``, entered once by ``PeftModel.forward``
and ``PeftModel.generate``) and a forward pre-hook on the decoder stack; the layers only read masks and rows from it.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import nn

ScopeKey = tuple[str, Optional[int]]  # (scope, scope_position) of an adapter that steers only some tokens


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
        self._masks: dict[tuple, torch.Tensor] = {}  # per forward: by scope, and shaped for each activation

    def start_call(self, prompt_width: Optional[int]) -> None:
        self.in_call, self.prompt_width, self.forwards_in_call = True, prompt_width, 0

    def end_call(self) -> None:
        self.in_call, self.prompt_width, self.forwards_in_call = False, None, 0

    def read_forward(self, inputs: torch.Tensor, attention_mask: Optional[torch.Tensor], cache: Any) -> None:
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
            self._past = cache.get_seq_length() if cache is not None else 0
            self._positions = (self._past + steps).expand(batch, tokens)
            last = torch.full((batch,), tokens - 1, device=inputs.device)
        self._columns = self._past + steps
        self._last = steps == last[:, None]
        self._shape = (batch, tokens)
        self._masks = {}
        if self.in_call:
            self.forwards_in_call += 1

    def mask(self, scope: ScopeKey, x: torch.Tensor) -> torch.Tensor:
        """Where an adapter with ``scope`` (scope, scope_position) steers, as a boolean ``[*x.shape[:-1], 1]`` that
        broadcasts over the width of `x` ([batch, tokens, width]); made once per forward, shape and device."""
        key = (scope, x.shape[:-1], x.device)
        if key not in self._masks:
            self._masks[key] = self._keep(scope, x).reshape(*x.shape[:-1], 1).to(x.device)
        return self._masks[key]

    def row_mask(self, rows: "RowAdapters", x: torch.Tensor) -> Optional[torch.Tensor]:
        """In a batch whose rows use different adapters: where each row's own adapter steers (True for rows whose
        adapter steers every token), as ``[batch, tokens, 1]``; None when no row's adapter has a scope."""
        selections = rows.scoped_rows(x.shape[0], x.device)
        if not selections:
            return None
        key = ("rows", x.shape[:-1], x.device)
        if key not in self._masks:
            mask = None
            for scope, selected in selections:  # selected: [batch, 1], rows whose adapter has this scope
                part = self._keep(scope, x).reshape(x.shape[:-1]).to(x.device) | ~selected
                mask = part if mask is None else mask & part
            self._masks[key] = mask[..., None]
        return self._masks[key]

    def _keep(self, scope: ScopeKey, x: torch.Tensor) -> torch.Tensor:
        """[batch, tokens] bool: the token positions of this forward that an adapter with ``scope`` steers."""
        if self._shape is None or x[..., 0].numel() != self._shape[0] * self._shape[1]:
            raise RuntimeError(
                f"An AUSteer adapter here steers only some token positions (scope={scope[0]!r}), but the positions "
                f"of this activation (shape {tuple(x.shape)}) are unknown: they are read when the model's decoder "
                f"stack runs (last forward: batch x tokens = {self._shape}). Call the model, not one of its "
                "submodules."
            )
        if scope not in self._masks:
            kind, first = scope
            if kind == "from_position":
                keep = self._positions >= first
            elif self.forwards_in_call > 1 and self.prompt_width is not None:  # later steps of generate
                keep = (self._columns >= self.prompt_width - 1).expand(self._shape)
            elif self._past == 0:  # a forward that starts a sequence: the token that predicts the next one
                keep = self._last
            else:  # a forward that continues a KV cache: all its tokens are generated
                keep = torch.ones(self._shape, dtype=torch.bool, device=self._columns.device)
            self._masks[scope] = keep
        return self._masks[scope]


class RowAdapters:
    """Which adapter each row of the current call uses (PEFT's ``adapter_names``: one name per row, ``"__base__"``
    for an unsteered row), shared by all layers of one model.

    AUSteerModel fills it when a ``PeftModel.forward`` / ``generate`` call passes ``adapter_names`` and empties it
    when the call ends, so layers see ``rows is None`` otherwise. Each layer keeps a factor table with one row per
    adapter in ``order`` (row 0: unsteered) and gathers the rows of the batch from it: one gather per module.
    ``generate`` repeats each input row for its beams (and returned sequences) with ``repeat_interleave``; the
    rows are repeated the same way for activations whose batch is a multiple of the input's.
    """

    BASE = "__base__"

    def __init__(self) -> None:
        self.order: tuple[str, ...] = ()  # table row i + 1 belongs to order[i]
        self.names: Optional[list[str]] = None  # one per input row, while a call runs
        self.rows: Optional[torch.Tensor] = None  # [input batch, 1] int64: each input row's table row
        self._scopes: dict[ScopeKey, torch.Tensor] = {}  # scope -> [input batch, 1] bool: rows whose adapter has it
        self._expanded: dict[tuple, Any] = {}

    def start_call(self, names: list[str], order: tuple[str, ...], scopes: dict[str, ScopeKey],
                   device: torch.device) -> None:
        if order != self.order:
            self.order = order  # a new tuple only when the adapters change: layers compare it by identity
        table_row = {name: row for row, name in enumerate(order, start=1)}
        table_row[self.BASE] = 0
        self.names = list(names)
        self.rows = torch.tensor([table_row[name] for name in names], device=device)[:, None]
        self._scopes = {}
        for scope in sorted(set(scopes.values()), key=repr):
            selected = [scopes.get(name) == scope for name in names]
            if any(selected):
                self._scopes[scope] = torch.tensor(selected, device=device)[:, None]
        self._expanded = {}

    def end_call(self) -> None:
        self.names = self.rows = None
        self._scopes, self._expanded = {}, {}

    def rows_for(self, batch: int, device: torch.device) -> torch.Tensor:
        """[batch, 1] table rows of an activation with `batch` rows (a multiple of the input rows)."""
        key = ("rows", batch, device)
        if key not in self._expanded:
            self._expanded[key] = self._expand(self.rows, batch).to(device)
        return self._expanded[key]

    def scoped_rows(self, batch: int, device: torch.device) -> list[tuple[ScopeKey, torch.Tensor]]:
        """(scope, [batch, 1] bool rows whose adapter has that scope) for the scopes some row's adapter has."""
        if not self._scopes:
            return []
        key = ("scopes", batch, device)
        if key not in self._expanded:
            self._expanded[key] = [(scope, self._expand(rows, batch).to(device)) for scope, rows in self._scopes.items()]
        return self._expanded[key]

    def _expand(self, rows: torch.Tensor, batch: int) -> torch.Tensor:
        if batch % rows.shape[0]:
            raise ValueError(
                f"`adapter_names` has {rows.shape[0]} names, one per row of the input, but an activation of this "
                f"call has {batch} rows, which is not a multiple of that. Pass one adapter name per input row."
            )
        return rows.repeat_interleave(batch // rows.shape[0], dim=0) if batch != rows.shape[0] else rows


def check_adapter_names(names: Any, adapters: list[str], inputs: Any) -> None:
    """Refuse ``adapter_names`` that are not one known adapter name (or ``"__base__"``) per row of ``inputs``."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"`adapter_names` must be a list of adapter names, one per row of the batch "
                        f"('{RowAdapters.BASE}' for an unsteered row); got {names!r}.")
    unknown = sorted(set(names) - set(adapters) - {RowAdapters.BASE})
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. Adapters: "
                         f"{sorted(adapters)}, or '{RowAdapters.BASE}' for an unsteered row.")
    if isinstance(inputs, torch.Tensor) and inputs.ndim >= 2 and inputs.shape[0] != len(names):
        raise ValueError(f"`adapter_names` has {len(names)} names but the batch has {inputs.shape[0]} rows; pass one "
                         "adapter name per row.")


def call_inputs(args: tuple, kwargs: dict) -> Any:
    """A call's input: ``input_ids`` or ``inputs_embeds``, as the first positional argument or a keyword."""
    inputs = kwargs.get("input_ids", args[0] if args else None)
    return kwargs.get("inputs_embeds") if inputs is None else inputs


def input_width(args: tuple, kwargs: dict) -> Optional[int]:
    """Columns of a call's input (see ``call_inputs``)."""
    inputs = call_inputs(args, kwargs)
    return inputs.shape[1] if isinstance(inputs, torch.Tensor) and inputs.ndim >= 2 else None


def kv_cache(arguments: dict) -> Any:
    """The KV cache a decoder stack's forward got: ``cache`` in transformers 5, ``past_key_values`` before (and
    in the extra keyword arguments of some models)."""
    extra = arguments.get("kwargs") or {}
    for name in ("cache", "past_key_values"):
        value = arguments.get(name, extra.get(name))
        if value is not None:
            return value
    return None


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
        positions.read_forward(inputs, arguments.get("attention_mask"), kv_cache(arguments))

    return read_token_positions
