"""The paper's table on one model and task (issue 22): vanilla, AUSteer per site, block-level, CAA, ITI, SADI-HEAD
and the Table 3 ablations, through ``compare_methods`` (the code path of ``austeer sweep``), writing the results
file after every method so that a stopped run keeps what it measured.

Every method gets the same grid size (``--grid 3``: 3 x 3 cells, CAA 3 depths x 3 multipliers; block-level: the
α axis), the same pairs, splits, scoring, token scope and guarded selection. Exact match and ``greedy`` come from
the same forward as the ``restricted`` score the methods are selected by.

    python bench/bench_paper_table.py --model smollm2-135m --task copa --n-fit 300 --n-validation 200 --n-test 500 \
        --output bench/paper-table/smollm2-copa.json
    python bench/bench_paper_table.py --summary bench/paper-table/*.json      # markdown rows of all saved runs
    python bench/bench_paper_table.py --overview bench/paper-table/*.json     # one table: model x task by method
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_common import start_benchmark

GRIDS = {  # --grid 5 is the library default (5 x 5 = 25 cells per method); --grid 3 the reduced CPU budget
    5: {"ks": (1, 4, 16, 64, 100), "alphas": (2, 5, 10, 20, 50), "caa_multipliers": (0.5, 1, 2, 4, 8),
        "caa_layer_fractions": (0.25, 0.4, 0.5, 0.6, 0.75),
        "iti_heads": (4, 8, 16, 32, 48), "iti_alphas": (5, 10, 15, 20, 30), "sadi_heads": (1, 2, 4, 6, 8),
        "sadi_strengths": (2, 5, 10, 20, 50)},
    3: {"ks": (1, 16, 100), "alphas": (2, 10, 50), "caa_multipliers": (0.5, 2, 8),
        "caa_layer_fractions": (0.25, 0.5, 0.75), "iti_heads": (4, 16, 48),
        "iti_alphas": (5, 15, 30), "sadi_heads": (1, 4, 8), "sadi_strengths": (2, 5, 20)},
}
ALL_METHODS = ["block", "caa", "iti", "sadi", "random", "mean-diff", "fixed-vector", "fixed-strength"]


def run(args: argparse.Namespace) -> None:
    from austeer_peft.evaluate import load_task
    from austeer_peft.evaluate.compare import compare_methods
    from austeer_peft.hub.models import load_model

    started, load = start_benchmark(args.threads)
    import torch

    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    task = load_task(args.task, n_fit=args.n_fit, n_validation=args.n_validation)
    if args.n_test is not None and args.n_test < len(task.test):
        task.test = task.test.select(range(args.n_test))
        task.split_note += f" Test scored on its first {args.n_test} examples only."
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    grid = GRIDS[args.grid]

    def write(comparison) -> None:
        record = {"model": args.model, "dtype": args.dtype, "task": args.task, "sizes": task.sizes, "split_note": task.split_note,
                  "scoring": comparison.scoring, "scope": comparison.scope,
                  "grid": {key: list(values) for key, values in grid.items()},
                  "threads": args.threads, "load_average_at_start": load,
                  "seconds": round(time.perf_counter() - started, 1), "finished": False,
                  "sweep_seconds": {s.method: round(s.seconds, 1) for s in comparison.sweeps},
                  "results": comparison.table()}
        output.write_text(json.dumps(record, indent=1))
        print(f"[{record['seconds']:.0f} s] {comparison.methods[-1].method} done", flush=True)

    comparison = compare_methods(model, tokenizer, task, baselines=args.baselines, scoring=args.scoring,
                                 scope=args.scope, batch_size=args.batch_size, progress=False, on_method=write,
                                 **grid)
    write(comparison)
    record = json.loads(output.read_text())
    record["finished"] = True
    output.write_text(json.dumps(record, indent=1))
    print(comparison.format_table())


def summary(paths: list[str]) -> None:
    """One markdown table per run: accuracy with its 95 % CI, gain with its CI, p, #steered, setting, exact match."""
    for path in paths:
        record = json.loads(Path(path).read_text())
        sizes = record["sizes"]
        state = "" if record["finished"] else " — **unfinished run: the methods below are those it had measured**"
        print(f"\n**{record['model']} ({record.get('dtype', 'float32')}), {record['task']}** (fit {sizes['fit']} / validation {sizes['validation']} / "
              f"test {sizes['test']}; scoring {record['scoring']}, scope {record['scope']}; "
              f"{record['seconds'] / 60:.0f} min){state}\n")
        print("| method | #steered | test accuracy (95 % CI) | gain vs vanilla (95 % CI) | p | exact match "
              "| greedy | selection on validation: out-of-fold gain, wins/losses, p | chosen |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in record["results"]:
            shipped, selection = row["shipped"], row["selection"]
            gain = "" if row["method"] == "vanilla" else (
                f"{row['gain']:+.1f} ({row['gain_ci_low']:+.1f} – {row['gain_ci_high']:+.1f})" if shipped
                else "no steer ships")
            p = "" if row["p_vs_vanilla"] is None else f"{row['p_vs_vanilla']:.2g}"
            checked = "" if selection is None else (f"{100 * selection['out_of_fold_gain']:+.1f}, "
                                                    f"{selection['wins']}/{selection['losses']}, "
                                                    f"p = {selection['p_value']:.2g}")
            chosen = ", ".join(f"{k}={v}" for k, v in row["settings"].items() if k not in ("chosen_heads", "blocks"))
            if "blocks" in row["settings"]:
                chosen = f"{len(row['settings']['blocks'])} blocks, " + chosen
            print(f"| {row['method']} | {row['steered']} | {row['test_accuracy']:.1f} ({row['ci_low']:.1f} – "
                  f"{row['ci_high']:.1f}) | {gain} | {p} | {row.get('also_exact', '')} | {row.get('also_greedy', '')} "
                  f"| {checked} | {chosen if shipped else ''} |")


OVERVIEW_METHODS = ["vanilla", "ITI", "CAA", "SADI-HEAD", "block-level", "AUSteer-attention", "AUSteer-ffn"]


def overview(paths: list[str]) -> None:
    """One markdown table over runs: a row per model x task, a column per method of the paper's table; a cell is
    the test accuracy with its 95 % CI, the gain over vanilla and the number of steered activations, or "no steer"
    when the guarded selection shipped none (the model stays vanilla), with the out-of-fold validation gain (points)
    and p-value it was refused on."""
    print("| model (dtype) | task (fit / validation / test) | scope, scoring | " + " | ".join(OVERVIEW_METHODS) + " |")
    print("|---|---|---|" + "---|" * len(OVERVIEW_METHODS))
    for path in paths:
        record = json.loads(Path(path).read_text())
        rows = {row["method"]: row for row in record["results"]}
        sizes = record["sizes"]
        cells = []
        for method in OVERVIEW_METHODS:
            row = rows.get(method)
            if row is None:
                cells.append("not run" if record["finished"] else "unfinished")
            elif method == "vanilla":
                cells.append(f"{row['test_accuracy']:.1f} ({row['ci_low']:.1f}–{row['ci_high']:.1f})")
            elif not row["shipped"]:
                selection = row["selection"]
                cells.append("no steer" if selection is None else
                             f"no steer ({100 * selection['out_of_fold_gain']:+.0f}, p {selection['p_value']:.2f})")
            else:
                cells.append(f"{row['test_accuracy']:.1f} ({row['ci_low']:.1f}–{row['ci_high']:.1f}), "
                             f"{row['gain']:+.1f}, {row['steered']} act.")
        print(f"| {record['model']} ({record.get('dtype', 'float32')}) | {record['task']} ({sizes['fit']} / "
              f"{sizes['validation']} / {sizes['test']}) | {record['scope']}, {record['scoring']} | "
              + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task")
    parser.add_argument("--n-fit", type=int, default=300)
    parser.add_argument("--n-validation", type=int, default=200)
    parser.add_argument("--n-test", type=int)
    parser.add_argument("--baselines", nargs="*", default=ALL_METHODS)
    parser.add_argument("--scoring")
    parser.add_argument("--scope", default="all", choices=["all", "generated"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16 runs 3-4x faster on CPUs with AVX512-BF16 (this machine)")
    parser.add_argument("--grid", type=int, default=3, choices=sorted(GRIDS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output")
    parser.add_argument("--summary", nargs="+", help="print the markdown tables of these result files and exit")
    parser.add_argument("--overview", nargs="+", help="print one markdown table over these result files and exit")
    args = parser.parse_args()
    if args.summary:
        summary(args.summary)
    elif args.overview:
        overview(args.overview)
    elif args.task is None or args.output is None:
        parser.error("--task and --output are required to run")
    else:
        run(args)


if __name__ == "__main__":
    main()
