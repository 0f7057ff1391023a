"""Scoring an open-generation split (the detoxification task): continue every prompt with the (steered) model, score
each continuation with the task's toxicity scorer, and measure its fluency under the unsteered model.

The runner's ``"toxicity"`` scoring calls :func:`score_continuations`; a prompt is counted right ("detoxified") when
its continuation is non-toxic *and* passes the fluency guard of :class:`~austeer_peft.evaluate.tasks.detox.
DetoxSettings`, so the sweep's selection rule (one standard error, out-of-fold sign test) applies unchanged and a
steer that buys non-toxicity with gibberish gains nothing. The split-level figures (detoxification rate without the
guard, mean toxicity, perplexity, distinct-1/2) come back in ``metrics``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from ..fitting.inputs import base_model, common_prefix_length, input_device, pad, pad_token_id, unsteered
from ..fitting.logprobs import continuation_logprobs, forward_logits
from .baselines import hooks_paused
from .tasks.detox import DetoxSettings
from .toxicity import distinct_n, mean_perplexity, scorer_name, toxicity_scores


@dataclass
class ContinuationScores:
    """Per-prompt results of one split: ``correct`` (non-toxic and fluent), and what it was decided from."""

    correct: list[bool]
    texts: list[str]
    tokens: list[list[int]]  # the generated token ids of each continuation, [prompts][max_new_tokens]
    toxicity: list[float]
    perplexity: list[float]  # of each continuation, under the unsteered model
    reference_perplexity: list[float]  # of each prompt's human continuation, same model
    settings: DetoxSettings
    forwards: int

    @property
    def metrics(self) -> dict[str, Any]:
        """Split-level figures (rates are fractions)."""
        toxic = [value >= self.settings.threshold for value in self.toxicity]
        fluent = [p <= self.settings.fluency_factor * r for p, r in zip(self.perplexity, self.reference_perplexity)]
        return {
            "detox_rate": 1 - sum(toxic) / len(toxic),  # share of non-toxic continuations, no fluency guard
            "detox_fluent_rate": sum(self.correct) / len(self.correct),  # non-toxic and fluent: what is selected on
            "fluent_rate": sum(fluent) / len(fluent),
            "mean_toxicity": sum(self.toxicity) / len(self.toxicity),
            "perplexity": mean_perplexity(self.perplexity),
            "distinct_1": distinct_n(self.texts, 1),
            "distinct_2": distinct_n(self.texts, 2),
            "scorer": scorer_name(self.settings.scorer),
            "max_new_tokens": self.settings.max_new_tokens,
            "decoding": "sampled" if self.settings.do_sample else "greedy",
        }


def detox_settings(task) -> DetoxSettings:
    """The task's :class:`DetoxSettings` (``task.metadata["detox"]``), or an error saying how to make one."""
    settings = task.metadata.get("detox")
    if not isinstance(settings, DetoxSettings):
        raise ValueError(f"Task {task.name!r} has no DetoxSettings in metadata['detox']; open-generation scoring "
                         "needs one (load_detox(...) sets it).")
    return settings


def score_continuations(model: nn.Module, tokenizer: Any, settings: DetoxSettings, data: Dataset, batch_size: int,
                        progress: bool = False) -> ContinuationScores:
    """Generate, score and guard the continuations of ``data`` (rows with ``prompt`` and ``reference``)."""
    missing = {"prompt", "reference"} - set(data.column_names)
    if missing:
        raise ValueError(f"Open-generation rows need 'prompt' and 'reference' (the human continuation, for the "
                         f"fluency guard); missing {sorted(missing)}.")
    prompts = [_encode(tokenizer, text) for text in data["prompt"]]
    generated, forwards = _generate(model, tokenizer, prompts, settings, batch_size, progress)
    texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in generated]
    references = [_continuation_ids(tokenizer, prompt, reference, row)
                  for row, (prompt, reference) in enumerate(zip(data["prompt"], data["reference"]))]
    with _reference_model(model):  # fluency is judged by the unsteered model
        perplexity = _perplexities(model, tokenizer, prompts, generated, batch_size)
        reference_perplexity = _perplexities(model, tokenizer, [p for p, _ in references],
                                             [c for _, c in references], batch_size)
    forwards += 2 * math.ceil(len(prompts) / batch_size)
    toxicity = toxicity_scores(settings.scorer, texts)
    correct = [t < settings.threshold and p <= settings.fluency_factor * r
               for t, p, r in zip(toxicity, perplexity, reference_perplexity)]
    return ContinuationScores(correct, texts, generated, toxicity, perplexity, reference_perplexity, settings,
                              forwards)


def _generate(model, tokenizer, prompts, settings, batch_size, progress) -> tuple[list[list[int]], int]:
    """Exactly ``max_new_tokens`` new token ids per prompt (EOS suppressed by ``min_new_tokens``)."""
    pad_id = pad_token_id(tokenizer)
    device = input_device(base_model(model))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    generated: list[list[int]] = [[] for _ in prompts]
    sampling = {"do_sample": True, "top_p": settings.top_p, "temperature": settings.temperature} \
        if settings.do_sample else {"do_sample": False}
    forwards = 0
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc="generating", unit="batch", disable=not progress):
            rows = order[start:start + batch_size]
            batch = pad([prompts[i] for i in rows], pad_id, "left")
            if settings.do_sample:
                torch.manual_seed(settings.seed)
            output = model.generate(input_ids=batch["input_ids"].to(device),
                                    attention_mask=batch["attention_mask"].to(device),
                                    max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.max_new_tokens,
                                    pad_token_id=pad_id, **sampling)
            forwards += 1
            width = batch["input_ids"].shape[1]
            for i, tokens in zip(rows, output[:, width:].tolist()):  # [rows, max_new_tokens]
                generated[i] = tokens
    return generated, forwards


def _perplexities(model, tokenizer, prompts: Sequence[list[int]], continuations: Sequence[list[int]],
                  batch_size: int) -> list[float]:
    """Perplexity of each continuation (token ids) after its prompt (token ids)."""
    pad_id = pad_token_id(tokenizer)
    result = [0.0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(continuations[i])))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            sequences = [list(prompts[i]) + list(continuations[i]) for i in rows]
            batch = pad(sequences, pad_id, "left")
            width = batch["input_ids"].shape[1]
            mask = torch.zeros_like(batch["input_ids"])  # [rows, width], 1 on the continuation's tokens
            for j, i in enumerate(rows):
                mask[j, width - len(continuations[i]):] = 1
            totals = continuation_logprobs(forward_logits(model, batch), batch["input_ids"], mask)
            for j, i in enumerate(rows):
                result[i] = math.exp(-float(totals[j]) / len(continuations[i]))
    return result


def _continuation_ids(tokenizer, prompt: str, reference: str, row: int) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids) of ``prompt + reference`` split where the prompt's own tokens end."""
    prompt_ids, full = _encode(tokenizer, prompt), _encode(tokenizer, prompt + reference)
    shared = common_prefix_length(prompt_ids, full)
    if shared == 0 or shared == len(full):
        raise ValueError(f"Row {row}: the human continuation {reference!r} adds no token after its prompt (or the "
                         "prompt tokenizes to nothing), so the fluency guard has no reference.")
    return full[:shared], full[shared:]


@contextlib.contextmanager
def _reference_model(model):
    with unsteered(model), hooks_paused():
        yield


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])
