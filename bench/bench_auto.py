"""Automatic (k, α) vs the labelled-validation sweep, on the same splits (issue 10, part 3).

For a task already run with `austeer sweep` (its results.json), this fits with ``k="auto", alpha="auto"`` on the same
fit split for each site (one momentum pass, every cell scored once on the held-out pairs), takes the cell each
criterion chooses from those same held-out margins, scores it on the validation and test splits, and prints the test
accuracies beside the sweep's. No validation labels are used by the automatic choice; the validation accuracy is there
to choose between the criteria without looking at test (``--summary`` averages it over several runs).

    python bench/bench_auto.py --task sst2 --n-validation 50 --sweep-results out-sst2/results.json

The two can also run side by side: without ``--sweep-results`` the automatic rows are written to ``--output``, and
``--compare auto.json --sweep-results results.json`` prints the comparison later without running anything, and
``--summary auto-*.json`` prints each criterion's mean validation and test accuracy over the runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from austeer_peft import fit_austeer
from austeer_peft.fitting.auto import CRITERIA, DEFAULT_CRITERION, MAX_HELDOUT_PAIRS, criterion_key
from austeer_peft.evaluate import bootstrap_ci, load_task, paired_test
from austeer_peft.evaluate.runner import evaluate_split
from austeer_peft.hub.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", help="required unless --compare or --summary")
    parser.add_argument("--n-fit", type=int)
    parser.add_argument("--n-validation", type=int)
    parser.add_argument("--n-test", type=int)
    parser.add_argument("--sites", nargs="+", default=["attention", "ffn"])
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    parser.add_argument("--folds", type=int, help="auto_folds of fit_austeer (default: one pair at a time)")
    parser.add_argument("--heldout", type=int, default=MAX_HELDOUT_PAIRS, help="auto_heldout of fit_austeer")
    parser.add_argument("--sweep-results", type=Path, help="results.json of `austeer sweep` on the same splits")
    parser.add_argument("--output", type=Path, help="write the automatic rows (and the comparison) as JSON here")
    parser.add_argument("--compare", type=Path, help="a JSON written by --output: print it against --sweep-results")
    parser.add_argument("--summary", type=Path, nargs="+", help="JSONs written by --output: mean accuracy per criterion")
    args = parser.parse_args()
    if args.summary is not None:
        summarize([json.loads(path.read_text()) for path in args.summary])
        return
    if args.compare is not None:
        if args.sweep_results is None:
            parser.error("--compare needs --sweep-results")
        saved = json.loads(args.compare.read_text())
        report(saved["task"], saved["vanilla"], saved["note"], add_sweep(saved["rows"], args.sweep_results))
        return
    if args.task is None:
        parser.error("--task is required to run (only --compare and --summary read saved runs instead)")

    task = load_task(args.task, n_fit=args.n_fit, n_validation=args.n_validation)
    if args.n_test is not None:
        task.test = task.test.select(range(args.n_test))
    model, tokenizer = load_model(args.model)
    vanilla = evaluate_split(model, tokenizer, task, "test")
    vanilla_validation = evaluate_split(model, tokenizer, task, "validation")
    rows, heldout = [], {}
    for site in args.sites:
        started = time.perf_counter()
        result = fit_austeer(model, tokenizer, task.pairs("fit"), sites=[site], k="auto", alpha="auto",
                             auto_criterion=args.criteria[0], auto_folds=args.folds, auto_heldout=args.heldout)
        seconds = time.perf_counter() - started
        choice, peft_model = result.auto, result.peft_model
        heldout[site] = {"vanilla": choice.vanilla_margins,
                         "cells": [[k, alpha, margins] for (k, alpha), margins in choice.heldout_margins.items()]}
        evaluated = {}  # (k, α) -> (validation, test): criteria often agree
        for criterion in args.criteria:
            cell = choice.best(criterion)
            if cell not in evaluated:
                peft_model.set_aus(result.scores.select(*cell))
                evaluated[cell] = (evaluate_split(peft_model, tokenizer, task, "validation"),
                                   evaluate_split(peft_model, tokenizer, task, "test"))
            validation, test = evaluated[cell]
            margins = torch.tensor(choice.heldout_margins[cell])
            mean, low, high = bootstrap_ci(test.correct)
            rows.append({"site": site, "criterion": criterion, "auto_k": cell[0], "auto_alpha": cell[1],
                         **{f"heldout_{name}": criterion_key(margins, name)[0] for name in CRITERIA},
                         "heldout_pairs": choice.num_heldout, "folds": args.folds,
                         "auto_validation": round(100 * validation.accuracy, 2),
                         "auto_test": round(100 * mean, 2), "auto_ci": [round(100 * low, 2), round(100 * high, 2)],
                         "p_vs_vanilla": paired_test(vanilla.correct, test.correct),
                         "fit_seconds": round(seconds, 1)})
        model = peft_model.unload()
    note = f"{len(task.test)} test examples; {task.split_note}"
    if args.sweep_results is not None:
        rows = add_sweep(rows, args.sweep_results)
    if args.output is not None:
        args.output.write_text(json.dumps({"task": task.name, "vanilla": 100 * vanilla.accuracy,
                                           "vanilla_validation": 100 * vanilla_validation.accuracy, "note": note,
                                           "rows": rows, "heldout_margins": heldout}, indent=2))
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
        line = (f"  {row['site']:<10} {row['criterion']:<10} auto k={row['auto_k']:<3} α={row['auto_alpha']:<5g} "
                f"validation {row['auto_validation']:5.1f} %  test {row['auto_test']:5.1f} %")
        if "sweep_test" in row:
            line += (f"  |  sweep k={row['sweep_k']:<3} α={row['sweep_alpha']:<5g} {row['sweep_test']:5.1f} %  "
                     f"(auto − sweep {row['auto_test'] - row['sweep_test']:+.1f})")
        print(f"{line}; fit + choice {row['fit_seconds']:.0f} s")


def summarize(runs: list[dict]) -> None:
    """Per criterion, the mean validation and test accuracy of its chosen cells over every (task, site) of the runs.
    The criterion to keep is the one with the best mean validation accuracy (a tie keeps the current default); the
    test accuracies are printed beside it, not used."""
    by_criterion: dict[str, list[dict]] = {}
    for run in runs:
        for row in run["rows"]:
            by_criterion.setdefault(row["criterion"], []).append(row)
    print(f"{len(runs)} runs: {', '.join(run['task'] for run in runs)}")
    for criterion, rows in by_criterion.items():
        line = (f"  {criterion:<10} {len(rows)} cells  mean validation {_mean(rows, 'auto_validation'):5.2f} %  "
                f"mean test {_mean(rows, 'auto_test'):5.2f} %")
        if all("sweep_test" in row for row in rows):
            line += f"  mean auto − sweep {_mean(rows, 'auto_test') - _mean(rows, 'sweep_test'):+.2f}"
        print(line)
    kept = max(by_criterion, key=lambda c: (round(_mean(by_criterion[c], "auto_validation"), 6), c == DEFAULT_CRITERION))
    print(f"kept by validation: {kept}")


def _mean(rows: list[dict], key: str) -> float:
    return sum(row[key] for row in rows) / len(rows)


if __name__ == "__main__":
    main()
