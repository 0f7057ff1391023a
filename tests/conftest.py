"""Fixtures: tiny random models of every supported family, built from configs, and the real SmolLM2 model."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import austeer_peft  # noqa: F401  (registers the method)

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2"]
DATA_DIR = Path(os.environ.get("AUSTEER_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def tiny_config(family: str, layers: int = 2, hidden: int = 32):
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=hidden, n_layer=layers, n_head=4, vocab_size=101, n_positions=64,
                                    bos_token_id=1, eos_token_id=2)
    extra = {"head_dim": hidden // 4} if family not in ("phi3",) else {}
    return AutoConfig.for_model(
        family, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False, **extra,
    )


def tiny_model(family: str, seed: int = 0, layers: int = 2, hidden: int = 32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers, hidden), dtype=torch.float32).eval()
    # Random init leaves some weights at exactly zero or one (norms); perturb so every AU matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def input_ids():
    torch.manual_seed(1)
    return torch.randint(3, 101, (2, 9))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF from PyPI), loaded once per session."""
    from austeer_peft.hub.models import load_model

    return load_model("smollm2-135m")


MOE_FAMILIES = ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe"]


def tiny_moe_model(family: str, seed: int = 0, layers: int = 2):
    """Tiny sparse-MoE model; transformers 5 fuses its experts into 3D parameters ([experts, hidden, inner])."""
    config = AutoConfig.for_model(
        family, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=101,
        max_position_embeddings=64, num_experts=4, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def quantized_copy(model, tmp_path, **bnb_kwargs):
    """The same weights loaded through bitsandbytes (runs on CPU): real Linear4bit / Linear8bitLt layers. Widths must
    be multiples of the 4-bit block size (64): build the model with `hidden=64` or more."""
    from transformers import BitsAndBytesConfig

    model.save_pretrained(tmp_path / "fp32")
    quantization = BitsAndBytesConfig(**bnb_kwargs)
    return AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=quantization).eval()
