"""Sparse MoE models (transformers 5 fused experts): steer attention, the whole MoE block output and single columns of
single experts (`ffn_inner`), merge exactly, and fit with counts equal to a per-pair reference."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    MOE_FAMILIES,
    assert_merge_exact_and_unmerge_restores,
    assert_only_dim_scaled,
    brute_force_counts,
    char_tokenizer,
    logits,
    random_pairs,
    spread_aus,
    steered_and_plain,
    tiny_moe_model,
)
from peft import PeftModel, get_peft_model

from austeer_peft import AUSteerConfig, AUSteerLayer, compute_momentum, fit_austeer
from austeer_peft.tuner.sites import candidate_modules, merge_slices

SITES = ["attention", "ffn", "ffn_inner"]
EXPERTS = 4  # tiny_moe_model's num_experts


@pytest.fixture(params=MOE_FAMILIES)
def moe_family(request):
    return request.param


def test_ffn_is_the_whole_sparse_block(moe_family):
    model = tiny_moe_model(moe_family)
    candidates = candidate_modules(model, AUSteerConfig(sites=["ffn"]))
    assert [c.name for c in candidates] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert [c.width for c in candidates] == [32, 32]
    slices = merge_slices(model.model.layers[0].mlp, candidates[0])
    assert slices[0].name == "down_proj" and getattr(slices[0].owner, "down_proj").ndim == 3  # fused experts
    assert len(slices) == (2 if moe_family == "qwen2_moe" else 1)  # + the shared expert's down projection


def test_hand_set_au_scales_the_moe_block_output(moe_family, input_ids):
    model = get_peft_model(tiny_moe_model(moe_family), AUSteerConfig(sites=["ffn"]))
    model.set_aus([(("ffn", 0), 9, 4.0)])
    layer = model.get_base_model().model.layers[0].mlp
    assert isinstance(layer, AUSteerLayer)
    assert_only_dim_scaled(*steered_and_plain(model, layer, input_ids), dim=9, factor=5.0)


def test_moe_merge_is_exact_and_unmerge_restores(moe_family, input_ids):
    base = tiny_moe_model(moe_family)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, AUSteerConfig(sites=SITES))
    model.set_aus(spread_aus(base, SITES, 16))
    steered = assert_merge_exact_and_unmerge_restores(model, original, input_ids)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AUSteerLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), steered, rtol=0, atol=1e-5)


def test_moe_adapter_round_trip(moe_family, input_ids, tmp_path):
    model = get_peft_model(tiny_moe_model(moe_family), AUSteerConfig(sites=SITES))
    model.set_aus(spread_aus(model.get_base_model(), SITES, 16))
    steered = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_moe_model(moe_family), tmp_path)
    assert torch.equal(logits(loaded, input_ids), steered)


def expert_inner(model) -> int:
    return model.model.layers[0].mlp.experts.down_proj.shape[2]  # down_proj is [experts, hidden, inner]


def test_ffn_inner_is_one_column_of_one_expert(moe_family):
    model = tiny_moe_model(moe_family)
    inner = expert_inner(model)
    candidates = candidate_modules(model, AUSteerConfig(sites=["ffn_inner"]))
    assert [c.name for c in candidates] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert [c.width for c in candidates] == [EXPERTS * inner] * 2  # AU = expert * inner + column
    (weight_slice,) = merge_slices(model.model.layers[0].mlp.experts, candidates[0])
    assert weight_slice.experts and weight_slice.name == "down_proj" and weight_slice.axis == 2


def test_expert_level_au_scales_that_column_of_that_expert_only(moe_family, input_ids):
    base = tiny_moe_model(moe_family)
    experts = base.model.layers[1].mlp.experts
    column = experts.down_proj[2, :, 5].detach().clone()
    routed, outputs = [], []
    experts.register_forward_pre_hook(lambda m, args: routed.append((args[1] == 2).any(-1)))
    experts.register_forward_hook(lambda m, args, out: outputs.append(out.clone()))
    model = get_peft_model(base, AUSteerConfig(sites=["ffn_inner"]))
    model.set_aus([(("ffn_inner", 1), 2 * expert_inner(base) + 5, 3.0)])
    logits(model, input_ids)
    with model.disable_adapter():
        logits(model, input_ids)
    (steered, plain), hit = outputs, routed[0]
    assert hit.any() and not hit.all()
    assert torch.equal(steered[~hit], plain[~hit])  # tokens not routed to expert 2 are untouched
    change = steered[hit] - plain[hit]  # = γ · w_2 · h_2[5] · W[2, :, 5]: along that column
    cosine = torch.nn.functional.cosine_similarity(change, column.expand_as(change), dim=-1).abs()
    assert bool((cosine > 1 - 1e-4).all()) and change.abs().max() > 1e-4
    assert torch.equal(experts.down_proj[2, :, 5], column)  # steering never touches the parameter


def test_expert_level_merge_is_bit_exact(moe_family, input_ids):
    model = get_peft_model(tiny_moe_model(moe_family), AUSteerConfig(sites=["ffn_inner"]))
    model.set_aus([(m, d, 10.0) for m, d, _ in spread_aus(model.get_base_model(), ["ffn_inner"], 12)])
    steered = logits(model, input_ids)
    model.merge_adapter()  # the steered forward runs with exactly the weights a merge writes
    assert torch.equal(logits(model, input_ids), steered)


def expert_reference_counts(model, tokenizer, pairs) -> tuple[dict, dict]:
    """Per-pair reference for expert-level AUs, independent of the package's reading: the coefficient of weight
    column W[e, :, i] in the MoE block's last-token output is d(sum of that output) / dW[e, h, i] (for any h),
    which autograd gives through whatever expert kernel runs; it is 0 for experts the token is not routed to."""
    layers = model.model.layers
    outputs = {}
    handles = [layer.mlp.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out[0, -1].sum()))
               for i, layer in enumerate(layers)]
    names = [f"model.layers.{i}.mlp.experts" for i in range(len(layers))]
    n_pos = {name: 0 for name in names}
    n_neg = {name: 0 for name in names}
    try:
        for positive, negative in pairs:
            read = []
            for text in (positive, negative):
                model(torch.tensor([tokenizer(text)["input_ids"]]))
                read.append([torch.autograd.grad(outputs[i], layer.mlp.experts.down_proj, retain_graph=True)[0]
                             [:, 0, :].flatten() for i, layer in enumerate(layers)])
            for name, x_pos, x_neg in zip(names, *read):
                n_pos[name] = n_pos[name] + (x_pos > x_neg).long()
                n_neg[name] = n_neg[name] + (x_pos < x_neg).long()
    finally:
        for handle in handles:
            handle.remove()
    return n_pos, n_neg


def test_fit_counts_equal_per_pair_reference(moe_family):
    model, pairs = tiny_moe_model(moe_family), random_pairs(8)
    n_pos, n_neg = brute_force_counts(model, char_tokenizer(), pairs, ["attention", "ffn"])
    expert_pos, expert_neg = expert_reference_counts(model, char_tokenizer(), pairs)
    n_pos.update(expert_pos)
    n_neg.update(expert_neg)
    for padding_side in ("right", "left"):  # batches of 3 pairs: padding tokens are routed too
        scores = compute_momentum(model, char_tokenizer(padding_side), pairs, sites=SITES, batch_size=3,
                                  progress=False)
        for m in scores.modules:
            assert torch.equal(scores.n_pos[m.name], n_pos[m.name]), m.name
            assert torch.equal(scores.n_neg[m.name], n_neg[m.name]), m.name
    inner = scores.n_pos["model.layers.1.mlp.experts"] + scores.n_neg["model.layers.1.mlp.experts"]
    # A pair whose last tokens are routed to neither side's expert e is a tie for all of e's units.
    assert 0 < int(inner.min()) and int(inner.min()) < 8


def test_fit_is_the_same_with_every_expert_kernel_and_round_trips(tmp_path, input_ids):
    model, tokenizer, pairs = tiny_moe_model("qwen3_moe"), char_tokenizer(), random_pairs(6)
    results = {}
    for kernel in ("eager", "batched_mm", "grouped_mm"):
        model.config._experts_implementation = kernel
        results[kernel] = compute_momentum(model, tokenizer, pairs, sites=SITES, progress=False)
    for scores in results.values():
        for m in scores.modules:
            assert torch.equal(scores.n_pos[m.name], results["eager"].n_pos[m.name]), m.name
    fitted = fit_austeer(model, tokenizer, pairs, sites=["ffn_inner"], k=10, alpha=15, progress=False).peft_model
    assert all(au.module.endswith("mlp.experts") for au in fitted.get_aus())
    steered = logits(fitted, input_ids)
    fitted.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_moe_model("qwen3_moe"), tmp_path)
    assert sorted(loaded.get_aus()) == sorted(fitted.get_aus())
    assert torch.equal(logits(loaded, input_ids), steered)


def test_expert_level_aus_refuse_a_token_scope(input_ids):
    model = get_peft_model(tiny_moe_model("qwen3_moe"), AUSteerConfig(sites=["ffn_inner"], scope="generated"))
    model.set_aus([(("ffn_inner", 0), 3, 2.0)])
    with pytest.raises(ValueError, match="steer every token.*scope='all'"):
        logits(model, input_ids)


def test_experts_kept_as_separate_modules_are_refused_with_the_alternative():
    model = tiny_moe_model("qwen3_moe")
    for layer in model.model.layers:  # the pre-transformers-5 layout: one MLP module per expert
        layer.mlp.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(EXPERTS))
    with pytest.raises(ValueError, match="neither a down projection nor transformers fused experts.*target_modules"):
        get_peft_model(model, AUSteerConfig(sites=["ffn_inner"]))
