"""fit_austeer: contrastive pairs in, a steered PeftModel and the full momentum table out.

One pass over the pairs with the unsteered model: each batch runs its pairs' shared prompts once (KV cache) and then
the B positive and B negative continuations in one forward (pairs without a shared prompt: full sequences), hooks turn
the last-token activations into sign counts (see :mod:`austeer_peft.fitting.activations` and
:mod:`austeer_peft.fitting.counter`), and every forward stops right after the last candidate module. The top-k AUs by
discriminative score become the adapter. A checkpoint makes the pass resumable
(:mod:`austeer_peft.fitting.checkpoint`); a batch that runs out of memory is retried in halves.

Scaling out runs on the existing engines. A model dispatched with ``device_map`` (accelerate hooks, offload) is read
and counted on each layer's own device. Under ``torchrun`` / ``accelerate launch`` every process passes the same
pairs; each counts its share of the batches and the integer counts are summed over the processes (accelerate's
``PartialState``, see :mod:`austeer_peft.fitting.inputs`), so every process ends with the scores (and adapter) of a
single-process fit, byte for byte. Tokenizing, padding and batching are :mod:`austeer_peft.fitting.inputs` too.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..hub.export import save_adapter
from ..tuner.config import AUSteerConfig
from ..tuner.sites import candidate_modules
from . import inputs
from .auto import AUTO_ALPHAS, AUTO_KS, choose_k_alpha, split_folds
from .activations import can_share_prompts, read_pairs
from .checkpoint import CountsCheckpoint, fingerprint, process_path
from .counter import MomentumCounter
from .pairs import as_text_pairs
from .scores import MomentumScores


@dataclass
class FitResult:
    """What a fit returns: the steered model and the momentum table it was selected from.

    ``scores.to_adapter(k, alpha, model)`` builds an adapter for any other ``(k, α)`` without another pass.
    """

    peft_model: Any  # peft.PeftModel
    scores: MomentumScores
    auto: Optional[Any] = None  # austeer_peft.fitting.auto.AutoChoice when k or alpha was "auto"

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs) -> Path:
        """Save the adapter with its AUSteer model card (``austeer_peft.save_adapter``; ``kwargs`` go to
        ``save_pretrained``, e.g. ``is_main_process``). ``peft_model.save_pretrained`` writes PEFT's generic card."""
        return save_adapter(self.peft_model, save_directory, **kwargs)


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
    share_prompts: bool = True,
    checkpoint: Union[str, os.PathLike, None] = None,
    checkpoint_every: int = 10,
) -> FitResult:
    """Fit an AUSteer adapter: count activation momentum on contrastive pairs, keep the top-k AUs, set γ from α.

    Args:
        model: a causal LM (also one dispatched with ``device_map``), or a PeftModel with AUSteer adapters (its
            adapters are disabled while counting; the fitted adapter is added to it and made active).
        tokenizer: the model's tokenizer; its ``padding_side`` is used for batching.
        pairs: ``(positive, negative)`` texts, ``(prompt, chosen, rejected)`` triples, or a ``datasets.Dataset`` with
            ``prompt``/``chosen``/``rejected`` columns (see :mod:`austeer_peft.fitting.pairs`).
        sites: ``"attention"``, ``"ffn"``, ``"ffn_inner"``, ``"residual"`` or a list of them (default attention).
        k: number of AUs to steer (top-k over all layers and sites), or ``"auto"``.
        alpha: steering strength α; ``γ = α·r_pos`` for promoting AUs, ``-α·r_neg`` for suppressing ones; or
            ``"auto"``. With ``"auto"``, up to ``auto_heldout`` pairs (keeping the mix of answers) are held out one
            at a time (or in ``auto_folds`` folds); each is scored under the steer counted on all other pairs (the
            counting is still one pass), for every cell of a grid (k in 1, 4, 16, 64; α in 5..100), and the cell
            under which the held-out pairs most prefer their positive continuation is kept, with the counts of all pairs
            (``auto_criterion``: ``"accuracy"``, the share of pairs preferring the positive; ``"preference"``, mean
            ``log σ(margin)``; or ``"margin"``, the plain mean log-likelihood margin); see :mod:`austeer_peft.fitting.auto`.
        target_modules, position: instead of ``sites``, module names whose input/output carries the AUs.
        batch_size: pairs per forward pass (each forward holds ``2 * batch_size`` sequences).
        max_length: longer sequences are cut from the left (the last token, where activations are read, survives);
            default: the tokenizer's / model's maximum length.
        chat_template: render each prompt as a user turn through the tokenizer's chat template (with the generation
            prompt) and append the answer to it.
        adapter_name: name of the fitted adapter.
        progress: show a progress bar over batches (on the main process only).
        distributed: split the pairs over the processes of accelerate's ``PartialState`` and sum their counts.
            Default: yes when it sees more than one process (``torchrun`` / ``accelerate launch`` started them; it sets
            up torch.distributed's process group if nobody has yet). Every process must
            pass the same pairs and arguments, and every process gets the same result; ``False`` fits each process
            on its own pairs. Only the main process should write files: ``scores.save`` does so by itself,
            ``save_pretrained`` takes ``is_main_process``.
        share_prompts: run the prompt two texts of a pair start with once (KV cache) and both continuations from
            it; the counts are those of the full sequences. Pairs without a shared prompt, and models whose forward
            takes no ``past_key_values``/``position_ids``, run full sequences. ``False``: full sequences always.
        checkpoint: a file (``counts.safetensors``) to write the partial counts to every ``checkpoint_every``
            batches and at the end; a fit started again with the same pairs and arguments resumes from it (one
            file per process in a data-parallel fit). Not with ``k="auto"``/``alpha="auto"``.

    Returns:
        FitResult with ``peft_model`` (the model wrapped with the fitted adapter; the base model is modified in place,
        as ``get_peft_model`` does) and ``scores`` (the full MomentumScores).
    """
    if k == "auto" or alpha == "auto":
        if checkpoint is not None:
            raise ValueError("`checkpoint` is not supported with k='auto' or alpha='auto' (they count several folds). "
                             "Resume a fixed (k, alpha) fit, or checkpoint compute_momentum and choose from its scores.")
        return _fit_auto(model, tokenizer, pairs, sites, k, alpha, target_modules=target_modules, position=position,
                         batch_size=batch_size, max_length=max_length, chat_template=chat_template,
                         adapter_name=adapter_name, progress=progress, distributed=distributed,
                         criterion=auto_criterion, folds=auto_folds, max_heldout=auto_heldout,
                         share_prompts=share_prompts)
    config = AUSteerConfig(sites=sites, target_modules=target_modules, position=position, k=k, alpha=alpha)
    candidates = candidate_modules(inputs.base_model(model), config)
    num_aus = sum(c.width for c in candidates)
    if config.k > num_aus:  # fail before the (expensive) pass
        raise ValueError(f"k={config.k} is larger than the number of candidate AUs ({num_aus} over {len(candidates)} "
                         f"modules of sites {config.sites or config.target_modules}); use k <= {num_aus} or add sites.")
    scores = compute_momentum(model, tokenizer, pairs, config=config, batch_size=batch_size, max_length=max_length,
                              chat_template=chat_template, progress=progress, distributed=distributed,
                              share_prompts=share_prompts, checkpoint=checkpoint, checkpoint_every=checkpoint_every)
    peft_model = scores.to_adapter(config.k, config.alpha, model, adapter_name=adapter_name)
    return FitResult(peft_model=peft_model, scores=scores)


def _fit_auto(model, tokenizer, pairs, sites, k, alpha, *, target_modules, position, batch_size, max_length,
              chat_template, adapter_name, progress, distributed, criterion, folds, max_heldout,
              share_prompts) -> FitResult:
    """``fit_austeer`` with ``k="auto"`` and/or ``alpha="auto"``: count each fold and the rest (one pass over all
    pairs), choose on the folds, keep the counts of all pairs."""
    config = AUSteerConfig(sites=sites, target_modules=target_modules, position=position,
                           k=1 if k == "auto" else k, alpha=1.0 if alpha == "auto" else alpha)  # checks the fixed one
    never_heldout, heldout = split_folds(as_text_pairs(pairs, tokenizer, chat_template=chat_template), folds,
                                         max_heldout)
    count = functools.partial(compute_momentum, model, tokenizer, config=config, batch_size=batch_size,
                              max_length=max_length, progress=progress, distributed=distributed,
                              share_prompts=share_prompts)
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
    share_prompts: bool = True,
    checkpoint: Union[str, os.PathLike, None] = None,
    checkpoint_every: int = 10,
) -> MomentumScores:
    """The counting pass of :func:`fit_austeer` alone: MomentumScores for all candidate AUs, no adapter.

    Arguments are those of :func:`fit_austeer`; ``config`` (an AUSteerConfig) may replace sites/target_modules/position.
    """
    if config is None:
        config = AUSteerConfig(sites=sites, target_modules=target_modules, position=position)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive integer (pairs per forward pass), got {batch_size!r}.")
    base_model = inputs.base_model(model)
    candidates = candidate_modules(base_model, config)

    text_pairs = as_text_pairs(pairs, tokenizer, chat_template=chat_template)
    token_pairs = inputs.tokenize_pairs(tokenizer, text_pairs,
                                        max_length=inputs.resolve_max_length(max_length, tokenizer, base_model))
    inputs.check_distinct(token_pairs)

    pad_id, padding_side = inputs.pad_token_id(tokenizer), getattr(tokenizer, "padding_side", "right")
    share_prompts = _check_flag("share_prompts", share_prompts) and can_share_prompts(base_model)
    batches = inputs.plan_batches(token_pairs, batch_size, pad_id, padding_side, share_prompts)
    share = inputs.data_parallel_share(distributed, token_pairs, candidates, batch_size)
    if share is not None:
        rank, world_size = share
        batches = inputs.shard_batches(batches, rank, world_size)
        progress = progress and rank == 0

    counter = MomentumCounter(base_model, candidates)
    saver, done = None, set()
    if checkpoint is not None:
        key = fingerprint(token_pairs, candidates, batch_size=batch_size, share_prompts=share_prompts, share=share,
                          padding_side=padding_side, model=_model_identity(base_model))
        saver = CountsCheckpoint(process_path(checkpoint, share), key, len(batches), checkpoint_every)
        done = saver.restore(counter)
    todo = [i for i in range(len(batches)) if i not in done]
    with contextlib.ExitStack() as stack:
        stack.enter_context(inputs.unsteered(model))
        stack.enter_context(inputs.eval_mode(base_model))
        stack.enter_context(torch.inference_mode())
        stack.enter_context(counter)
        read_pairs(base_model, [batches[i] for i in todo], counter.count_batch, token_pairs=token_pairs,
                   pad_id=pad_id, padding_side=padding_side, progress=progress, desc="AUSteer activation momentum",
                   on_batch_done=None if saver is None else lambda j: saver.batch_done(todo[j], counter))
    if saver is not None:
        saver.save(counter)
    if share is not None:
        counter.all_reduce()

    nonfinite = counter.nonfinite_modules()
    if nonfinite:
        warnings.warn(
            f"NaN/inf activations were read in {len(nonfinite)} module(s), e.g. {nonfinite[:3]}; they count as ties, "
            "which lowers those AUs' scores. Fit in a wider dtype (e.g. float32 or bfloat16 instead of float16).",
            stacklevel=2,
        )
    return counter.to_scores(base_model, config)


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def _model_identity(model: nn.Module) -> dict:
    """What a checkpoint remembers of the model: its type, where it came from, its shape and dtype."""
    config = getattr(model, "config", None)
    parameter = next(model.parameters(), None)
    return {"model_type": getattr(config, "model_type", None), "name": getattr(config, "_name_or_path", None),
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": None if parameter is None else str(parameter.dtype)}
