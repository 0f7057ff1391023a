"""Reading pair activations: each sequence's last-token activation at chosen modules, for every batch of a pass over
contrastive pairs. The AUSteer fit (sign counts) and the baselines that read pair activations (CAA's mean
differences, and any new one) all read through here, so they share one forward path:

* **shared prompts**: a pair whose two texts start with the same prompt runs that prompt once, keeping its KV cache,
  and then both continuations from it in one batch (:class:`~austeer_peft.fitting.inputs.SharedPromptBatch`);
  other pairs run as full sequences. The activations read are those of the full sequences (same tokens, positions
  and mask), only computed without repeating the prompt.
* **early stop**: every forward stops right after the last module read; later layers and the LM head never run.
* **memory back-off**: a batch that runs out of accelerator memory is retried in halves, and the pass goes on at
  the smaller size (said once in the log); no pair is lost or read twice.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..tuner.experts import fused_experts_axis, read_expert_units
from ..tuner.sites import SiteModule, base_named_modules, unwrap
from . import inputs

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised from the hook of the last module read: nothing after it (later layers, norm, LM head) is needed."""


class LastTokenReader:
    """Forward hooks that read, at each of ``targets``, the activation of every sequence's last real token.

    Use it as a context manager (hooks are registered on enter and removed on exit); :meth:`read` runs one forward
    over ``2B`` sequences and returns one ``[2B, width]`` tensor per target, on that module's device.
    """

    def __init__(self, model: nn.Module, targets: Sequence[SiteModule]) -> None:
        modules = base_named_modules(model)
        self.targets = list(targets)
        self.modules = [modules[t.name] for t in self.targets]
        # Expert-level AUs (`ffn_inner` on fused MoE experts) are inside the module: read them from its inputs.
        self._expert_modules = {i: unwrap(m) for i, (t, m) in enumerate(zip(self.targets, self.modules))
                                if t.position == "input" and fused_experts_axis(unwrap(m)) is not None}
        self._handles: list[Any] = []
        self._reset()

    def __enter__(self) -> "LastTokenReader":
        for i, (target, module) in enumerate(zip(self.targets, self.modules)):
            if target.position == "input":
                handle = module.register_forward_pre_hook(functools.partial(self._input_hook, i), with_kwargs=True)
            else:
                handle = module.register_forward_hook(functools.partial(self._output_hook, i))
            self._handles.append(handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._reset()

    def _reset(self) -> None:
        self._active = False  # inside read() or prefill()
        self._recording = False  # read(): keep activations; prefill(): only stop after the last target
        self._last_token: Optional[torch.Tensor] = None  # [2B] index of each sequence's last non-padding token
        self._index: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # (rows, last_token) per device
        self._seq_len = 0
        self._last: list[Optional[torch.Tensor]] = [None] * len(self.targets)  # this forward's [2B, width] slices
        self._seen = [False] * len(self.targets)
        self._remaining = 0

    # ------------------------------------------------------------------------------------------------ passes

    def prefill(self, run_forward: Callable[[], Any]) -> None:
        """Run ``run_forward()`` (a prompt filling a KV cache) only as far as the last target; read nothing."""
        self._start(recording=False)
        try:
            self._run(run_forward)
        finally:
            self._reset()

    def read(self, run_forward: Callable[[], Any], last_token: torch.Tensor, seq_len: int,
             prefill: Optional[Callable[[], Any]] = None) -> list[torch.Tensor]:
        """Run one forward over ``2B`` sequences (``run_forward()``) and return each target's ``[2B, width]``
        activations at ``last_token`` (``[2B]`` positions in the padded length ``seq_len``). ``prefill``, if given,
        runs first (see :meth:`prefill`)."""
        if last_token.ndim != 1 or last_token.numel() % 2:
            raise ValueError(f"A batch holds 2B sequences (B positives, then B negatives); got {last_token.numel()}.")
        if prefill is not None:
            self.prefill(prefill)
        self._start(recording=True)
        self._last_token, self._seq_len = last_token.long(), seq_len
        try:
            self._run(run_forward)
            return list(self._last)
        finally:
            self._reset()

    def _start(self, recording: bool) -> None:
        if not self._handles:
            raise RuntimeError(f"{type(self).__name__} hooks are not registered; use it as `with ...:`.")
        self._active, self._recording, self._remaining = True, recording, len(self.targets)

    def _run(self, run_forward: Callable[[], Any]) -> None:
        try:
            run_forward()
        except _StopForward:
            pass
        missing = [t.name for t, seen in zip(self.targets, self._seen) if not seen]
        if missing:
            raise RuntimeError(
                f"The forward pass finished without running {len(missing)} candidate module(s), e.g. "
                f"{missing[:3]}; their AUs cannot be counted. Choose sites/target_modules that the model's "
                "forward actually calls."
            )

    # ------------------------------------------------------------------------------------------------ hooks

    def _input_hook(self, i: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if i in self._expert_modules:
            if self._active and self._recording:
                rows, last_token = self._index_on(args[0].device if args else kwargs["hidden_states"].device)
                rows = rows * self._seq_len + last_token
                self._record(i, read_expert_units(self._expert_modules[i], args, kwargs, rows), at_last_token=True)
            else:
                self._record(i, None)
            return
        if args:
            activation = args[0]
        else:
            activation = kwargs.get("hidden_states", next((v for v in kwargs.values() if torch.is_tensor(v)), None))
        self._record(i, activation)

    def _output_hook(self, i: int, module: nn.Module, args: tuple, output: Any) -> None:
        self._record(i, output if torch.is_tensor(output) else output[0])

    def _record(self, i: int, activation: Optional[torch.Tensor], at_last_token: bool = False) -> None:
        if not self._active:  # a forward outside read()/prefill() (e.g. the user's own call): not ours
            return
        target = self.targets[i]
        if self._seen[i]:
            raise RuntimeError(
                f"{target.name} ran twice in one forward pass, so its last-token activation is ambiguous; "
                "AUSteer can only fit modules that run once per forward."
            )
        self._seen[i] = True
        if self._recording:
            if not torch.is_tensor(activation):
                raise TypeError(f"Could not read a tensor from the {target.position} of {target.name}.")
            activation = activation.detach()
            self._last[i] = activation if at_last_token else self._last_token_slice(target, activation)  # [2B, width]
        self._remaining -= 1
        if self._remaining == 0:
            raise _StopForward

    def _last_token_slice(self, target: SiteModule, activation: torch.Tensor) -> torch.Tensor:
        """Each sequence's last-token activation; blocks such as MoE may see the tokens flattened to [2B·T, width]."""
        batch, seq_len = self._last_token.numel(), self._seq_len
        rows, last_token = self._index_on(activation.device)
        if activation.ndim == 3 and activation.shape == (batch, seq_len, target.width):
            return activation[rows, last_token]
        if activation.ndim == 2 and activation.shape == (batch * seq_len, target.width):
            return activation.index_select(0, rows * seq_len + last_token)
        raise RuntimeError(
            f"The {target.position} of {target.name} has shape {tuple(activation.shape)}; expected "
            f"[{batch}, {seq_len}, {target.width}] (sequences, tokens, AUs). This module does not carry one "
            "activation per token; pick another site or target module."
        )

    def _index_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._index:
            last_token = self._last_token.to(device)
            self._index[device] = (torch.arange(last_token.numel(), device=device), last_token)
        return self._index[device]


# ---------------------------------------------------------------------------------------------------- the pass


def cache_argument(model: nn.Module) -> Optional[str]:
    """The name under which ``model``'s forward takes a KV cache (``cache`` in transformers 5, ``past_key_values``
    before), or None."""
    return next((name for name in ("cache", "past_key_values") if inputs.accepts(model, name)), None)


def can_share_prompts(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes a KV cache and position ids, which running a prompt once needs."""
    return cache_argument(model) is not None and inputs.accepts(model, "position_ids")


# What a pass hands each (sub)batch to: read(run_forward, last_token, seq_len, prefill, pair_indices) -> anything;
# pair_indices are the batch's pairs (positions in the pass's pair list), in the order of its rows.
BatchReader = Callable[[Callable[[], Any], torch.Tensor, int, Optional[Callable[[], Any]], list[int]], Any]


def forward_batch(model: nn.Module, batch: inputs.PairBatch, device: torch.device, read: BatchReader,
                  position_ids: bool = True) -> Any:
    """One batch through ``read``: full sequences in one forward; a shared-prompt batch as its prompts (filling a
    fresh KV cache, ``[B]`` rows, repeated to ``[2B]`` after) and then its continuations."""
    if isinstance(batch, inputs.Batch):
        batch_inputs = batch.model_inputs(device, position_ids=position_ids)
        return read(lambda: model(**batch_inputs), batch.last_token, batch.input_ids.shape[1], None,
                    list(batch.pair_indices))
    from transformers import DynamicCache

    cache = DynamicCache()  # full (non-sliding) layers: every prompt token stays visible, as in the full sequence
    argument, num_pairs = cache_argument(model), len(batch.pair_indices)

    def prefill() -> Any:
        return model(**batch.prompt_inputs(device, cache, argument))

    def continuations() -> Any:
        # [B] -> [2B] rows (positives, then negatives). CPU indices: a dispatched model's layers may sit on
        # several devices, and a CPU index tensor indexes a tensor on any of them.
        cache.batch_select_indices(torch.arange(2 * num_pairs) % num_pairs)
        return model(**batch.continuation_inputs(device, cache, argument))

    return read(continuations, batch.last_token, batch.continuation_ids.shape[1], prefill, list(batch.pair_indices))


def read_pairs(model: nn.Module, batches: Sequence[inputs.PairBatch], read: BatchReader, *,
               token_pairs: list[tuple[list[int], list[int]]], pad_id: int, padding_side: str,
               on_batch_done: Optional[Callable[[int], None]] = None, progress: bool = True,
               desc: str = "pair activations") -> None:
    """Run every batch of ``batches`` through ``read`` (see :func:`forward_batch`), backing off on out-of-memory.

    ``model`` is the transformers model (adapters, if any, already disabled by the caller). A batch that runs out
    of memory is split into halves (rebuilt from ``token_pairs``), and every later batch runs at the size that
    worked, so each pair is read exactly once. ``on_batch_done(i)`` is called when all pairs of ``batches[i]`` are
    read (a checkpoint hooks in there).
    """
    device = inputs.input_device(model)
    position_ids = inputs.accepts(model, "position_ids")
    size: Optional[int] = None  # pairs per forward after a back-off; None: as planned
    announced = None
    for index, batch in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress)):
        pending = [batch]
        while pending:
            part = pending.pop(0)
            if size is not None and len(part.pair_indices) > size:
                pending = inputs.rebatch(part, token_pairs, size, pad_id, padding_side) + pending
                continue
            try:
                forward_batch(model, part, device, read, position_ids)
            except Exception as error:  # noqa: BLE001 - only memory errors are handled; the rest re-raised below
                if not is_out_of_memory(error):
                    raise
                if len(part.pair_indices) == 1:
                    raise RuntimeError("One pair alone does not fit in memory: shorten the texts (max_length), "
                                       "fit fewer sites, or spread the model over more devices.") from error
                from accelerate.utils.memory import clear_device_cache

                size = len(part.pair_indices) // 2
                announced = announced or len(part.pair_indices)
                clear_device_cache(garbage_collection=True)
                pending = inputs.rebatch(part, token_pairs, size, pad_id, padding_side) + pending
                continue
            if announced is not None:
                logger.warning("A batch of %d pairs ran out of memory; continuing with %d pairs per forward.",
                               announced, size)
                announced = None
        if on_batch_done is not None:
            on_batch_done(index)


def is_out_of_memory(error: BaseException) -> bool:
    """An accelerator (or CPU allocator) out-of-memory error, by type or by accelerate's list of messages."""
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(error, torch.OutOfMemoryError) or should_reduce_batch_size(error)


def read_pair_activations(model: nn.Module, tokenizer: Any, pairs: Any, targets: Sequence[SiteModule],
                          consume: Callable[[list[torch.Tensor], list[int]], None], *, batch_size: int = 16,
                          max_length: Optional[int] = None, chat_template: bool = False, share_prompts: bool = True,
                          progress: bool = True, desc: str = "pair activations") -> int:
    """One pass over contrastive ``pairs`` with the unsteered model, for methods that learn from pair activations
    (CAA, ITI, SADI, the ablations): ``consume(activations, pair_indices)`` gets, per batch, one ``[2B, width]``
    tensor per target (the last-token activations of the B positives, then of their B negatives) and the B pairs'
    positions in ``pairs``. Same tokens, batching, shared prompts and memory back-off as the AUSteer fit. Returns
    the number of pairs read.
    """
    from .pairs import as_text_pairs

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive integer (pairs per forward pass), got {batch_size!r}.")
    base = inputs.base_model(model)
    text_pairs = as_text_pairs(pairs, tokenizer, chat_template=chat_template)
    token_pairs = inputs.tokenize_pairs(tokenizer, text_pairs,
                                        max_length=inputs.resolve_max_length(max_length, tokenizer, base))
    pad_id, padding_side = inputs.pad_token_id(tokenizer), getattr(tokenizer, "padding_side", "right")
    batches = inputs.plan_batches(token_pairs, batch_size, pad_id, padding_side,
                                  share_prompts and can_share_prompts(base))
    reader = LastTokenReader(base, targets)

    def read(run_forward, last_token, seq_len, prefill, pair_indices):
        consume(reader.read(run_forward, last_token, seq_len, prefill), pair_indices)

    with inputs.unsteered(model), inputs.eval_mode(base), torch.inference_mode(), reader:
        read_pairs(base, batches, read, token_pairs=token_pairs, pad_id=pad_id, padding_side=padding_side,
                   progress=progress, desc=desc)
    return len(token_pairs)
