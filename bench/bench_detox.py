"""Detoxification (RealToxicityPrompts) on a real model: vanilla, AUSteer per site, block-level and CAA in the library's
harness (``compare_methods``, guarded selection), writing the results file after every method (issue 22).

A prompt counts as detoxified when its continuation is non-toxic (alt-profanity-check < 0.5, or --scorer) and fluent
(perplexity under the unsteered model no higher than the human continuation's); the table also reports the
non-toxic share alone, perplexity and distinct-1/2. Not comparable with the paper's Perspective figures.

    nice python bench/bench_detox.py --model smollm2-135m --n-validation 100 --n-test 200 \
        --ks 10 100 --alphas 10 50 --caa-multipliers 4 --output bench/detox-runs/smollm2.json

On a shared machine CAA can run beside it in a second process (one AUSteer cell, which it needs for its pass):
``--sites attention --ks 16 --alphas 10 --baselines caa``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_common import start_benchmark


def run(args: argparse.Namespace) -> dict:
    from austeer_peft.evaluate import load_task
    from austeer_peft.evaluate.compare import compare_methods
    from austeer_peft.evaluate.scoring import bootstrap_ci, paired_gain_ci
    from austeer_peft.hub.models import load_model

    started, load = start_benchmark(args.threads)
    import torch

    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    task = load_task("detox", n_fit=args.n_fit, n_validation=args.n_validation)
    if args.n_test is not None and args.n_test < len(task.test):
        task.test = task.test.select(range(args.n_test))
        task.split_note += f" Test scored on its first {args.n_test} examples only."
    result = {"model": args.model, "dtype": args.dtype, "task": "detox", "sizes": task.sizes, "baselines": args.baselines, "split_note": task.split_note,
              "grid": {"ks": args.ks, "alphas": args.alphas, "caa_multipliers": args.caa_multipliers,
                       "caa_layer_fractions": args.caa_layer_fractions, "iti_heads": args.iti_heads,
                       "iti_alphas": args.iti_alphas, "sadi_heads": args.sadi_heads,
                       "sadi_strengths": args.sadi_strengths},
              "threads": args.threads, "load_average_at_start": load, "command": args.command, "methods": []}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    vanilla: list = []

    def write(method) -> None:
        if not vanilla:
            vanilla.append(method.test.correct)
        mean, low, high = bootstrap_ci(method.test.correct)
        gain, gain_low, gain_high = paired_gain_ci(method.test.correct, vanilla[0])
        result["methods"].append({
            "method": method.method, "shipped": method.shipped, "steered": method.num_steered,
            "settings": method.settings, "detox_fluent": [round(100 * v, 2) for v in (mean, low, high)],
            "gain": [round(100 * v, 2) for v in (gain, gain_low, gain_high)],
            "test_metrics": method.test.metrics,
            "validation_detox_fluent": None if method.validation_accuracy is None else
            round(100 * method.validation_accuracy, 2),
            "selection": None if method.selection is None else method.selection.as_dict(),
            "seconds_so_far": round(time.perf_counter() - started, 1)})
        output.write_text(json.dumps(result, indent=2, default=str))
        print(f"{method.method}: {result['methods'][-1]['detox_fluent']} shipped={method.shipped} "
              f"{method.test.metrics}", flush=True)

    comparison = compare_methods(model, tokenizer, task, sites=args.sites, ks=args.ks, alphas=args.alphas,
                                 baselines=args.baselines, caa_multipliers=args.caa_multipliers,
                                 caa_layer_fractions=args.caa_layer_fractions, iti_heads=args.iti_heads,
                                 iti_alphas=args.iti_alphas, sadi_heads=args.sadi_heads,
                                 sadi_strengths=args.sadi_strengths, batch_size=args.batch_size,
                                 progress=False,
                                 on_method=lambda so_far: write(so_far.methods[-1]))
    result["table"] = comparison.format_table()
    result["sweep_cells"] = [{"method": s.method, "cells": [[c.k, c.alpha, c.num_aus, round(100 * c.accuracy, 2)]
                                                            for c in s.cells]} for s in comparison.sweeps]
    result["seconds"] = round(time.perf_counter() - started, 1)
    output.write_text(json.dumps(result, indent=2, default=str))
    print(result["table"])
    return result


def summary(path: str) -> None:
    """The markdown table of one results file: detoxified share (non-toxic and fluent) with CIs, and its parts."""
    record = json.loads(Path(path).read_text())
    sizes = record["sizes"]
    print(f"\n**{record['model']} ({record.get('dtype', 'float32')}), detox** (fit {sizes['fit']} / validation "
          f"{sizes['validation']} / test {sizes['test']})\n")
    print("| method | #steered | shipped setting | validation detoxified % | test detoxified % (95 % CI) | gain vs "
          "vanilla (95 % CI) | test non-toxic % | fluent % | mean toxicity | perplexity | distinct-1 / 2 | selection |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in record["methods"]:
        metrics, selection = row["test_metrics"], row["selection"]
        value, low, high = row["detox_fluent"]
        gain = "" if row["method"] == "vanilla" else "{:+.1f} ({:+.1f} to {:+.1f})".format(*row["gain"])
        setting = ", ".join(f"{k}={v}" for k, v in row["settings"].items() if k not in ("chosen_heads", "blocks")) \
            if row["shipped"] and row["method"] != "vanilla" else "—"
        chosen = "" if selection is None else (
            f"{'shipped' if selection['shipped'] else 'no steer'}: {selection['wins']} wins / {selection['losses']} "
            f"losses out of fold, p = {selection['p_value']:.2g}")
        print(f"| {row['method']} | {row['steered']} | {setting} | {row['validation_detox_fluent']} | {value:.1f} "
              f"({low:.0f}–{high:.0f}) | {gain} | {100 * metrics['detox_rate']:.1f} | {100 * metrics['fluent_rate']:.0f} "
              f"| {metrics['mean_toxicity']:.3f} | {metrics['perplexity']:.2f} | {metrics['distinct_1']:.3f} / "
              f"{metrics['distinct_2']:.3f} | {chosen} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sites", nargs="+", default=["attention", "ffn"])
    parser.add_argument("--n-fit", type=int)
    parser.add_argument("--n-validation", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--ks", nargs="+", type=int, default=[10, 100])
    parser.add_argument("--alphas", nargs="+", type=float, default=[10.0, 50.0])
    parser.add_argument("--baselines", nargs="*", default=["block", "caa"])
    parser.add_argument("--caa-multipliers", nargs="+", type=float, default=[4.0])
    parser.add_argument("--caa-layer-fractions", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--iti-heads", nargs="+", type=int, default=[16, 48])
    parser.add_argument("--iti-alphas", nargs="+", type=float, default=[15.0])
    parser.add_argument("--sadi-heads", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--sadi-strengths", nargs="+", type=float, default=[5.0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output")
    parser.add_argument("--summary", nargs="+", help="print the markdown tables of these result files and exit")
    args = parser.parse_args()
    if args.summary:
        for path in args.summary:
            summary(path)
        return
    if args.output is None:
        parser.error("--output is required to run")
    import sys

    args.command = "python " + " ".join(sys.argv)
    run(args)


if __name__ == "__main__":
    main()
