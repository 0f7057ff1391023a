"""Activation momentum (paper Section 4.1): per-AU sign counts of ``x_pos - x_neg`` over contrastive pairs.

Two objects live here:

* :class:`MomentumCounter` reads every candidate AU at the last non-padding token of each sequence through forward
  hooks and turns a batch straight into integer counts, so nothing whose size depends on the number of pairs is ever
  kept. It stops the forward pass as soon as the last candidate module has been read.
* :class:`MomentumScores` is the only product of a fit pass: the counts, ``N`` and what the counted modules are. Every
  adapter, for any ``(k, α)``, is derived from it without touching the model again.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..tuner.config import AUSteerConfig
from ..tuner.experts import fused_experts_axis, read_expert_units
from ..tuner.aus import AU
from ..tuner.sites import SiteModule, base_named_modules, candidate_modules, unwrap

SCORES_FORMAT = "austeer-momentum"
SCORES_FORMAT_VERSION = "2"  # 2: all metadata in one entry (1: one entry per field)


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
        """Sum the counts of all processes of torch.distributed's default group into every process.

        The counts are integers, so the sum does not depend on how the pairs were split: afterwards every process
        holds exactly the counts one process would have made of all pairs (on the CPU).
        """
        import torch.distributed as dist

        widths = [c.width for c in self.candidates]
        starts = [sum(widths[:i]) for i in range(len(widths))]
        counts = torch.zeros(3, sum(widths), dtype=torch.int64)  # n_pos, n_neg, n_nonfinite; a process may have none
        for i, module_counts in self._module_counts().items():
            counts[:, starts[i]:starts[i] + widths[i]] = torch.stack(module_counts).cpu()
        flat = torch.cat([counts.flatten(), torch.tensor([self.num_pairs])])
        # nccl only reduces GPU tensors; gloo (and a "cpu:gloo,cuda:nccl" group) takes CPU ones.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else flat.device
        flat = flat.to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.cpu()
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


@dataclass(eq=False)
class MomentumScores:
    """The full activation-momentum table of a fit: for every candidate AU, how often its positive activation was
    above (``n_pos``) and below (``n_neg``) the negative one over ``num_pairs`` pairs.

    ``r_pos = n_pos / N``, ``r_neg = n_neg / N`` and the discriminative score ``s = max(r_pos, r_neg)``. Because counts
    are kept for all AUs, an adapter for any ``(k, α)`` comes from :meth:`select` / :meth:`to_adapter` without
    another forward pass.

    Attributes:
        modules: the candidate modules, in model order (name, site, layer, position, width).
        n_pos, n_neg: module name -> int64 tensor ``[width]`` of sign counts.
        num_pairs: N, the number of contrastive pairs counted (ties count here only).
        model_type: ``config.model_type`` of the model the counts come from.
        sites, target_modules, position: how the candidates were chosen, to rebuild the adapter config.
    """

    modules: list[SiteModule]
    n_pos: dict[str, torch.Tensor]
    n_neg: dict[str, torch.Tensor]
    num_pairs: int
    model_type: Optional[str] = None
    sites: Optional[list[str]] = None
    target_modules: Optional[Union[list[str], str]] = None
    position: str = "output"
    _flat_cache: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [m.name for m in self.modules]
        for counts, label in ((self.n_pos, "n_pos"), (self.n_neg, "n_neg")):
            if list(counts) != names:
                raise ValueError(f"MomentumScores.{label} must have one entry per module, in module order.")
            for module in self.modules:
                tensor = counts[module.name]
                if tensor.shape != (module.width,) or tensor.dtype != torch.int64:
                    raise ValueError(f"{label}[{module.name!r}] must be an int64 tensor of shape [{module.width}].")
        if self.num_pairs <= 0:
            raise ValueError(f"MomentumScores needs num_pairs > 0, got {self.num_pairs}.")

    # ------------------------------------------------------------------------------------------------ views

    @property
    def num_aus(self) -> int:
        """Number of candidate AUs (all dimensions of all counted modules)."""
        return sum(m.width for m in self.modules)

    def r_pos(self, module: str) -> torch.Tensor:
        return self.n_pos[module].double() / self.num_pairs

    def r_neg(self, module: str) -> torch.Tensor:
        return self.n_neg[module].double() / self.num_pairs

    def score(self, module: str) -> torch.Tensor:
        """Discriminative score ``s = max(r_pos, r_neg)`` of every AU of a module."""
        return torch.maximum(self.n_pos[module], self.n_neg[module]).double() / self.num_pairs

    def _flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All AUs in model order: (module index, dim, n_pos, n_neg)."""
        if self._flat_cache is None:
            module_index = torch.cat([torch.full((m.width,), i, dtype=torch.int64) for i, m in enumerate(self.modules)])
            dims = torch.cat([torch.arange(m.width) for m in self.modules])
            n_pos = torch.cat([self.n_pos[m.name] for m in self.modules])
            n_neg = torch.cat([self.n_neg[m.name] for m in self.modules])
            self._flat_cache = (module_index, dims, n_pos, n_neg)
        return self._flat_cache

    def _top(self, k: int) -> torch.Tensor:
        """Flat positions of the top-k AUs.

        Ranking: higher ``s`` first; among equal ``s``, the module that comes first in the model, then the lower
        dimension. (AUs are laid out in exactly that order, so a stable sort on ``-s`` implements the tie-break.)
        """
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"`k` must be a positive integer (the number of AUs to steer), got {k!r}.")
        if k > self.num_aus:
            raise ValueError(
                f"k={k} is larger than the number of candidate AUs ({self.num_aus} over {len(self.modules)} modules); "
                f"use k <= {self.num_aus} or add sites."
            )
        _, _, n_pos, n_neg = self._flat()
        s = torch.maximum(n_pos, n_neg)  # integer numerator of s: ranks exactly like s, with no float ties
        return torch.sort(-s, stable=True).indices[:k]

    def select(self, k: int, alpha: float) -> list[AU]:
        """The top-k AUs with their γ, best first: ``γ = α·r_pos`` if ``r_pos > r_neg``, else ``-α·r_neg``."""
        alpha = _check_alpha(alpha)
        top = self._top(k)
        module_index, dims, n_pos, n_neg = self._flat()
        aus = []
        for position in top.tolist():
            module = self.modules[int(module_index[position])]
            pos, neg = int(n_pos[position]), int(n_neg[position])
            aus.append(AU(module.name, int(dims[position]), adaptive_gamma(pos, neg, self.num_pairs, alpha)))
        top_counts = torch.maximum(n_pos[top], n_neg[top])
        if int(top_counts[0]) == 0:
            raise ValueError(
                "No AU separates positives from negatives (every activation momentum is zero: each pair's two texts "
                "give identical activations). Check that the positive and negative texts of each pair differ."
            )
        silent = int((top_counts == 0).sum())
        if silent:
            warnings.warn(
                f"{silent} of the k={k} selected AUs never separated a pair (s = 0, γ = 0); only {k - silent} AUs "
                "will steer. Use a smaller k or more (and more varied) pairs.",
                stacklevel=2,
            )
        return aus

    def layer_distribution(self, k: int) -> dict[tuple[str, Optional[int]], int]:
        """How many of the top-k AUs sit at each (site, layer), for every candidate (site, layer) including empty
        ones: sites in the order they were requested, then layers in order.

        Modules chosen by ``target_modules`` have no site; their key is (module name, layer), in model order.
        """
        module_index = self._flat()[0]
        chosen = Counter(int(module_index[p]) for p in self._top(k).tolist())
        distribution: dict[tuple[str, Optional[int]], int] = {}
        for i, module in enumerate(self.modules):
            key = (module.site or module.name, module.layer)
            distribution[key] = distribution.get(key, 0) + chosen.get(i, 0)
        if self.sites:
            site_rank = {site: rank for rank, site in enumerate(self.sites)}

            def site_then_layer(item):
                (site, layer), _ = item
                return site_rank.get(site, len(site_rank)), -1 if layer is None else layer

            distribution = dict(sorted(distribution.items(), key=site_then_layer))
        return distribution

    def __repr__(self) -> str:
        sites = self.sites if self.sites is not None else f"target_modules={self.target_modules!r}"
        return (f"MomentumScores(num_pairs={self.num_pairs}, modules={len(self.modules)}, aus={self.num_aus}, "
                f"sites={sites}, model_type={self.model_type!r})")

    def __add__(self, other: "MomentumScores") -> "MomentumScores":
        """The counts of both sets of pairs together (counts are sums over pairs, so this equals one pass over both)."""
        return self._combined(other, 1)

    def __sub__(self, other: "MomentumScores") -> "MomentumScores":
        """The counts without ``other``'s pairs, which must be part of these (e.g. a held-out fold)."""
        return self._combined(other, -1)

    def _combined(self, other: "MomentumScores", sign: int) -> "MomentumScores":
        if not isinstance(other, MomentumScores):
            return NotImplemented
        if other.modules != self.modules or other.model_type != self.model_type:
            raise ValueError("These MomentumScores were counted on other modules or another model "
                             f"({other!r} vs {self!r}); only counts of the same candidates can be added or subtracted.")
        n_pos = {name: counts + sign * other.n_pos[name] for name, counts in self.n_pos.items()}
        n_neg = {name: counts + sign * other.n_neg[name] for name, counts in self.n_neg.items()}
        num_pairs = self.num_pairs + sign * other.num_pairs
        if num_pairs == 0:
            raise ValueError(f"Subtracting {other!r} from {self!r} leaves no pairs to count on.")
        if num_pairs < 0 or any(bool((c < 0).any()) for c in (*n_pos.values(), *n_neg.values())):
            raise ValueError(f"Cannot subtract {other!r} from {self!r}: its pairs are not part of these counts.")
        return replace(self, n_pos=n_pos, n_neg=n_neg, num_pairs=num_pairs)

    # ------------------------------------------------------------------------------------------------ adapters

    def adapter_config(self, k: int, alpha: float) -> AUSteerConfig:
        """The AUSteerConfig these counts were taken for, with the given k and α."""
        if self.target_modules is not None:
            return AUSteerConfig(target_modules=self.target_modules, position=self.position, k=k, alpha=alpha)
        return AUSteerConfig(sites=list(self.sites), k=k, alpha=alpha)

    def to_adapter(self, k: int, alpha: float, model: nn.Module, adapter_name: str = "default"):
        """An AUSteer adapter with the top-k AUs at strength α, without another forward pass.

        ``model`` is the base model the counts come from (it gets wrapped in place by ``get_peft_model``, as with
        any PEFT method), or a PeftModel with AUSteer adapters: then the adapter is added (or, if ``adapter_name``
        exists with the same sites, its AUs are replaced) and made the active adapter. Returns the PeftModel.
        """
        from peft import PeftModel, get_peft_model

        config = self.adapter_config(k, alpha)
        aus = self.select(k, alpha)
        if isinstance(model, PeftModel):
            base = model.get_base_model()
            self._check_model(base, config)
            existing = model.peft_config.get(adapter_name)
            if existing is None:
                model.add_adapter(adapter_name, config)
            elif not isinstance(existing, AUSteerConfig):
                raise ValueError(
                    f"Adapter {adapter_name!r} of this PeftModel is a {existing.peft_type} adapter, not AUSteer. Pass "
                    "another `adapter_name`, or the base model (`merge_and_unload()` first)."
                )
            elif (existing.sites, existing.target_modules, existing.position) != \
                    (config.sites, config.target_modules, config.position):
                raise ValueError(
                    f"Adapter {adapter_name!r} steers sites={existing.sites} target_modules={existing.target_modules},"
                    f" but these scores were counted on sites={config.sites} target_modules={config.target_modules}. "
                    "Pass another `adapter_name`."
                )
            else:
                existing.k, existing.alpha = config.k, config.alpha
            model.set_aus(aus, adapter_name=adapter_name)
            model.set_adapter(adapter_name)
            return model
        self._check_model(model, config)
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
        peft_model.set_aus(aus, adapter_name=adapter_name)
        return peft_model

    def _check_model(self, model: nn.Module, config: AUSteerConfig) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if self.model_type and model_type and model_type != self.model_type:
            raise ValueError(
                f"These momentum scores were counted on a {self.model_type!r} model, not on this {model_type!r} model."
            )
        expected = [(m.name, m.width) for m in self.modules]
        found = [(m.name, m.width) for m in candidate_modules(model, config)]
        if found != expected:
            raise ValueError(
                f"The model's candidate modules do not match the scores' ({len(found)} vs {len(expected)} modules, "
                f"e.g. {found[:1]} vs {expected[:1]}); use the model the scores were counted on."
            )

    # ------------------------------------------------------------------------------------------------ files

    def save(self, path: Union[str, Path], is_main_process: Optional[bool] = None) -> None:
        """Write the counts to one safetensors file; what they count (modules, N, sites) goes in one JSON metadata
        entry, since safetensors writes several entries in an arbitrary order and the file should be reproducible.

        After a distributed fit every process holds the same scores, and only the main one writes: rank 0 of
        torch.distributed's default group (or any process without one) unless ``is_main_process`` says otherwise,
        as in PEFT's ``save_pretrained(..., is_main_process=...)``. Other processes return at once; one that reads
        the file must wait for the main process first (e.g. ``torch.distributed.barrier()``).
        """
        from safetensors.torch import save_file

        if is_main_process is None:
            is_main_process = _is_main_process()
        if not is_main_process:
            return
        tensors = {}
        for module in self.modules:
            tensors[f"n_pos/{module.name}"] = self.n_pos[module.name].contiguous()
            tensors[f"n_neg/{module.name}"] = self.n_neg[module.name].contiguous()
        header = {
            "version": SCORES_FORMAT_VERSION,
            "num_pairs": self.num_pairs,
            "model_type": self.model_type,
            "sites": self.sites,
            "target_modules": self.target_modules,
            "position": self.position,
            "modules": [[m.name, m.site, m.layer, m.position, m.width] for m in self.modules],
        }
        save_file(tensors, str(path), metadata={SCORES_FORMAT: json.dumps(header)})

    @classmethod
    def load(cls, path: Union[str, Path]) -> "MomentumScores":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if SCORES_FORMAT in metadata:
                header = json.loads(metadata[SCORES_FORMAT])
            elif metadata.get("format") == SCORES_FORMAT:  # version 1: one entry per field, most JSON-encoded
                header = {k: v if k in ("version", "position") else json.loads(v)
                          for k, v in metadata.items() if k != "format"}
            else:
                raise ValueError(f"{path} is not an AUSteer momentum-scores file (no {SCORES_FORMAT!r} metadata).")
            if header.get("version") not in ("1", SCORES_FORMAT_VERSION):
                raise ValueError(f"{path} has scores format version {header.get('version')!r}; this austeer_peft "
                                 f"reads versions 1 and {SCORES_FORMAT_VERSION}. Update austeer_peft.")
            modules = [SiteModule(name, site, layer, position, width)
                       for name, site, layer, position, width in header["modules"]]
            n_pos = {m.name: handle.get_tensor(f"n_pos/{m.name}") for m in modules}
            n_neg = {m.name: handle.get_tensor(f"n_neg/{m.name}") for m in modules}
        return cls(modules=modules, n_pos=n_pos, n_neg=n_neg, num_pairs=int(header["num_pairs"]),
                   model_type=header["model_type"], sites=header["sites"], target_modules=header["target_modules"],
                   position=header["position"])


def _is_main_process() -> bool:
    """Rank 0 of torch.distributed's default process group, or True without one."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def adaptive_gamma(n_pos: int, n_neg: int, num_pairs: int, alpha: float) -> float:
    """AUSteer's adaptive γ of one AU: ``α·r_pos`` if ``r_pos > r_neg``, else ``-α·r_neg``."""
    return alpha * n_pos / num_pairs if n_pos > n_neg else -alpha * n_neg / num_pairs


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"`alpha` must be a finite number > 0 (typical range 1..100), got {alpha!r}.")
    return float(alpha)
