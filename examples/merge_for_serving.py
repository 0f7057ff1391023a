"""Merge an AUSteer adapter into its base model for serving, and check the result without austeer-peft.

Each AUSteer factor `1 + γ` multiplies one column or row of a linear layer's weight, so the merged model is an
ordinary transformers checkpoint (same architecture, same speed) that any server loading transformers/safetensors
checkpoints can run. This script:

1. steers a base model (a few hand-set AUs; real ones come from `austeer_peft.fit_austeer`) and saves the adapter;
2. merges it with `austeer_peft.merge_and_save`, which is what `austeer merge --model M --adapter A --output DIR`
   runs (GGUF models such as the `smollm2-135m` alias are unpacked and saved as plain safetensors);
3. loads the merged folder in a fresh Python that never imports austeer_peft and compares its logits (and, for a
   real model, its greedy continuation) with the steered model's.

    python examples/merge_for_serving.py                          # tiny random Llama, offline, seconds
    python examples/merge_for_serving.py --model smollm2-135m     # SmolLM2-135M-Instruct (about a minute)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

import austeer_peft
from austeer_peft.hub.models import load_model

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="Could not find a config file")  # PEFT's vocabulary check, offline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help="base model: a local folder, a Hub id or an alias such as smollm2-135m "
                                    "(default: a tiny random Llama written to the work folder)")
parser.add_argument("--workdir", type=Path, help="where to keep the files (default: a temporary folder)")
args = parser.parse_args()
workdir = args.workdir or Path(tempfile.mkdtemp(prefix="austeer-merge-"))
PROMPT = "The capital of France is"


def tiny_base_folder(folder: Path) -> str:
    """A complete (random) checkpoint: config, weights and a toy word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    vocabulary = {word: i for i, word in enumerate(["<unk>", "<s>", "</s>", *PROMPT.split(), *"abcdefghij"])}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return str(folder)


model_name = args.model or tiny_base_folder(workdir / "base")
base, tokenizer = load_model(model_name)
layers = base.config.num_hidden_layers
head_dim = getattr(base.config, "head_dim", None) or base.config.hidden_size // base.config.num_attention_heads

# 1. Steer and save the adapter (a promoted head dimension in the last layer, a damped MLP output early on).
model = get_peft_model(base, austeer_peft.AUSteerConfig(sites=["attention", "ffn", "ffn_inner"], k=3))
model.set_aus([(("attention", layers - 1), 1 * head_dim + 20, 6.0), (("ffn", 1), 5, -0.5),
               (("ffn_inner", 2), 11, 2.0)])
input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
with torch.no_grad():
    steered = model(input_ids).logits
    steered_text = tokenizer.decode(model.generate(input_ids, max_new_tokens=8, do_sample=False)[0]) \
        if args.model else None
model.save_pretrained(workdir / "adapter")
torch.save({"input_ids": input_ids, "logits": steered}, workdir / "steered.pt")
print(f"Adapter: {workdir / 'adapter'} ({(workdir / 'adapter' / 'adapter_model.safetensors').stat().st_size} bytes)")
del model, base  # merge_and_save loads its own copy, as `austeer merge` does

# 2. Merge: same as `austeer merge --model <model> --adapter <workdir>/adapter --output <workdir>/merged`.
merged_dir = austeer_peft.merge_and_save(model_name, workdir / "adapter", workdir / "merged")
print(f"Merged checkpoint: {merged_dir}")
for path in sorted(merged_dir.iterdir()):
    print(f"  {path.name:24} {path.stat().st_size:>12,} bytes")

# 3. Serve it with plain transformers, in a process without austeer_peft.
check = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(merged_dir)!r}).eval()
tokenizer = AutoTokenizer.from_pretrained({str(merged_dir)!r})
saved = torch.load({str(workdir / 'steered.pt')!r})
with torch.no_grad():
    logits = model(saved["input_ids"]).logits
    text = tokenizer.decode(model.generate(saved["input_ids"], max_new_tokens=8, do_sample=False)[0])
print(json.dumps({{"max_abs_error": (logits - saved["logits"]).abs().max().item(),
                  "logit_scale": saved["logits"].abs().max().item(), "text": text,
                  "austeer_imported": "austeer_peft" in sys.modules}}))
"""
done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
if done.returncode != 0:
    sys.exit(done.stderr[-2000:])
result = json.loads(done.stdout.strip().splitlines()[-1])
print(f"Plain transformers (austeer_peft imported: {result['austeer_imported']}): max |logit difference| "
      f"{result['max_abs_error']:.2e} (logits up to {result['logit_scale']:.1f})")
if steered_text is not None:
    print(f"  steered adapter: {steered_text!r}\n  merged model:    {result['text']!r}")
assert not result["austeer_imported"]
# Folding a factor into a weight rounds differently from scaling the activation (exact for powers of two).
assert result["max_abs_error"] <= 2e-6 * max(result["logit_scale"], 1.0), result
