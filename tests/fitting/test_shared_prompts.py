"""Shared-prompt counting: each prompt runs once (KV cache) and both continuations from it, with the very integer
counts of the full-sequence pass -- on every tiny family, both padding sides, multi-token continuations, pairs
without a shared prompt, target_modules, MoE expert units and 4-bit models -- and CAA reads through the same path."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_SITES, char_tokenizer, quantized_copy, random_pairs, tiny_model, tiny_moe_model
from test_fit import assert_same_counts

from austeer_peft import compute_momentum
from austeer_peft.evaluate.baselines import caa_vectors
from austeer_peft.fitting import inputs

# Multi-token continuations (random_pairs' negatives run up to 3 words) and two pairs with no prompt in common.
PAIRS = random_pairs(10, seed=5) + [("cold sea", "hot road"), ("a", "abc")]


def forwards(model) -> list[tuple[int, int, bool]]:
    """Record (rows, tokens, with a KV cache) of every forward of ``model``."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((*kwargs["input_ids"].shape, kwargs.get("cache") is not None))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def shared_and_full(model, tokenizer, pairs=PAIRS, **kwargs):
    full = compute_momentum(model, tokenizer, pairs, share_prompts=False, progress=False, **kwargs)
    seen = forwards(model)
    shared = compute_momentum(model, tokenizer, pairs, progress=False, **kwargs)
    return shared, full, seen


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_shared_prompts_count_exactly_like_full_sequences_on_every_family(family, padding_side):
    shared, full, seen = shared_and_full(tiny_model(family), char_tokenizer(padding_side), sites=ALL_SITES,
                                         batch_size=4)
    assert_same_counts(shared, full)
    # 10 pairs with a prompt: 3 batches of prompts (B rows) then continuations (2B rows, from the cache); the two
    # pairs without one: one batch of full sequences.
    assert [rows for rows, _, cached in seen] == [4, 8, 4, 8, 2, 4, 4]
    assert [cached for _, _, cached in seen] == [True] * 6 + [False]


def test_each_prompt_token_runs_once():
    tokenizer = char_tokenizer()
    token_pairs = inputs.tokenize_pairs(tokenizer, PAIRS[:10], max_length=None)
    (batch,) = inputs.plan_batches(token_pairs, 10, pad_id=0)
    assert isinstance(batch, inputs.SharedPromptBatch)
    full = sum(len(p) + len(n) for p, n in token_pairs)
    computed = int(batch.prompt_mask.sum() + batch.continuation_mask.sum())
    shared = sum(inputs.shared_prompt_length(p, n) for p, n in token_pairs)
    assert computed == full - shared and shared > full / 3
    # The continuations' positions go on from each prompt's length, and the last token is the text's last.
    for row, j in enumerate(batch.pair_indices):
        n = inputs.shared_prompt_length(*token_pairs[j])
        assert batch.continuation_positions[row, 0] == n
        assert batch.continuation_ids[row, batch.last_token[row]] == token_pairs[j][0][-1]
        assert batch.continuation_ids[10 + row, batch.last_token[10 + row]] == token_pairs[j][1][-1]


def test_a_text_that_is_a_prefix_of_the_other_keeps_its_last_token_out_of_the_prompt():
    assert inputs.shared_prompt_length([5, 6, 7], [5, 6, 7, 8]) == 2
    assert inputs.shared_prompt_length([5, 6, 7], [5, 6, 9]) == 2
    assert inputs.shared_prompt_length([5, 6], [5, 9]) == 0  # one token in common: no prompt worth a forward
    assert inputs.shared_prompt_length([5], [5, 6, 7]) == 0


def test_target_modules_on_inputs_and_outputs():
    model, tokenizer = tiny_model("qwen2"), char_tokenizer("left")
    for position, names in [("input", ["o_proj", "down_proj"]), ("output", ["q_proj", "up_proj"])]:
        shared, full, _ = shared_and_full(model, tokenizer, target_modules=names, position=position, batch_size=3)
        assert_same_counts(shared, full)


@pytest.mark.parametrize("moe_family", ["qwen3_moe", "mixtral"])
def test_moe_expert_units_and_blocks(moe_family):
    shared, full, _ = shared_and_full(tiny_moe_model(moe_family), char_tokenizer(), sites=["ffn", "ffn_inner"],
                                      batch_size=4)
    assert_same_counts(shared, full)
    assert any(m.site == "ffn_inner" for m in shared.modules)


def test_4bit_model(tmp_path):
    quantized = quantized_copy(tiny_model("llama", hidden=64), tmp_path, load_in_4bit=True,
                               bnb_4bit_compute_dtype=torch.float32)
    shared, full, seen = shared_and_full(quantized, char_tokenizer(), sites=["attention", "ffn"], batch_size=6)
    assert_same_counts(shared, full)
    assert any(cached for _, _, cached in seen)


def test_models_without_a_cache_argument_run_full_sequences():
    model = tiny_model("llama")
    plain_forward = model.forward
    model.forward = lambda input_ids, attention_mask=None, position_ids=None, use_cache=False: plain_forward(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache)
    seen = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("cache")),
                                          with_kwargs=True)
    scores = compute_momentum(model, char_tokenizer(), PAIRS, sites=["ffn"], batch_size=4, progress=False)
    assert scores.num_pairs == len(PAIRS) and seen and all(cache is None for cache in seen)


def test_share_prompts_must_be_a_bool():
    with pytest.raises(ValueError, match="`share_prompts` must be True or False"):
        compute_momentum(tiny_model("llama"), char_tokenizer(), PAIRS, sites=["ffn"], share_prompts="yes",
                         progress=False)


def test_caa_reads_the_same_vectors_through_shared_prompts():
    model, tokenizer = tiny_model("gemma2"), char_tokenizer("left")
    seen = forwards(model)
    shared = caa_vectors(model, tokenizer, PAIRS, batch_size=4, progress=False)
    assert any(cached for _, _, cached in seen)
    full = caa_vectors(model, tokenizer, PAIRS, batch_size=4, progress=False, share_prompts=False)
    assert shared.num_pairs == full.num_pairs == len(PAIRS)
    assert torch.allclose(shared.vectors, full.vectors, atol=1e-5, rtol=1e-4)
    assert shared.vectors.abs().max() > 1e-2
