"""Fit cost: wall time and peak memory of `fit_austeer` relative to plain forward passes over the same sequences.

    python bench/bench_fit.py                      # SmolLM2-135M-Instruct, 256 SST-2 pairs, batch 16, attention+ffn
    python bench/bench_fit.py --task boolq --pairs 64 --batch-size 8 --repeats 3   # long passages, 1-token answers
    python bench/bench_fit.py --threads 2          # on a machine nobody else is using

Time: in one process, after a warm-up, `repeats` rounds each time one full fit with shared prompts (the default:
each prompt once, then both answers from its KV cache), one full fit without (`share_prompts=False`, every full
sequence: the path before issue 23) and one plain pass (`model(**batch)`, logits included) over the very same 2N
full sequences in the fit's length-sorted padded batches; the order inside a round rotates. Reported: median fit
time / median forward time for both fits (and process CPU time, which a busy machine disturbs less). Torch runs on
one thread by default (see --threads).

Memory: each mode runs in its own fresh subprocess. After loading the model, building the inputs and one small
warm-up forward, the kernel's peak-RSS mark is reset (`/proc/self/clear_refs` = 5) and RSS is read; after the run,
VmHWM is the exact peak of the run. Reported: peak growth over that loaded-model baseline, fit / forward.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA_DIR = Path(os.environ.get("AUSTEER_DATA", ROOT.parent / "shared" / "data"))


def task_pairs(task: str, n: int) -> list:
    """The first n fit pairs of SST-2 (the bench's own template) or BoolQ (the paper's template, " yes"/" no")."""
    if task == "sst2":
        return sst2_pairs(n)
    from austeer_peft.evaluate.tasks import load_task

    return load_task(task, data_dir=DATA_DIR, n_fit=n).pairs("fit")[:n]


def sst2_pairs(n: int) -> list[tuple[str, str, str]]:
    """The first n SST-2 training sentences as (prompt, correct label word, wrong label word)."""
    with open(DATA_DIR / "SST-2" / "train.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    words = {"1": " positive", "0": " negative"}
    return [(f"Review: {row['text'].strip()}\nSentiment:", words[row["label"]],
             words["0" if row["label"] == "1" else "1"]) for row in rows]


def plain_batches(tokenizer, pairs, batch_size):
    """Exactly the padded batches the fit builds, as tokenizer-style dicts for `model(**batch)`."""
    from austeer_peft.fitting.inputs import make_batches, pad_token_id, tokenize_pairs
    from austeer_peft.fitting.pairs import as_text_pairs

    token_pairs = tokenize_pairs(tokenizer, as_text_pairs(pairs), max_length=None)
    batches = make_batches(token_pairs, batch_size, pad_token_id(tokenizer), tokenizer.padding_side)
    return [{"input_ids": b.input_ids, "attention_mask": b.attention_mask} for b in batches]


def run_fit(model, tokenizer, pairs, args, share_prompts=True):
    from austeer_peft import fit_austeer

    result = fit_austeer(model, tokenizer, pairs, sites=args.sites, k=args.k, alpha=15.0, batch_size=args.batch_size,
                         progress=False, share_prompts=share_prompts)
    return result


def run_forward(model, batches):
    import torch

    with torch.inference_mode():
        for batch in batches:
            model(**batch)


# ---------------------------------------------------------------------------------------------------- memory


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(mode: str, args) -> dict:
    """One mode in this (fresh) process: peak RSS growth of the run over the loaded-model baseline."""
    import torch

    from austeer_peft.hub.models import load_model

    model, tokenizer = load_model(args.model)
    pairs = task_pairs(args.task, args.pairs)
    batches = plain_batches(tokenizer, pairs, args.batch_size)
    with torch.inference_mode():  # small warm-up: runtime one-time allocations are not the run's cost
        model(**plain_batches(tokenizer, pairs[:1], 1)[0])
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM (peak RSS) to the current RSS
    baseline = rss_kib("VmRSS")
    if mode in ("fit", "fit_full"):
        run_fit(model, tokenizer, pairs, args, share_prompts=mode == "fit")
    else:
        run_forward(model, batches)
    peak = rss_kib("VmHWM")
    return {"mode": mode, "baseline_mib": baseline / 1024, "peak_mib": peak / 1024,
            "growth_mib": (peak - baseline) / 1024}


def measure_memory(args) -> dict:
    results = {}
    for mode in ("forward", "fit", "fit_full"):
        command = [sys.executable, __file__, "--memory-probe", mode, "--task", args.task, "--pairs", str(args.pairs),
                   "--batch-size",
                   str(args.batch_size), "--k", str(args.k), "--model", args.model, "--threads", str(args.threads),
                   "--sites", *args.sites]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe {mode} failed:\n{done.stderr[-2000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


# ---------------------------------------------------------------------------------------------------- time


def measure_time(args) -> dict:
    import torch

    from austeer_peft.hub.models import load_model

    model, tokenizer = load_model(args.model)
    pairs = task_pairs(args.task, args.pairs)
    batches = plain_batches(tokenizer, pairs, args.batch_size)
    run_forward(model, batches[:2])  # warm-up
    for share_prompts in (True, False):
        run_fit(model, tokenizer, pairs[: 2 * args.batch_size], args, share_prompts).peft_model.unload()

    modes = ("fit", "fit_full", "forward")
    wall = {mode: [] for mode in modes}
    cpu = {mode: [] for mode in modes}
    loads = []
    for round_index in range(args.repeats):
        for mode in modes[round_index % 3:] + modes[:round_index % 3]:
            start, start_cpu = time.perf_counter(), time.process_time()
            if mode == "forward":
                run_forward(model, batches)
                result = None
            else:
                result = run_fit(model, tokenizer, pairs, args, share_prompts=mode == "fit")
            wall[mode].append(time.perf_counter() - start)
            cpu[mode].append(time.process_time() - start_cpu)
            if result is not None:
                result.peft_model.unload()  # outside the timer: give the next round the plain model back
        loads.append(os.getloadavg()[0])
        print(f"round {round_index}: fit {wall['fit'][-1]:.2f} s, fit without sharing {wall['fit_full'][-1]:.2f} s, "
              f"forward {wall['forward'][-1]:.2f} s, 1-min load {loads[-1]:.2f}", file=sys.stderr)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    median = {mode: statistics.median(wall[mode]) for mode in modes}
    return {
        "fit_s": wall["fit"], "fit_full_s": wall["fit_full"], "forward_s": wall["forward"],
        "fit_median_s": median["fit"], "fit_full_median_s": median["fit_full"], "forward_median_s": median["forward"],
        "time_ratio": median["fit"] / median["forward"],
        "time_ratio_full": median["fit_full"] / median["forward"],
        "time_ratio_per_round_median": statistics.median(f / p for f, p in zip(wall["fit"], wall["forward"])),
        "time_ratio_of_minima": min(wall["fit"]) / min(wall["forward"]),
        "cpu_time_ratio": statistics.median(cpu["fit"]) / statistics.median(cpu["forward"]),
        "cpu_time_ratio_full": statistics.median(cpu["fit_full"]) / statistics.median(cpu["forward"]),
        "fit_cpu_s": cpu["fit"], "fit_full_cpu_s": cpu["fit_full"], "forward_cpu_s": cpu["forward"],
        "load_average_1min": loads, "sequences": 2 * len(pairs), "forwards": len(batches), "tokens": tokens,
        "padded_tokens": padded, "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", choices=["sst2", "boolq"], default="sst2")
    parser.add_argument("--output", help="also write the JSON report to this file")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward (2x sequences)")
    parser.add_argument("--sites", nargs="+", default=["attention", "ffn"])
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core machine, 2 OpenMP threads stall on each "
                             "other's barriers whenever another process runs, and timings become noise)")
    parser.add_argument("--skip-memory", action="store_true",
                        help="time only (the memory probes run each mode again in a fresh process)")
    parser.add_argument("--memory-probe", choices=["fit", "fit_full", "forward"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import torch

    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args)))
        return

    started = time.perf_counter()
    timing = measure_time(args)
    memory = None if args.skip_memory else measure_memory(args)
    report = {
        "setup": {"model": args.model, "task": args.task, "pairs": args.pairs, "batch_size_pairs": args.batch_size,
                  "sites": args.sites,
                  "k": args.k, "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
                  "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "time": timing,
        "memory": memory,
        "memory_growth_ratio": memory and memory["fit"]["growth_mib"] / memory["forward"]["growth_mib"],
        "memory_growth_ratio_full": memory and memory["fit_full"]["growth_mib"] / memory["forward"]["growth_mib"],
        "memory_peak_ratio": memory and memory["fit"]["peak_mib"] / memory["forward"]["peak_mib"],
        "bench_wall_s": time.perf_counter() - started,
    }
    print(json.dumps(report, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"\ntime ratio (fit / forward, medians of {args.repeats}): {report['time']['time_ratio']:.3f} with shared "
          f"prompts, {report['time']['time_ratio_full']:.3f} without  [target <= 0.85; on BoolQ <= 0.5]")
    if memory:
        print(f"peak-RSS growth ratio (fit / forward): {report['memory_growth_ratio']:.3f}  [target <= 1.10]")


if __name__ == "__main__":
    main()
