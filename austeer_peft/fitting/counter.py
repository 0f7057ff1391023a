"""The sign counter of a fit pass: forward hooks that read every candidate AU at each sequence's last real token and
turn a batch of contrastive pairs straight into int64 counts, summed over processes after a data-parallel fit.

It is the only part of fitting that touches the model's activations; what the counts mean (scores, top-k, γ, files)
is :mod:`austeer_peft.fitting.scores`, which never sees a model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..tuner.config import AUSteerConfig
from ..tuner.experts import fused_experts_axis, read_expert_units
from ..tuner.sites import SiteModule, base_named_modules, unwrap
from .scores import MomentumScores


class _StopForward(Exception):
    """Raised from the hook of the last candidate module: nothing after it (later layers, norm, LM head) is needed."""


class MomentumCounter:
    """Streams batches of contrastive pairs into per-AU counts ``#(x_pos > x_neg)`` and ``#(x_pos < x_neg)``.

    A batch holds ``2B`` sequences: the B positives first, then their B negatives in the same order. For every
    candidate module a hook keeps only the activation at each sequence's last non-padding token (``[2B, width]``).
    When the last candidate module has been read, the forward is stopped and the batch's slices are compared in one
    go per device: positives against negatives, adding the sign counts to int64 vectors on that device (so a model
    dispatched over several devices never moves activations between them). Ties (equal activations) add to neither
    count; they only count in ``N``. Nothing outlives a batch but the counts.

    Use it as a context manager (hooks are registered on enter and removed on exit) and call :meth:`count_batch`
    once per batch.
    """

    def __init__(self, model: nn.Module, candidates: list[SiteModule]) -> None:
        modules = base_named_modules(model)
        self.candidates = candidates
        self.modules = [modules[c.name] for c in candidates]
        # Expert-level AUs (`ffn_inner` on fused MoE experts) are inside the module: read them from its inputs.
        self._expert_modules = {i: unwrap(m) for i, (c, m) in enumerate(zip(candidates, self.modules))
                                if c.position == "input" and fused_experts_axis(unwrap(m)) is not None}
        # The only state that outlives a batch: per device, the counts of the AUs of the modules on it (created on
        # the first batch), and the number of pairs counted.
        self.blocks: list[_DeviceCounts] = []
        self.num_pairs = 0
        self._handles: list[Any] = []
        self._reset_batch()

    # ------------------------------------------------------------------------------------------------ hooks

    def __enter__(self) -> "MomentumCounter":
        for i, (candidate, module) in enumerate(zip(self.candidates, self.modules)):
            if candidate.position == "input":
                handle = module.register_forward_pre_hook(functools.partial(self._input_hook, i), with_kwargs=True)
            else:
                handle = module.register_forward_hook(functools.partial(self._output_hook, i))
            self._handles.append(handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._reset_batch()

    def _input_hook(self, i: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if i in self._expert_modules:
            if self._last_token is not None:
                rows, last_token = self._index_on(args[0].device if args else kwargs["hidden_states"].device)
                experts = self._expert_modules[i]
                self._record(i, read_expert_units(experts, args, kwargs, rows * self._seq_len + last_token),
                             at_last_token=True)
            return
        if args:
            activation = args[0]
        else:
            activation = kwargs.get("hidden_states", next((v for v in kwargs.values() if torch.is_tensor(v)), None))
        self._record(i, activation)

    def _output_hook(self, i: int, module: nn.Module, args: tuple, output: Any) -> None:
        self._record(i, output if torch.is_tensor(output) else output[0])

    # ------------------------------------------------------------------------------------------------ counting

    def _reset_batch(self) -> None:
        self._last_token: Optional[torch.Tensor] = None  # [2B] index of each sequence's last non-padding token
        self._index: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # (rows, last_token) per device
        self._seq_len = 0
        self._last: list[Optional[torch.Tensor]] = [None] * len(self.candidates)  # this batch's [2B, width] slices
        self._remaining = 0

    def count_batch(self, run_forward: Callable[[], Any], last_token: torch.Tensor, seq_len: int) -> None:
        """Run one forward pass (``run_forward()``) over ``2B`` sequences and add its pairs to the counts.

        ``last_token[r]`` is the position of the last non-padding token of sequence ``r``; ``seq_len`` the padded
        length. The forward is cut short once every candidate module has been read.
        """
        if not self._handles:
            raise RuntimeError("MomentumCounter hooks are not registered; use it as `with MomentumCounter(...) as c:`.")
        if last_token.ndim != 1 or last_token.numel() % 2:
            raise ValueError(f"A batch holds 2B sequences (B positives, then B negatives); got {last_token.numel()}.")
        self._last_token = last_token.long()
        self._seq_len = seq_len
        self._remaining = len(self.candidates)
        try:
            try:
                run_forward()
            except _StopForward:
                pass
            missing = [c.name for c, last in zip(self.candidates, self._last) if last is None]
            if missing:
                raise RuntimeError(
                    f"The forward pass finished without running {len(missing)} candidate module(s), e.g. "
                    f"{missing[:3]}; their AUs cannot be counted. Choose sites/target_modules that the model's "
                    "forward actually calls."
                )
            self._accumulate(self._last, last_token.numel() // 2)
        finally:
            self._reset_batch()
        self.num_pairs += last_token.numel() // 2

    def _record(self, i: int, activation: Optional[torch.Tensor], at_last_token: bool = False) -> None:
        if self._last_token is None:  # a forward outside count_batch (e.g. the user's own call): not ours to count
            return
        candidate = self.candidates[i]
        if self._last[i] is not None:
            raise RuntimeError(
                f"{candidate.name} ran twice in one forward pass, so its last-token activation is ambiguous; "
                "AUSteer can only fit modules that run once per forward."
            )
        if not torch.is_tensor(activation):
            raise TypeError(f"Could not read a tensor from the {candidate.position} of {candidate.name}.")
        activation = activation.detach()
        self._last[i] = activation if at_last_token else self._last_token_slice(candidate, activation)  # [2B, width]
        self._remaining -= 1
        if self._remaining == 0:
            raise _StopForward

    def _last_token_slice(self, candidate: SiteModule, activation: torch.Tensor) -> torch.Tensor:
        """Each sequence's last-token activation; blocks such as MoE may see the tokens flattened to [2B·T, width]."""
        batch, seq_len = self._last_token.numel(), self._seq_len
        rows, last_token = self._index_on(activation.device)
        if activation.ndim == 3 and activation.shape == (batch, seq_len, candidate.width):
            return activation[rows, last_token]
        if activation.ndim == 2 and activation.shape == (batch * seq_len, candidate.width):
            return activation.index_select(0, rows * seq_len + last_token)
        raise RuntimeError(
            f"The {candidate.position} of {candidate.name} has shape {tuple(activation.shape)}; expected "
            f"[{batch}, {seq_len}, {candidate.width}] (sequences, tokens, AUs). This module does not carry one "
            "activation per token; pick another site or target module."
        )

    def _index_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._index:
            last_token = self._last_token.to(device)
            self._index[device] = (torch.arange(last_token.numel(), device=device), last_token)
        return self._index[device]

    def _accumulate(self, last: list[torch.Tensor], num_pairs: int) -> None:
        """Compare the batch's positives with its negatives, all modules of a device at once."""
        if not self.blocks:
            by_device: dict[torch.device, list[int]] = {}
            for i, tensor in enumerate(last):
                by_device.setdefault(tensor.device, []).append(i)
            self.blocks = [_DeviceCounts.empty(device, members, self.candidates)
                           for device, members in by_device.items()]
        for block in self.blocks:
            tensors = [last[i] for i in block.members]
            if any(t.device != block.device for t in tensors):
                raise RuntimeError("A candidate module changed device between batches; keep the model where it is "
                                   "during the fit.")
            if len({t.dtype for t in tensors}) > 1:  # promoting is exact, so comparisons do not change
                dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
                tensors = [t.to(dtype) for t in tensors]
            values = torch.cat(tensors, dim=1) if len(tensors) > 1 else tensors[0]  # [2B, AUs on this device]
            positive, negative = values[:num_pairs], values[num_pairs:]
            block.n_pos += (positive > negative).sum(0)
            block.n_neg += (positive < negative).sum(0)
            finite = torch.isfinite(values)
            block.n_nonfinite += (~(finite[:num_pairs] & finite[num_pairs:])).sum(0)

    def all_reduce(self) -> None:
        """Sum the counts of all processes (accelerate's ``PartialState``, as the data-parallel fit set it up) into
        every process.

        The counts are integers, so the sum does not depend on how the pairs were split: afterwards every process
        holds exactly the counts one process would have made of all pairs (on the CPU).
        """
        from accelerate import PartialState
        from accelerate.utils import reduce

        widths = [c.width for c in self.candidates]
        starts = [sum(widths[:i]) for i in range(len(widths))]
        counts = torch.zeros(3, sum(widths), dtype=torch.int64)  # n_pos, n_neg, n_nonfinite; a process may have none
        for i, module_counts in self._module_counts().items():
            counts[:, starts[i]:starts[i] + widths[i]] = torch.stack(module_counts).cpu()
        flat = torch.cat([counts.flatten(), torch.tensor([self.num_pairs])])  # [3 * AUs + 1]
        # The process's own device: nccl only reduces GPU tensors, gloo takes CPU ones.
        flat = reduce(flat.to(PartialState().device), reduction="sum").cpu()
        counts = flat[:-1].view(3, -1)
        self.blocks = [_DeviceCounts(torch.device("cpu"), list(range(len(self.candidates))), starts,
                                     counts[0].clone(), counts[1].clone(), counts[2].clone())]
        self.num_pairs = int(flat[-1])

    # ------------------------------------------------------------------------------------------------ result

    def _module_counts(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Module index -> (n_pos, n_neg, n_nonfinite) slices of its device's counts."""
        counts = {}
        for block in self.blocks:
            for i, start in zip(block.members, block.offsets):
                end = start + self.candidates[i].width
                counts[i] = (block.n_pos[start:end], block.n_neg[start:end], block.n_nonfinite[start:end])
        return counts

    def nonfinite_modules(self) -> list[str]:
        """Modules where some pair had a NaN/inf activation (such pairs count as ties)."""
        counts = self._module_counts()
        return [c.name for i, c in enumerate(self.candidates) if i in counts and int(counts[i][2].max()) > 0]

    def to_scores(self, model: nn.Module, config: AUSteerConfig) -> "MomentumScores":
        """The counts so far, moved to the CPU, as MomentumScores."""
        if self.num_pairs == 0:
            raise ValueError("No pairs were counted; there is nothing to build MomentumScores from.")
        counts = self._module_counts()
        return MomentumScores(
            modules=list(self.candidates),
            n_pos={c.name: counts[i][0].cpu().clone() for i, c in enumerate(self.candidates)},
            n_neg={c.name: counts[i][1].cpu().clone() for i, c in enumerate(self.candidates)},
            num_pairs=self.num_pairs,
            model_type=getattr(getattr(model, "config", None), "model_type", None),
            sites=list(config.sites) if config.target_modules is None else None,
            target_modules=config.target_modules,
            position=config.position,
        )


@dataclass
class _DeviceCounts:
    """The counts of all AUs of the candidate modules on one device, modules side by side in model order."""

    device: torch.device
    members: list[int]  # candidate indices of the modules on this device
    offsets: list[int]  # where each member's AUs start
    n_pos: torch.Tensor  # int64 [AUs on this device]: #(x_pos > x_neg)
    n_neg: torch.Tensor  # int64 [AUs on this device]: #(x_pos < x_neg)
    n_nonfinite: torch.Tensor  # int64 [AUs on this device]: pairs with a NaN/inf on either side

    @classmethod
    def empty(cls, device: torch.device, members: list[int], candidates: list[SiteModule]) -> "_DeviceCounts":
        widths = [candidates[i].width for i in members]
        offsets = [sum(widths[:j]) for j in range(len(widths))]

        def zeros():
            return torch.zeros(sum(widths), dtype=torch.int64, device=device)

        return cls(device, members, offsets, zeros(), zeros(), zeros())
