"""How often each choice was the answer, for every method of an `austeer sweep` output folder written before
results.json recorded it: re-scores the test split with the saved adapters (and the saved CAA vector), checks that
each accuracy is the one in results.json, and prints the shares. A gain that only moves the answer toward the
majority label shows here (e.g. BoolQ, where always " yes" is 62 % of the test examples).

    python bench/answer_shares.py out-boolq/ --task boolq --n-fit 300 --n-validation 50 --n-test 500
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peft import PeftModel
from safetensors.torch import load_file

from austeer_peft.evaluate.baselines import caa_steering
from austeer_peft.evaluate import load_task
from austeer_peft.evaluate.runner import evaluate_split
from austeer_peft.hub.models import load_model

ADAPTERS = {"AUSteer-attention": "austeer_attention", "AUSteer-ffn": "austeer_ffn", "block-level": "block_level"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="the folder `austeer sweep --output` wrote")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", required=True)
    parser.add_argument("--n-fit", type=int)
    parser.add_argument("--n-validation", type=int)
    parser.add_argument("--n-test", type=int)
    args = parser.parse_args()

    summary = json.loads((args.output / "results.json").read_text())
    task = load_task(args.task, n_fit=args.n_fit, n_validation=args.n_validation)
    if args.n_test is not None:
        task.test = task.test.select(range(args.n_test))
    model, tokenizer = load_model(args.model)
    scoring = summary["scoring"]
    for row in summary["results"]:
        method = row["method"]
        if method == "vanilla":
            result = evaluate_split(model, tokenizer, task, "test", scoring)
        elif method == "CAA":
            vector = load_file(str(args.output / "adapters" / "caa.safetensors"))["caa_vector"]
            with caa_steering(model, row["settings"]["layer"], vector, row["settings"]["multiplier"]):
                result = evaluate_split(model, tokenizer, task, "test", scoring)
        else:
            steered = PeftModel.from_pretrained(model, args.output / "adapters" / ADAPTERS[method])
            result = evaluate_split(steered, tokenizer, task, "test", scoring)
            model = steered.unload()
        accuracy = round(100 * result.accuracy, 2)
        if accuracy != row["test_accuracy"]:
            raise SystemExit(f"{method}: re-scored {accuracy} % but results.json says {row['test_accuracy']} %; are "
                             "the task options the ones the sweep ran with?")
        shares = result.predicted_shares(task.choices)
        print(f"{method:<18} {accuracy:5.1f} %  answers: " + " · ".join(
            f"{name.strip()} {100 * share:.1f} %" for name, share in shares.items()))


if __name__ == "__main__":
    main()
