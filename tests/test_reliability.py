"""Precision: float16 and bfloat16 models steered at α = 100 stay finite where float32 does; float16 overflow is
reported with the AU that causes it; γ stays float32 whatever the model is cast to."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import spread_aus, tiny_model
from peft import get_peft_model

from austeer_peft import AUSteerConfig, AUSteerLayer
from austeer_peft.tuner.sites import SITES

# Largest error of the half-precision logits relative to the largest float32 logit, measured on the tiny families:
# up to 1.1% in float16 and 2.6% in bfloat16 (8 bits of mantissa).
TOLERANCE = {torch.float16: 0.02, torch.bfloat16: 0.05}


def steered_run(family, dtype, aus, input_ids):
    model = get_peft_model(tiny_model(family).to(dtype), AUSteerConfig(sites=list(SITES)))
    model.set_aus(aus)
    with torch.no_grad():
        return model(input_ids, output_hidden_states=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_with_alpha_100_stays_finite_where_float32_does(family, dtype, input_ids):
    # α = 100: γ = ±α·r reaches ±100, so factors run from -99 to 101, on 40 AUs over every site.
    aus = spread_aus(tiny_model(family), list(SITES), 40, gamma_range=(-100.0, 100.0))
    reference = steered_run(family, torch.float32, aus, input_ids)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="AUSteer adapter .* overflowed")
        half = steered_run(family, dtype, aus, input_ids)
    for want, got in zip((*reference.hidden_states, reference.logits), (*half.hidden_states, half.logits)):
        assert got.dtype == dtype
        assert bool(torch.isfinite(got)[torch.isfinite(want)].all())
    error = (half.logits.float() - reference.logits).abs().max() / reference.logits.abs().max()
    assert error <= TOLERANCE[dtype]


MASSIVE_TOKEN = 7


def model_with_massive_activation(dtype, dim=5):
    """Token 7 puts ~2000 on residual-stream dimension `dim`, as the "massive activations" of real LLMs do."""
    base = tiny_model("llama")
    with torch.no_grad():
        base.model.embed_tokens.weight[MASSIVE_TOKEN, dim] = 2000.0
    return get_peft_model(base.to(dtype), AUSteerConfig(sites=["residual", "attention"]))


def test_float16_overflow_warns_with_the_offending_au(input_ids):
    input_ids = input_ids.clone()
    input_ids[:, 0] = MASSIVE_TOKEN
    aus = [(("residual", 0), 5, 100.0), (("residual", 0), 6, 100.0), (("attention", 1), 3, 100.0)]
    reference = model_with_massive_activation(torch.float32)
    reference.set_aus(aus)
    assert bool(torch.isfinite(logits_of(reference, input_ids)).all())  # float32: 2000 · 101 is harmless

    model = model_with_massive_activation(torch.float16)
    model.set_aus(aus)
    message = (r"overflowed float16 .* at model\.layers\.0\[5\] \(factor 1 \+ γ = 101: any \|activation\| above "
               r"648\.6 overflows\): .* bfloat16 or float32")
    with pytest.warns(UserWarning, match=message) as record:
        logits_of(model, input_ids)
    messages = [str(w.message) for w in record if "overflowed" in str(w.message)]
    assert len(messages) == 1 and "[6]" not in messages[0] and "self_attn" not in messages[0]  # only the culprit
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="AUSteer adapter .* overflowed")
        logits_of(model, input_ids)  # warned once per module and adapter, not on every forward
        model.set_aus([(("attention", 1), 3, 100.0)])
        assert bool(torch.isfinite(logits_of(model, input_ids)).all())
        bf16 = model_with_massive_activation(torch.bfloat16)
        bf16.set_aus(aus)
        assert bool(torch.isfinite(logits_of(bf16, input_ids)).all())


def test_float16_overflow_in_a_later_forward_is_not_missed(input_ids):
    """Flags are read on forwards 1, 2, 4, 8, ...: an overflow in forward 3 is reported by forward 4."""
    model = model_with_massive_activation(torch.float16)
    model.set_aus([(("residual", 0), 5, 100.0)])
    clean, massive = input_ids.clone(), input_ids.clone()
    clean[clean == MASSIVE_TOKEN] = 8
    massive[0, 3] = MASSIVE_TOKEN
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="AUSteer adapter .* overflowed")
        logits_of(model, clean)
        logits_of(model, clean)
        logits_of(model, massive)  # overflows, not read yet
    with pytest.warns(UserWarning, match=r"overflowed float16 .* model\.layers\.0\[5\]"):
        logits_of(model, clean)


def test_a_factor_beyond_float16_range_warns(input_ids):
    model = get_peft_model(tiny_model("llama").half(), AUSteerConfig(sites=["attention"]))
    model.set_aus([(("attention", 0), 2, 70000.0)])
    with pytest.warns(UserWarning, match=r"o_proj\[2\] \(factor 1 \+ γ = 7e\+04: the factor itself is beyond float16"):
        logits_of(model, input_ids)


def test_gamma_stays_float32_when_the_model_is_cast(input_ids):
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites=["attention", "ffn"]))
    model.set_aus([(("attention", 0), 1, 100.37), (("ffn", 1), 4, -0.123456789)])
    want = model.get_aus()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        model.to(dtype)
        layers = [m for m in model.modules() if isinstance(m, AUSteerLayer)]
        assert {m.austeer_gamma["default"].dtype for m in layers} == {torch.float32}
        assert {m.austeer_index["default"].dtype for m in layers} == {torch.int64}
        assert model.get_aus() == want  # bit-exact: bfloat16 would have rounded 100.37 to 100.5


def logits_of(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits
