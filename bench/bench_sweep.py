"""Cost of the (k, α) sweep (P5): `sweep_k_alpha` over the 56 cells of the default grid on 100 SST-2 validation
examples, divided by 56 single evaluations of the same examples with a fixed adapter.

    python bench/bench_sweep.py                    # SmolLM2-135M-Instruct, momentum from 64 SST-2 pairs

The momentum scores come from one fit (not timed). The sweep runs in 8 chunks, one per k of the grid with its 7
values of α (one `sweep_k_alpha(..., ks=[k])` call each, so the per-call work of building the adapter and setting the
best cell is paid 8 times instead of once: the ratio is an upper bound). Each chunk alternates with a block of 7
single evaluations (`evaluate_split` with a fixed adapter), the order inside a round alternating, so drift of the
machine's load hits both alike. The vanilla result is computed once outside the timers and passed in
(`vanilla=...`); one timed vanilla evaluation per round gives the figure with vanilla counted too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_common import start_benchmark

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=100, help="SST-2 validation examples")
    parser.add_argument("--fit-pairs", type=int, default=64)
    parser.add_argument("--sites", nargs="+", default=["attention", "ffn"])
    parser.add_argument("--fixed-k", type=int, default=32, help="k of the fixed adapter (the grid's mean k is 28)")
    parser.add_argument("--fixed-alpha", type=float, default=10.0)
    parser.add_argument("--ks", type=int, nargs="+", help="k values of the grid (default: the sweep's 8)")
    parser.add_argument("--alphas", type=float, nargs="+", help="α values of the grid (default: the sweep's 7)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from austeer_peft import fit_austeer
    from austeer_peft.evaluate import evaluate_split, load_task
    from austeer_peft.hub.models import load_model
    from austeer_peft.evaluate.sweep import DEFAULT_ALPHAS, DEFAULT_KS, sweep_k_alpha

    started, load_start = start_benchmark(args.threads)
    ks, alphas = args.ks or list(DEFAULT_KS), args.alphas or list(DEFAULT_ALPHAS)

    model, tokenizer = load_model(args.model)
    task = load_task("sst2", n_fit=args.fit_pairs, n_validation=args.examples)
    fit = fit_austeer(model, tokenizer, task.pairs(), sites=args.sites, k=args.fixed_k, alpha=args.fixed_alpha,
                      progress=False)
    peft_model, scores = fit.peft_model, fit.scores
    fixed_aus = scores.select(args.fixed_k, args.fixed_alpha)

    def vanilla_eval():
        with peft_model.disable_adapter():
            return evaluate_split(peft_model, tokenizer, task, "validation")

    def single_eval():
        return evaluate_split(peft_model, tokenizer, task, "validation")

    def sweep_chunk(k):
        return sweep_k_alpha(peft_model, tokenizer, scores, task, "validation", ks=[k], alphas=alphas,
                             vanilla=vanilla, progress=False)[0]

    # Warm-up (also the vanilla result passed to every chunk).
    vanilla = vanilla_eval()
    sweep_chunk(ks[0])
    peft_model.set_aus(fixed_aus)
    fixed = single_eval()

    sweep_s, single_s, vanilla_s, sweep_cpu, single_cpu, loads, cells = [], [], [], [], [], [], []
    for round_index, k in enumerate(ks):
        for part in (("sweep", "single") if round_index % 2 == 0 else ("single", "sweep")):
            if part == "sweep":
                start, start_cpu = time.perf_counter(), time.process_time()
                result = sweep_chunk(k)
                sweep_s.append(time.perf_counter() - start)
                sweep_cpu.append(time.process_time() - start_cpu)
                cells += result.cells
            else:
                peft_model.set_aus(fixed_aus)  # outside the timer: the chunk left its best cell set
                start, start_cpu = time.perf_counter(), time.process_time()
                for _ in alphas:
                    single_eval()
                single_s.append(time.perf_counter() - start)
                single_cpu.append(time.process_time() - start_cpu)
        start = time.perf_counter()
        vanilla_eval()
        vanilla_s.append(time.perf_counter() - start)
        loads.append(os.getloadavg()[0])
        print(f"k={k}: sweep of {len(alphas)} cells {sweep_s[-1]:.2f} s, {len(alphas)} single evaluations "
              f"{single_s[-1]:.2f} s, vanilla {vanilla_s[-1]:.2f} s, 1-min load {loads[-1]:.2f}", file=sys.stderr)

    n_cells = len(cells)
    per_chunk = [s / e for s, e in zip(sweep_s, single_s)]
    ratio = sum(sweep_s) / sum(single_s)
    best = max(cells, key=lambda cell: (cell.accuracy, -cell.num_aus, -cell.alpha))
    report = {
        "setup": {"model": args.model, "examples": len(task.validation), "fit_pairs": args.fit_pairs,
                  "sites": args.sites, "grid": {"k": ks, "alpha": alphas}, "cells": n_cells,
                  "fixed_adapter": {"k": args.fixed_k, "alpha": args.fixed_alpha}, "scoring": vanilla.scoring,
                  "forwards_per_evaluation": fixed.forwards, "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                  "cores": os.cpu_count(), "load_average_at_start": load_start, "load_average_1min_per_round": loads},
        "sweep_chunk_s": sweep_s, "single_block_s": single_s, "vanilla_s": vanilla_s,
        "sweep_total_s": sum(sweep_s), "single_total_s": sum(single_s),
        "single_eval_mean_s": sum(single_s) / n_cells,
        "ratio": ratio,
        "ratio_per_chunk_median": statistics.median(per_chunk),
        "ratio_per_chunk_quartiles": statistics.quantiles(per_chunk, n=4, method="inclusive"),
        "cpu_time_ratio": sum(sweep_cpu) / sum(single_cpu), "sweep_chunk_cpu_s": sweep_cpu,
        "single_block_cpu_s": single_cpu,
        "ratio_vanilla_counted": (sum(sweep_s) + statistics.median(vanilla_s)) / sum(single_s),
        "accuracy": {"vanilla": vanilla.accuracy, "fixed_adapter": fixed.accuracy,
                     "best_cell": {"k": best.k, "alpha": best.alpha, "accuracy": best.accuracy},
                     "cells_min": min(c.accuracy for c in cells), "cells_max": max(c.accuracy for c in cells)},
        "bench_wall_s": time.perf_counter() - started,
    }
    print(json.dumps(report, indent=2))
    print(f"\nP5: sweep of {n_cells} cells {report['sweep_total_s']:.1f} s / {n_cells} single evaluations "
          f"{report['single_total_s']:.1f} s = {ratio:.4f} (per-chunk median {report['ratio_per_chunk_median']:.4f}, "
          f"IQR {report['ratio_per_chunk_quartiles'][0]:.4f}-{report['ratio_per_chunk_quartiles'][2]:.4f}); "
          f"process CPU time {report['cpu_time_ratio']:.4f}; vanilla counted: {report['ratio_vanilla_counted']:.4f}  "
          "[target <= 1.05]")


if __name__ == "__main__":
    main()
