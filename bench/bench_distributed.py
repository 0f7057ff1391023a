"""Data-parallel fit: wall time of `fit_austeer` on P processes (torchrun, gloo) against one process.

    python bench/bench_distributed.py                 # SmolLM2-135M-Instruct, 512 SST-2 pairs, batch 16, attention+ffn
    python bench/bench_distributed.py --repeats 5     # on a quiet machine
    python bench/bench_distributed.py --pairs 64 --repeats 1 --modes 1x1 2x1    # a quick look

Modes are "PxT": P processes with T torch threads each. Each mode runs in fresh processes (P = 1: plain python,
P > 1: `python -m torch.distributed.run --standalone --nproc_per_node P`), which load the model, the pairs and warm
up with one small forward; then, `repeats` times, all processes meet at a barrier, fit (the whole `fit_austeer`
call, adapter included) and meet again. The time between the two barriers is the fit's wall time; each process also
reports its CPU time and the padded tokens of its batches (the balance of the split). Every fit's scores are saved
and hashed: all processes of all modes must produce the same bytes.

The 1-minute load average is sampled before and after every mode (the machine may be shared).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    """One process of one mode: load, warm up, then `repeats` timed fits; each process writes its own JSON."""
    import torch
    import torch.distributed as dist

    from austeer_peft import fit_austeer
    from austeer_peft.evaluate import load_task
    from austeer_peft.fitting.inputs import make_batches, pad_token_id, shard_batches, tokenize_pairs
    from austeer_peft.hub.models import load_model
    from austeer_peft.fitting.pairs import as_text_pairs

    torch.set_num_threads(args.threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        dist.init_process_group("gloo")
    model, tokenizer = load_model(args.model)
    pairs = load_task("sst2", n_fit=args.pairs).pairs()
    # The padded tokens this process will run: the fit's own batches and split.
    token_pairs = tokenize_pairs(tokenizer, as_text_pairs(pairs), max_length=None)
    batches = list(make_batches(token_pairs, args.batch_size, pad_token_id(tokenizer), tokenizer.padding_side))
    batches = shard_batches(batches, rank, world_size)
    tokens = sum(b.input_ids.numel() for b in batches)
    with torch.inference_mode():
        model(**tokenizer(["warm up"], return_tensors="pt"))

    def barrier():
        if world_size > 1:
            dist.barrier()

    rounds = []
    for repeat in range(args.repeats):
        barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = fit_austeer(model, tokenizer, pairs, sites=args.sites, k=args.k, alpha=15.0,
                             batch_size=args.batch_size, progress=False)
        cpu = time.process_time() - cpu_start
        barrier()
        wall = time.perf_counter() - start
        path = Path(args.out) / f"scores-{rank}-{repeat}.safetensors"
        result.scores.save(path, is_main_process=True)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        result.peft_model.unload()  # the model is fitted again: take the adapter off, outside the timer
        rounds.append({"wall_s": wall, "cpu_s": cpu, "scores_sha256": digest})
    report = {"rank": rank, "world_size": world_size, "threads": torch.get_num_threads(), "batches": len(batches),
              "padded_tokens": tokens, "rounds": rounds}
    (Path(args.out) / f"rank-{rank}.json").write_text(json.dumps(report))
    if world_size > 1:
        dist.destroy_process_group()


def run_mode(mode: str, args) -> dict:
    processes, threads = (int(x) for x in mode.split("x"))
    with tempfile.TemporaryDirectory() as out:
        script = [str(Path(__file__).resolve()), "--worker", "--out", out, "--threads", str(threads),
                  "--pairs", str(args.pairs), "--batch-size", str(args.batch_size), "--k", str(args.k),
                  "--repeats", str(args.repeats), "--model", args.model, "--sites", *args.sites]
        launcher = [sys.executable] if processes == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        done = subprocess.run(launcher + script, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"mode {mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        reports = [json.loads((Path(out) / f"rank-{r}.json").read_text()) for r in range(processes)]
    walls = [r["wall_s"] for r in reports[0]["rounds"]]
    return {
        "mode": mode, "processes": processes, "threads": threads,
        "wall_s": walls, "wall_median_s": statistics.median(walls),
        "cpu_s_per_rank": [[round(r["cpu_s"], 2) for r in rep["rounds"]] for rep in reports],
        "batches_per_rank": [rep["batches"] for rep in reports],
        "padded_tokens_per_rank": [rep["padded_tokens"] for rep in reports],
        "scores_sha256": sorted({r["scores_sha256"] for rep in reports for r in rep["rounds"]}),
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "mode_total_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sites", nargs="+", default=["attention", "ffn"])
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["1x1", "2x1", "1x2"],
                        help="PxT: P processes with T torch threads each; the first is the baseline")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    print(f"# {args.pairs} SST-2 pairs, {args.model}, batch {args.batch_size}, sites {args.sites}, k {args.k}, "
          f"{args.repeats} repeats; torch {torch.__version__}, {os.cpu_count()} CPUs ({platform.processor() or '?'})")
    results = []
    for mode in args.modes:
        results.append(run_mode(mode, args))
        print(json.dumps(results[-1]), flush=True)
    baseline = results[0]["wall_median_s"]
    digests = {d for r in results for d in r["scores_sha256"]}
    print(f"\nscores identical across all modes and processes: {len(digests) == 1}")
    print(f"\n| mode (processes x threads) | fit wall time, median (s) | ratio to {results[0]['mode']} | "
          "CPU time per process (s) | padded tokens per process | load average before / after |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['wall_median_s']:.2f} | {r['wall_median_s'] / baseline:.3f} | "
              f"{r['cpu_s_per_rank']} | {r['padded_tokens_per_rank']} | "
              f"{r['load_avg_1min'][0]:.2f} / {r['load_avg_1min'][1]:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
