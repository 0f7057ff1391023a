"""torch.compile of a steered model: no graph break caused by AUSteer (a LoRA PeftModel on the same base is the bar
PEFT sets), the eager outputs, and no stale factors after the AUs or the active adapter change.

Kept small for CI on two CPU cores: a one-layer model and the "eager" backend, i.e. dynamo's graph capture and guards,
which is where AUSteer's code could break a graph or leave stale factors; inductor's code generation is torch's own
(`bench/bench_ops.py --compile` runs the same checks with inductor)."""

from __future__ import annotations

import pytest
import torch
from conftest import spread_aus, tiny_model
from peft import get_peft_model

from torch._dynamo.utils import counters

from austeer_peft import AUSteerConfig

SITES = ["attention", "ffn"]
PROMPT = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13], [14, 15, 16, 17, 18]])
MASK = (PROMPT != 0).long()
ROWS = ["default", "__base__", "other"]
GENERATE = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def steered():
    base = tiny_model("llama", layers=1)
    model = get_peft_model(base, AUSteerConfig(sites=SITES))
    model.set_aus(spread_aus(base, SITES, 8, seed=1, gamma_range=(0.5, 4.0)))
    model.add_adapter("other", AUSteerConfig(sites=SITES))
    model.set_aus(spread_aus(base, SITES, 8, seed=2, gamma_range=(0.5, 4.0)), adapter_name="other")
    return model.eval()


def test_no_graph_break_in_a_whole_steered_peft_model():
    """The whole PeftModel, the per-call context of `adapter_names` included, is one graph. (A LoRA PeftModel on the
    same base also has 0 breaks, with and without `adapter_names`: bench/bench_ops.py --compile.)"""
    explained = torch._dynamo.explain(steered())(input_ids=PROMPT, attention_mask=MASK, adapter_names=ROWS)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def eager_and_compiled(model, run):
    with torch.no_grad():
        with torch.compiler.set_stance("force_eager"):
            eager = run()
        return eager, run()


def test_compiled_model_gives_the_eager_outputs_and_follows_changes():
    model = steered()
    model.get_base_model().compile(backend="eager")  # PeftModel.forward / generate stay eager around it

    def forward(**kwargs):
        return model(input_ids=PROMPT, attention_mask=MASK, **kwargs).logits

    def generate(**kwargs):
        out = model.generate(input_ids=PROMPT, attention_mask=MASK, **GENERATE, **kwargs)
        return torch.stack(out.logits, 1)

    seen = []
    for step, runs in (("one adapter", (forward, generate)), ("new γ", (forward,)), ("other adapter", (forward,)),
                       ("rows", (forward, generate))):
        if step == "new γ":  # same modules, new values: the compiled graph must not keep the old factors
            model.set_aus([(au.module, au.dim, au.gamma + 1.0) for au in model.get_aus("default")])
        elif step == "other adapter":
            model.base_model.set_adapter("other")
        kwargs = {"adapter_names": ROWS} if step == "rows" else {}
        for run in runs:
            eager, compiled = eager_and_compiled(model, lambda: run(**kwargs))
            torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
            seen.append(eager)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not torch.allclose(seen[0], seen[2]) and not torch.allclose(seen[2], seen[3])  # each change mattered
