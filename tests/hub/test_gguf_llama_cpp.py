"""Merged GGUF files in llama.cpp itself (llama-cpp-python), on the real SmolLM2-135M-Instruct Q4_1 file.

Deselected by default (llama-cpp-python builds from source; bench/RESULTS.md, "Merged GGUF (issue 21)", has the
build time): `make test-llama-cpp` installs it and runs these. llama.cpp multiplies with quantized activations, so its
logits differ from transformers' even unsteered; what must agree is the steering effect within each runtime.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from austeer_peft import fit_austeer
from austeer_peft.evaluate import load_task
from austeer_peft.hub.gguf import gguf_source, load_gguf_model, write_merged_gguf

pytestmark = [pytest.mark.llama_cpp, pytest.mark.real]
ROOT = Path(__file__).resolve().parents[2]
N_PROMPTS = 30


def answer_margins_llama_cpp(path: Path, ids_list, answer_ids) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    margins = []
    for ids in ids_list:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
        margins.append(logits[answer_ids[1]] - logits[answer_ids[0]])
    return np.array(margins)


@pytest.mark.parametrize("site", ["ffn", "attention"])
def test_steering_effect_in_llama_cpp_follows_transformers(tmp_path, site):
    """(merged GGUF - original GGUF) in llama.cpp against (steered - vanilla) in transformers: the answer-logit shift
    of each SST-2 prompt, fed as the same token ids to both runtimes."""
    source = gguf_source("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    task = load_task("sst2", n_fit=100, n_validation=0)
    model = fit_austeer(load_gguf_model(source), tokenizer, task.pairs("fit"), sites=site, k=100, alpha=15.0,
                        progress=False).peft_model
    ids_list = [tokenizer(prompt).input_ids for prompt in task.test["prompt"][:N_PROMPTS]]
    answer_ids = [tokenizer(choice, add_special_tokens=False).input_ids[0] for choice in task.choices]

    def margins(run) -> np.ndarray:
        with torch.inference_mode():
            rows = [run(torch.tensor([ids]), logits_to_keep=1).logits[0, -1] for ids in ids_list]
        return np.array([row[answer_ids[1]].item() - row[answer_ids[0]].item() for row in rows])

    steered = margins(model)
    with model.disable_adapter():
        vanilla = margins(model)
    merged = write_merged_gguf(model, source, tmp_path / "steered.gguf")
    assert merged.type_changes == []  # Q4_1 is encodable: every tensor keeps its type
    shift_transformers = steered - vanilla
    shift_llama = (answer_margins_llama_cpp(tmp_path / "steered.gguf", ids_list, answer_ids)
                   - answer_margins_llama_cpp(source, ids_list, answer_ids))
    assert np.abs(shift_llama).mean() > 0.5 * np.abs(shift_transformers).mean()
    assert np.corrcoef(shift_transformers, shift_llama)[0, 1] > 0.9
    assert np.mean(np.sign(shift_transformers) == np.sign(shift_llama)) >= 0.75


def test_example_fit_merge_and_answer_in_llama_cpp(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "gguf_llama_cpp.py"), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.splitlines()[-1]
    changed, towards, away = (int(last.split(word)[0].split()[-1]) for word in (" answers changed", " to the steered",
                                                                                " to the other"))
    assert changed > 0 and towards > away, done.stdout
