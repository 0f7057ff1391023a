"""fit_austeer: contrastive pairs in, a steered PeftModel and the full momentum table out.

One pass over the pairs with the unsteered model: each batch puts B positives and their B negatives through one
forward, hooks turn the last-token activations into sign counts (see :mod:`austeer_peft.momentum`), and the forward
stops right after the last candidate module. The top-k AUs by discriminative score become the adapter.

Scaling out runs on the existing engines. A model dispatched with ``device_map`` (accelerate hooks, offload) is read
and counted on each layer's own device. Under ``torchrun`` / ``accelerate launch`` every process passes the same
pairs; each counts its share of the batches and the integer counts are summed with ``torch.distributed``, so every
process ends with the scores (and adapter) of a single-process fit, byte for byte.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import operator
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..tuner.config import AUSteerConfig
from .scores import MomentumCounter, MomentumScores
from .pairs import as_text_pairs
from ..tuner.sites import candidate_modules


@dataclass
class FitResult:
    """What a fit returns: the steered model and the momentum table it was selected from.

    ``scores.to_adapter(k, alpha, model)`` builds an adapter for any other ``(k, α)`` without another pass.
    """

    peft_model: Any  # peft.PeftModel
    scores: MomentumScores
    auto: Optional[Any] = None  # austeer_peft.auto.AutoChoice when k or alpha was "auto"


@dataclass
class Batch:
    """One forward's worth of pairs: rows ``[0, B)`` are the positives, rows ``[B, 2B)`` their negatives."""

    input_ids: torch.Tensor  # [2B, T]
    attention_mask: torch.Tensor  # [2B, T]
    position_ids: torch.Tensor  # [2B, T], counted from each sequence's first real token
    last_token: torch.Tensor  # [2B], position of each sequence's last real token
    pair_indices: list[int]  # which pairs (indices into the input) this batch holds


def fit_austeer(
    model: nn.Module,
    tokenizer: Any,
    pairs: Any,
    sites: Union[str, list[str], None] = None,
    k: Union[int, str] = 100,
    alpha: Union[float, str] = 15.0,
    *,
    target_modules: Union[str, list[str], None] = None,
    position: str = "output",
    batch_size: int = 16,
    max_length: Optional[int] = None,
    chat_template: bool = False,
    adapter_name: str = "default",
    progress: bool = True,
    distributed: Optional[bool] = None,
    auto_criterion: str = "accuracy",
    auto_folds: Optional[int] = None,
    auto_heldout: int = 128,
) -> FitResult:
    """Fit an AUSteer adapter: count activation momentum on contrastive pairs, keep the top-k AUs, set γ from α.

    Args:
        model: a causal LM (also one dispatched with ``device_map``), or a PeftModel with AUSteer adapters (its
            adapters are disabled while counting; the fitted adapter is added to it and made active).
        tokenizer: the model's tokenizer; its ``padding_side`` is used for batching.
        pairs: ``(positive, negative)`` texts, ``(prompt, chosen, rejected)`` triples, or a ``datasets.Dataset`` with
            ``prompt``/``chosen``/``rejected`` columns (see :mod:`austeer_peft.pairs`).
        sites: ``"attention"``, ``"ffn"``, ``"ffn_inner"``, ``"residual"`` or a list of them (default attention).
        k: number of AUs to steer (top-k over all layers and sites), or ``"auto"``.
        alpha: steering strength α; ``γ = α·r_pos`` for promoting AUs, ``-α·r_neg`` for suppressing ones; or
            ``"auto"``. With ``"auto"``, up to ``auto_heldout`` pairs (keeping the mix of answers) are held out one
            at a time (or in ``auto_folds`` folds); each is scored under the steer counted on all other pairs (the
            counting is still one pass), for every cell of a grid (k in 1, 4, 16, 64; α in 5..100), and the cell
            under which the held-out pairs most prefer their positive continuation is kept, with the counts of all pairs
            (``auto_criterion``: ``"accuracy"``, the share of pairs preferring the positive; ``"preference"``, mean
            ``log σ(margin)``; or ``"margin"``, the plain mean log-likelihood margin); see :mod:`austeer_peft.auto`.
        target_modules, position: instead of ``sites``, module names whose input/output carries the AUs.
        batch_size: pairs per forward pass (each forward holds ``2 * batch_size`` sequences).
        max_length: longer sequences are cut from the left (the last token, where activations are read, survives);
            default: the tokenizer's / model's maximum length.
        chat_template: render each prompt as a user turn through the tokenizer's chat template (with the generation
            prompt) and append the answer to it.
        adapter_name: name of the fitted adapter.
        progress: show a progress bar over batches (on the main process only).
        distributed: split the pairs over the processes of torch.distributed's default group and sum their counts.
            Default: yes when that group has more than one process (set up through accelerate's ``PartialState``
            when ``torchrun`` / ``accelerate launch`` started the processes and nobody has yet). Every process must
            pass the same pairs and arguments, and every process gets the same result; ``False`` fits each process
            on its own pairs. Only the main process should write files: ``scores.save`` does so by itself,
            ``save_pretrained`` takes ``is_main_process``.

    Returns:
        FitResult with ``peft_model`` (the model wrapped with the fitted adapter; the base model is modified in place,
        as ``get_peft_model`` does) and ``scores`` (the full MomentumScores).
    """
    if k == "auto" or alpha == "auto":
        return _fit_auto(model, tokenizer, pairs, sites, k, alpha, target_modules=target_modules, position=position,
                         batch_size=batch_size, max_length=max_length, chat_template=chat_template,
                         adapter_name=adapter_name, progress=progress, distributed=distributed,
                         criterion=auto_criterion, folds=auto_folds, max_heldout=auto_heldout)
    config = AUSteerConfig(sites=sites, target_modules=target_modules, position=position, k=k, alpha=alpha)
    candidates = candidate_modules(_base_model(model), config)
    num_aus = sum(c.width for c in candidates)
    if config.k > num_aus:  # fail before the (expensive) pass
        raise ValueError(f"k={config.k} is larger than the number of candidate AUs ({num_aus} over {len(candidates)} "
                         f"modules of sites {config.sites or config.target_modules}); use k <= {num_aus} or add sites.")
    scores = compute_momentum(model, tokenizer, pairs, config=config, batch_size=batch_size, max_length=max_length,
                              chat_template=chat_template, progress=progress, distributed=distributed)
    peft_model = scores.to_adapter(config.k, config.alpha, model, adapter_name=adapter_name)
    return FitResult(peft_model=peft_model, scores=scores)


def _fit_auto(model, tokenizer, pairs, sites, k, alpha, *, target_modules, position, batch_size, max_length,
              chat_template, adapter_name, progress, distributed, criterion, folds, max_heldout) -> FitResult:
    """``fit_austeer`` with ``k="auto"`` and/or ``alpha="auto"``: count each fold and the rest (one pass over all
    pairs), choose on the folds, keep the counts of all pairs."""
    from .auto import AUTO_ALPHAS, AUTO_KS, choose_k_alpha, split_folds

    config = AUSteerConfig(sites=sites, target_modules=target_modules, position=position,
                           k=1 if k == "auto" else k, alpha=1.0 if alpha == "auto" else alpha)  # checks the fixed one
    never_heldout, heldout = split_folds(as_text_pairs(pairs, tokenizer, chat_template=chat_template), folds,
                                         max_heldout)
    count = functools.partial(compute_momentum, model, tokenizer, config=config, batch_size=batch_size,
                              max_length=max_length, progress=progress, distributed=distributed)
    heldout_bar = tqdm(heldout, desc="AUSteer momentum, held-out folds", unit="fold", disable=not progress)
    fold_counts = [count(fold, progress=False) for fold in heldout_bar]  # one bar, not one per fold
    scores = functools.reduce(operator.add, fold_counts)
    if never_heldout:
        scores = scores + count(never_heldout)
    choice, peft_model = choose_k_alpha(model, tokenizer, scores, list(zip(fold_counts, heldout)),
                                        ks=AUTO_KS if k == "auto" else [config.k],
                                        alphas=AUTO_ALPHAS if alpha == "auto" else [config.alpha],
                                        criterion=criterion, batch_size=batch_size, adapter_name=adapter_name,
                                        progress=progress)
    return FitResult(peft_model=peft_model, scores=scores, auto=choice)


def compute_momentum(
    model: nn.Module,
    tokenizer: Any,
    pairs: Any,
    sites: Union[str, list[str], None] = None,
    *,
    target_modules: Union[str, list[str], None] = None,
    position: str = "output",
    config: Optional[AUSteerConfig] = None,
    batch_size: int = 16,
    max_length: Optional[int] = None,
    chat_template: bool = False,
    progress: bool = True,
    distributed: Optional[bool] = None,
) -> MomentumScores:
    """The counting pass of :func:`fit_austeer` alone: MomentumScores for all candidate AUs, no adapter.

    Arguments are those of :func:`fit_austeer`; ``config`` (an AUSteerConfig) may replace sites/target_modules/position.
    """
    if config is None:
        config = AUSteerConfig(sites=sites, target_modules=target_modules, position=position)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive integer (pairs per forward pass), got {batch_size!r}.")
    base_model = _base_model(model)
    candidates = candidate_modules(base_model, config)

    text_pairs = as_text_pairs(pairs, tokenizer, chat_template=chat_template)
    token_pairs = tokenize_pairs(tokenizer, text_pairs, max_length=_max_length(max_length, tokenizer, base_model))
    _check_distinct(token_pairs)

    pad_id = _pad_token_id(tokenizer)
    padding_side = getattr(tokenizer, "padding_side", "right")
    accepts_position_ids = _accepts(base_model, "position_ids")
    device = _input_device(base_model)
    batches = list(make_batches(token_pairs, batch_size, pad_id, padding_side))
    shard = _data_parallel_shard(distributed, token_pairs, candidates, batch_size)
    if shard is not None:
        rank, world_size = shard
        batches = shard_batches(batches, rank, world_size)
        progress = progress and rank == 0

    counter = MomentumCounter(base_model, candidates)
    with contextlib.ExitStack() as stack:
        if _is_peft_model(model):
            stack.enter_context(model.disable_adapter())
        stack.enter_context(_eval_mode(base_model))
        stack.enter_context(torch.inference_mode())
        stack.enter_context(counter)
        for batch in tqdm(batches, desc="AUSteer activation momentum", unit="batch", disable=not progress):
            inputs = {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device),
                      "use_cache": False}
            if accepts_position_ids:
                inputs["position_ids"] = batch.position_ids.to(device)
            counter.count_batch(lambda: base_model(**inputs), batch.last_token, batch.input_ids.shape[1])
    if shard is not None:
        counter.all_reduce()

    nonfinite = counter.nonfinite_modules()
    if nonfinite:
        warnings.warn(
            f"NaN/inf activations were read in {len(nonfinite)} module(s), e.g. {nonfinite[:3]}; they count as ties, "
            "which lowers those AUs' scores. Fit in a wider dtype (e.g. float32 or bfloat16 instead of float16).",
            stacklevel=2,
        )
    return counter.to_scores(base_model, config)


# ---------------------------------------------------------------------------------------------------- tokens


def tokenize_pairs(tokenizer: Any, text_pairs: list[tuple[str, str]],
                   max_length: Optional[int]) -> list[tuple[list[int], list[int]]]:
    """Token ids of each pair's two texts, as the model sees them in use (with the tokenizer's special tokens).

    A text rendered by a chat template already starts with BOS, so a second BOS added by the tokenizer is dropped.
    Too-long texts lose tokens on the left so that the last token, where activations are read, survives.
    """
    texts = [text for pair in text_pairs for text in pair]
    ids = [list(sequence) for sequence in tokenizer(texts)["input_ids"]]
    bos_id = getattr(tokenizer, "bos_token_id", None)
    truncated = 0
    for index, sequence in enumerate(ids):
        if bos_id is not None and len(sequence) >= 2 and sequence[0] == sequence[1] == bos_id:
            sequence = ids[index] = sequence[1:]
        if not sequence:
            pair, side = divmod(index, 2)
            raise ValueError(f"Pair {pair}: the {'negative' if side else 'positive'} text tokenizes to no tokens.")
        if max_length is not None and len(sequence) > max_length:
            ids[index] = sequence[-max_length:]
            truncated += 1
    if truncated:
        warnings.warn(f"{truncated} of {len(texts)} texts are longer than max_length={max_length} tokens and were "
                      "truncated from the left (their last tokens, where activations are read, are kept).",
                      stacklevel=3)
    return [(list(ids[2 * j]), list(ids[2 * j + 1])) for j in range(len(text_pairs))]


def _check_distinct(token_pairs: list[tuple[list[int], list[int]]]) -> None:
    identical = [j for j, (positive, negative) in enumerate(token_pairs) if positive == negative]
    if len(identical) == len(token_pairs):
        raise ValueError("In every pair the positive and negative texts are identical (as tokens), so no AU can "
                         "separate them. Each pair needs a correct/preferred and a wrong/rejected answer.")
    if identical:
        warnings.warn(f"{len(identical)} of {len(token_pairs)} pairs have identical positive and negative texts (e.g. "
                      f"pairs {identical[:5]}); they only dilute the scores. Remove or fix them.", stacklevel=3)


def make_batches(token_pairs: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                 padding_side: str = "right") -> Iterator[Batch]:
    """Batches of pairs, longest first (less padding; any memory error shows on the first batch).

    The order of pairs does not change the counts (they are sums), so sorting is free; it is stable, so the batches
    themselves are deterministic too.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"tokenizer.padding_side must be 'left' or 'right', got {padding_side!r}.")
    order = sorted(range(len(token_pairs)), key=lambda j: -max(len(token_pairs[j][0]), len(token_pairs[j][1])))
    for start in range(0, len(order), batch_size):
        pair_indices = order[start:start + batch_size]
        sequences = [token_pairs[j][0] for j in pair_indices] + [token_pairs[j][1] for j in pair_indices]
        seq_len = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), seq_len), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), seq_len), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            if padding_side == "right":
                input_ids[row, :len(sequence)] = torch.tensor(sequence)
                attention_mask[row, :len(sequence)] = 1
            else:
                input_ids[row, seq_len - len(sequence):] = torch.tensor(sequence)
                attention_mask[row, seq_len - len(sequence):] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        lengths = attention_mask.sum(-1)
        last_token = lengths - 1 if padding_side == "right" else torch.full_like(lengths, seq_len - 1)
        yield Batch(input_ids, attention_mask, position_ids, last_token, pair_indices)


def shard_batches(batches: list[Batch], rank: int, world_size: int) -> list[Batch]:
    """This process's share of the batches: each batch, longest first, goes to the process with the fewest padded
    tokens so far (ties: the lower rank). Every process computes the same split, and the work comes out even."""
    loads = [0] * world_size
    mine = []
    for batch in batches:
        target = loads.index(min(loads))
        loads[target] += batch.input_ids.numel()
        if target == rank:
            mine.append(batch)
    return mine


def _max_length(max_length: Optional[int], tokenizer: Any, model: nn.Module) -> Optional[int]:
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
            raise ValueError(f"`max_length` must be a positive integer, got {max_length!r}.")
        return max_length
    limits = []
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and tokenizer_limit < 10**7:  # transformers uses a huge int for "no limit"
        limits.append(tokenizer_limit)
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions"):
        model_limit = getattr(config, name, None)
        if isinstance(model_limit, int) and model_limit > 0:
            limits.append(model_limit)
            break
    return min(limits) if limits else None


def _pad_token_id(tokenizer: Any) -> int:
    for token_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(token_id, int):
            return token_id
    return 0  # any id works: padded positions are masked out and never read


# ---------------------------------------------------------------------------------------------------- processes

LAUNCHER_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _data_parallel_shard(distributed: Optional[bool], token_pairs: list[tuple[list[int], list[int]]],
                         candidates: list, batch_size: int) -> Optional[tuple[int, int]]:
    """(rank, world size) when this fit is one of several processes that split the pairs, else None."""
    if distributed is not None and not isinstance(distributed, bool):
        raise ValueError(f"`distributed` must be None (auto), True or False, got {distributed!r}.")
    if distributed is False:
        return None
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    # torchrun and `accelerate launch` on GPUs set WORLD_SIZE; `accelerate launch --cpu` (mpirun) sets the others.
    launched = max(int(os.environ.get(name, "1")) for name in LAUNCHER_WORLD_SIZE_VARIABLES)
    if not initialized and launched > 1:
        # Started by a launcher, but nobody set up the process group: accelerate does it (gloo on CPU, nccl on
        # GPUs), as the transformers Trainer would.
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
        initialized = dist.is_initialized()
    if not initialized:
        if distributed:
            raise ValueError(
                "distributed=True needs a torch.distributed process group, and none is set up. Start the script with "
                "`torchrun --nproc_per_node N script.py` or `accelerate launch script.py`, or call "
                "`torch.distributed.init_process_group()` first."
            )
        return None
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if world_size == 1:
        return None
    # Every process must split the very same batches, or pairs would be counted twice or not at all.
    setup = json.dumps([batch_size, [(c.name, c.width) for c in candidates], token_pairs])
    mine = (len(token_pairs), hashlib.sha256(setup.encode()).hexdigest())
    everyone = [None] * world_size
    dist.all_gather_object(everyone, mine)
    if len(set(everyone)) > 1:
        raise ValueError(
            f"fit_austeer runs on {world_size} processes (torch.distributed), but they were given different pairs or "
            f"settings (number of pairs per process: {[n for n, _ in everyone]}). Pass the same full list of pairs, "
            "sites, batch_size and max_length on every process: the fit splits the pairs by rank itself. To fit each "
            "process on its own pairs instead, pass distributed=False."
        )
    return rank, world_size


# ---------------------------------------------------------------------------------------------------- model


def _is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if _is_peft_model(model) else model


def _accepts(model: nn.Module, argument: str) -> bool:
    parameters = inspect.signature(model.forward).parameters
    return argument in parameters


def _input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embedding's execution device (accelerate dispatch) or its weight's device."""
    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    execution_device = getattr(hook, "execution_device", None)
    if execution_device is not None:
        return torch.device(execution_device)
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the pass; modules that were training are put back afterwards."""
    training = [module for module in model.modules() if module.training]
    model.eval()
    try:
        yield
    finally:
        for module in training:
            module.training = True  # not .train(): that would also flip children that were in eval mode
