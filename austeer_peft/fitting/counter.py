"""The sign counter of a fit pass: every candidate AU read at each sequence's last real token (by
:mod:`austeer_peft.fitting.activations`) turns a batch of contrastive pairs straight into int64 counts, summed over
processes after a data-parallel fit, and restored from a checkpoint after a crash.

What the counts mean (scores, top-k, γ, files) is :mod:`austeer_peft.fitting.scores`, which never sees a model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..tuner.config import AUSteerConfig
from ..tuner.sites import SiteModule
from .activations import LastTokenReader
from .scores import MomentumScores


class MomentumCounter:
    """Streams batches of contrastive pairs into per-AU counts ``#(x_pos > x_neg)`` and ``#(x_pos < x_neg)``.

    A batch holds ``2B`` sequences: the B positives first, then their B negatives in the same order. A
    :class:`~austeer_peft.fitting.activations.LastTokenReader` keeps, for every candidate module, only the
    activation at each sequence's last non-padding token (``[2B, width]``) and stops the forward after the last
    candidate; the batch's slices are then compared in one go per device: positives against negatives, adding the
    sign counts to int64 vectors on that device (so a model dispatched over several devices never moves activations
    between them). Ties (equal activations) add to neither count; they only count in ``N``. Nothing outlives a
    batch but the counts.

    Use it as a context manager (hooks are registered on enter and removed on exit) and call :meth:`count_batch`
    once per batch.
    """

    def __init__(self, model: nn.Module, candidates: list[SiteModule]) -> None:
        self.candidates = candidates
        self.reader = LastTokenReader(model, candidates)
        # The only state that outlives a batch: per device, the counts of the AUs of the modules on it (created on
        # the first batch), the number of pairs counted, and counts resumed from a checkpoint (CPU, [3, AUs]).
        self.blocks: list[_DeviceCounts] = []
        self.num_pairs = 0
        self.resumed: Optional[torch.Tensor] = None

    def __enter__(self) -> "MomentumCounter":
        self.reader.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self.reader.__exit__(*exc_info)

    # ------------------------------------------------------------------------------------------------ counting

    def count_batch(self, run_forward: Callable[[], Any], last_token: torch.Tensor, seq_len: int,
                    prefill: Optional[Callable[[], Any]] = None, pair_indices: Optional[list[int]] = None) -> None:
        """Run one forward pass (``run_forward()``) over ``2B`` sequences and add its pairs to the counts.

        ``last_token[r]`` is the position of the last non-padding token of sequence ``r``; ``seq_len`` the padded
        length. ``prefill`` (a shared prompt filling a KV cache) runs first and is not read. The forward is cut
        short once every candidate module has been read. A batch that fails (e.g. out of memory) adds nothing.
        Counts do not depend on which pairs a batch holds, so ``pair_indices`` is not needed.
        """
        last = self.reader.read(run_forward, last_token, seq_len, prefill)
        self._accumulate(last, last_token.numel() // 2)
        self.num_pairs += last_token.numel() // 2

    def _accumulate(self, last: list[torch.Tensor], num_pairs: int) -> None:
        """Compare the batch's positives with its negatives, all modules of a device at once."""
        if not self.blocks:
            by_device: dict[torch.device, list[int]] = {}
            for i, tensor in enumerate(last):
                by_device.setdefault(tensor.device, []).append(i)
            self.blocks = [_DeviceCounts.empty(device, members, self.candidates)
                           for device, members in by_device.items()]
        increments = []  # all computed before any is added: a batch that fails midway adds nothing
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
            finite = torch.isfinite(values)
            increments.append(((positive > negative).sum(0), (positive < negative).sum(0),
                               (~(finite[:num_pairs] & finite[num_pairs:])).sum(0)))
        for block, (more, less, nonfinite) in zip(self.blocks, increments):
            block.n_pos += more
            block.n_neg += less
            block.n_nonfinite += nonfinite

    def all_reduce(self) -> None:
        """Sum the counts of all processes (accelerate's ``PartialState``, as the data-parallel fit set it up) into
        every process.

        The counts are integers, so the sum does not depend on how the pairs were split: afterwards every process
        holds exactly the counts one process would have made of all pairs (on the CPU).
        """
        from accelerate import PartialState
        from accelerate.utils import reduce

        flat = torch.cat([self.flat_counts().flatten(), torch.tensor([self.num_pairs])])  # [3 * AUs + 1]
        # The process's own device: nccl only reduces GPU tensors, gloo takes CPU ones.
        flat = reduce(flat.to(PartialState().device), reduction="sum").cpu()
        self.set_counts(flat[:-1].view(3, -1), int(flat[-1]))

    def flat_counts(self) -> torch.Tensor:
        """All counts on the CPU as int64 ``[3, AUs]`` (n_pos, n_neg, n_nonfinite; modules in candidate order)."""
        widths = [c.width for c in self.candidates]
        starts = [sum(widths[:i]) for i in range(len(widths))]
        counts = torch.zeros(3, sum(widths), dtype=torch.int64)  # a process may have counted no batch
        for block in self.blocks:
            for i, start in zip(block.members, block.offsets):
                end = start + widths[i]
                counts[:, starts[i]:starts[i] + widths[i]] = torch.stack(
                    [block.n_pos[start:end], block.n_neg[start:end], block.n_nonfinite[start:end]]).cpu()
        return counts if self.resumed is None else counts + self.resumed

    def set_counts(self, counts: torch.Tensor, num_pairs: int) -> None:
        """Replace all counts by ``counts`` (``[3, AUs]``, as :meth:`flat_counts` gives) over ``num_pairs`` pairs;
        batches counted afterwards add to them (a resumed fit)."""
        widths = [c.width for c in self.candidates]
        if tuple(counts.shape) != (3, sum(widths)) or counts.dtype != torch.int64:
            raise ValueError(f"Counts of shape {tuple(counts.shape)} ({counts.dtype}) do not fit these candidates: "
                             f"expected int64 [3, {sum(widths)}].")
        self.blocks, self.resumed, self.num_pairs = [], counts.clone(), num_pairs

    # ------------------------------------------------------------------------------------------------ result

    def _module_counts(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Module index -> its (n_pos, n_neg, n_nonfinite), on the CPU."""
        counts, start = self.flat_counts(), 0
        result = {}
        for i, candidate in enumerate(self.candidates):
            part = counts[:, start:start + candidate.width]
            result[i] = (part[0], part[1], part[2])
            start += candidate.width
        return result

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
