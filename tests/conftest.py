"""Fixtures: tiny random models of every supported family, built from configs, and the real SmolLM2 model."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

import austeer_peft  # noqa: F401  (registers the method)
from austeer_peft import AUSteerConfig
from austeer_peft.tuner.sites import base_named_modules, candidate_modules, unwrap

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

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


# ------------------------------------------------------------------ helpers shared by the test modules


ALL_SITES = ["attention", "ffn", "ffn_inner", "residual"]


def char_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A character-level tokenizer that fits the tiny models' vocabulary of 101 (no special tokens added)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in [chr(c) for c in range(32, 127)] + ["\n"]:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", padding_side=padding_side)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tokenizer


def random_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Pairs of different lengths (so batches need padding) sharing a prompt and differing in the answer."""
    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "red", "blue", "tree", "road", "sea", "hot", "cold", "yes", "no"]
    pairs = []
    for _ in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 7))) + "? "
        positive = prompt + rng.choice(words)
        negative = prompt + " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        pairs.append((positive, negative))
    return pairs


def brute_force_counts(model, tokenizer, pairs, sites) -> tuple[dict, dict]:
    """Reference counts: one unpadded sequence at a time, full activations through plain hooks, a Python loop."""
    candidates = candidate_modules(model, AUSteerConfig(sites=sites))
    modules = base_named_modules(model)
    seen = {}

    def keep(name, tensor):
        seen[name] = tensor[0, -1].clone()  # batch of one, last token

    handles = []
    for c in candidates:
        if c.position == "input":
            handles.append(modules[c.name].register_forward_pre_hook(lambda m, a, name=c.name: keep(name, a[0])))
        else:
            handles.append(modules[c.name].register_forward_hook(
                lambda m, a, out, name=c.name: keep(name, out if torch.is_tensor(out) else out[0])))
    n_pos = {c.name: [0] * c.width for c in candidates}
    n_neg = {c.name: [0] * c.width for c in candidates}
    try:
        for positive, negative in pairs:
            activations = []
            for text in (positive, negative):
                seen.clear()
                with torch.no_grad():
                    model(torch.tensor([tokenizer(text)["input_ids"]]))
                activations.append(dict(seen))
            for c in candidates:
                for dim in range(c.width):
                    x_pos, x_neg = activations[0][c.name][dim].item(), activations[1][c.name][dim].item()
                    n_pos[c.name][dim] += x_pos > x_neg
                    n_neg[c.name][dim] += x_pos < x_neg
    finally:
        for handle in handles:
            handle.remove()
    return ({k: torch.tensor(v) for k, v in n_pos.items()}, {k: torch.tensor(v) for k, v in n_neg.items()})


MERGEABLE_SITES = ["attention", "ffn", "ffn_inner"]


def spread_aus(model, sites, n, seed=0, gamma_range=(-0.9, 3.0)):
    """n distinct AUs spread over all candidate modules of `sites`, with random γ."""
    candidates = candidate_modules(model, AUSteerConfig(sites=sites))
    generator = torch.Generator().manual_seed(seed)
    everything = [(c.name, d) for c in candidates for d in range(c.width)]
    chosen = torch.randperm(len(everything), generator=generator)[:n].tolist()
    low, high = gamma_range
    gammas = (torch.rand(n, generator=generator) * (high - low) + low).tolist()
    return [(*everything[i], g) for i, g in zip(chosen, gammas)]


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def steered_and_plain(model, layer, input_ids):
    """The activation an AUSteerLayer steers, with the adapter on and off: for input sites what the wrapped module
    actually receives, for output sites what the wrapper hands on."""
    seen = []
    if layer.position == "input":
        handle = unwrap(layer).register_forward_pre_hook(lambda m, args, kwargs: seen.append(
            (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)
    else:
        handle = layer.register_forward_hook(lambda m, args, out: seen.append(out.clone()))
    with torch.no_grad():
        model(input_ids)
        with model.disable_adapter():
            model(input_ids)
    handle.remove()
    return seen


def assert_only_dim_scaled(steered, plain, dim, factor):
    others = [d for d in range(steered.shape[-1]) if d != dim]
    assert torch.equal(steered[..., others], plain[..., others])
    torch.testing.assert_close(steered[..., dim], plain[..., dim] * factor, rtol=1e-6, atol=1e-7)
    assert not torch.equal(steered[..., dim], plain[..., dim])


def assert_merge_exact_and_unmerge_restores(model, original, input_ids):
    """merge_adapter matches the unmerged logits (≤ 1e-5); unmerge_adapter restores every weight bit-exactly."""
    steered = logits(model, input_ids)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), steered, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    for key, value in model.get_base_model().state_dict().items():
        assert torch.equal(value, original[key.replace(".base_layer", "")]), key
    assert torch.equal(logits(model, input_ids), steered)
    return steered


def tiny_checkpoint(folder: Path, chat_template: bool = True) -> Path:
    """A tiny Llama with the character tokenizer (and its chat template, unless told not to), saved as a checkpoint
    folder that `austeer --model` takes; room for 512 positions so that real prompts fit."""
    config = tiny_config("llama")
    config.max_position_embeddings = 512
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer = char_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    return folder
