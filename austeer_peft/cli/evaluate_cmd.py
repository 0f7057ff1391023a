"""``austeer eval``: score the plain model, and optionally an adapter, on one split of a task, with a bootstrap
confidence interval and a paired test between them.

Named ``evaluate_cmd`` rather than ``eval`` (a builtin) or ``evaluate`` (the library's evaluation package).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peft import PeftModel

from ..evaluate.runner import evaluate_split
from ..evaluate.scoring import bootstrap_ci, paired_test
from .arguments import (
    add_model_and_task_arguments,
    check_run_arguments,
    load_model_from_args,
    load_task_from_args,
    prepare_task,
    run_facts,
)
from .command import Command


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_task_arguments(parser)
    parser.add_argument("--adapter", help="an AUSteer adapter (folder or Hub id) to evaluate; default: the plain model")
    parser.add_argument("--split", default="test", choices=["fit", "validation", "test"],
                        help="split to score (default: test)")
    parser.add_argument("--output", type=Path, help="also write results.json (per-example results) here")


def run_eval(args: argparse.Namespace) -> int:
    check_run_arguments(args)
    task = load_task_from_args(args)  # every row is checked before the model loads
    model, tokenizer = load_model_from_args(args)
    task = prepare_task(task, tokenizer, args)
    vanilla = evaluate_split(model, tokenizer, task, args.split, args.scoring, batch_size=args.batch_size,
                             progress=True)
    results = {"vanilla": vanilla}
    if args.adapter is not None:
        steered = PeftModel.from_pretrained(model, args.adapter)
        results["adapter"] = evaluate_split(steered, tokenizer, task, args.split, args.scoring,
                                            batch_size=args.batch_size, progress=True)
    print(f"{task.name}, {args.split} split ({len(vanilla.correct)} examples), scoring {vanilla.scoring}. "
          f"{task.split_note}")
    summary = {"task": task.name, "split": args.split, "split_note": task.split_note, **run_facts(args, task),
               "adapter": args.adapter, "scoring": vanilla.scoring, "results": {}}
    for name, result in results.items():
        mean, low, high = bootstrap_ci(result.correct)
        line = f"  {name:<8} {100 * mean:5.1f} %  (95 % CI {100 * low:.1f}–{100 * high:.1f})"
        if name == "adapter":
            p_value = paired_test(vanilla.correct, result.correct)
            line += f"  paired test vs vanilla p = {p_value:.3g}"
        shares = result.predicted_shares(task.choices)
        if shares is not None:
            line += "  answers: " + " · ".join(f"{c.strip()} {100 * share:.0f} %" for c, share in shares.items())
        if result.metrics is not None:  # open generation: the parts of "detoxified" and the text quality
            m = result.metrics
            line += (f"  non-toxic {100 * m['detox_rate']:.1f} %, fluent {100 * m['fluent_rate']:.1f} %, perplexity "
                     f"{m['perplexity']:.2f}, distinct-1/2 {m['distinct_1']:.3f}/{m['distinct_2']:.3f}")
        print(line)
        summary["results"][name] = {"accuracy": mean, "ci": [low, high], "correct": result.correct,
                                    **{f"also_{k}": sum(v) / len(v) for k, v in result.also.items()},
                                    "predicted": shares, **({"metrics": result.metrics} if result.metrics else {})}
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "results.json").write_text(json.dumps(summary, indent=2))
    return 0


COMMAND = Command(
    "eval", "score a model (and optionally an adapter) on a task split, with a 95%% CI and a paired test",
    "Score the plain model on a split of a task and, with --adapter, the steered model on the same\n"
    "examples: accuracy with a 95 % bootstrap confidence interval, and McNemar's paired test between them.\n\n"
    "examples:\n"
    "  austeer eval --task sst2 --adapter out/adapter\n"
    "  austeer eval --task boolq --n-test 500 --scoring greedy",
    add_eval_arguments, run_eval,
)
