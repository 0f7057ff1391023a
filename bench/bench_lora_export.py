"""LoRA export (issue 21) on the real models: file size next to the AUSteer file, largest rank, exactness against the
unmerged AUSteer adapter in float32, and on a bitsandbytes 4-bit base the export's error next to the merge's.

    nice python bench/bench_lora_export.py                                  # all three aliases, k = 16 / 100 / 400
    nice python bench/bench_lora_export.py --models smollm2-135m --output bench/lora-export.json

Per model: one counting pass over SST-2 fit pairs on the attention, ffn and ffn_inner sites, then for each k the
adapter at α = 15 (its AUs chosen over all three sites by momentum), exported with `to_lora` and reloaded with stock
PEFT in this process (the subprocess check is tests/hub/test_lora_export.py). Logit errors are max |Δ| over the
SST-2 test prompts given (all positions of a right-padded batch, padding excluded). 4-bit: the fp32 model saved and
reloaded with nf4 weights, the fp32-fitted adapter loaded onto it, with bitsandbytes' plain dequantize-then-matmul
kernel and, where the CPU has AVX512-BF16, its bf16 kernel too. Writes the JSON after each model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_common import start_benchmark  # noqa: E402

SITES = ["attention", "ffn", "ffn_inner"]


def max_error(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b).abs().amax(-1)[mask.bool()].max().item()


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def set_bf16_kernel(model, enabled: bool) -> None:
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = enabled and _has_avx512bf16()


def _has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def measure_model(alias: str, args, workdir: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GgufConfig

    from austeer_peft import compute_momentum, to_lora
    from austeer_peft.evaluate.tasks import load_task
    from austeer_peft.hub.export import drop_gguf_quantizer
    from austeer_peft.hub.models import load_model

    model, tokenizer = load_model(alias, quantization_config=GgufConfig(dequantize=True))
    tokenizer.padding_side = "right"
    task = load_task("sst2", n_fit=args.n_fit, seed=0)
    prompts = list(task.test["prompt"][: args.n_prompts])
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    started = time.perf_counter()
    scores = compute_momentum(model, tokenizer, task.pairs("fit"), sites=SITES, progress=False)
    result = {"model": alias, "fit_pairs": len(task.pairs("fit")), "count_seconds": time.perf_counter() - started,
              "prompts": len(prompts), "by_k": {}}
    plain = logits(model, batch)
    folder = workdir / alias
    drop_gguf_quantizer(model)
    model.save_pretrained(folder / "fp32")
    peft_model = None
    for k in args.k:
        peft_model = scores.to_adapter(k, args.alpha, peft_model or model)
        steered = logits(peft_model, batch)
        peft_model.save_pretrained(folder / f"austeer-k{k}")
        to_lora(peft_model, folder / f"lora-k{k}")
        to_lora(peft_model, folder / f"lora-uniform-k{k}", uniform_rank=True)
        lora_config = json.loads((folder / f"lora-k{k}" / "adapter_config.json").read_text())
        base = AutoModelForCausalLM.from_pretrained(folder / "fp32").eval()
        lora = PeftModel.from_pretrained(base, folder / f"lora-k{k}").eval()
        row = {
            "aus": len(peft_model.get_aus()), "weights": len(lora_config["target_modules"]),
            "largest_rank": lora_config["r"], "ranks": sorted(lora_config["rank_pattern"].values(), reverse=True),
            "austeer_bytes": (folder / f"austeer-k{k}" / "adapter_model.safetensors").stat().st_size,
            "lora_bytes": (folder / f"lora-k{k}" / "adapter_model.safetensors").stat().st_size,
            "lora_uniform_bytes": (folder / f"lora-uniform-k{k}" / "adapter_model.safetensors").stat().st_size,
            "effect": max_error(steered, plain, batch["attention_mask"]),
            "lora_error_fp32": max_error(logits(lora, batch), steered, batch["attention_mask"]),
        }
        peft_model.merge_adapter()
        row["merge_error_fp32"] = max_error(logits(peft_model, batch), steered, batch["attention_mask"])
        peft_model.unmerge_adapter()
        result["by_k"][k] = row
        print(alias, k, row, flush=True)
        del base, lora
    del peft_model, model

    if args.four_bit_k:
        k = args.four_bit_k
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        kernels = {"dequantize+fp32 matmul": False}
        if _has_avx512bf16():
            kernels["CPU AVX512-BF16 kernel"] = True
        result["four_bit"] = {"k": k}
        reference = {}  # the plain kernel's steered and merged logits: float32 arithmetic on the same 4-bit weights
        for kernel, bf16 in kernels.items():
            quantized = AutoModelForCausalLM.from_pretrained(folder / "fp32", quantization_config=nf4).eval()
            set_bf16_kernel(quantized, bf16)
            vanilla = logits(quantized, batch)
            steered_model = PeftModel.from_pretrained(quantized, folder / f"austeer-k{k}").eval()
            steered = logits(steered_model, batch)
            to_lora(steered_model, folder / f"lora-4bit-{bf16}")
            steered_model.merge_adapter()
            merged = logits(steered_model, batch)
            other = AutoModelForCausalLM.from_pretrained(folder / "fp32", quantization_config=nf4).eval()
            set_bf16_kernel(other, bf16)
            lora = PeftModel.from_pretrained(other, folder / f"lora-4bit-{bf16}").eval()
            mask = batch["attention_mask"]
            row = {"effect": max_error(steered, vanilla, mask),
                   "lora_error": max_error(logits(lora, batch), steered, mask),
                   "merge_error": max_error(merged, steered, mask)}
            if bf16:  # how far each route is from float32 arithmetic on the same weights
                row["steered_vs_plain_kernel_steered"] = max_error(steered, reference["steered"], mask)
                row["lora_vs_plain_kernel_steered"] = max_error(logits(lora, batch), reference["steered"], mask)
                row["merged_vs_plain_kernel_merged"] = max_error(merged, reference["merged"], mask)
            else:
                reference = {"steered": steered, "merged": merged}
            result["four_bit"][kernel] = row
            print(alias, "nf4", kernel, row, flush=True)
            del quantized, steered_model, other, lora
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
    parser.add_argument("--k", nargs="+", type=int, default=[16, 100, 400])
    parser.add_argument("--alpha", type=float, default=15.0)
    parser.add_argument("--n-fit", type=int, default=128)
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--four-bit-k", type=int, default=100, help="k of the 4-bit comparison (0: skip it)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "lora-export.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _, load = start_benchmark(args.threads)
    report = {"setup": {**{k: v for k, v in vars(args).items() if k != "output"}, "sites": SITES,
                        "load_average_at_start": load, "torch": torch.__version__}, "models": []}
    with tempfile.TemporaryDirectory(prefix="austeer-lora-") as tmp:
        for alias in args.models:
            report["models"].append(measure_model(alias, args, Path(tmp)))
            args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
