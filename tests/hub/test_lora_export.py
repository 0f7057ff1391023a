"""Exact LoRA export: stock PEFT loads it (in a process without austeer_peft) and reproduces the steered logits on
every family, a fused MoE and a bitsandbytes 4-bit base, also in PEFT's mixed batches; and the refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, logits, quantized_copy, spread_aus, tiny_model, tiny_moe_model
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from austeer_peft import AUSteerConfig, to_lora
from austeer_peft.tuner.sites import candidate_modules

# Every site LoRA can express, with `ffn` rows and `ffn_inner` columns of the same down projection on layer 1.
SITE_LAYERS = {"attention": [0, 1], "ffn_inner": [0, 1], "ffn": [1]}
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def pick_aus(model, site_layers, per_module=3, seed=0):
    """`per_module` random AUs with random γ in (-0.9, 3) on each (site, layer) given (per_module + layer AUs on
    layer > 0, so that modules get different ranks)."""
    generator = torch.Generator().manual_seed(seed)
    aus = []
    for candidate in candidate_modules(model, AUSteerConfig(sites=list(site_layers))):
        if candidate.layer in site_layers[candidate.site]:
            n = per_module + candidate.layer
            dims = torch.randperm(candidate.width, generator=generator)[:n].tolist()
            gammas = (torch.rand(n, generator=generator) * 3.9 - 0.9).tolist()
            aus += [(candidate.name, d, g) for d, g in zip(dims, gammas)]
    return aus


def steered(base, site_layers=SITE_LAYERS, **kwargs):
    model = get_peft_model(base, AUSteerConfig(sites=list(site_layers)))
    model.set_aus(pick_aus(base, site_layers, **kwargs))
    return model


def plain_4bit_kernel(model):
    """Pin bitsandbytes to its dequantize-then-matmul path (the one CUDA takes for prompts). On CPUs with AVX512-BF16
    it otherwise repacks 4-bit weights on the first forward and multiplies in bfloat16 (absmax rounded to bf16), which
    is neither the dequantized weight nor float32 arithmetic; bench/RESULTS.md reports that case."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


CHECK = """
import sys, warnings, torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
root = sys.argv[1]
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=torch.float32)  # as in the test
ids = torch.load(root + '/ids.pt')
warnings.filterwarnings('error', message='Found missing adapter keys')


def load(case, **kwargs):
    base = AutoModelForCausalLM.from_pretrained(f'{root}/{case}/base', **kwargs).eval()
    for module in base.modules():  # as the exporting process did (see plain_4bit_kernel)
        if hasattr(module, 'support_avx512bf16_for_cpu'):
            module.support_avx512bf16_for_cpu = False
    model = PeftModel.from_pretrained(base, f'{root}/{case}/lora').eval()
    assert model.peft_type == 'LORA' and isinstance(model.peft_config['default'], LoraConfig)
    saved = load_file(f'{root}/{case}/lora/adapter_model.safetensors')
    loaded = set(get_peft_model_state_dict(model))
    assert loaded == set(saved), sorted(loaded ^ set(saved))
    return model


for case in sys.argv[2:]:
    kwargs = {'quantization_config': BitsAndBytesConfig(**NF4)} if case == 'nf4' else {}
    model = load(case, **kwargs)
    with torch.no_grad():
        error = (model(ids).logits - torch.load(f'{root}/{case}/steered.pt')).abs().max().item()
    print(case, error)
    assert error <= 1e-4, (case, error)

# Mixed batch: row 0 with the export, row 1 with another LoRA on some of the same modules, row 2 with neither.
model = load('llama')
model.load_adapter(f'{root}/other', adapter_name='other')
batch = torch.cat([ids[:1], ids[1:], ids[:1]])
with torch.no_grad():
    mixed = model(batch, adapter_names=['default', 'other', '__base__']).logits
    model.set_adapter('other')
    other = model(ids[1:]).logits
    with model.disable_adapter():
        plain = model(ids[:1]).logits
steered = torch.load(f'{root}/llama/steered.pt')
errors = [(mixed[0] - steered[0]).abs().max().item(), (mixed[1] - other[0]).abs().max().item(),
          (mixed[2] - plain[0]).abs().max().item()]
print('mixed', errors)
assert max(errors) <= 1e-4, errors
assert (steered[0] - plain[0]).abs().max() > 1e-2 and (other[0] - plain[0]).abs().max() > 1e-2
assert 'austeer_peft' not in sys.modules
print('ok')
"""


def test_lora_export_loads_with_plain_peft_and_reproduces_the_steered_logits(tmp_path, input_ids, capsys):
    """All eight families, a fused MoE (qwen2_moe: `ffn` on every expert's and the shared expert's down projection,
    expert-level `ffn_inner` columns) and a 4-bit nf4 base, reloaded where austeer_peft is never imported; the
    export then serves in a mixed batch next to another LoRA."""
    cases = {family: tiny_model(family) for family in FAMILIES}
    cases["qwen2_moe"] = tiny_moe_model("qwen2_moe")
    for case, base in cases.items():
        base.save_pretrained(tmp_path / case / "base")
        model = steered(base, per_module=5 if case == "qwen2_moe" else 3)
        torch.save(logits(model, input_ids), tmp_path / case / "steered.pt")
        to_lora(model, tmp_path / case / "lora")

    quantized = plain_4bit_kernel(quantized_copy(tiny_model("llama", hidden=64), tmp_path / "nf4", **NF4))
    (tmp_path / "nf4" / "fp32").rename(tmp_path / "nf4" / "base")
    model = get_peft_model(quantized, AUSteerConfig(sites=["attention", "ffn", "ffn_inner"]))
    model.set_aus([(m, d, 10.0) for m, d, _ in spread_aus(quantized, ["attention", "ffn", "ffn_inner"], 12)])
    steered_4bit = logits(model, input_ids)
    torch.save(steered_4bit, tmp_path / "nf4" / "steered.pt")
    to_lora(model, tmp_path / "nf4" / "lora")  # from the dequantized 4-bit weights
    model.merge_adapter()  # what the export replaces: re-quantized scaled weights
    merge_error = (logits(model, input_ids) - steered_4bit).abs().max().item()

    other = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj", "o_proj", "down_proj"], r=4,
                                                           init_lora_weights=False))
    other.save_pretrained(tmp_path / "other")
    torch.save(input_ids, tmp_path / "ids.pt")
    done = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path), *cases, "nf4"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
    lora_error = float(next(line for line in done.stdout.splitlines() if line.startswith("nf4 ")).split()[1])
    with capsys.disabled():
        print(f"\n4-bit nf4: max |logit| error vs the unmerged steered model: LoRA export {lora_error:.1e}, "
              f"merge {merge_error:.3f}")
    assert lora_error < merge_error / 100  # the export is the exact route where merging re-quantizes


def test_lora_files_ranks_scaling_and_card(tmp_path):
    model = steered(tiny_model("gpt2"))
    to_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False and config["lora_dropout"] == 0.0
    assert config["fan_in_fan_out"] is True  # GPT-2 Conv1D stores [in, out]
    assert config["lora_bias"] is True  # `ffn` rows of the biased c_proj also scale its bias
    counts = {}
    for module, _, _ in model.get_aus():
        counts[module] = counts.get(module, 0) + 1
    # c_proj of layer 1's MLP carries its `ffn_inner` columns and its `ffn` rows: ranks add up.
    counts["transformer.h.1.mlp.c_proj"] = counts.pop("transformer.h.1.mlp") + counts["transformer.h.1.mlp.c_proj"]
    assert config["target_modules"] == sorted(counts)
    ranks = {name.replace("\\", ""): rank for name, rank in config["rank_pattern"].items()}
    assert ranks == counts and config["alpha_pattern"] == config["rank_pattern"]  # every scaling alpha / r = 1
    assert config["r"] == config["lora_alpha"] == max(counts.values())
    for name, rank in counts.items():
        assert weights[f"base_model.model.{name}.lora_A.weight"].shape[0] == rank
        assert weights[f"base_model.model.{name}.lora_B.weight"].shape[1] == rank
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert f"{len(model.get_aus())} steered activations in {len(counts)} weights" in card.text


def test_uniform_rank_pads_every_module_and_max_rank_refuses(tmp_path, input_ids):
    model = steered(tiny_model("llama"))
    steered_logits = logits(model, input_ids)
    # Layer 1's down projection: 4 `ffn_inner` columns and 4 `ffn` rows; every other module has 3 or 4 AUs.
    to_lora(model, tmp_path / "uniform", uniform_rank=True, max_rank=8)
    config = json.loads((tmp_path / "uniform" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {config["r"]} == {8}
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "uniform")
    torch.testing.assert_close(logits(loaded, input_ids), steered_logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"rank 8 on model.layers.1.mlp.down_proj .*max_rank=4.*--max-lora-rank"):
        to_lora(model, tmp_path / "capped", max_rank=4)
    assert not (tmp_path / "capped").exists()


def tiny_gpt_oss():
    """gpt-oss stores its fused experts transposed (down_proj [experts, inner, hidden]) and with biases."""
    config = AutoConfig.for_model(
        "gpt_oss", hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=101, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        layer_types=["full_attention"] * 2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("make, site_layers", [
    (tiny_gpt_oss, {"ffn_inner": [0, 1], "attention": [0]}),  # transposed 3D experts, biased o_proj (input side)
    (lambda: tiny_model("llama"), None),  # target_modules: the outputs of up_proj
])
def test_transposed_experts_and_target_modules(tmp_path, input_ids, make, site_layers):
    if site_layers is None:
        model = get_peft_model(make(), AUSteerConfig(target_modules=["up_proj"], position="output"))
        model.set_aus([("model.layers.1.mlp.up_proj", 40, 1.5), ("model.layers.0.mlp.up_proj", 3, -0.5)])
    else:
        model = steered(make(), site_layers)
    to_lora(model, tmp_path)
    loaded = PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids), rtol=0, atol=1e-5)


def _scoped():
    model = steered(tiny_model("llama"))
    model.set_scope("generated")
    return model


def _merged():
    model = steered(tiny_model("llama"))
    model.merge_adapter()
    return model


def _embedding():
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(target_modules=["embed_tokens"], position="output"))
    model.set_aus([("model.embed_tokens", 1, 1.0)])
    return model


@pytest.mark.parametrize("make, message", [
    (lambda: steered(tiny_model("llama"), {"attention": [0], "residual": [1]}), "residual.*no weight update"),
    (_scoped, "scope='generated'.*a LoRA adds its update at every position"),
    (_merged, "merged into the weights; call `unmerge_adapter"),
    (lambda: get_peft_model(tiny_model("llama"), AUSteerConfig()), "no AUs to export"),
    (lambda: steered(tiny_gpt_oss(), {"ffn": [1]}), "scale the experts' down projection biases.*no `lora_bias`"),
    (_embedding, "LoRA cannot express AUs on model.embed_tokens"),
])
def test_lora_export_refuses_what_lora_cannot_express(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        to_lora(make(), tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_8bit_base_is_refused(tmp_path):
    quantized = quantized_copy(tiny_model("llama", hidden=64), tmp_path, load_in_8bit=True)
    model = get_peft_model(quantized, AUSteerConfig(sites="attention"))
    model.set_aus([(("attention", 0), 3, 1.0)])
    with pytest.raises(ValueError, match="8-bit layer: LLM.int8 multiplies with quantized activations"):
        to_lora(model, tmp_path / "lora")


def test_exports_the_named_adapter_not_the_active_one(tmp_path, input_ids):
    model = steered(tiny_model("qwen2"))
    model.add_adapter("other", AUSteerConfig(sites=["ffn"]))
    model.set_aus([(("ffn", 0), 5, 2.0), (("ffn", 1), 7, -0.5)], adapter_name="other")
    to_lora(model, tmp_path, adapter_name="other")
    model.set_adapter("other")
    loaded = PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids), rtol=0, atol=1e-5)
