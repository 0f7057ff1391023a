"""What an unmerged AUSteer adapter launches: aten ops per decode step and per prefill, steered vs unsteered, and
per-request adapters in one batch (issue 20).

    python bench/bench_ops.py                                # SmolLM2-135M fp32, k = 100 fitted on 64 SST-2 pairs
    python bench/bench_ops.py --model llama-7b-shape         # random Llama-7B-shaped config (2 layers), 100 AUs
    python bench/bench_ops.py --mixed                        # also: 8 rows with 4 adapters vs 4 separate batches
    python bench/bench_ops.py --compile-only                 # graph breaks vs LoRA, inductor vs eager (tiny model)
    python bench/bench_ops.py --layer-cost-only              # CPU µs one AUSteerLayer call adds (decode shape)

Ops are counted with the torch profiler: every aten op that no other aten op called (what a GPU would launch one or
more kernels for; the count is deterministic, unlike time on a shared machine). Workloads at batch 1: one decode step
(one token on a KV cache of the prompt) and one 64-token prefill. "Extra ops per wrapped module" is (steered −
vanilla) / number of AUSteerLayers. The vanilla model is a copy of the base model taken before wrapping.

Decode-step time, as `bench_overhead.decode_steps` measures it (same token, same cache length, models interleaved in
blocks of 10, tenth percentile of the steps), vanilla vs steered vs merged, on two clocks: wall time, and the process
CPU time of each step (one torch thread: CPU time does not count the time other jobs on a shared machine hold the
core, which wall time does).

Compile (`--compile`, on a tiny one-layer Llama, random weights): graph breaks (`torch._dynamo.explain`) of a whole
AUSteer PeftModel and of a LoRA PeftModel on the same base, each with one adapter and with `adapter_names`; then the
inductor-compiled base model under the PeftModel vs eager, forward and greedy `generate`, one adapter and mixed rows,
after changing the AUs and the active adapter.

Mixed batch (`--mixed`): four adapters on one model (for SmolLM2 the fit's top 100 / 64 / 16 / 4 AUs at α = 15 from
the same momentum counts; for the random model random AUs), 8 rows of different lengths (left padding), two rows per
adapter, run as one batch with `adapter_names=[...]` vs as 4 batches of 2 rows with `set_adapter`; the outputs must
agree within 1e-5 (max |logit| difference is reported), then the time of a prefill forward and of a greedy
`generate` of `--new-tokens` tokens, interleaved, median of `--repeats`.
"""

from __future__ import annotations

import argparse
import collections
import copy
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
sys.path.append(str(ROOT))  # after PYTHONPATH, so another checkout can be measured ("before")

SITES = ["attention", "ffn"]


# ---------------------------------------------------------------------------------------------------- models


def llama_7b_shape(layers: int, dtype: torch.dtype):
    """A random model with Llama-2-7B's widths (hidden 4096, MLP 11008, 32 heads, vocabulary 32000), `layers` deep."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def random_aus(model, n: int, seed: int) -> list[tuple[str, int, float]]:
    """n distinct AUs over every attention and ffn module of `model`, γ uniform in [-0.9, 3]."""
    from austeer_peft import AUSteerConfig
    from austeer_peft.tuner.sites import candidate_modules

    candidates = candidate_modules(model, AUSteerConfig(sites=SITES))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for i, c in enumerate(candidates):  # at least one AU on every module, the rest anywhere
        chosen.append((c.name, int(torch.randint(c.width, (1,), generator=generator))))
    while len(set(chosen)) < n:
        c = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
        chosen.append((c.name, int(torch.randint(c.width, (1,), generator=generator))))
    chosen = sorted(set(chosen))[:n]
    gammas = (torch.rand(len(chosen), generator=generator) * 3.9 - 0.9).tolist()
    return [(name, dim, g) for (name, dim), g in zip(chosen, gammas)]


def build(args):
    """(vanilla, steered PeftModel, tokenizer or None, a function adding the mixed-batch adapters)."""
    from peft import get_peft_model

    import austeer_peft

    if args.model == "llama-7b-shape":
        base = llama_7b_shape(args.layers, getattr(torch, args.dtype))
        vanilla = copy.deepcopy(base)
        steered = get_peft_model(base, austeer_peft.AUSteerConfig(sites=SITES))
        steered.set_aus(random_aus(vanilla, args.k, seed=0))

        def add_adapters(names):
            for i, name in enumerate(names):
                steered.add_adapter(name, austeer_peft.AUSteerConfig(sites=SITES))
                steered.set_aus(random_aus(vanilla, args.k, seed=i + 1), adapter_name=name)

        return vanilla, steered, None, add_adapters

    from austeer_peft.evaluate import load_task
    from austeer_peft.hub.models import load_model

    base, tokenizer = load_model(args.model)
    vanilla = copy.deepcopy(base)
    pairs = load_task("sst2", n_fit=args.fit_pairs).pairs()
    fit = austeer_peft.fit_austeer(base, tokenizer, pairs, sites=SITES, k=args.k, alpha=args.alpha, progress=False)
    steered = fit.peft_model

    def add_adapters(names):
        for name, k in zip(names, (100, 64, 16, 4)):
            fit.scores.to_adapter(k, args.alpha, steered, adapter_name=name)
        steered.base_model.set_adapter("default")

    return vanilla, steered, tokenizer, add_adapters


def wrapped_modules(model) -> int:
    from austeer_peft import AUSteerLayer

    return sum(isinstance(m, AUSteerLayer) for m in model.modules())


# ---------------------------------------------------------------------------------------------------- op counts


def top_level_ops(fn) -> collections.Counter:
    """Names of the aten ops `fn` runs that no other aten op called, counted."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = collections.Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] += 1
    return counts


def decode_and_prefill(model, prompt_ids: torch.Tensor):
    """Two callables: one decode step on a KV cache of `prompt_ids` (cropped back after each call), one prefill."""
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt_ids, past_key_values=cache, use_cache=True)
    token = prompt_ids[:, -1:]

    def decode():
        model(input_ids=token, past_key_values=cache, use_cache=True)
        cache.crop(-1)

    def prefill():
        model(input_ids=prompt_ids, use_cache=True)

    return {"decode_step": decode, "prefill_64": prefill}


def op_counts(models: dict, prompt_ids: torch.Tensor, wrapped: int) -> dict:
    out = {}
    calls = {mode: decode_and_prefill(model, prompt_ids) for mode, model in models.items()}
    for workload in ("decode_step", "prefill_64"):
        counts = {mode: top_level_ops(calls[mode][workload]) for mode in models}
        for _ in range(2):  # the count is deterministic: check it
            again = {mode: top_level_ops(calls[mode][workload]) for mode in models}
            if again != counts:
                raise RuntimeError(f"op counts of {workload} changed between runs: {counts} vs {again}")
        totals = {mode: sum(c.values()) for mode, c in counts.items()}
        extra = counts["steered"] - counts["vanilla"]
        fewer = counts["vanilla"] - counts["steered"]
        out[workload] = {
            "ops": totals, "extra_ops": totals["steered"] - totals["vanilla"],
            "extra_ops_per_wrapped_module": (totals["steered"] - totals["vanilla"]) / wrapped,
            "extra_by_op": dict(extra.most_common()), "fewer_by_op": dict(fewer.most_common()),
        }
    return out


# ---------------------------------------------------------------------------------------------------- decode time


def decode_steps(models: dict, prompt_ids: torch.Tensor, blocks: int, steps: int) -> dict:
    """Milliseconds of one decode step per model (same token, same cache length: the cache is cropped back after
    each step), models interleaved in blocks of `steps`; wall and process CPU time; min / p10 / median."""
    from transformers import DynamicCache

    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {clock: {mode: [] for mode in models} for clock in clocks}
    with torch.inference_mode():
        caches = {}
        for mode, model in models.items():
            caches[mode] = DynamicCache(config=model.config)
            model(input_ids=prompt_ids, past_key_values=caches[mode], use_cache=True)
        token = prompt_ids[:, -1:]
        for _ in range(blocks):
            for mode, model in models.items():
                for _ in range(steps):
                    start = {clock: fn() for clock, fn in clocks.items()}
                    model(input_ids=token, past_key_values=caches[mode], use_cache=True)
                    for clock, fn in clocks.items():
                        times[clock][mode].append((fn() - start[clock]) * 1e3)
                    caches[mode].crop(-1)
    out = {}
    for clock, by_mode in times.items():
        out[clock] = {}
        for mode, values in by_mode.items():
            values = sorted(values)
            out[clock][mode] = {"min": values[0], "p10": values[len(values) // 10],
                                "median": statistics.median(values)}
        for mode in models:
            if mode != "vanilla":
                out[clock][f"{mode}_ratio"] = {q: out[clock][mode][q] / out[clock]["vanilla"][q]
                                               for q in ("min", "p10", "median")}
    return out


# ---------------------------------------------------------------------------------------------------- layer cost


def layer_cost(width: int = 576, aus: int = 4, calls: int = 2000, blocks: int = 7) -> dict:
    """Microseconds of process CPU time one AUSteerLayer call adds to its Linear(width, width) on a decode-shaped
    input [1, 1, width], at an input and at an output site with `aus` AUs; the minimum over `blocks` blocks."""
    from austeer_peft import AUSteerLayer
    from austeer_peft.tuner.sites import SiteModule

    torch.manual_seed(0)
    x = torch.randn(1, 1, width)
    out = {}
    with torch.inference_mode():
        for position in ("input", "output"):
            linear = torch.nn.Linear(width, width)
            layer = AUSteerLayer(linear, SiteModule("linear", None, None, position, width), "default")
            layer.update_layer("default", torch.randperm(width)[:aus].sort().values, torch.rand(aus) * 3)
            layer.set_adapter(["default"])
            best = {"plain": float("inf"), "wrapped": float("inf")}
            for _ in range(blocks):
                for name, module in (("plain", linear), ("wrapped", layer)):
                    start = time.process_time()
                    for _ in range(calls):
                        module(x)
                    best[name] = min(best[name], (time.process_time() - start) / calls * 1e6)
            out[position] = {**best, "extra_us": best["wrapped"] - best["plain"]}
    return out


# ---------------------------------------------------------------------------------------------------- compile


def compile_checks() -> dict:
    """Graph breaks of AUSteer vs LoRA PeftModels, and inductor vs eager outputs (see the module docstring)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import spread_aus, tiny_model
    from peft import LoraConfig, get_peft_model

    import austeer_peft

    prompt = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13], [14, 15, 16, 17, 18]])
    mask = (prompt != 0).long()
    rows = ["default", "__base__", "other"]
    base = tiny_model("llama", layers=1)
    model = get_peft_model(base, austeer_peft.AUSteerConfig(sites=SITES))
    model.set_aus(spread_aus(base, SITES, 8, seed=1, gamma_range=(0.5, 4.0)))
    model.add_adapter("other", austeer_peft.AUSteerConfig(sites=SITES))
    model.set_aus(spread_aus(base, SITES, 8, seed=2, gamma_range=(0.5, 4.0)), adapter_name="other")
    model.eval()
    lora = get_peft_model(tiny_model("llama", layers=1), LoraConfig(target_modules=["o_proj", "down_proj"],
                                                                    init_lora_weights=False))
    lora.add_adapter("other", LoraConfig(target_modules=["o_proj", "down_proj"], init_lora_weights=False))
    lora.eval()
    out = {"graph_breaks": {}}
    for name, peft_model in (("austeer", model), ("lora", lora)):
        for case, kwargs in (("one adapter", {}), ("adapter_names", {"adapter_names": rows})):
            torch._dynamo.reset()
            explained = torch._dynamo.explain(peft_model)(input_ids=prompt, attention_mask=mask, **kwargs)
            out["graph_breaks"][f"{name}, {case}"] = {"graphs": explained.graph_count,
                                                      "breaks": explained.graph_break_count,
                                                      "reasons": [str(r.reason) for r in explained.break_reasons]}
    torch._dynamo.reset()
    model.get_base_model().compile()  # inductor

    def forward(**kwargs):
        return model(input_ids=prompt, attention_mask=mask, **kwargs).logits

    def generate(**kwargs):
        result = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kwargs)
        return torch.stack(result.logits, 1)

    out["inductor_vs_eager_max_abs_difference"] = {}
    for step in ("one adapter", "new gamma", "other adapter", "adapter_names"):
        if step == "new gamma":
            model.set_aus([(au.module, au.dim, au.gamma + 1.0) for au in model.get_aus("default")])
        elif step == "other adapter":
            model.base_model.set_adapter("other")
        kwargs = {"adapter_names": rows} if step == "adapter_names" else {}
        for run in (forward, generate):
            with torch.no_grad():
                with torch.compiler.set_stance("force_eager"):
                    eager = run(**kwargs)
                compiled = run(**kwargs)
            out["inductor_vs_eager_max_abs_difference"][f"{step}, {run.__name__}"] = (
                (compiled - eager).abs().max().item())
    from torch._dynamo.utils import counters

    out["inductor_graph_breaks"] = sum(counters["graph_break"].values())
    out["inductor_graphs"] = counters["stats"]["unique_graphs"]
    return out


# ---------------------------------------------------------------------------------------------------- mixed batch


def mixed_batch(steered, names: list[str], input_ids, attention_mask, new_tokens: int, repeats: int,
                pad_token_id: int) -> dict:
    """8 rows with per-row adapters in one batch vs the same rows as one batch per adapter."""
    rows = [names[i % len(names)] for i in range(input_ids.shape[0])]
    groups = {name: [i for i, r in enumerate(rows) if r == name] for name in names}

    def one_batch_forward():
        return steered(input_ids=input_ids, attention_mask=attention_mask, adapter_names=rows).logits

    def separate_forward():
        logits = torch.empty(0)
        for name, index in groups.items():
            steered.base_model.set_adapter(name)
            part = steered(input_ids=input_ids[index], attention_mask=attention_mask[index]).logits
            if logits.numel() == 0:
                logits = part.new_empty(input_ids.shape[0], *part.shape[1:])
            logits[index] = part
        steered.base_model.set_adapter("default")
        return logits

    generate_kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                       "pad_token_id": pad_token_id}

    def one_batch_generate():
        return steered.generate(input_ids=input_ids, attention_mask=attention_mask, adapter_names=rows,
                                **generate_kwargs)

    def separate_generate():
        out = torch.empty(0, dtype=torch.long)
        for name, index in groups.items():
            steered.base_model.set_adapter(name)
            part = steered.generate(input_ids=input_ids[index], attention_mask=attention_mask[index],
                                    **generate_kwargs)
            if out.numel() == 0:
                out = part.new_empty(input_ids.shape[0], part.shape[1])
            out[index] = part
        steered.base_model.set_adapter("default")
        return out

    with torch.inference_mode():
        together, apart = one_batch_forward(), separate_forward()
        real = attention_mask.bool()
        difference = (together - apart)[real].abs().max().item()
        tokens_equal = torch.equal(one_batch_generate(), separate_generate())
    times = {key: [] for key in ("forward_one_batch", "forward_4_batches", "generate_one_batch",
                                 "generate_4_batches")}
    with torch.inference_mode():
        for rep in range(repeats):
            pairs = [("forward_one_batch", one_batch_forward), ("forward_4_batches", separate_forward),
                     ("generate_one_batch", one_batch_generate), ("generate_4_batches", separate_generate)]
            if rep % 2:
                pairs = [pairs[1], pairs[0], pairs[3], pairs[2]]
            for key, fn in pairs:
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    medians = {key: statistics.median(values) for key, values in times.items()}
    return {"rows": rows, "shape": list(input_ids.shape), "max_logit_difference": difference,
            "generated_tokens_equal": tokens_equal, "median_s": medians, "all_s": times,
            "forward_ratio": medians["forward_one_batch"] / medians["forward_4_batches"],
            "generate_ratio": medians["generate_one_batch"] / medians["generate_4_batches"]}


def mixed_inputs(tokenizer, vocab: int, rows: int, tokens: int):
    """`rows` prompts of different lengths, left padded (as for generation)."""
    lengths = [tokens - 3 * i for i in range(rows)]
    if tokenizer is not None:
        from austeer_peft.evaluate import load_task

        text = "\n".join(load_task("sst2").test["prompt"][:200])
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        pieces = [ids[i * tokens: i * tokens + n] for i, n in enumerate(lengths)]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    else:
        generator = torch.Generator().manual_seed(1)
        pieces = [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]
        pad = 0
    input_ids = torch.full((rows, tokens), pad, dtype=torch.long)
    attention_mask = torch.zeros(rows, tokens, dtype=torch.long)
    for i, piece in enumerate(pieces):
        input_ids[i, tokens - len(piece):] = piece
        attention_mask[i, tokens - len(piece):] = 1
    return input_ids, attention_mask, pad


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a model alias/id, or llama-7b-shape")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of llama-7b-shape")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of llama-7b-shape")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=15.0)
    parser.add_argument("--fit-pairs", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-blocks", type=int, default=30, help="blocks of 10 decode steps per model (0: none)")
    parser.add_argument("--mixed", action="store_true", help="also the mixed-batch benchmark")
    parser.add_argument("--new-tokens", type=int, default=16, help="generated tokens in the mixed-batch benchmark")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of the mixed-batch benchmark")
    parser.add_argument("--compile", action="store_true", help="also the torch.compile checks (tiny model)")
    parser.add_argument("--compile-only", action="store_true", help="only the torch.compile checks")
    parser.add_argument("--layer-cost-only", action="store_true", help="only the per-call cost of one AUSteerLayer")
    parser.add_argument("--device", default="cpu", help="where the models run (e.g. cuda)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, help="also write the JSON report here")
    args = parser.parse_args()
    started, load = start_benchmark(args.threads)
    if args.layer_cost_only:
        import austeer_peft

        report = {"austeer_peft": str(Path(austeer_peft.__file__).parent), "layer_cost_us": layer_cost(),
                  "load_average_at_start": load}
        print(json.dumps(report, indent=2))
        if args.output:
            args.output.write_text(json.dumps(report, indent=2))
        return
    if args.compile_only:
        report = {"compile": compile_checks(), "torch": torch.__version__, "load_average_at_start": load,
                  "bench_wall_s": time.perf_counter() - started}
        print(json.dumps(report, indent=2))
        if args.output:
            args.output.write_text(json.dumps(report, indent=2))
        return

    vanilla, steered, tokenizer, add_adapters = build(args)
    vanilla.to(args.device)
    steered.to(args.device)
    vocab = vanilla.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    prompt_ids = prompt_ids.to(args.device)
    wrapped = wrapped_modules(steered)
    import austeer_peft

    report = {"setup": {"austeer_peft": str(Path(austeer_peft.__file__).parent), "model": args.model, "layers": vanilla.config.num_hidden_layers,
                        "dtype": str(next(vanilla.parameters()).dtype), "aus": len(steered.get_aus()),
                        "wrapped_modules": wrapped, "prompt_tokens": args.prompt_tokens, "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "load_average_at_start": load}}
    models = {"vanilla": vanilla, "steered": steered}
    report["ops"] = op_counts(models, prompt_ids, wrapped)
    for workload, result in report["ops"].items():
        print(f"{workload}: vanilla {result['ops']['vanilla']} ops, steered {result['ops']['steered']} ops: "
              f"{result['extra_ops']:+d} = {result['extra_ops_per_wrapped_module']:.2f} per wrapped module "
              f"({wrapped} modules); extra {result['extra_by_op']}", flush=True)

    if args.decode_blocks:
        models["merged"] = copy.deepcopy(steered).merge_and_unload()
        step = decode_steps(models, prompt_ids[:, :16], blocks=args.decode_blocks, steps=10)
        report["decode_step_ms"] = step
        for clock, s in step.items():
            print(f"decode step ms, {clock} (min / p10 / median): " + "; ".join(
                f"{m} {s[m]['min']:.2f} / {s[m]['p10']:.2f} / {s[m]['median']:.2f}" for m in models)
                + "; steered/vanilla " + " / ".join(f"{s['steered_ratio'][q]:.4f}" for q in ("min", "p10", "median"))
                + "; merged/vanilla " + " / ".join(f"{s['merged_ratio'][q]:.4f}" for q in ("min", "p10", "median")),
                flush=True)
        del models["merged"]

    if args.mixed:
        names = ["default", "a2", "a3", "a4"]
        add_adapters(names[1:])
        input_ids, attention_mask, pad = mixed_inputs(tokenizer, vocab, rows=8, tokens=args.prompt_tokens)
        input_ids, attention_mask = input_ids.to(args.device), attention_mask.to(args.device)
        mixed = mixed_batch(steered, names, input_ids, attention_mask, args.new_tokens, args.repeats, pad)
        rows = mixed["rows"]
        counts = top_level_ops(lambda: steered(input_ids=input_ids, attention_mask=attention_mask,
                                               adapter_names=rows))
        plain = top_level_ops(lambda: vanilla(input_ids=input_ids, attention_mask=attention_mask))
        mixed["prefill_ops"] = {"vanilla": sum(plain.values()), "mixed": sum(counts.values()),
                                "extra_per_wrapped_module": (sum(counts.values()) - sum(plain.values()))
                                / wrapped_modules(steered), "wrapped_modules": wrapped_modules(steered),
                                "extra_by_op": dict((counts - plain).most_common())}
        report["mixed_batch"] = mixed
        m = mixed["median_s"]
        print(f"mixed batch {mixed['shape']} with {len(names)} adapters: max |logit diff| vs separate batches "
              f"{mixed['max_logit_difference']:.2e}, generated tokens equal: {mixed['generated_tokens_equal']}; "
              f"forward {m['forward_one_batch']:.3f} s vs {m['forward_4_batches']:.3f} s "
              f"(ratio {mixed['forward_ratio']:.3f}); generate {args.new_tokens} tokens {m['generate_one_batch']:.3f} s "
              f"vs {m['generate_4_batches']:.3f} s (ratio {mixed['generate_ratio']:.3f}); prefill ops "
              f"{mixed['prefill_ops']['mixed']} vs vanilla {mixed['prefill_ops']['vanilla']} "
              f"({mixed['prefill_ops']['extra_per_wrapped_module']:.2f} per wrapped module)", flush=True)

    if args.compile:
        report["compile"] = compile_checks()
        print("compile: " + json.dumps(report["compile"]), flush=True)

    report["bench_wall_s"] = time.perf_counter() - started
    text = json.dumps(report, indent=2)
    if args.output:
        args.output.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
