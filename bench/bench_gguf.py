"""Merged GGUF (issue 21): does a steer folded into a GGUF file keep its effect, in transformers and in llama.cpp?

    nice python bench/bench_gguf.py --model smollm2-135m      # Q4_1
    nice python bench/bench_gguf.py --model gemma3-270m       # Q4_K_M (its o_proj / down_proj become Q8_0)

Per model and per site (``ffn``: rows of down_proj; ``attention``: columns of o_proj), one steer is fitted with
``fit_austeer`` on SST-2 pairs of the built-in task (k = 100, α = 15 by default) and merged into the model's GGUF
file with ``write_merged_gguf``. Then, on the first 50 SST-2 test prompts (the same token ids in both runtimes):

- transformers: last-token logits of vanilla, steered (unmerged AUSteer) and the merged GGUF reloaded through
  transformers' GGUF loader; the reload's distance to the steered model is the re-quantization error, reported next to
  the steering effect (steered - vanilla), and per tensor as max |written - exact| / max |exact|;
- llama.cpp (llama-cpp-python): last-token logits of the original and the merged GGUF. llama.cpp multiplies with
  quantized activations, so its logits differ from transformers' even unsteered; compared is the steering effect within
  each runtime: answer-logit shift Δ = (logit " positive" - logit " negative") of merged - original in llama.cpp
  against steered - vanilla in transformers (Pearson correlation, sign agreement), and the answers (the greedy next
  token, and the choice between the two answers) of merged llama.cpp against steered transformers.

Results go to ``--output`` (default bench/gguf-runs/) as <model>.json; the GGUF files and adapters to a scratch
folder. Stages already done there are reused, so a run can be resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import start_benchmark

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SITES = ("ffn", "attention")


def last_logits(model, ids_list: list[list[int]]) -> torch.Tensor:
    """[prompts, vocab] next-token logits, one prompt at a time (no padding)."""
    rows = []
    with torch.inference_mode():
        for ids in ids_list:
            rows.append(model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float())
    return torch.stack(rows)


def llama_cpp_logits(path: Path, ids_list: list[list[int]], threads: int) -> np.ndarray:
    """[prompts, vocab] next-token logits of llama.cpp for the same token ids."""
    from llama_cpp import Llama

    # logits_all: llama-cpp-python keeps the logits (in `scores`) only then.
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_batch=512, logits_all=True, verbose=False)
    rows = []
    for ids in ids_list:
        llm.reset()
        llm.eval(ids)
        rows.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
    del llm
    return np.stack(rows)


def shift_agreement(reference: np.ndarray, other: np.ndarray) -> dict:
    return {"pearson": float(np.corrcoef(reference, other)[0, 1]),
            "sign_agreement": float(np.mean(np.sign(reference) == np.sign(other))),
            "mean_abs_reference": float(np.abs(reference).mean()), "mean_abs_other": float(np.abs(other).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=15.0)
    parser.add_argument("--n-fit", type=int, default=200)
    parser.add_argument("--n-prompts", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sites", nargs="+", choices=SITES, default=list(SITES))
    parser.add_argument("--stage", choices=["all", "transformers", "llama"], default="all",
                        help="llama: only the llama.cpp comparison, on the files and results of an earlier run")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "gguf-runs")
    parser.add_argument("--scratch", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "austeer-bench-gguf")
    args = parser.parse_args()
    started, load = start_benchmark(args.threads)

    from peft import PeftModel
    from transformers import AutoTokenizer

    from austeer_peft import fit_austeer
    from austeer_peft.evaluate import load_task
    from austeer_peft.hub.gguf import gguf_source, load_gguf_model, write_merged_gguf

    source = gguf_source(args.model)
    scratch = args.scratch / args.model
    scratch.mkdir(parents=True, exist_ok=True)
    args.output.mkdir(parents=True, exist_ok=True)
    result_file = args.output / f"{args.model}.json"
    results = json.loads(result_file.read_text()) if result_file.exists() else {}
    results.update({"model": args.model, "source": source.name, "k": args.k, "alpha": args.alpha,
                    "n_fit": args.n_fit, "load_at_start": load})

    def save() -> None:
        result_file.write_text(json.dumps(results, indent=2))

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    task = load_task("sst2", n_fit=args.n_fit, n_validation=0)
    test = task.test.select(range(args.n_prompts))
    ids_list = [tokenizer(prompt).input_ids for prompt in test["prompt"]]
    labels = np.array(test["label"])
    answer_ids = [tokenizer(choice, add_special_tokens=False).input_ids[0] for choice in task.choices]
    results["answer_tokens"] = [tokenizer.decode([i]) for i in answer_ids]

    def margins(logits) -> np.ndarray:  # logit " positive" - logit " negative"
        logits = np.asarray(logits)
        return logits[:, answer_ids[1]] - logits[:, answer_ids[0]]

    def summary(logits) -> dict:
        m = margins(logits)
        return {"accuracy": float(np.mean((m > 0) == (labels == 1))), "greedy": np.asarray(logits).argmax(-1).tolist()}

    base = load_gguf_model(source)
    model = None
    vanilla = last_logits(base, ids_list).numpy()
    results["transformers_vanilla"] = summary(vanilla)
    for site in args.sites if args.stage != "llama" else ():
        entry = results.setdefault("sites", {}).setdefault(site, {})
        adapter_dir, merged_path = scratch / f"adapter-{site}", scratch / f"merged-{site}.gguf"
        if not (adapter_dir / site / "adapter_config.json").exists():
            t0 = time.perf_counter()
            fitted = fit_austeer(model if model is not None else base, tokenizer, task.pairs("fit"), sites=site,
                                 k=args.k, alpha=args.alpha, adapter_name=site, progress=False)
            entry["fit_seconds"] = time.perf_counter() - t0
            model = fitted.peft_model
            model.save_pretrained(adapter_dir, selected_adapters=[site])
        elif model is None:
            model = PeftModel.from_pretrained(base, str(adapter_dir / site), adapter_name=site)
        else:
            model.load_adapter(str(adapter_dir / site), adapter_name=site)
        model.set_adapter(site)
        steered = last_logits(model, ids_list).numpy()
        t0 = time.perf_counter()
        merge = write_merged_gguf(model, source, merged_path, adapter_name=site)
        entry["merge_seconds"] = time.perf_counter() - t0
        entry["file_bytes"], results["source_bytes"] = merged_path.stat().st_size, source.stat().st_size
        entry["tensors"] = [vars(change) for change in merge.changes]
        entry["type_changes"] = [f"{c.name}: {c.source_type} -> {c.written_type}" for c in merge.type_changes]
        entry["relative_weight_error_max"] = max(c.max_error / c.max_abs for c in merge.changes)
        reloaded = last_logits(load_gguf_model(merged_path), ids_list).numpy()
        entry["transformers_steered"] = summary(steered)
        entry["transformers_merged_gguf"] = summary(reloaded)
        entry["reload_vs_steered_max_abs_logit"] = float(np.abs(reloaded - steered).max())
        entry["steered_vs_vanilla_max_abs_logit"] = float(np.abs(steered - vanilla).max())
        entry["transformers_reload_shift_vs_steered_shift"] = shift_agreement(
            margins(steered) - margins(vanilla), margins(reloaded) - margins(vanilla))
        entry["steered_shift"] = (margins(steered) - margins(vanilla)).tolist()
        save()
        print(f"{args.model} {site}: transformers done ({time.perf_counter() - started:.0f} s)", flush=True)

    if args.stage == "transformers":
        return
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: skipping the llama.cpp comparison", flush=True)
        return
    results["llama_cpp_version"] = llama_cpp.__version__
    original = llama_cpp_logits(source, ids_list, args.threads)
    results["llama_cpp_original"] = summary(original)
    results["llama_cpp_vs_transformers_vanilla_max_abs_logit"] = float(np.abs(original - vanilla).max())
    for site in [site for site in args.sites if site in results.get("sites", {})]:
        entry = results["sites"][site]
        merged = llama_cpp_logits(scratch / f"merged-{site}.gguf", ids_list, args.threads)
        steered_shift = np.array(entry["steered_shift"])
        entry["llama_cpp_merged"] = summary(merged)
        entry["llama_cpp_shift_vs_transformers_shift"] = shift_agreement(steered_shift, margins(merged) -
                                                                         margins(original))
        greedy_llama, greedy_hf = np.array(entry["llama_cpp_merged"]["greedy"]), np.array(
            entry["transformers_steered"]["greedy"])
        entry["greedy_agreement_llama_merged_vs_transformers_steered"] = float(np.mean(greedy_llama == greedy_hf))
        entry["choice_agreement_llama_merged_vs_transformers_steered"] = float(np.mean(
            (margins(merged) > 0) == (np.array(steered_shift) + margins(vanilla) > 0)))
        entry["greedy_changed_by_merge_llama_cpp"] = float(np.mean(
            greedy_llama != np.array(results["llama_cpp_original"]["greedy"])))
        save()
    results["seconds"] = time.perf_counter() - started
    save()
    print(json.dumps({site: {k: v for k, v in e.items() if k not in ("tensors", "steered_shift")}
                      for site, e in results["sites"].items()}, indent=1))


if __name__ == "__main__":
    main()
