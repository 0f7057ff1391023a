"""Steer a sparse mixture-of-experts model: fit, steer, merge exactly (tiny random Qwen3-MoE, offline, seconds).

transformers 5 fuses a MoE layer's experts into 3D parameters (`experts.down_proj` is [experts, hidden, inner]). On
such models the sites are:

- `attention`: input of each layer's attention output projection, as on dense models;
- `ffn`: the output of the whole sparse MoE block; it merges into every expert's (and a shared expert's) down
  projection rows;
- `ffn_inner`: expert-level AUs, one input column of one expert's down projection; AU `d` is column `d % inner` of
  expert `d // inner`. They are steered by scaling that weight column on a copy for the forward, and merge by
  scaling it in place, so merged and steered models agree bit for bit. A fit reads them as `w_e * h_e[i]` (routing
  weight times inner activation) at each sequence's last token: 0 when the token is not routed to expert `e`.

    python examples/moe.py
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3MoeConfig
from transformers.utils import logging as hf_logging

import austeer_peft

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="Could not find a config file")  # PEFT's vocabulary check, offline
workdir = Path(tempfile.mkdtemp(prefix="austeer-moe-"))

# Toy contrastive pairs (prompt, chosen, rejected); real ones come from a task, e.g. austeer_peft.evaluate.
TRUE = {("snow", "cold"), ("fire", "hot"), ("grass", "green"), ("sky", "blue"), ("sea", "blue"), ("coal", "hot")}
PAIRS = [(f"question : is {thing} {what} ? answer :", *((" yes", " no") if (thing, what) in TRUE else (" no", " yes")))
         for thing in ("snow", "fire", "grass", "sky", "sea", "coal") for what in ("cold", "hot", "green", "blue")]

# 1. A tiny random Qwen3-MoE: 4 layers, 8 experts of inner width 32, 2 routed per token.
torch.manual_seed(0)
config = Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=32, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                        num_experts_per_tok=2, vocab_size=64, max_position_embeddings=64, pad_token_id=0)
model = AutoModelForCausalLM.from_config(config).eval()
model.save_pretrained(workdir / "base")
words = sorted({w for prompt, chosen, rejected in PAIRS for w in f"{prompt}{chosen}{rejected}".split()})
backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<unk>", *words])}, unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
inputs = tokenizer(["question : is fire hot ? answer :", "question : is sea green ? answer :"], return_tensors="pt",
                   padding=True)


def logits(m):
    with torch.no_grad():
        return m(**inputs).logits


# 2. Fit on attention, the MoE block output and the experts' inner units together.
result = austeer_peft.fit_austeer(model, tokenizer, PAIRS, sites=["attention", "ffn", "ffn_inner"], k=24, alpha=15,
                                  progress=False)
steered_model = result.peft_model
inner = config.moe_intermediate_size
print(f"fitted {len(steered_model.get_aus())} AUs; top-24 per (site, layer): "
      f"{ {f'{site}@{layer}': n for (site, layer), n in result.scores.layer_distribution(24).items() if n} }")
for au in steered_model.get_aus():
    if au.module.endswith("experts"):
        print(f"  expert-level AU {au.module}[{au.dim}] = expert {au.dim // inner}, column {au.dim % inner}, "
              f"gamma {au.gamma:+.2f}")

# 3. Steering changes the model; merge is exact, unmerge restores the weights bit for bit.
steered = logits(steered_model)
with steered_model.disable_adapter():
    plain = logits(steered_model)
weights = {k: v.clone() for k, v in steered_model.get_base_model().state_dict().items()}
steered_model.merge_adapter()
merged = logits(steered_model)
steered_model.unmerge_adapter()
restored = all(torch.equal(v, weights[k]) for k, v in steered_model.get_base_model().state_dict().items())
print(f"steering effect max |logit change| {(steered - plain).abs().max():.3e}; merged vs steered max |logit error| "
      f"{(merged - steered).abs().max():.3e}; unmerge restores every weight bit-exactly: {restored}")
assert restored and torch.allclose(merged, steered, rtol=0, atol=1e-5)

# 4. Save, load onto a fresh copy of the base model, and merge for serving.
steered_model.save_pretrained(workdir / "adapter")
fresh = AutoModelForCausalLM.from_pretrained(workdir / "base").eval()
loaded = PeftModel.from_pretrained(fresh, workdir / "adapter")
assert torch.equal(logits(loaded), steered)
serving = loaded.merge_and_unload()
size = (workdir / "adapter" / "adapter_model.safetensors").stat().st_size
print(f"adapter {size} bytes reloads identically; merge_and_unload() vs steered max |logit error| "
      f"{(logits(serving) - steered).abs().max():.3e}")
