"""Property tests (hypothesis): the scale layer against a dense reference, the momentum counter against a brute-force
loop, over random shapes, index sets, γ, dtypes, input/output position, padding and ties."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from austeer_peft import AUSteerConfig, AUSteerLayer
from austeer_peft.fitting.counter import MomentumCounter
from austeer_peft.tuner.sites import SiteModule

# Derandomized and without an example database: the same examples on every run and no files left behind.
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def scale_cases(draw):
    width = draw(st.integers(1, 12))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))  # e.g. [] (one vector), [tokens], [batch, tokens]
    adapters = []
    for _ in range(draw(st.integers(1, 2))):  # one adapter, or two active together (their factors multiply)
        dims = draw(st.lists(st.integers(0, width - 1), unique=True, max_size=width))
        gammas = draw(st.lists(st.floats(-3.0, 100.0, width=32), min_size=len(dims), max_size=len(dims)))
        adapters.append((dims, gammas))
    return {"width": width, "lead": lead, "adapters": adapters, "dtype": draw(st.sampled_from(DTYPES)),
            "position": draw(st.sampled_from(["input", "output"])), "seed": draw(st.integers(0, 2**16))}


def steered_linear(case):
    """A Linear whose input or output (the `width` side) carries the case's AUs, and the same Linear unwrapped."""
    torch.manual_seed(case["seed"])
    width, other = case["width"], 5
    linear = nn.Linear(width, other) if case["position"] == "input" else nn.Linear(other, width)
    linear = linear.to(case["dtype"])
    candidate = SiteModule("linear", None, None, case["position"], width)
    layer = AUSteerLayer(linear, candidate, "a0")
    for i, (dims, gammas) in enumerate(case["adapters"]):
        layer.update_layer(f"a{i}", torch.tensor(dims, dtype=torch.int64), torch.tensor(gammas))
    layer.set_adapter([f"a{i}" for i in range(len(case["adapters"]))])
    x = torch.randn(*case["lead"], width if case["position"] == "input" else other).to(case["dtype"])
    return layer, linear, x


def dense_factors(case):
    """One full-width factor vector per adapter: 1 everywhere, 1 + γ (computed in float32) on its AUs."""
    factors = []
    for dims, gammas in case["adapters"]:
        dense = torch.ones(case["width"])
        dense[dims] = 1.0 + torch.tensor(gammas, dtype=torch.float32)
        factors.append(dense.to(case["dtype"]))
    return factors


@SETTINGS
@given(scale_cases())
def test_scale_layer_equals_a_dense_reference(case):
    layer, linear, x = steered_linear(case)
    x_before = x.clone()
    with torch.no_grad():
        got = layer(x)
        if case["position"] == "input":
            scaled = x
            for dense in dense_factors(case):
                scaled = scaled * dense
            want = linear(scaled)
        else:
            want = linear(x)
            for dense in dense_factors(case):
                want = want * dense
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)  # multiplying by exactly 1 changes nothing, so even float16 is bit-exact
    assert torch.equal(x, x_before)  # the caller's tensor is never scaled in place
    with torch.no_grad():
        layer.enable_adapters(False)
        assert torch.equal(layer(x), linear(x))


@SETTINGS
@given(scale_cases().filter(lambda case: case["dtype"] in (torch.float32, torch.float64)))
def test_merge_matches_the_scale_and_unmerge_is_exact(case):
    layer, linear, x = steered_linear(case)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    with torch.no_grad():
        steered = layer(x)
        layer.merge()
        assert layer.merged
        layer.enable_adapters(True)
        merged = layer(x)  # merged adapters are not applied a second time
        tolerance = 1e-4 if case["dtype"] == torch.float32 else 1e-10
        torch.testing.assert_close(merged, steered, rtol=tolerance, atol=tolerance * 100)
        layer.unmerge()
    assert torch.equal(linear.weight, weight) and torch.equal(linear.bias, bias)


class Emit(nn.Module):
    """Hands its input on: the test decides what activation the counter reads."""

    def forward(self, activation):
        return activation


class TwoSites(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Emit()
        self.b = Emit()

    def forward(self, a, b):
        return self.a(a), self.b(b)


@st.composite
def batches(draw):
    widths = {"a": draw(st.integers(1, 6)), "b": draw(st.integers(1, 6))}
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    flat_b = draw(st.booleans())  # module b sees tokens flattened to [2B·T, width], as MoE blocks do
    result = []
    for _ in range(draw(st.integers(1, 3))):
        pairs, tokens = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        last_token = draw(st.lists(st.integers(0, tokens - 1), min_size=2 * pairs, max_size=2 * pairs))
        activations = {}
        for name, width in widths.items():
            # Values from {-1, 0, 1, NaN}: many ties, and NaN pairs that must count on neither side.
            values = draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0, float("nan")]),
                                   min_size=2 * pairs * tokens * width, max_size=2 * pairs * tokens * width))
            activations[name] = torch.tensor(values).reshape(2 * pairs, tokens, width).to(dtype)
        result.append((torch.tensor(last_token), tokens, activations))
    return widths, flat_b, result


@SETTINGS
@given(batches())
def test_momentum_counter_equals_brute_force(case):
    widths, flat_b, batch_list = case
    model = TwoSites()
    candidates = [SiteModule("a", None, None, "output", widths["a"]), SiteModule("b", None, None, "input", widths["b"])]
    n_pos = {name: [0] * width for name, width in widths.items()}
    n_neg = {name: [0] * width for name, width in widths.items()}
    nonfinite = set()
    with MomentumCounter(model, candidates) as counter:
        for last_token, tokens, activations in batch_list:
            b = activations["b"].reshape(-1, widths["b"]) if flat_b else activations["b"]
            counter.count_batch(lambda: model(activations["a"], b), last_token, tokens)
            pairs = len(last_token) // 2
            for name, values in activations.items():
                for j in range(pairs):
                    for dim in range(widths[name]):
                        positive = values[j, last_token[j], dim].item()
                        negative = values[pairs + j, last_token[pairs + j], dim].item()
                        n_pos[name][dim] += positive > negative
                        n_neg[name][dim] += positive < negative
                        if positive != positive or negative != negative:
                            nonfinite.add(name)
    scores = counter.to_scores(model, AUSteerConfig(target_modules=["a", "b"]))
    assert scores.num_pairs == sum(len(last_token) // 2 for last_token, _, _ in batch_list)
    for name in widths:
        assert scores.n_pos[name].tolist() == n_pos[name]
        assert scores.n_neg[name].tolist() == n_neg[name]
    assert set(counter.nonfinite_modules()) == nonfinite
