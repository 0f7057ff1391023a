"""Fit a steer, merge it into a GGUF file with `austeer merge --gguf`, and run both files in llama.cpp.

llama.cpp, Ollama and LM Studio run GGUF files and load no PEFT adapter; `austeer merge --gguf` folds an AUSteer
adapter into a copy of the model's GGUF file (untouched tensors and all metadata kept byte for byte). This script:

1. fits an AUSteer adapter on SST-2 pairs of the built-in task (prompt + correct answer vs prompt + wrong answer), on
   the `ffn` site of SmolLM2-135M-Instruct (Q4_1 GGUF), and saves it;
2. runs `austeer merge --model smollm2-135m --adapter ADAPTER --gguf steered.gguf` (printing which tensors it
   re-encoded);
3. asks llama.cpp (llama-cpp-python, with its own tokenizer) for the answer (" negative" or " positive": the one with
   the larger next-token logit) of the original and the merged file on SST-2 test reviews, and prints the reviews
   whose answer the merge changed, next to the answers of the unmerged adapter in transformers. A change in the
   steered direction is one to the answer the AUSteer-steered model gives.

    pip install "llama-cpp-python==0.3.36"           # builds llama.cpp from source (see `make test-llama-cpp`)
    python examples/gguf_llama_cpp.py                # about a minute or two on a free CPU
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from austeer_peft import fit_austeer
from austeer_peft.evaluate import load_task
from austeer_peft.hub.gguf import gguf_source, load_gguf_model

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m", help="a GGUF model alias or .gguf file")
parser.add_argument("--site", default="ffn", choices=["ffn", "attention", "ffn_inner"])
parser.add_argument("--k", type=int, default=100)
parser.add_argument("--alpha", type=float, default=15.0)
parser.add_argument("--n-fit", type=int, default=200)
parser.add_argument("--n-test", type=int, default=50)
parser.add_argument("--workdir", type=Path, help="where to keep the files (default: a temporary folder)")
args = parser.parse_args()
try:
    from llama_cpp import Llama
except ImportError:
    sys.exit("This example runs llama.cpp through llama-cpp-python: pip install 'llama-cpp-python==0.3.36' "
             "(or `make test-llama-cpp`).")
workdir = args.workdir or Path(tempfile.mkdtemp(prefix="austeer-gguf-"))

# 1. Fit on the model as transformers loads it from the GGUF file.
source = gguf_source(args.model)
tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
task = load_task("sst2", n_fit=args.n_fit, n_validation=0)
fitted = fit_austeer(load_gguf_model(source), tokenizer, task.pairs("fit"), sites=args.site, k=args.k,
                     alpha=args.alpha, progress=False)
fitted.save_pretrained(workdir / "adapter")
print(f"1. Fitted {len(fitted.peft_model.get_aus())} AUs on the {args.site} site from {args.n_fit} SST-2 pairs.")

# 2. The command line merge into a GGUF file.
steered_path = workdir / "steered.gguf"
command = [sys.executable, "-m", "austeer_peft.cli", "merge", "--model", args.model, "--adapter",
           str(workdir / "adapter"), "--gguf", str(steered_path), "--force"]
print("2. $ austeer " + " ".join(command[3:]))
done = subprocess.run(command, capture_output=True, text=True)
print("   " + done.stdout.strip().replace("\n", "\n   "))
if done.returncode != 0:
    sys.exit(done.stderr[-2000:])

# 3. The answers (" negative" or " positive", whichever has the larger next-token logit) of the steered and unsteered
# model in transformers, and of both files in llama.cpp, with llama.cpp's own tokenizer.
test = task.test.select(range(args.n_test))
model = fitted.peft_model
choice_ids = [tokenizer(choice, add_special_tokens=False).input_ids[0] for choice in task.choices]


def transformers_answers() -> list[str]:
    with torch.inference_mode():
        rows = [model(**tokenizer(prompt, return_tensors="pt"), logits_to_keep=1).logits[0, -1]
                for prompt in test["prompt"]]
    return [task.choices[int(row[choice_ids[1]] > row[choice_ids[0]])] for row in rows]


def llama_cpp_answers(path: Path) -> list[str]:
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    ids = [llm.tokenize(choice.encode(), add_bos=False)[0] for choice in task.choices]
    found = []
    for prompt in test["prompt"]:
        llm.reset()
        llm.eval(llm.tokenize(prompt.encode()))
        logits = llm.scores[llm.n_tokens - 1]
        found.append(task.choices[int(logits[ids[1]] > logits[ids[0]])])
    return found


steered_hf = transformers_answers()
with model.disable_adapter():
    plain_hf = transformers_answers()
plain, steered = llama_cpp_answers(source), llama_cpp_answers(steered_path)
towards = away = 0
print(f"3. llama.cpp answers of {source.name} -> {steered_path.name} on {args.n_test} SST-2 test reviews that changed "
      "(and the AUSteer adapter's answer in transformers):")
for prompt, before, after, hf_before, hf_after in zip(test["prompt"], plain, steered, plain_hf, steered_hf):
    if before == after:
        continue
    towards += after == hf_after
    away += after != hf_after
    review = prompt.split("\n")[0][len("Review: "):]
    print(f"   {review[:60]!r}: {before!r} -> {after!r}   (transformers: {hf_before!r} -> {hf_after!r})")
changed_hf = sum(a != b for a, b in zip(plain_hf, steered_hf))
print(f"   llama.cpp: {towards + away} answers changed, {towards} to the steered model's answer (the steered "
      f"direction), {away} to the other; transformers: the steer changes {changed_hf} answers.")
