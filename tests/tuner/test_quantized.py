"""bitsandbytes models (4-bit nf4/fp4 and 8-bit run on CPU here): fit on them, steer, load fp32 adapters, merge or
refuse."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from conftest import (
    assert_only_dim_scaled,
    brute_force_counts,
    char_tokenizer,
    logits,
    quantized_copy,
    random_pairs,
    spread_aus,
    steered_and_plain,
    tiny_model,
)
from peft import PeftModel, get_peft_model

from austeer_peft import AUSteerConfig, AUSteerLayer, compute_momentum, fit_austeer
from austeer_peft.tuner.bnb import dequantized_4bit

FOUR_BIT = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
            "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32)}
SITES = ["attention", "ffn", "ffn_inner"]


@pytest.fixture(params=list(FOUR_BIT))
def four_bit(request, tmp_path):
    return tiny_model("llama", hidden=64), quantized_copy(tiny_model("llama", hidden=64), tmp_path,
                                                          **FOUR_BIT[request.param])


def test_fp32_adapter_loads_onto_4bit_model_and_steers(four_bit, tmp_path, input_ids):
    fp32, quantized = four_bit
    assert isinstance(quantized.model.layers[0].self_attn.o_proj, bnb.nn.Linear4bit)
    model = get_peft_model(fp32, AUSteerConfig(sites=SITES))
    model.set_aus(spread_aus(fp32, SITES, 12))
    model.save_pretrained(tmp_path / "adapter")

    plain = logits(quantized, input_ids)
    loaded = PeftModel.from_pretrained(quantized, tmp_path / "adapter")
    wrapped = [m for m in loaded.modules() if isinstance(m, AUSteerLayer)]
    assert any(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in wrapped)
    steered = logits(loaded, input_ids)
    assert (steered - plain).abs().max() > 1e-3
    with loaded.disable_adapter():
        assert torch.equal(logits(loaded, input_ids), plain)


def test_hand_set_au_on_linear4bit_scales_its_input(four_bit, input_ids):
    _, quantized = four_bit
    model = get_peft_model(quantized, AUSteerConfig(sites="attention"))
    model.set_aus([(("attention", 1), 6, 3.0)])
    layer = model.get_base_model().model.layers[1].self_attn.o_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert_only_dim_scaled(*steered_and_plain(model, layer, input_ids), dim=6, factor=4.0)


def test_merge_into_4bit_requantizes_and_unmerge_is_exact(four_bit, input_ids):
    fp32, quantized = four_bit
    quantization_noise = (logits(quantized, input_ids) - logits(fp32, input_ids)).abs().max().item()
    dense = {n: dequantized_4bit(m.weight) for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    model = get_peft_model(quantized, AUSteerConfig(sites=SITES))
    model.set_aus([(m, d, 10.0) for m, d, _ in spread_aus(quantized, SITES, 12)])  # γ of a typical fit (α≈15)
    with model.disable_adapter():
        plain = logits(model, input_ids)
    steered = logits(model, input_ids)
    effect = (steered - plain).abs().max().item()
    model.merge_adapter()
    merged = logits(model, input_ids)
    error = (merged - steered).abs().max().item()
    print(f"\n4-bit merge: max |logit| error merged vs unmerged {error:.3e}; steering effect {effect:.3e}; "
          f"fp32 vs 4-bit quantization noise {quantization_noise:.3e}")
    # Re-quantizing the touched blocks adds noise of the order of quantization itself; the steering is kept.
    assert error <= 3 * quantization_noise
    assert (merged - steered).norm() < 0.5 * (merged - plain).norm()
    model.unmerge_adapter()
    assert torch.equal(logits(model, input_ids), steered)
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert torch.equal(dequantized_4bit(module.weight), dense[name.replace(".base_layer", "")])


def test_merge_and_unload_4bit_keeps_the_steering(four_bit, input_ids):
    _, quantized = four_bit
    plain = logits(quantized, input_ids)
    model = get_peft_model(quantized, AUSteerConfig(sites=SITES))
    model.set_aus([(m, d, 20.0) for m, d, _ in spread_aus(quantized, SITES, 12)])
    steered = logits(model, input_ids)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AUSteerLayer) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.o_proj, bnb.nn.Linear4bit)
    merged_logits = logits(merged, input_ids)
    assert (merged_logits - steered).norm() < 0.5 * (merged_logits - plain).norm()  # the steering is kept


def test_8bit_model_steers_and_merge_is_refused(tmp_path, input_ids):
    quantized = quantized_copy(tiny_model("llama", hidden=64), tmp_path, load_in_8bit=True)
    assert isinstance(quantized.model.layers[0].self_attn.o_proj, bnb.nn.Linear8bitLt)
    plain = logits(quantized, input_ids)
    model = get_peft_model(quantized, AUSteerConfig(sites=["attention", "ffn"]))
    model.set_aus([(("attention", 0), 3, 5.0), (("ffn", 1), 4, 5.0)])
    assert (logits(model, input_ids) - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="8-bit.*merge into the fp16/fp32 model"):
        model.merge_and_unload()
    assert sum(isinstance(m, AUSteerLayer) for m in model.modules()) == 2  # nothing half-merged


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_fit_on_quantized_model_counts_like_a_per_pair_reference_and_round_trips(kind, tmp_path, input_ids):
    bnb_kwargs = FOUR_BIT.get(kind, dict(load_in_8bit=True))
    quantized = quantized_copy(tiny_model("llama", hidden=64), tmp_path, **bnb_kwargs)
    tokenizer, pairs = char_tokenizer(), random_pairs(8)
    n_pos, n_neg = brute_force_counts(quantized, tokenizer, pairs, SITES)
    fp32_scores = compute_momentum(tiny_model("llama", hidden=64), tokenizer, pairs, sites=SITES, progress=False)

    result = fit_austeer(quantized, tokenizer, pairs, sites=SITES, k=20, alpha=15, batch_size=3, progress=False)
    scores = result.scores
    for m in scores.modules:  # the fit reads the quantized model's own activations, batched and padded
        assert torch.equal(scores.n_pos[m.name], n_pos[m.name]), m.name
        assert torch.equal(scores.n_neg[m.name], n_neg[m.name]), m.name
    # Quantization perturbs activations, not what separates the pairs: the scores follow the fp32 model's.
    s_quantized = torch.cat([scores.score(m.name) for m in scores.modules])
    s_fp32 = torch.cat([fp32_scores.score(m.name) for m in scores.modules])
    correlation = torch.corrcoef(torch.stack([s_quantized, s_fp32]))[0, 1].item()
    top = {(au.module, au.dim) for au in result.peft_model.get_aus()}
    overlap = len(top & {(au.module, au.dim) for au in fp32_scores.select(20, 15)}) / 20
    print(f"\n{kind}: score correlation with fp32 {correlation:.2f}, top-20 overlap {overlap:.2f}")
    assert correlation > 0.5

    steered = logits(result.peft_model, input_ids)
    result.peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(quantized_copy(tiny_model("llama", hidden=64), tmp_path / "again",
                                                      **bnb_kwargs), tmp_path / "adapter")
    assert sorted(loaded.get_aus()) == sorted(result.peft_model.get_aus())
    assert torch.equal(logits(loaded, input_ids), steered)


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantized_4bit_undoes_the_cpu_kernel_repacking(tmp_path, double_quant):
    """On CPUs with AVX512-BF16 bitsandbytes repacks 4-bit weights on the first eval forward, with the block scales
    transposed to [in / 64, out] in bfloat16; its inverse (0.50) leaves plain scales transposed, which scrambled the
    rows of every weight wider than one block (here down_proj, in = 128). Packed here directly, on any CPU."""
    import copy
    from types import SimpleNamespace

    import bitsandbytes.functional as F

    quantized = quantized_copy(tiny_model("llama", hidden=64), tmp_path, **FOUR_BIT["nf4"],
                               bnb_4bit_use_double_quant=double_quant)
    weight = quantized.model.layers[0].mlp.down_proj.weight
    assert weight.quant_state.shape == (64, 128) and not getattr(weight.quant_state, "packing_format_for_cpu", False)
    dense = dequantized_4bit(weight)
    packed, state = F._convert_weight_packed_for_cpu(weight.data.clone(), copy.deepcopy(weight.quant_state))
    assert state.packing_format_for_cpu
    repacked = dequantized_4bit(SimpleNamespace(data=packed, quant_state=state))
    # Only the bfloat16 rounding of the scales differs (relative 2^-8).
    assert (repacked - dense).abs().max() <= 2 ** -8 * dense.abs().max()
