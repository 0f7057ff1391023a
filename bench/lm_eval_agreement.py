"""lm-evaluation-harness vs our `loglik` scorer on a real model (issue 24): the same rows, per-row agreement.

A BoolQ (or COPA) test subset is written as JSON lines with an lm-eval YAML task over it; an AUSteer adapter is fitted
on the task's fit pairs; then every row is scored four ways, each unsteered and steered: our `loglik` scorer, lm-eval's
Python route (``HFLM(pretrained=peft_model, tokenizer=tok)``), and `austeer lm-eval` (lm-eval's own command line).

    nice python bench/lm_eval_agreement.py --model smollm2-135m --task boolq --n-test 100 --output lm-eval-agree.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_common import start_benchmark


def task_yaml(name: str, data_file: Path) -> str:
    return "\n".join([
        f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data_file}",
        "test_split: test", "output_type: multiple_choice", "doc_to_text: prompt", "doc_to_choice: choices",
        "doc_to_target: label", 'target_delimiter: ""', "metric_list:", "  - metric: acc", ""])


def lm_eval_rows(samples: list[dict]) -> list[bool]:
    return [bool(s["acc"]) for s in sorted(samples, key=lambda s: s["doc_id"])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="boolq")
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--n-fit", type=int, default=100)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    started, load = start_benchmark(args.threads)

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import PeftModel

    from austeer_peft import fit_austeer
    from austeer_peft.cli import main as austeer_main
    from austeer_peft.evaluate import load_task
    from austeer_peft.evaluate.runner import evaluate_split
    from austeer_peft.hub.models import load_model

    work = Path(tempfile.mkdtemp(prefix="lm-eval-agree-"))
    task = load_task(args.task, n_fit=args.n_fit)
    task.test = task.test.select(range(min(args.n_test, len(task.test))))
    name = f"austeer_{args.task}_subset"
    data_file = work / "rows.jsonl"
    data_file.write_text("".join(json.dumps({"prompt": r["prompt"], "choices": r["choices"], "label": r["label"]})
                                 + "\n" for r in task.test))
    (work / "tasks").mkdir()
    (work / "tasks" / f"{name}.yaml").write_text(task_yaml(name, data_file))

    model, tokenizer = load_model(args.model)
    result = fit_austeer(model, tokenizer, task.pairs("fit"), sites=["attention"], k=args.k, alpha=args.alpha)
    result.save_pretrained(work / "adapter")
    result.peft_model.unload()

    record: dict = {"model": args.model, "task": args.task, "n_test": len(task.test), "k": args.k,
                    "alpha": args.alpha, "split_note": task.split_note, "load_average": load, "routes": {}}
    for steered in (False, True):
        label = "steered" if steered else "unsteered"
        current = PeftModel.from_pretrained(model, work / "adapter") if steered else model
        ours = evaluate_split(current, tokenizer, task, "test", "loglik", batch_size=8).correct
        python = simple_evaluate(model=HFLM(pretrained=current, tokenizer=tokenizer, batch_size=8), tasks=[name],
                                 task_manager=TaskManager(include_path=str(work / "tasks"), include_defaults=False),
                                 log_samples=True)
        python_rows = lm_eval_rows(python["samples"][name])
        if steered:
            current.unload()
        out = work / f"cli-{label}"
        argv = ["lm-eval", "--model", args.model, "--tasks", name, "--include_path", str(work / "tasks"),
                "--device", "cpu", "--batch_size", "8", "--log_samples", "--output_path", str(out)]
        assert austeer_main(argv + (["--adapter", str(work / "adapter")] if steered else [])) == 0
        cli_rows = lm_eval_rows([json.loads(line) for f in out.rglob(f"samples_{name}_*.jsonl") for line in f.open()])
        record["routes"][label] = {
            "ours_loglik_accuracy": sum(ours) / len(ours),
            "lm_eval_python_accuracy": sum(python_rows) / len(python_rows),
            "lm_eval_cli_accuracy": sum(cli_rows) / len(cli_rows),
            "rows_python_differs": sum(a != b for a, b in zip(ours, python_rows)),
            "rows_cli_differs": sum(a != b for a, b in zip(ours, cli_rows)),
        }
        record["seconds"] = round(time.perf_counter() - started, 1)
        args.output.write_text(json.dumps(record, indent=2))
        print(label, record["routes"][label], flush=True)


if __name__ == "__main__":
    main()
