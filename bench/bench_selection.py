"""Old selection rule vs the guarded rule, on one model and task, from one momentum pass (issue 19).

Old rule (until 2026-12): the paper's 56-cell grid (k 1..100 × α 1..100) scored on 50 validation examples, the most
accurate cell ships. New rule (austeer_peft.fitting.selection): the 25-cell default grid scored on a larger
validation split (the first 50 examples of which are the old rule's 50), the simplest cell within one standard error
of the best ships only if its out-of-fold choice beats vanilla (one-sided sign test, p < 0.05); otherwise no steer.
Both read the same momentum counts; each rule's cell is scored once on the same test examples. The new rule is the
library's own code path (``sweep_k_alpha``), so this measures what users get.

    python bench/bench_selection.py --model smollm2-135m --task sst2 --n-fit 300 --n-validation 200 --n-test 500 \
        --output sel-smollm2-sst2.json
    python bench/bench_selection.py --summary sel-*.json      # the old-vs-new table of all saved runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_common import start_benchmark

OLD_KS = (1, 2, 4, 8, 16, 32, 64, 100)
OLD_ALPHAS = (1, 2, 5, 10, 20, 50, 100)
OLD_N_VALIDATION = 50


def run(args: argparse.Namespace) -> dict:
    from austeer_peft import compute_momentum
    from austeer_peft.evaluate import load_task, paired_test
    from austeer_peft.evaluate.runner import evaluate_split
    from austeer_peft.evaluate.sweep import DEFAULT_ALPHAS, DEFAULT_KS, scores_for_sites, sweep_k_alpha
    from austeer_peft.hub.models import load_model

    started, load = start_benchmark(args.threads)
    model, tokenizer = load_model(args.model)
    task = load_task(args.task, n_fit=args.n_fit, n_validation=args.n_validation)
    if args.n_test is not None and args.n_test < len(task.test):
        task.test = task.test.select(range(args.n_test))
    old_validation = task.validation.select(range(min(OLD_N_VALIDATION, len(task.validation))))

    def evaluate(current, split):
        return evaluate_split(current, tokenizer, task, split, batch_size=args.batch_size)

    vanilla_validation, vanilla_test = evaluate(model, "validation"), evaluate(model, "test")
    vanilla_old_validation = vanilla_validation.correct[:len(old_validation)]
    fit_started = time.perf_counter()
    scores = compute_momentum(model, tokenizer, task.pairs("fit"), sites=args.sites, batch_size=args.batch_size,
                              progress=False)
    fit_seconds = time.perf_counter() - fit_started
    result = {"model": args.model, "task": args.task, "sizes": task.sizes, "old_validation": len(old_validation),
              "split_note": task.split_note, "scoring": vanilla_test.scoring, "threads": args.threads,
              "load_average": load, "fit_seconds": round(fit_seconds, 1),
              "vanilla": {"validation": vanilla_validation.accuracy, "test": vanilla_test.accuracy}, "sites": {}}
    peft_model = model
    for site in args.sites:
        name = f"austeer_{site}"
        site_scores = scores_for_sites(scores, site)
        # New rule: the library's sweep (default grid, whole validation split, guarded selection).
        sweep, peft_model = sweep_k_alpha(peft_model, tokenizer, site_scores, task, "validation", DEFAULT_KS,
                                          DEFAULT_ALPHAS, batch_size=args.batch_size, adapter_name=name,
                                          vanilla=vanilla_validation, progress=False)
        new_test = evaluate(peft_model, "test") if sweep.chosen is not None else vanilla_test
        # Old rule: the 56-cell grid on the first 50 validation examples (cells of the new grid are read off the
        # sweep above; the others are scored here), the most accurate cell ships.
        scored = {(c.k, c.alpha): c.correct[:len(old_validation)] for c in sweep.cells}
        for k in OLD_KS:
            for alpha in OLD_ALPHAS:
                if (k, float(alpha)) not in scored and k <= site_scores.num_aus:
                    peft_model.set_aus(site_scores.select(k, alpha), adapter_name=name)
                    scored[k, float(alpha)] = evaluate(peft_model, old_validation).correct
        old_cell = max(scored, key=lambda cell: (sum(scored[cell]), -cell[0], -cell[1]))
        peft_model.set_aus(site_scores.select(*old_cell), adapter_name=name)
        old_test = evaluate(peft_model, "test")
        result["sites"][site] = {
            "old": {"cell": old_cell, "validation": sum(scored[old_cell]) / len(old_validation),
                    "vanilla_validation": sum(vanilla_old_validation) / len(old_validation),
                    "test": old_test.accuracy, "p_vs_vanilla": paired_test(vanilla_test.correct, old_test.correct)},
            "new": {"cell": None if sweep.chosen is None else (sweep.chosen.k, sweep.chosen.alpha),
                    "validation": None if sweep.chosen is None else sweep.chosen.accuracy,
                    "test": new_test.accuracy,
                    "p_vs_vanilla": paired_test(vanilla_test.correct, new_test.correct),
                    "selection": sweep.selection.as_dict()},
        }
        print(json.dumps({site: result["sites"][site]}, default=str), flush=True)
        if args.output:  # after each site, so a run stopped midway keeps what it measured
            Path(args.output).write_text(json.dumps(result, indent=2, default=str))
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def summary(paths: list[str]) -> str:
    """Markdown table: per model, task and site, vanilla, the old rule's and the new rule's test accuracy."""
    lines = ["| model, task (fit / validation / test) | site | vanilla | old rule: cell, test (p) | "
             "new rule: cell, test (p) | new rule: out-of-fold gain, p |", "|---|---|---|---|---|---|"]
    old_sum = new_sum = count = 0
    for path in paths:
        run_result = json.loads(Path(path).read_text())
        sizes = run_result["sizes"]
        label = f"{run_result['model']}, {run_result['task']} ({sizes['fit']} / {sizes['validation']} / {sizes['test']})"
        for site, row in run_result["sites"].items():
            old, new = row["old"], row["new"]
            new_cell = "no steer" if new["cell"] is None else f"k {new['cell'][0]}, α {new['cell'][1]:g}"
            selection = new["selection"]
            lines.append(
                f"| {label} | {site} | {100 * run_result['vanilla']['test']:.1f} | k {old['cell'][0]}, "
                f"α {old['cell'][1]:g}: {100 * old['test']:.1f} (p = {old['p_vs_vanilla']:.2g}) | {new_cell}: "
                f"{100 * new['test']:.1f} (p = {new['p_vs_vanilla']:.2g}) | "
                f"{100 * selection['out_of_fold_gain']:+.1f}, p = {selection['p_value']:.2g} |")
            old_sum, new_sum, count = old_sum + old["test"], new_sum + new["test"], count + 1
    if count:
        lines.append(f"| mean over {count} cells | | | {100 * old_sum / count:.2f} | {100 * new_sum / count:.2f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--sites", nargs="+", default=["attention", "ffn"])
    parser.add_argument("--n-fit", type=int)
    parser.add_argument("--n-validation", type=int, default=200)
    parser.add_argument("--n-test", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output")
    parser.add_argument("--summary", nargs="+", help="print the table of these saved runs and exit")
    args = parser.parse_args()
    if args.summary:
        print(summary(args.summary))
        return
    result = run(args)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2, default=str))
    print(summary([args.output]) if args.output else json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
