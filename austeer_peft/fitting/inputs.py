"""Model inputs, the one place for them: tokenizing pairs, padding, batching, which device inputs go to, and which
share of the batches this process runs.

The fit, the automatic (k, α), evaluation and the CAA baseline all feed token ids to a causal LM the same way: left-
or right-padded rows with an attention mask and position ids counted from each row's first real token, so a row's
result does not depend on what it is batched with. Keeping that here means one rule for all of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

PADDING_SIDES = ("left", "right")


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


def check_distinct(token_pairs: list[tuple[list[int], list[int]]]) -> None:
    """Refuse pairs whose two texts are all the same tokens; warn about some."""
    identical = [j for j, (positive, negative) in enumerate(token_pairs) if positive == negative]
    if len(identical) == len(token_pairs):
        raise ValueError("In every pair the positive and negative texts are identical (as tokens), so no AU can "
                         "separate them. Each pair needs a correct/preferred and a wrong/rejected answer.")
    if identical:
        warnings.warn(f"{len(identical)} of {len(token_pairs)} pairs have identical positive and negative texts (e.g. "
                      f"pairs {identical[:5]}); they only dilute the scores. Remove or fix them.", stacklevel=3)


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    """How many leading items (token ids, or characters of two strings) ``a`` and ``b`` share."""
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared


def resolve_max_length(max_length: Optional[int], tokenizer: Any, model: nn.Module) -> Optional[int]:
    """``max_length`` if given (checked), else the smaller of the tokenizer's and the model's limits, else None."""
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


def pad_token_id(tokenizer: Any) -> int:
    """The id padded positions get: the pad token, else EOS, else 0 (padded positions are masked and never read)."""
    for token_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(token_id, int):
            return token_id
    return 0


# ---------------------------------------------------------------------------------------------------- padding


def pad(sequences: Sequence[Sequence[int]], pad_id: int, padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Token id lists as one padded batch: ``input_ids``, ``attention_mask`` and ``position_ids`` (counted from each
    row's first real token), all ``[rows, longest]``.

    torch's ``pad_sequence`` rather than ``tokenizer.pad``: the latter refuses tokenizers without a pad token (GPT-2,
    Llama), which are padded here with EOS, and has no position ids.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"tokenizer.padding_side must be 'left' or 'right', got {padding_side!r}.")
    rows = [torch.tensor(sequence, dtype=torch.long) for sequence in sequences]
    input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side=padding_side)
    attention_mask = pad_sequence([torch.ones_like(row) for row in rows], batch_first=True, padding_value=0,
                                  padding_side=padding_side)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


@dataclass
class Batch:
    """One forward's worth of pairs: rows ``[0, B)`` are the positives, rows ``[B, 2B)`` their negatives."""

    input_ids: torch.Tensor  # [2B, T]
    attention_mask: torch.Tensor  # [2B, T]
    position_ids: torch.Tensor  # [2B, T], counted from each sequence's first real token
    last_token: torch.Tensor  # [2B], position of each sequence's last real token
    pair_indices: list[int]  # which pairs (indices into the input) this batch holds

    def model_inputs(self, device: torch.device, position_ids: bool = True) -> dict[str, Any]:
        """Keyword arguments of the model's forward, on ``device``, without a KV cache."""
        inputs = {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device),
                  "use_cache": False}
        if position_ids:
            inputs["position_ids"] = self.position_ids.to(device)
        return inputs

    @property
    def cost(self) -> int:
        """Padded tokens this batch puts through the model."""
        return self.input_ids.numel()


def make_batches(token_pairs: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                 padding_side: str = "right") -> Iterator[Batch]:
    """Batches of pairs, longest first (less padding; any memory error shows on the first batch).

    The order of pairs does not change the counts (they are sums), so sorting is free; it is stable, so the batches
    themselves are deterministic too.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"tokenizer.padding_side must be 'left' or 'right', got {padding_side!r}.")
    order = sorted(range(len(token_pairs)), key=lambda j: -max(len(token_pairs[j][0]), len(token_pairs[j][1])))
    for start in range(0, len(order), batch_size):
        yield full_batch(token_pairs, order[start:start + batch_size], pad_id, padding_side)


def full_batch(token_pairs: list[tuple[list[int], list[int]]], pair_indices: list[int], pad_id: int,
               padding_side: str) -> Batch:
    """The pairs ``pair_indices`` as one batch of full sequences."""
    sequences = [token_pairs[j][0] for j in pair_indices] + [token_pairs[j][1] for j in pair_indices]
    padded = pad(sequences, pad_id, padding_side)
    seq_len = padded["input_ids"].shape[1]
    lengths = padded["attention_mask"].sum(-1)
    last_token = lengths - 1 if padding_side == "right" else torch.full_like(lengths, seq_len - 1)
    return Batch(padded["input_ids"], padded["attention_mask"], padded["position_ids"], last_token, list(pair_indices))


# ---------------------------------------------------------------------------------------------------- shared prompts

MIN_SHARED_TOKENS = 2  # a lone BOS is no prompt: sharing it would cost a forward and save nothing


def shared_prompt_length(positive: Sequence[int], negative: Sequence[int]) -> int:
    """Tokens both texts of a pair start with and that can be computed once: their common prefix, less at least
    the last token of each text (where activations are read). 0 when the pair has no prompt worth sharing."""
    shared = min(common_prefix_length(positive, negative), len(positive) - 1, len(negative) - 1)
    return shared if shared >= MIN_SHARED_TOKENS else 0


@dataclass
class SharedPromptBatch:
    """Pairs that share a prompt: the prompts run once (left-padded, filling a KV cache), then the ``2B``
    continuations (right-padded, B positives then their B negatives) run from that cache, twice repeated.

    Left-padded prompts followed by right-padded continuations keep each row's real tokens contiguous, so the last
    token sees exactly the tokens (and positions) it sees in the full sequence; the tokenizer's padding side does not
    matter here.
    """

    prompt_ids: torch.Tensor  # [B, P], left-padded
    prompt_mask: torch.Tensor  # [B, P]
    prompt_positions: torch.Tensor  # [B, P]
    continuation_ids: torch.Tensor  # [2B, C], right-padded
    continuation_mask: torch.Tensor  # [2B, C]
    continuation_positions: torch.Tensor  # [2B, C], each row's prompt length onwards
    last_token: torch.Tensor  # [2B], last real token of each continuation (index into C)
    pair_indices: list[int]

    def prompt_inputs(self, device: torch.device, cache: Any, cache_argument: str = "cache") -> dict[str, Any]:
        """The prompts' forward, filling ``cache`` (passed as ``cache_argument``: transformers 5 calls it ``cache``,
        older models ``past_key_values``)."""
        return {"input_ids": self.prompt_ids.to(device), "attention_mask": self.prompt_mask.to(device),
                "position_ids": self.prompt_positions.to(device), cache_argument: cache, "use_cache": True}

    def continuation_inputs(self, device: torch.device, cache: Any, cache_argument: str = "cache") -> dict[str, Any]:
        """The continuations' forward from the prompts' ``cache`` (repeated to ``2B`` rows)."""
        mask = torch.cat([self.prompt_mask.repeat(2, 1), self.continuation_mask], dim=1)  # [2B, P + C]
        return {"input_ids": self.continuation_ids.to(device), "attention_mask": mask.to(device),
                "position_ids": self.continuation_positions.to(device), cache_argument: cache, "use_cache": True}

    @property
    def cost(self) -> int:
        return self.prompt_ids.numel() + self.continuation_ids.numel()


def shared_prompt_batch(token_pairs: list[tuple[list[int], list[int]]], pair_indices: list[int],
                        pad_id: int) -> SharedPromptBatch:
    """The pairs ``pair_indices`` (each with a prompt to share) as one shared-prompt batch."""
    shared = [shared_prompt_length(*token_pairs[j]) for j in pair_indices]
    if not all(shared):
        raise ValueError("shared_prompt_batch needs pairs that share a prompt; see shared_prompt_length.")
    prompts = pad([token_pairs[j][0][:n] for j, n in zip(pair_indices, shared)], pad_id, "left")
    continuations = pad([token_pairs[j][0][n:] for j, n in zip(pair_indices, shared)]
                        + [token_pairs[j][1][n:] for j, n in zip(pair_indices, shared)], pad_id, "right")
    lengths = continuations["attention_mask"].sum(-1)
    offsets = torch.tensor(shared + shared).unsqueeze(1)  # [2B, 1]
    positions = offsets + torch.arange(continuations["input_ids"].shape[1])  # [2B, C]
    return SharedPromptBatch(prompts["input_ids"], prompts["attention_mask"], prompts["position_ids"],
                             continuations["input_ids"], continuations["attention_mask"], positions, lengths - 1,
                             list(pair_indices))


PairBatch = Union[Batch, SharedPromptBatch]


def plan_batches(token_pairs: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                 padding_side: str = "right", share_prompts: bool = True) -> list[PairBatch]:
    """All batches of a pass: pairs that share a prompt in shared-prompt batches, the others (or all, with
    ``share_prompts=False``) in full-sequence ones, each kind longest first.

    Deterministic: the same pairs and settings always give the same batches (a checkpoint counts on it).
    """
    if not share_prompts:
        return list(make_batches(token_pairs, batch_size, pad_id, padding_side))
    shared = [j for j, pair in enumerate(token_pairs) if shared_prompt_length(*pair)]
    alone = sorted(set(range(len(token_pairs))) - set(shared))
    shared.sort(key=lambda j: -len(token_pairs[j][0]) - len(token_pairs[j][1]))
    batches: list[PairBatch] = [shared_prompt_batch(token_pairs, shared[start:start + batch_size], pad_id)
                                for start in range(0, len(shared), batch_size)]
    batches += [full_batch(token_pairs, [alone[i] for i in batch.pair_indices], pad_id, padding_side)
                for batch in make_batches([token_pairs[j] for j in alone], batch_size, pad_id, padding_side)]
    return batches


def rebatch(batch: PairBatch, token_pairs: list[tuple[list[int], list[int]]], size: int, pad_id: int,
            padding_side: str) -> list[PairBatch]:
    """``batch`` as consecutive batches of at most ``size`` pairs, of the same kind (to retry after running out of
    memory). They are the batches a pass planned at ``size`` would make when ``size`` divides the planned size."""
    chunks = [batch.pair_indices[start:start + size] for start in range(0, len(batch.pair_indices), size)]
    if isinstance(batch, SharedPromptBatch):
        return [shared_prompt_batch(token_pairs, chunk, pad_id) for chunk in chunks]
    return [full_batch(token_pairs, chunk, pad_id, padding_side) for chunk in chunks]


# ---------------------------------------------------------------------------------------------------- processes


def data_parallel_share(distributed: Optional[bool], token_pairs: list[tuple[list[int], list[int]]],
                        candidates: list, batch_size: int) -> Optional[tuple[int, int]]:
    """(process index, number of processes) when this fit is one of several processes that split the batches, else
    None.

    accelerate's ``PartialState`` says which process this is, and sets up the process group when a launcher
    (``torchrun``, ``accelerate launch``) started the processes and nobody has yet: gloo on CPU, nccl on GPUs, as
    the transformers Trainer would. A group set up by hand without a launcher's environment is not seen by it; each
    process then counts all pairs itself, which gives the same scores.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise ValueError(f"`distributed` must be None (auto), True or False, got {distributed!r}.")
    if distributed is False:
        return None
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState(cpu=not torch.cuda.is_available())  # on CPU, accelerate only sets up gloo when told so
    if state.num_processes == 1:
        if distributed:
            raise ValueError(
                "distributed=True needs several processes started by a launcher, and this is the only one. Start the "
                "script with `torchrun --nproc_per_node N script.py` or `accelerate launch script.py`."
            )
        return None
    # Every process must split the very same batches, or pairs would be counted twice or not at all.
    setup = json.dumps([batch_size, [(c.name, c.width) for c in candidates], token_pairs])
    everyone = gather_object([(len(token_pairs), hashlib.sha256(setup.encode()).hexdigest())])
    if len(set(everyone)) > 1:
        raise ValueError(
            f"fit_austeer runs on {state.num_processes} processes, but they were given different pairs or settings "
            f"(number of pairs per process: {[n for n, _ in everyone]}). Pass the same full list of pairs, sites, "
            "batch_size and max_length on every process: the fit splits the pairs by rank itself. To fit each "
            "process on its own pairs instead, pass distributed=False."
        )
    return state.process_index, state.num_processes


def shard_batches(batches: list[PairBatch], rank: int, world_size: int) -> list[PairBatch]:
    """This process's share of the batches: each batch, longest first, goes to the process with the fewest padded
    tokens so far (ties: the lower rank). Every process computes the same split, and the work comes out even.

    Not ``PartialState.split_between_processes``: it hands out equal numbers of consecutive items, so with batches
    sorted longest first the first process would get the longest ones. (Any split gives the same sums.)
    """
    loads = [0] * world_size
    mine = []
    for batch in batches:
        target = loads.index(min(loads))
        loads[target] += batch.cost
        if target == rank:
            mine.append(batch)
    return mine


def is_main_process() -> bool:
    """Whether this process writes files: accelerate's main process once ``PartialState`` is set up with several
    processes (a data-parallel fit sets it up), else rank 0 of a torch.distributed group set up otherwise, else True.

    It never sets up a process group itself: a save that only the main process calls would wait for the others
    forever.
    """
    import torch.distributed as dist
    from accelerate import PartialState

    if PartialState._shared_state and PartialState().num_processes > 1:
        return PartialState().is_main_process
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ---------------------------------------------------------------------------------------------------- model


def is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel, or ``model`` itself."""
    return model.get_base_model() if is_peft_model(model) else model


def accepts(model: nn.Module, argument: str) -> bool:
    """Whether ``model.forward`` takes ``argument`` (e.g. ``position_ids``, ``logits_to_keep``)."""
    return argument in inspect.signature(model.forward).parameters


def input_device(model: nn.Module) -> torch.device:
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


def unsteered(model: nn.Module) -> contextlib.AbstractContextManager:
    """``model`` with its adapters disabled for the pass. PEFT's ``disable_adapter`` refuses a PeftModel whose
    adapters wrap no module (e.g. an AUSteer adapter with no AUs, when no steer shipped), which is unsteered as is."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if is_peft_model(model) and any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        return model.disable_adapter()
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the pass; modules that were training are put back afterwards."""
    training = [module for module in model.modules() if module.training]
    model.eval()
    try:
        yield
    finally:
        for module in training:
            module.training = True  # not .train(): that would also flip children that were in eval mode
