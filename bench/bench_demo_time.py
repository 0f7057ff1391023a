"""How long `make demo` takes, from one timing of each of its stages (run on a quiet machine).

The demo (`austeer sweep --task sst2 --n-validation 50`) is: load the model; vanilla on validation and test; one
momentum pass over the 500 fit pairs; per site 56 validation evaluations; block-level 7; one CAA pass and 25 CAA
validation evaluations; 4 steered test evaluations. Every validation evaluation costs about the same, so the total is
the stage times times their counts (a steered forward costs ~1 % more than a plain one, see P1).

    python bench/bench_demo_time.py
"""

from __future__ import annotations

import os
import time

import torch

from austeer_peft import compute_momentum
from austeer_peft.evaluate.baselines import caa_vectors
from austeer_peft.evaluate import evaluate_split, load_task
from austeer_peft.hub.models import load_model


def timed(function):
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    started = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    load = time.perf_counter() - started
    task = load_task("sst2", n_validation=50)
    pairs = task.pairs("fit")
    validation = min(timed(lambda: evaluate_split(model, tokenizer, task, "validation")) for _ in range(3))
    test = timed(lambda: evaluate_split(model, tokenizer, task, "test"))
    fit = timed(lambda: compute_momentum(model, tokenizer, pairs, sites=["attention", "ffn"], progress=False))
    caa = timed(lambda: caa_vectors(model, tokenizer, pairs, progress=False))
    validations, tests = 1 + 2 * 56 + 7 + 25, 5
    total = load + validations * validation + tests * test + fit + caa
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    print(f"load {load:.0f} s, validation evaluation (50) {validation:.2f} s x {validations}, test evaluation (872) "
          f"{test:.1f} s x {tests}, momentum pass (500 pairs) {fit:.0f} s, CAA pass {caa:.0f} s")
    print(f"estimated demo time: {total / 60:.1f} min")


if __name__ == "__main__":
    main()
