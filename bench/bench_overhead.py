"""Inference overhead of a k = 100 adapter (P1 unmerged, P1m merged) and adapter file size (P4).

    python bench/bench_overhead.py                 # SmolLM2-135M-Instruct fp32, k = 100 fitted on 64 SST-2 pairs
    python bench/bench_overhead.py --profile       # also: torch.profiler tables of one steered vs vanilla generate

Three models in one process: vanilla (a copy of the base model taken before fitting), steered (the fitted PeftModel,
unmerged) and merged (`merge_and_unload()` of a copy of the steered one). Two workloads: one forward of a batch of
8 x 128 tokens (logits for all positions, no KV cache) and a greedy `generate` of exactly 64 new tokens at batch 1.
After a warm-up, every repetition runs each model once per workload, rotating which model goes first, so a change of
load hits the three alike. Reported: medians, quartiles, ratio of the medians and the median of the per-repetition
ratios (wall time and process CPU time; with one thread CPU time is what a busy machine disturbs least).

Also reported: one decode step (same token, same cache length) per model, in interleaved blocks of 10, min / p10 /
median of 300; and what one AUSteerLayer call adds to its base module on a decode-shaped input, times the wrapped
modules (calls per generated token): a prediction of the generate overhead that does not depend on end-to-end noise.

P4: bytes of the saved `adapter_model.safetensors` of the AUSteer adapter, of its IA3 export (same outputs, one dense
vector per steered module) and of LoRA r = 8 adapters on the same model (o_proj + down_proj, and all linear layers).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import start_benchmark

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("vanilla", "steered", "merged")


def quartiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3


def forward_inputs(tokenizer, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    """`batch` rows of `tokens` real tokens: consecutive SST-2 test prompts cut into equal rows (no padding)."""
    from austeer_peft.evaluate import load_task

    text = "\n\n".join(load_task("sst2").test["prompt"])
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < batch * tokens:
        raise ValueError(f"Need {batch * tokens} tokens of text, have {ids.numel()}.")
    input_ids = ids[: batch * tokens].reshape(batch, tokens)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def run_forward(model, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs, use_cache=False).logits


def run_generate(model, prompt, new_tokens: int, pad_token_id: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=pad_token_id)


def count_hooks(model) -> int:
    """Forward (pre-)hooks registered on any module of `model`."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def timed(fn) -> tuple[float, float]:
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - start_cpu


def summarize(times: dict[str, list[float]]) -> dict:
    """Medians, quartiles and overhead ratios (steered or merged over vanilla) of one workload."""
    out = {mode: {"median": statistics.median(values), "quartiles": quartiles(values), "all": values}
           for mode, values in times.items()}
    for mode in ("steered", "merged"):
        per_rep = [t / v for t, v in zip(times[mode], times["vanilla"])]
        out[f"{mode}_ratio_of_medians"] = out[mode]["median"] / out["vanilla"]["median"]
        out[f"{mode}_ratio_per_rep_median"] = statistics.median(per_rep)
        out[f"{mode}_ratio_per_rep_quartiles"] = quartiles(per_rep)
    return out


def decode_steps(models: dict, prompt, blocks: int, steps: int) -> dict:
    """Milliseconds of one decode step (batch 1, KV cache of the prompt), each model in turn in blocks of `steps`.

    The cache is cropped back after every step, so all steps see the same length. Unlike a whole `generate`, this
    feeds every model the same token, and the minimum and 10th percentile of hundreds of steps are little affected
    by other processes.
    """
    from transformers import DynamicCache

    step_ms = {mode: [] for mode in models}
    with torch.inference_mode():
        caches = {}
        for mode, model in models.items():
            caches[mode] = DynamicCache(config=models["vanilla"].config)
            model(**prompt, past_key_values=caches[mode], use_cache=True)
        token = prompt["input_ids"][:, -1:]
        for _ in range(blocks):
            for mode, model in models.items():
                for _ in range(steps):
                    start = time.perf_counter()
                    model(input_ids=token, past_key_values=caches[mode], use_cache=True)
                    step_ms[mode].append((time.perf_counter() - start) * 1e3)
                    caches[mode].crop(-1)
    out = {}
    for mode, values in step_ms.items():
        values = sorted(values)
        out[mode] = {"min": values[0], "p10": values[len(values) // 10], "median": statistics.median(values)}
    for mode in ("steered", "merged"):
        out[f"{mode}_ratio"] = {key: out[mode][key] / out["vanilla"][key] for key in ("min", "p10", "median")}
    return out


class _FreshCopy(torch.nn.Module):
    """Stand-in base module that costs one small copy: returns a new tensor, as a real module does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def wrapper_cost(peft_model, repeats: int) -> dict:
    """Microseconds one AUSteerLayer adds around its base module on a [1, 1, width] activation (one decode step).

    The base module is swapped for a one-copy stand-in while timing, so the difference (wrapped minus the stand-in
    alone) is the wrapper's own work, not noise of a 0.5 ms MLP; the minimum of 5 blocks of `repeats` calls is kept.
    """
    from austeer_peft.tuner.layer import AUSteerLayer

    layers = [m for m in peft_model.modules() if isinstance(m, AUSteerLayer)]
    stand_in = _FreshCopy()
    costs = []
    with torch.inference_mode():
        for layer in layers:
            x = torch.randn(1, 1, layer.candidate.width)
            base = layer.base_layer
            layer.base_layer = stand_in
            try:
                best = {"wrapped": float("inf"), "alone": float("inf")}
                for _ in range(5):
                    for name, module in (("wrapped", layer), ("alone", stand_in)):
                        start = time.perf_counter()
                        for _ in range(repeats):
                            module(x)
                        best[name] = min(best[name], (time.perf_counter() - start) / repeats)
            finally:
                layer.base_layer = base
            costs.append((best["wrapped"] - best["alone"]) * 1e6)
    return {"wrapped_modules": len(layers), "extra_us_per_call_median": statistics.median(costs),
            "extra_us_per_token": sum(costs)}


def profile_generate(models: dict, prompt, new_tokens: int, pad_token_id: int) -> None:
    """torch.profiler tables (self CPU time by op) of one generate per model, to stderr."""
    from torch.profiler import ProfilerActivity, profile

    for mode in ("vanilla", "steered"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_generate(models[mode], prompt, new_tokens, pad_token_id)
        print(f"\n=== profile: generate, {mode} ===", file=sys.stderr)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- P4


def adapter_sizes(vanilla, peft_model) -> dict:
    """Bytes of adapter_model.safetensors: AUSteer, its IA3 export, LoRA r = 8 (o_proj + down_proj, all linear)."""
    from peft import LoraConfig, get_peft_model

    from austeer_peft.hub.export import to_ia3

    def size(folder: Path) -> dict:
        return {"safetensors_bytes": (folder / "adapter_model.safetensors").stat().st_size,
                "config_bytes": (folder / "adapter_config.json").stat().st_size}

    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        peft_model.save_pretrained(tmp / "austeer")
        sizes["austeer"] = size(tmp / "austeer")
        to_ia3(peft_model, tmp / "ia3")
        sizes["ia3_export"] = size(tmp / "ia3")
        for name, targets in (("lora_r8_o_down", ["o_proj", "down_proj"]), ("lora_r8_all_linear", "all-linear")):
            lora = get_peft_model(copy.deepcopy(vanilla), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
            lora.save_pretrained(tmp / name)
            sizes[name] = size(tmp / name)
            sizes[name]["trainable_params"] = lora.get_nb_trainable_parameters()[0]
    return sizes


# ---------------------------------------------------------------------------------------------------- main


def build_models(args):
    """(vanilla, steered, merged, tokenizer, number of AUs): steered is a real fit at k = args.k."""
    from austeer_peft import fit_austeer
    from austeer_peft.evaluate import load_task
    from austeer_peft.hub.models import load_model

    model, tokenizer = load_model(args.model)
    vanilla = copy.deepcopy(model)
    pairs = load_task("sst2", n_fit=args.fit_pairs).pairs()
    fit = fit_austeer(model, tokenizer, pairs, sites=args.sites, k=args.k, alpha=args.alpha, progress=False)
    steered = fit.peft_model
    merged = copy.deepcopy(steered).merge_and_unload()
    return vanilla, steered, merged, tokenizer, len(steered.get_aus())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=15.0)
    parser.add_argument("--sites", nargs="+", default=["attention", "ffn"])
    parser.add_argument("--fit-pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repetitions per workload")
    parser.add_argument("--decode-blocks", type=int, default=30, help="blocks of 10 single decode steps per model")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine two OpenMP threads stall on each "
                             "other and timings become noise; see bench/RESULTS.md)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of one generate")
    parser.add_argument("--skip-sizes", action="store_true")
    args = parser.parse_args()

    from austeer_peft.evaluate import load_task

    started, load_start = start_benchmark(args.threads)

    vanilla, steered, merged, tokenizer, num_aus = build_models(args)
    models = {"vanilla": vanilla, "steered": steered, "merged": merged}
    inputs = forward_inputs(tokenizer, args.batch, args.tokens)
    prompt = tokenizer(load_task("sst2").validation[0]["prompt"], return_tensors="pt")
    pad = tokenizer.pad_token_id

    # Warm-up, and a check that the three models are what they claim: steering changes the logits, merging keeps them.
    logits = {mode: run_forward(model, inputs) for mode, model in models.items()}
    steer_change = (logits["steered"] - logits["vanilla"]).abs().max().item()
    merge_error = (logits["merged"] - logits["steered"]).abs().max().item()
    if steer_change == 0 or merge_error > 1e-3 * logits["steered"].abs().max().item():
        raise RuntimeError(f"Models are not as expected: steered-vanilla {steer_change}, merged-steered {merge_error}")
    lengths = {mode: run_generate(model, prompt, args.new_tokens, pad).shape[1] for mode, model in models.items()}
    if len(set(lengths.values())) != 1:
        raise RuntimeError(f"Generated lengths differ: {lengths}")

    if args.profile:
        profile_generate(models, prompt, args.new_tokens, pad)

    wall = {w: {m: [] for m in MODES} for w in ("forward", "generate")}
    cpu = {w: {m: [] for m in MODES} for w in ("forward", "generate")}
    loads = []
    for rep in range(args.repeats):
        order = MODES[rep % 3:] + MODES[: rep % 3]
        for mode in order:
            w, c = timed(lambda: run_forward(models[mode], inputs))
            wall["forward"][mode].append(w)
            cpu["forward"][mode].append(c)
        for mode in order:
            w, c = timed(lambda: run_generate(models[mode], prompt, args.new_tokens, pad))
            wall["generate"][mode].append(w)
            cpu["generate"][mode].append(c)
        loads.append(os.getloadavg()[0])
        print(f"rep {rep}: forward " + " ".join(f"{m} {wall['forward'][m][-1]:.3f}" for m in MODES)
              + " | generate " + " ".join(f"{m} {wall['generate'][m][-1]:.3f}" for m in MODES)
              + f" | load {loads[-1]:.2f}", file=sys.stderr)

    report = {
        "setup": {"model": args.model, "k": args.k, "num_aus": num_aus, "alpha": args.alpha, "sites": args.sites,
                  "fit_pairs": args.fit_pairs, "forward_shape": [args.batch, args.tokens],
                  "new_tokens": args.new_tokens, "prompt_tokens": prompt["input_ids"].shape[1],
                  "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                  "load_average_at_start": load_start, "load_average_1min_per_rep": loads},
        "check": {"max_logit_change_steered_vs_vanilla": steer_change, "max_logit_diff_merged_vs_steered": merge_error,
                  # scope="all": no token-position hook on the decoder stack, layers see token_positions = None
                  "token_position_hook": steered.base_model._token_positions_hook is not None,
                  "hooks_steered": count_hooks(steered), "hooks_vanilla": count_hooks(vanilla)},
        "forward_wall": summarize(wall["forward"]), "forward_cpu": summarize(cpu["forward"]),
        "generate_wall": summarize(wall["generate"]), "generate_cpu": summarize(cpu["generate"]),
        "decode_step_ms": decode_steps(models, prompt, blocks=args.decode_blocks, steps=10),
        "layer_call": wrapper_cost(steered, repeats=1000),
    }
    per_token_s = report["layer_call"]["extra_us_per_token"] * 1e-6  # one call per wrapped module per forward
    report["layer_call"]["predicted_generate_overhead"] = (
        per_token_s * args.new_tokens / report["generate_wall"]["vanilla"]["median"])
    if not args.skip_sizes:
        report["sizes"] = adapter_sizes(vanilla, steered)
    report["bench_wall_s"] = time.perf_counter() - started
    print(json.dumps(report, indent=2))

    print()
    for workload in ("forward", "generate"):
        for clock in ("wall", "cpu"):
            s = report[f"{workload}_{clock}"]
            print(f"{workload:8s} {clock:4s}: vanilla {s['vanilla']['median']:.4f} s; "
                  f"P1 steered/vanilla {s['steered_ratio_of_medians']:.4f} (per-rep median "
                  f"{s['steered_ratio_per_rep_median']:.4f}, IQR {s['steered_ratio_per_rep_quartiles'][0]:.4f}-"
                  f"{s['steered_ratio_per_rep_quartiles'][2]:.4f}); "
                  f"P1m merged/vanilla {s['merged_ratio_of_medians']:.4f} (per-rep median "
                  f"{s['merged_ratio_per_rep_median']:.4f}, IQR "
                  f"{s['merged_ratio_per_rep_quartiles'][0]:.4f}-{s['merged_ratio_per_rep_quartiles'][2]:.4f})")
    ds = report["decode_step_ms"]
    print(f"decode step (ms, min / p10 / median of {10 * args.decode_blocks}): " + "; ".join(
        f"{m} {ds[m]['min']:.2f} / {ds[m]['p10']:.2f} / {ds[m]['median']:.2f}" for m in MODES)
        + "; steered/vanilla " + " / ".join(f"{ds['steered_ratio'][q]:.4f}" for q in ("min", "p10", "median"))
        + "; merged/vanilla " + " / ".join(f"{ds['merged_ratio'][q]:.4f}" for q in ("min", "p10", "median")))
    lc = report["layer_call"]
    print(f"AUSteerLayer call: +{lc['extra_us_per_call_median']:.1f} us median over {lc['wrapped_modules']} wrapped "
          f"modules, +{lc['extra_us_per_token']:.0f} us per token -> predicted generate overhead "
          f"{100 * lc['predicted_generate_overhead']:.2f} %")
    if "sizes" in report:
        print("P4 adapter_model.safetensors bytes: " + ", ".join(
            f"{name} {s['safetensors_bytes']}" for name, s in report["sizes"].items()) + "  [target austeer <= 4096]")


if __name__ == "__main__":
    main()
