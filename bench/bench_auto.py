"""Automatic (k, α) vs the labelled-validation sweep, on the same splits (issue 10, part 3).

For a task already run with `austeer sweep` (its results.json), this fits with ``k="auto", alpha="auto"`` on the same
fit split for each site, scores the test split once, and prints both test accuracies side by side. No validation
labels are used by the automatic choice.

    python bench/bench_auto.py --task sst2 --n-validation 50 --sweep-results out-sst2/results.json

The two can also run side by side: without ``--sweep-results`` the automatic rows are written to ``--output``, and
``--compare auto.json --sweep-results results.json`` prints the comparison later without running anything.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from austeer_peft import fit_austeer
from austeer_peft.evaluate import bootstrap_ci, load_task, paired_test
from austeer_peft.evaluate.runner import evaluate_split
from austeer_peft.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", required=True)
    parser.add_argument("--n-fit", type=int)
    parser.add_argument("--n-validation", type=int)
    parser.add_argument("--n-test", type=int)
    parser.add_argument("--sites", nargs="+", default=["attention", "ffn"])
    parser.add_argument("--criterion", default="preference", choices=["preference", "margin"])
    parser.add_argument("--sweep-results", type=Path, help="results.json of `austeer sweep` on the same splits")
    parser.add_argument("--output", type=Path, help="write the automatic rows (and the comparison) as JSON here")
    parser.add_argument("--compare", type=Path, help="a JSON written by --output: print it against --sweep-results")
    args = parser.parse_args()
    if args.compare is not None:
        if args.sweep_results is None:
            parser.error("--compare needs --sweep-results")
        saved = json.loads(args.compare.read_text())
        report(saved["task"], saved["vanilla"], saved["note"], add_sweep(saved["rows"], args.sweep_results))
        return

    task = load_task(args.task, n_fit=args.n_fit, n_validation=args.n_validation)
    if args.n_test is not None:
        task.test = task.test.select(range(args.n_test))
    model, tokenizer = load_model(args.model)
    vanilla = evaluate_split(model, tokenizer, task, "test")
    rows = []
    for site in args.sites:
        started = time.perf_counter()
        result = fit_austeer(model, tokenizer, task.pairs("fit"), sites=[site], k="auto", alpha="auto",
                             auto_criterion=args.criterion)
        seconds = time.perf_counter() - started
        test = evaluate_split(result.peft_model, tokenizer, task, "test")
        mean, low, high = bootstrap_ci(test.correct)
        rows.append({"site": site, "criterion": args.criterion, "auto_k": result.auto.k,
                     "auto_alpha": result.auto.alpha, "auto_score": result.auto.score,
                     "vanilla_score": result.auto.vanilla_score,
                     "auto_margin": result.auto.margin, "vanilla_margin": result.auto.vanilla_margin,
                     "heldout_pairs": result.auto.num_heldout, "auto_test": round(100 * mean, 2),
                     "auto_ci": [round(100 * low, 2), round(100 * high, 2)],
                     "p_vs_vanilla": paired_test(vanilla.correct, test.correct),
                     "fit_seconds": round(seconds, 1)})
        model = result.peft_model.unload()
    note = f"{len(task.test)} test examples; {task.split_note}"
    if args.sweep_results is not None:
        rows = add_sweep(rows, args.sweep_results)
    if args.output is not None:
        args.output.write_text(json.dumps({"task": task.name, "vanilla": 100 * vanilla.accuracy, "note": note,
                                           "rows": rows}, indent=2))
    report(task.name, 100 * vanilla.accuracy, note, rows)


def add_sweep(rows: list[dict], sweep_results: Path) -> list[dict]:
    """The automatic rows with the labelled-validation sweep's chosen cell and test accuracy for the same site."""
    sweep = {row["method"]: row for row in json.loads(sweep_results.read_text())["results"]}
    merged = []
    for row in rows:
        swept = sweep[f"AUSteer-{row['site']}"]
        merged.append({**row, "sweep_k": swept["settings"]["k"], "sweep_alpha": swept["settings"]["alpha"],
                       "sweep_test": swept["test_accuracy"]})
    return merged


def report(task: str, vanilla: float, note: str, rows: list[dict]) -> None:
    print(f"{task}, vanilla {vanilla:.1f} %; {note}")
    for row in rows:
        line = f"  {row['site']:<10} auto k={row['auto_k']:<3} α={row['auto_alpha']:<5g} {row['auto_test']:5.1f} %"
        if "sweep_test" in row:
            line += (f"  |  sweep k={row['sweep_k']:<3} α={row['sweep_alpha']:<5g} {row['sweep_test']:5.1f} %  "
                     f"(auto − sweep {row['auto_test'] - row['sweep_test']:+.1f})")
        print(f"{line}; fit + choice {row['fit_seconds']:.0f} s")


if __name__ == "__main__":
    main()
