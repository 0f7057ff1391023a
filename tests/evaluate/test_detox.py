"""The detoxification task (issue 22): RealToxicityPrompts pairs and splits, the toxicity scorer plug-in, the
open-generation metrics against hand-computed values, and the runner / sweep on a tiny model."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from conftest import DATA_DIR, char_tokenizer, tiny_model
from datasets import Dataset

from austeer_peft import AU
from austeer_peft.evaluate import SCORINGS, Task, evaluate_split, load_task
from austeer_peft.evaluate.baselines import caa_steering
from austeer_peft.evaluate.compare import compare_methods
from austeer_peft.evaluate.continuations import score_continuations
from austeer_peft.evaluate.tasks import DetoxSettings, load_detox
from austeer_peft.evaluate.tasks.detox import NEGATIVE_THRESHOLD, SAFE_THRESHOLD, VALIDATION_POOL, detox_pairs
from austeer_peft.evaluate.toxicity import (
    ProfanityCheckScorer,
    distinct_n,
    perplexities,
    scorer_name,
    toxicity_scores,
)

# ------------------------------------------------------------------------------------------------ metrics


def test_distinct_n_by_hand():
    texts = ["a b a b", "c", ""]
    assert distinct_n(texts, 1) == pytest.approx(3 / 5)  # a, b, a, b, c: 3 unique of 5
    assert distinct_n(texts, 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b); none spans two texts
    assert distinct_n(["x y", "y z"], 2) == 1.0
    assert distinct_n([""], 1) == 0.0
    with pytest.raises(ValueError, match="positive integer"):
        distinct_n(texts, 0)


def test_perplexities_by_hand():
    # exp(-(ln 0.5 + ln 0.25) / 2) = sqrt(8)
    assert perplexities([[math.log(0.5), math.log(0.25)], [0.0]]) == pytest.approx([math.sqrt(8), 1.0])
    with pytest.raises(ValueError, match="no token"):
        perplexities([[]])


def test_toxicity_scores_checks_the_plug_in():
    assert toxicity_scores(lambda texts: torch.tensor([0.25] * len(texts)), ["a", "b"]) == [0.25, 0.25]
    with pytest.raises(ValueError, match="returned 1 scores for 2 texts"):
        toxicity_scores(lambda texts: [0.1], ["a", "b"])
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        toxicity_scores(lambda texts: [1.5 for _ in texts], ["a"])
    with pytest.raises(ValueError, match="must return numbers"):
        toxicity_scores(lambda texts: ["high" for _ in texts], ["a"])

    def perspective(texts):
        return [0.0 for _ in texts]

    assert scorer_name(perspective) == "perspective"
    assert scorer_name(ProfanityCheckScorer()) == "alt-profanity-check"


def test_default_scorer_is_the_offline_classifier():
    scores = ProfanityCheckScorer()(["you are a fucking idiot", "have a nice day at the beach"])
    assert scores[0] >= 0.5 > scores[1]
    assert ProfanityCheckScorer()([]).shape == (0,)


# ------------------------------------------------------------------------------------------------ task


def test_detox_splits_and_pairs():
    task = load_task("detox", data_dir=DATA_DIR)  # the real data must be there: no skip
    assert task.kind == "open" and task.sizes == {"fit": 454, "validation": VALIDATION_POOL, "test": 996}
    assert load_task("RealToxicityPrompts", data_dir=DATA_DIR).sizes == task.sizes  # the alias
    fit = task.fit
    assert min(fit["rejected_toxicity"]) >= NEGATIVE_THRESHOLD and max(fit["chosen_toxicity"]) < SAFE_THRESHOLD
    pairs = task.pairs("fit")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs[:3]] == \
        [(r["prompt"], r["chosen"], r["rejected"]) for r in fit.select(range(3))]
    held_out = set(task.validation["prompt"]) | set(task.test["prompt"])
    assert not held_out & set(fit["prompt"]) and len(held_out) == VALIDATION_POOL + 996
    # The test split does not depend on n_validation; validation is a prefix of the pool.
    small = load_task("detox", data_dir=DATA_DIR, n_validation=50, n_fit=10)
    assert small.test["id"] == task.test["id"] and small.validation["id"] == task.validation["id"][:50]
    with pytest.raises(ValueError, match="holds prompts to continue"):
        task.pairs("test")
    with pytest.raises(ValueError, match="exceeds the 200 examples"):
        load_task("detox", data_dir=DATA_DIR, n_validation=201)
    with pytest.raises(ValueError, match="either settings"):
        load_detox(data_dir=DATA_DIR, settings=DetoxSettings(), max_new_tokens=5)


def test_detox_pairs_take_the_safe_continuation_of_the_most_similar_prompt():
    def row(index, prompt, continuation, toxicity):
        return {"filename": f"f{index}", "begin": 0, "end": 1, "prompt": {"text": prompt, "toxicity": 0.3},
                "continuation": {"text": continuation, "toxicity": toxicity}}

    pool = [row(0, "the police came to the house", " and shot the damn dog", 0.8),
            row(1, "my cat likes the garden", " and sleeps there all day", 0.02),
            row(2, "police officers came to a house", " to ask about the noise", 0.05),
            row(3, "the garden of my neighbour", " is full of shit", 0.7),
            row(4, "a borderline one", " neither toxic nor safe", 0.3),
            row(5, "no score", " missing", None)]
    pairs = detox_pairs(pool)
    assert [(p["prompt"], p["rejected"], p["chosen"]) for p in pairs] == [
        ("the police came to the house", " and shot the damn dog", " to ask about the noise"),
        ("the garden of my neighbour", " is full of shit", " and sleeps there all day")]
    with pytest.raises(ValueError, match="needs continuations"):
        detox_pairs(pool[:1])


def test_settings_refuse_bad_values():
    with pytest.raises(TypeError, match="callable"):
        DetoxSettings(scorer="perspective")
    for bad in ({"max_new_tokens": 0}, {"threshold": 0.0}, {"fluency_factor": 0.0}, {"top_p": 0.0}):
        with pytest.raises(ValueError):
            DetoxSettings(**bad)


# ------------------------------------------------------------------------------------------------ scoring


def tiny_detox_task(scorer, n=6, **settings) -> Task:
    """A small in-memory slice in the detox task's shape, with prompts short enough for the tiny models."""
    prompts = ["the cat sat", "you are a", "why do they", "we all know", "that man is", "go away you"][:n]
    references = [" on the mat", " good friend", " always lie", " the truth", " very tall", " fool"][:n]
    rows = [{"id": str(i), "prompt": p, "reference": r} for i, (p, r) in enumerate(zip(prompts, references))]
    pair_rows = [{"prompt": p, "chosen": " kind words", "rejected": " rude words"} for p in prompts]
    data = Dataset.from_list(rows)
    return Task("detox", "open", Dataset.from_list(pair_rows), data, data,
                metadata={"detox": DetoxSettings(scorer=scorer, max_new_tokens=4, **settings)})


def brute_force_perplexity(model, prompt_ids, continuation_ids) -> float:
    ids = torch.tensor([prompt_ids + continuation_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    token_log_probs = log_probs[torch.arange(len(targets)), targets][-len(continuation_ids):]
    return math.exp(-float(token_log_probs.mean()))


def test_score_continuations_against_brute_force():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    seen = []

    def scorer(texts):  # the plug-in: any callable texts -> probabilities
        seen.append(list(texts))
        return [0.9 if i % 3 == 0 else 0.2 for i in range(len(texts))]

    task = tiny_detox_task(scorer, fluency_factor=math.inf)
    scored = score_continuations(model, tokenizer, task.metadata["detox"], task.validation, batch_size=4)
    assert seen == [scored.texts] and all(len(tokens) == 4 for tokens in scored.tokens)
    assert scored.correct == [i % 3 != 0 for i in range(6)]
    for row, prompt in enumerate(task.validation["prompt"]):
        prompt_ids = tokenizer(prompt)["input_ids"]
        alone = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=4, min_new_tokens=4,
                               do_sample=False, pad_token_id=0)[0, len(prompt_ids):].tolist()
        assert scored.tokens[row] == alone  # batching and padding change nothing
        assert scored.perplexity[row] == pytest.approx(brute_force_perplexity(model, prompt_ids, alone), rel=1e-4)
        reference_ids = tokenizer(task.validation[row]["reference"])["input_ids"]
        assert scored.reference_perplexity[row] == pytest.approx(
            brute_force_perplexity(model, prompt_ids, reference_ids), rel=1e-4)
    metrics = scored.metrics
    assert metrics["detox_rate"] == pytest.approx(4 / 6) and metrics["fluent_rate"] == 1.0
    assert metrics["mean_toxicity"] == pytest.approx((2 * 0.9 + 4 * 0.2) / 6)
    assert metrics["perplexity"] == pytest.approx(float(np.mean(scored.perplexity)))
    assert metrics["distinct_2"] == distinct_n(scored.texts, 2)

    # The fluency guard: a factor below every ratio fails every prompt, however clean its text.
    strict = tiny_detox_task(lambda texts: [0.0] * len(texts), fluency_factor=1e-9)
    assert not any(evaluate_split(model, tokenizer, strict, "validation", batch_size=4).correct)


def test_fluency_is_measured_on_the_unsteered_model():
    """AUSteer adapters are disabled and CAA hooks paused for the perplexity pass: a steer changes the text, but
    perplexity is always the plain model's on that text."""
    from austeer_peft import AUSteerConfig
    from peft import get_peft_model

    tokenizer = char_tokenizer()
    task = tiny_detox_task(lambda texts: [0.0] * len(texts), n=3, fluency_factor=math.inf)
    plain = tiny_model("llama")
    config = AUSteerConfig(sites=["ffn"])
    steered = get_peft_model(tiny_model("llama"), config)
    steered.set_aus([AU("model.layers.0.mlp", d, 40.0) for d in range(8)])
    for model, context in ((steered, contextlib.nullcontext), (plain, lambda: caa_steering(plain, 0, torch.ones(32),
                                                                                             30.0))):
        prompts = [tokenizer(prompt)["input_ids"] for prompt in task.validation["prompt"]]
        with context():
            scored = score_continuations(model, tokenizer, task.metadata["detox"], task.validation, batch_size=2)
            as_steered = [brute_force_perplexity(model, p, c) for p, c in zip(prompts, scored.tokens)]
        expected = [brute_force_perplexity(plain, p, c) for p, c in zip(prompts, scored.tokens)]
        assert scored.perplexity == pytest.approx(expected, rel=1e-4)
        changed = [abs(a / e - 1) for a, e in zip(as_steered, expected)]
        assert max(changed) > 1e-3  # the steer is active: the steered model itself would have judged otherwise


def test_runner_scoring_rules_for_open_tasks():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    task = tiny_detox_task(lambda texts: [0.0] * len(texts), n=2)
    assert "toxicity" in SCORINGS
    result = evaluate_split(model, tokenizer, task, "validation", batch_size=2)
    assert result.scoring == "toxicity" and result.metrics["max_new_tokens"] == 4
    with pytest.raises(ValueError, match="use 'toxicity'"):
        evaluate_split(model, tokenizer, task, "validation", "number")
    with pytest.raises(ValueError, match="load_detox\\(max_new_tokens"):
        evaluate_split(model, tokenizer, task, "validation", max_new_tokens=8)
    bare = Task("detox", "open", task.fit, task.validation, task.test)
    with pytest.raises(ValueError, match="no DetoxSettings"):
        evaluate_split(model, tokenizer, bare, "validation")


def test_compare_methods_on_detox_reports_text_quality_as_it_goes():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    task = tiny_detox_task(lambda texts: [0.9 if "e" in t else 0.1 for t in texts], fluency_factor=math.inf)
    reported = []
    comparison = compare_methods(model, tokenizer, task, ks=[1, 4], alphas=[10.0], caa_multipliers=[4.0],
                                 batch_size=4, progress=False,
                                 on_method=lambda so_far: reported.append(so_far.methods[-1].method))
    assert reported == [m.method for m in comparison.methods] == \
        ["vanilla", "AUSteer-attention", "AUSteer-ffn", "block-level", "CAA"]
    rows = comparison.table()
    assert all(set(row["metrics"]) >= {"detox_rate", "perplexity", "distinct_1", "distinct_2"} for row in rows)
    assert rows[0]["test_accuracy"] == pytest.approx(100 * rows[0]["metrics"]["detox_fluent_rate"])
    assert "distinct-2" in comparison.format_table() and "not Perspective" in comparison.format_table()


def test_sampled_continuations_are_seeded():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    zero = lambda texts: [0.0] * len(texts)  # noqa: E731

    def tokens(**settings):
        task = tiny_detox_task(zero, n=4, **settings)
        return score_continuations(model, tokenizer, task.metadata["detox"], task.validation, batch_size=4).tokens

    sampled = tokens(do_sample=True, seed=3)
    assert tokens(do_sample=True, seed=3) == sampled
    assert tokens(do_sample=True, seed=4) != sampled and tokens() != sampled
