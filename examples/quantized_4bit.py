"""Fit on a full-precision model, deploy onto its 4-bit version: load, steer, merge (bitsandbytes, runs on CPU).

An AUSteer adapter names module dimensions, not weights, so an adapter fitted on the fp32 (or bf16) model loads onto
the bitsandbytes 4-bit model of the same architecture and steers it. Merging into 4-bit weights dequantizes, scales
the steered columns/rows and re-quantizes: the merged model is close to, not equal to, the unmerged steered 4-bit
model (re-quantization noise is of the order of the quantization itself), and unmerging restores the packed weights
exactly. This script prints those figures on a tiny random Llama (offline, seconds); a fit can also run directly on
the 4-bit model (`fit_austeer(quantized_model, ...)`), as the last step shows.

    python examples/quantized_4bit.py [--quant-type nf4|fp4]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

import austeer_peft

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="Could not find a config file")  # PEFT's vocabulary check, offline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
args = parser.parse_args()
workdir = Path(tempfile.mkdtemp(prefix="austeer-4bit-"))

# Toy contrastive pairs (prompt, chosen, rejected); real ones come from a task, e.g. austeer_peft.evaluate.
PAIRS = [(f"review : the {thing} was {how} . sentiment :", " positive", " negative")
         for thing in ("film", "plot", "cast", "music", "ending", "story") for how in ("great", "fine", "lovely")]
PAIRS += [(f"review : the {thing} was {how} . sentiment :", " negative", " positive")
          for thing in ("film", "plot", "cast", "music", "ending", "story") for how in ("awful", "dull", "bad")]

# 1. A tiny random Llama checkpoint with a word-level tokenizer. bitsandbytes' 4-bit blocks hold 64 weights, so
#    every width is a multiple of 64.
torch.manual_seed(0)
config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, pad_token_id=0)
AutoModelForCausalLM.from_config(config).save_pretrained(workdir / "fp32")
words = sorted({w for prompt, chosen, rejected in PAIRS for w in f"{prompt}{chosen}{rejected}".split()})
vocabulary = {word: i for i, word in enumerate(["<pad>", "<unk>", *words])}
backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")

fp32 = AutoModelForCausalLM.from_pretrained(workdir / "fp32").eval()
quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quant_type,
                                  bnb_4bit_compute_dtype=torch.float32)
quantized = AutoModelForCausalLM.from_pretrained(workdir / "fp32", quantization_config=quantization).eval()
assert isinstance(quantized.model.layers[0].self_attn.o_proj, bnb.nn.Linear4bit)
inputs = tokenizer(["review : the cast was lovely . sentiment :"], return_tensors="pt")


def logits(model):
    with torch.no_grad():
        return model(**inputs).logits[0, -1]


def max_error(a, b):
    return (a - b).abs().max().item()


# 2. Fit on the fp32 model and save the adapter (a few hundred bytes).
sites = ["attention", "ffn", "ffn_inner"]
fitted = austeer_peft.fit_austeer(fp32, tokenizer, PAIRS, sites=sites, k=24, alpha=15, progress=False)
fitted.peft_model.save_pretrained(workdir / "adapter")
size = (workdir / "adapter" / "adapter_model.safetensors").stat().st_size
print(f"fitted {len(fitted.peft_model.get_aus())} AUs on the fp32 model ({size} bytes)")

# 3. Load it onto the 4-bit model: it steers.
plain_4bit = logits(quantized)
steered_4bit = PeftModel.from_pretrained(quantized, workdir / "adapter")
steered = logits(steered_4bit)
print(f"4-bit ({args.quant_type}) model, max |logit difference| at the last token:")
print(f"  steered vs unsteered 4-bit (the steering)          {max_error(steered, plain_4bit):.3e}")
print(f"  steered 4-bit vs steered fp32 (quantization)       {max_error(steered, logits(fitted.peft_model)):.3e}")

# 4. Merge into the 4-bit weights (dequantize, scale, re-quantize), then unmerge (exact).
steered_4bit.merge_adapter()
merged = logits(steered_4bit)
print(f"  merged vs unmerged steered 4-bit (re-quantization) {max_error(merged, steered):.3e}")
steered_4bit.unmerge_adapter()
assert torch.equal(logits(steered_4bit), steered)
print("  unmerged: bit-identical to before the merge (the packed weights are restored)")
serving = steered_4bit.merge_and_unload()  # a plain transformers 4-bit model with the steering folded in
assert not any(isinstance(m, austeer_peft.AUSteerLayer) for m in serving.modules())
print(f"  merge_and_unload() vs unmerged steered 4-bit       {max_error(logits(serving), steered):.3e}")

# 5. Fitting directly on a 4-bit model works the same way.
quantized_again = AutoModelForCausalLM.from_pretrained(workdir / "fp32", quantization_config=quantization).eval()
on_4bit = austeer_peft.fit_austeer(quantized_again, tokenizer, PAIRS, sites=sites, k=24, alpha=15, progress=False)
shared = {au[:2] for au in on_4bit.peft_model.get_aus()} & {au[:2] for au in fitted.peft_model.get_aus()}
print(f"fit on the 4-bit model: {len(shared)} of its 24 AUs are also chosen on the fp32 model")
