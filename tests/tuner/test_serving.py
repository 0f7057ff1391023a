"""Serving-grade steering: one aten op per steered module, and rows of one batch with different adapters
(`adapter_names`, PEFT's LoRA convention) steered exactly as each adapter alone."""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import ALL_SITES, spread_aus, tiny_model, tiny_moe_model
from peft import get_peft_model
from torch.profiler import ProfilerActivity, profile

from austeer_peft import AUSteerConfig, AUSteerLayer

SITES = ["attention", "ffn"]
# Left-padded rows (pad 0): rows 1 and 3 have 3 and 1 pads.
PROMPT = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 11, 12, 13], [14, 15, 16, 17, 18, 19], [0, 20, 21, 22, 23, 24],
                       [25, 26, 27, 28, 29, 30]])
MASK = (PROMPT != 0).long()
ROWS = ["task", "__base__", "style", "late", "task"]
GENERATE = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)


def top_level_ops(fn) -> collections.Counter:
    """aten ops that no other aten op called, by name."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = collections.Counter()
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if event.name.startswith("aten::") and parent is None:
            counts[event.name] += 1
    return counts


def test_a_steered_module_costs_one_multiply(input_ids):
    base = tiny_model("llama")
    plain = top_level_ops(lambda: base(input_ids))
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites=ALL_SITES), adapter_name="task")
    model.set_aus(spread_aus(base, ALL_SITES, 40, seed=1), adapter_name="task")
    model.add_adapter("style", AUSteerConfig(sites=ALL_SITES))
    taken = {(m, d) for m, d, _ in model.get_aus("task")}
    model.set_aus([au for au in spread_aus(base, ALL_SITES, 80, seed=2) if au[:2] not in taken][:30],
                  adapter_name="style")
    wrapped = sum(isinstance(m, AUSteerLayer) for m in model.modules())
    for active in (["task"], ["task", "style"]):  # two adapters without a shared AU fold into one vector
        model.base_model.set_adapter(active)
        extra = top_level_ops(lambda: model(input_ids)) - plain
        assert sum(extra.values()) == wrapped and set(extra) <= {"aten::mul", "aten::mul_"}, extra

    shared = model.get_aus("task")[0]  # a shared AU takes a second multiply on its module only (exact rounding)
    model.set_aus([*model.get_aus("style"), (shared.module, shared.dim, 0.5)], adapter_name="style")
    extra = top_level_ops(lambda: model(input_ids)) - plain
    assert sum(extra.values()) == sum(isinstance(m, AUSteerLayer) for m in model.modules()) + 1


def two_adapters_and_a_scoped_one(family):
    base = tiny_model(family)
    model = get_peft_model(base, AUSteerConfig(sites=SITES), adapter_name="task")
    model.set_aus(spread_aus(base, SITES, 10, seed=1, gamma_range=(-0.9, 6.0)), adapter_name="task")
    model.add_adapter("style", AUSteerConfig(sites=SITES))
    model.set_aus(spread_aus(base, SITES, 10, seed=2, gamma_range=(-0.9, 6.0)), adapter_name="style")
    model.add_adapter("late", AUSteerConfig(sites=SITES, scope="generated"))
    model.set_aus(spread_aus(base, SITES, 10, seed=3, gamma_range=(-0.9, 6.0)), adapter_name="late")
    return model


def each_adapter_alone(model, run):
    """`run()` with each adapter of ROWS active alone ("__base__": adapters disabled), rows of ROWS picked."""
    results = {}
    for name in dict.fromkeys(ROWS):
        if name == "__base__":
            with model.disable_adapter():
                results[name] = run()
        else:
            model.base_model.set_adapter(name)
            results[name] = run()
    model.base_model.set_adapter("task")
    return results


def assert_rows_match(got, alone, rows_per_input=1):
    for i, name in enumerate(ROWS):
        rows = slice(i * rows_per_input, (i + 1) * rows_per_input)
        torch.testing.assert_close(got[rows], alone[name][rows], rtol=0, atol=1e-5)


def test_rows_with_different_adapters_are_each_steered_as_alone(family):
    model = two_adapters_and_a_scoped_one(family)
    with torch.no_grad():
        got = model(input_ids=PROMPT, attention_mask=MASK, adapter_names=ROWS).logits
        alone = each_adapter_alone(model, lambda: model(input_ids=PROMPT, attention_mask=MASK).logits)
        assert_rows_match(got, alone)
        assert not torch.allclose(alone["task"], alone["style"]) and not torch.allclose(alone["task"], alone["late"])

        # generate: KV cache, the scoped adapter's positions, and beam search (each row's name repeated per beam)
        def generate(**kwargs):
            out = model.generate(input_ids=PROMPT, attention_mask=MASK, **GENERATE, **kwargs)
            return out if isinstance(out, torch.Tensor) else torch.stack(out.logits, 1)

        got = generate(adapter_names=ROWS, output_logits=True, return_dict_in_generate=True)
        assert_rows_match(got, each_adapter_alone(model, lambda: generate(output_logits=True,
                                                                          return_dict_in_generate=True)))
        got = generate(adapter_names=ROWS, num_beams=2)
        assert_rows_match(got, each_adapter_alone(model, lambda: generate(num_beams=2)))
        got = generate(adapter_names=ROWS, use_cache=False)
        assert_rows_match(got, each_adapter_alone(model, lambda: generate(use_cache=False)))


def test_rows_cost_a_gather_and_a_multiply_per_steered_module():
    model = two_adapters_and_a_scoped_one("llama")
    model.delete_adapter("late")  # token scopes add their `where`; here every adapter steers every token
    plain = tiny_model("llama")
    rows = ["task", "__base__", "style", "style", "task"]
    with torch.no_grad():
        model(input_ids=PROMPT, attention_mask=MASK, adapter_names=rows)  # builds the per-row tables
    model.base_model.set_adapter("style")  # switching the active adapter keeps them
    extra = (top_level_ops(lambda: model(input_ids=PROMPT, attention_mask=MASK, adapter_names=rows))
             - top_level_ops(lambda: plain(input_ids=PROMPT, attention_mask=MASK)))
    wrapped = sum(isinstance(m, AUSteerLayer) for m in model.modules())
    assert extra["aten::index"] == extra["aten::mul"] + extra["aten::mul_"] == wrapped, extra
    # plus, once per call and not per module, making the [rows] index tensor (tensor, lift_fresh, unsqueeze, ...)
    assert sum(extra.values()) - 2 * wrapped <= 8, extra


def test_rows_follow_changes_of_the_aus():
    model = two_adapters_and_a_scoped_one("llama")
    with torch.no_grad():
        before = model(input_ids=PROMPT, attention_mask=MASK, adapter_names=ROWS).logits
        model.set_aus([(("ffn", 0), 3, 4.0)], adapter_name="style")
        got = model(input_ids=PROMPT, attention_mask=MASK, adapter_names=ROWS).logits
        model.base_model.set_adapter("style")
        want = model(input_ids=PROMPT, attention_mask=MASK).logits
    assert torch.equal(got[2], want[2]) and not torch.equal(got[2], before[2])
    assert torch.equal(got[0], before[0])


def test_adapter_names_are_refused_where_they_cannot_hold(input_ids):
    model = two_adapters_and_a_scoped_one("llama")
    ids, mask = PROMPT, MASK
    with pytest.raises(ValueError, match="non-existing adapter.*nope.*'__base__' for an unsteered row"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["nope"] * 5)
    with pytest.raises(ValueError, match="has 2 names but the batch has 5 rows"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["task", "style"])
    with pytest.raises(TypeError, match="must be a list of adapter names"):
        model(input_ids=ids, attention_mask=mask, adapter_names="task")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, attention_mask=mask, adapter_names=ROWS)
    model.eval()
    model.merge_adapter(["task"])
    with pytest.raises(ValueError, match=r"merged into the weights \(\['task'\]\).*unmerge_adapter"):
        model(input_ids=ids, attention_mask=mask, adapter_names=ROWS)
    model.unmerge_adapter()

    moe = get_peft_model(tiny_moe_model("qwen3_moe"), AUSteerConfig(sites=["ffn_inner"]))
    moe.set_aus([(("ffn_inner", 0), 3, 2.0)])
    with torch.no_grad():
        same = moe(input_ids, adapter_names=["default", "default"]).logits  # one adapter for all rows: fine
        assert torch.equal(same, moe(input_ids).logits)
        with pytest.raises(ValueError, match="Expert-level AUs .* rows with different adapters"):
            moe(input_ids, adapter_names=["default", "__base__"])


def test_factors_follow_dtype_and_device_moves(input_ids):
    aus = spread_aus(tiny_model("llama"), SITES, 20, seed=4)
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites=SITES))
    model.set_aus(aus)
    with torch.no_grad():
        model(input_ids)  # factors prepared in float32
        model.to(torch.bfloat16)
        got = model(input_ids).logits
        fresh = get_peft_model(tiny_model("llama").to(torch.bfloat16), AUSteerConfig(sites=SITES))
        fresh.set_aus(aus)
        assert got.dtype == torch.bfloat16 and torch.equal(got, fresh(input_ids).logits)
