"""Adapters on a 70B model cost O(k): on a Llama-3-70B-shaped model built on the meta device (no weight allocated),
attaching, setting 100 AUs, saving, loading, switching and deleting adapters all work and the process's peak memory
grows by a few MB at most; on a bitsandbytes 4-bit model, loading an adapter dequantizes nothing."""

from __future__ import annotations

import ctypes
import gc
import tracemalloc

import bitsandbytes as bnb
import torch
from accelerate import init_empty_weights
from conftest import quantized_copy, spread_aus, tiny_model
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from austeer_peft import AUSteerConfig, AUSteerLayer
from austeer_peft.tuner.sites import candidate_modules

SITES = ["attention", "ffn", "ffn_inner", "residual"]
MAX_GROWTH_MIB = 8  # what 100 AUs and their bookkeeping may cost; one 70B weight matrix alone is 896 MiB in fp32


def llama3_70b():
    """Llama-3-70B's shape (80 layers, hidden 8192, MLP 28672, GQA 64/8 heads, vocab 128256) on the meta device."""
    config = AutoConfig.for_model("llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                  max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def some_aus(model, n: int, seed: int) -> list[tuple[str, int, float]]:
    """n distinct AUs over the candidate modules of all sites, drawn without listing every AU (conftest's
    spread_aus lists all 4.3 million of a 70B model)."""
    candidates = candidate_modules(model, AUSteerConfig(sites=SITES))
    generator = torch.Generator().manual_seed(seed)
    aus = {}
    while len(aus) < n:
        candidate = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
        dim = int(torch.randint(candidate.width, (1,), generator=generator))
        aus[(candidate.name, dim)] = float(torch.rand(1, generator=generator)) * 4 - 1
    return [(name, dim, gamma) for (name, dim), gamma in aus.items()]


def adapter_round_trip(base, second_base, folder) -> None:
    """Everything a user does with adapters on a large model."""
    model = get_peft_model(base, AUSteerConfig(sites=SITES))
    model.set_aus(some_aus(base, 100, seed=1))
    model.save_pretrained(folder / "a")
    model.set_aus(some_aus(base, 100, seed=2))
    model.save_pretrained(folder / "b")
    loaded = PeftModel.from_pretrained(second_base, folder / "a")
    loaded.load_adapter(folder / "b", adapter_name="b")
    loaded.set_adapter("b")
    assert sum(au.module.startswith("model.layers") for au in loaded.get_aus("b")) == 100
    loaded.set_adapter("default")
    loaded.delete_adapter("b")
    assert len(loaded.get_aus()) == 100 and list(loaded.peft_config) == ["default"]


def test_adapters_on_a_70b_shaped_model_cost_o_k_memory(tmp_path):
    warm_up = [tiny_model("llama"), tiny_model("llama")]  # first-call imports and caches are not the adapters' cost
    adapter_round_trip(*warm_up, tmp_path / "warm")
    base, second_base = llama3_70b(), llama3_70b()
    assert base.model.layers[79].mlp.down_proj.weight.is_meta
    assert sum(p.numel() for p in base.parameters()) > 70e9
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)

    if peak_rss_reset():  # Linux: the kernel's exact peak, which sees torch's allocations as well as Python's
        before = status_kib("VmRSS")
        adapter_round_trip(base, second_base, tmp_path)
        growth, what = (status_kib("VmHWM") - before) / 1024, "peak RSS"
    else:  # where /proc/self/clear_refs is not writable: Python's own allocations (slower, sees less)
        tracemalloc.start()
        adapter_round_trip(base, second_base, tmp_path)
        growth, what = tracemalloc.get_traced_memory()[1] / 2**20, "Python allocations' peak"
        tracemalloc.stop()
    assert growth < MAX_GROWTH_MIB, f"{what} grew by {growth:.1f} MiB"
    wrapped = [m for m in second_base.modules() if isinstance(m, AUSteerLayer)]
    assert 0 < len(wrapped) <= 100  # only the modules that hold an AU are wrapped
    assert all(p.is_meta for name, p in second_base.named_parameters() if "austeer" not in name)
    assert (tmp_path / "a" / "adapter_model.safetensors").stat().st_size < 64 * 1024


def test_loading_onto_a_4bit_model_dequantizes_nothing(tmp_path, monkeypatch):
    fp32 = tiny_model("llama", hidden=64)
    model = get_peft_model(fp32, AUSteerConfig(sites=["attention", "ffn", "ffn_inner"]))
    model.set_aus(spread_aus(fp32, ["attention", "ffn", "ffn_inner"], 24))
    model.save_pretrained(tmp_path / "adapter")
    quantized = quantized_copy(tiny_model("llama", hidden=64), tmp_path, load_in_4bit=True,
                               bnb_4bit_compute_dtype=torch.float32)
    packed = {name: p.detach().clone() for name, p in quantized.named_parameters()}

    calls = []
    original = bnb.functional.dequantize_4bit
    monkeypatch.setattr(bnb.functional, "dequantize_4bit", lambda *a, **k: calls.append(1) or original(*a, **k))
    loaded = PeftModel.from_pretrained(quantized, tmp_path / "adapter")
    loaded.load_adapter(tmp_path / "adapter", adapter_name="again")
    loaded.set_adapter("again")
    loaded.delete_adapter("again")
    assert calls == []
    layers = [m for m in loaded.modules() if isinstance(m, AUSteerLayer)]
    assert layers and any(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in layers)
    for name, p in loaded.get_base_model().named_parameters():
        if "austeer" not in name:
            key = name.replace(".base_layer", "")
            assert p.dtype == packed[key].dtype and torch.equal(p, packed[key]), name
    loaded.merge_adapter()  # merging does dequantize (and re-quantize): the watch above would have seen it
    assert calls
