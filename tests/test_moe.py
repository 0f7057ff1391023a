"""Sparse MoE models (transformers 5 fused experts): steer attention and the whole MoE block output, merge exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import MOE_FAMILIES, tiny_moe_model
from peft import PeftModel, get_peft_model
from test_core import (
    assert_merge_exact_and_unmerge_restores,
    assert_only_dim_scaled,
    logits,
    spread_aus,
    steered_and_plain,
)

from austeer_peft import AUSteerConfig, AUSteerLayer
from austeer_peft.sites import candidate_modules, merge_slices

SITES = ["attention", "ffn"]


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


def test_ffn_inner_is_refused_on_fused_experts_with_the_reason():
    with pytest.raises(ValueError, match="Site 'ffn_inner'.*mlp.down_proj"):
        get_peft_model(tiny_moe_model("qwen3_moe"), AUSteerConfig(sites=["ffn_inner"]))
