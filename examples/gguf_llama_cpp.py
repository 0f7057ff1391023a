"""Fit a steer, merge it into a GGUF file with `austeer merge --gguf`, and run both files in llama.cpp.

llama.cpp, Ollama and LM Studio run GGUF files and load no PEFT adapter; `austeer merge --gguf` folds an AUSteer
adapter into a copy of the model's GGUF file (untouched tensors and all metadata kept byte for byte). This script:

1. fits an AUSteer adapter on SST-2 pairs of the built-in task (prompt + correct answer vs prompt + wrong answer), on
   the `ffn` site of SmolLM2-135M-Instruct (Q4_1 GGUF), and saves it;
2. runs `austeer merge --model smollm2-135m --adapter ADAPTER --gguf steered.gguf` (printing which tensors it
   re-encoded);
3. asks llama.cpp (llama-cpp-python) for the greedy one-token answer of the original and the merged file on SST-2 test
   reviews, with llama.cpp's own tokenizer, and prints the reviews where the answers differ. The steer was fitted
   towards the correct answer, so a change in the steered direction is one from the wrong answer to the right one.

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

# 3. Both files in llama.cpp: greedy one-token answers.
test = task.test.select(range(args.n_test))


def answers(path: Path) -> list[str]:
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
    return [llm(prompt, max_tokens=1, temperature=0.0)["choices"][0]["text"] for prompt in test["prompt"]]


plain, steered = answers(source), answers(steered_path)
towards = away = 0
print(f"3. llama.cpp, greedy answer of {source.name} vs {steered_path.name} on {args.n_test} SST-2 test reviews:")
for prompt, label, before, after in zip(test["prompt"], test["label"], plain, steered):
    if before == after:
        continue
    correct = task.choices[label]
    towards += after == correct
    away += before == correct
    review = prompt.split("\n")[0][len("Review: "):]
    print(f"   {review[:70]!r}: {before!r} -> {after!r} (correct: {correct!r})")
accuracy_before = sum(a == task.choices[y] for a, y in zip(plain, test["label"])) / args.n_test
accuracy_after = sum(a == task.choices[y] for a, y in zip(steered, test["label"])) / args.n_test
print(f"   {sum(a != b for a, b in zip(plain, steered))} answers changed: {towards} to the correct answer (the steered "
      f"direction), {away} away from it; accuracy {accuracy_before:.0%} -> {accuracy_after:.0%}.")
