"""Importing austeer_peft changes nothing outside it except PEFT's registration of the method (one added PeftType
member, filled through register_peft_method), and using an AUSteer model patches no method on any instance.

Checked in a fresh interpreter, so that what was there before the import can be captured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import json, sys, tempfile, types

    import peft
    import peft.utils.save_and_load as save_and_load
    import torch
    import torch.nn.modules.module as module_module
    import transformers
    from peft import PeftModel, PeftModelForCausalLM, get_peft_model
    from peft.utils import PeftType

    def hook_dicts():
        return {name: dict(value) for name, value in vars(module_module).items()
                if name.startswith("_global_") and isinstance(value, dict)}

    def same(a, b):
        # Identity, or an equal immutable value made again (time.tzset() rebuilds time.tzname, say).
        return a is b or (isinstance(a, (str, bytes, int, float, tuple, frozenset)) and type(a) is type(b) and a == b)

    def namespaces():
        return {name: dict(vars(module)) for name, module in list(sys.modules.items())
                if isinstance(module, types.ModuleType) and not name.startswith("austeer_peft")}

    torch_load, load_adapter = save_and_load.torch_load, PeftModel.load_adapter
    class_dicts = {cls: dict(vars(cls)) for cls in (PeftModel, PeftModelForCausalLM, torch.nn.Module)}
    members, hooks, before = [m.value for m in PeftType], hook_dicts(), namespaces()

    import austeer_peft
    from austeer_peft import AUSteerConfig, save_adapter

    problems = []
    if save_and_load.torch_load is not torch_load:
        problems.append("peft.utils.save_and_load.torch_load was replaced")
    if PeftModel.load_adapter is not load_adapter:
        problems.append("PeftModel.load_adapter was replaced")
    for cls, saved in class_dicts.items():
        if dict(vars(cls)) != saved:
            problems.append(f"the class dict of {cls.__name__} changed")
    if [m.value for m in PeftType] != [*members, "AUSTEER"]:
        problems.append(f"PeftType changed beyond the AUSTEER member: {[m.value for m in PeftType]}")
    for name, namespace in before.items():
        now = vars(sys.modules[name]) if name in sys.modules else {}
        rebound = [key for key, value in namespace.items() if key in now and not same(now[key], value)]
        if rebound:
            problems.append(f"module {name} has rebound names {rebound[:5]}")

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, head_dim=8)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    model = get_peft_model(base, AUSteerConfig(sites=["attention", "ffn"], task_type="CAUSAL_LM"))
    if type(model) is not PeftModelForCausalLM:
        problems.append(f"get_peft_model made a {type(model)!r}, not exactly peft.PeftModelForCausalLM")
    model.set_aus([(("attention", 1), 3, 1.5), (("ffn", 0), 7, -0.5)])
    model.set_scope("generated")
    prompt = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    with torch.no_grad():
        model.generate(input_ids=prompt, attention_mask=(prompt != 0).long(), max_new_tokens=3, do_sample=False,
                       pad_token_id=0)
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(model, folder)
    for obj in (model, model.get_base_model()):
        patched = [name for name, value in vars(obj).items() if callable(value) and hasattr(type(obj), name)]
        if patched:
            problems.append(f"{type(obj).__name__} instance has methods patched on it: {patched}")
    if hook_dicts() != hooks:
        problems.append("torch's global module hooks changed")
    print(json.dumps(problems))
''')


def test_import_and_use_change_nothing_outside_the_package():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    problems = json.loads(run.stdout.strip().splitlines()[-1])
    assert problems == []
