"""A real quantized model, not only tiny random ones (issue 23, part 5): Qwen2.5-Coder-0.5B loaded with bitsandbytes
nf4 on CPU, SST-2 (fixed subsets), one adapter fitted on the full-precision model and one on the 4-bit model.

Rows: vanilla (fp32, nf4); the fp32-fitted adapter on fp32 and loaded onto nf4; the adapter fitted on nf4; the nf4
merge of the fp32-fitted adapter; its exact LoRA export on the nf4 base. Accuracy with 95 % bootstrap CIs, gain over
nf4 vanilla with its paired CI and McNemar p, and the AU overlap of the two fits. bitsandbytes' CPU bf16 kernel is
turned off so every route multiplies in float32 (the figures do not depend on the CPU).

    OMP_NUM_THREADS=1 python bench/bench_quantized_real.py --output bench/quantized-real.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def set_bf16_kernel_off(model) -> None:
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--n-fit", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--site", default="ffn")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GgufConfig

    from austeer_peft import compute_momentum, to_lora
    from austeer_peft.evaluate import evaluate_split, load_task
    from austeer_peft.evaluate.scoring import bootstrap_ci, paired_gain_ci, paired_test
    from austeer_peft.hub.export import drop_gguf_quantizer
    from austeer_peft.hub.models import load_model

    started = time.perf_counter()
    result = {"model": args.model, "task": "sst2", "site": args.site, "k": args.k, "alpha": args.alpha, "rows": {}}
    model, tokenizer = load_model(args.model, quantization_config=GgufConfig(dequantize=True))
    task = load_task("sst2", n_fit=args.n_fit, seed=0)
    task.test = task.test.select(range(min(args.n_test, len(task.test))))  # a fixed subset: the first n_test
    result["sizes"] = task.sizes
    pairs = task.pairs("fit")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)

    def write() -> None:
        result["seconds"] = round(time.perf_counter() - started, 1)
        Path(args.output).write_text(json.dumps(result, indent=2))

    def record(name: str, peft_or_model, vanilla=None) -> list[bool]:
        correct = evaluate_split(peft_or_model, tokenizer, task, "test").correct
        mean, low, high = bootstrap_ci(correct)
        row = {"accuracy": round(100 * mean, 1), "ci": [round(100 * low, 1), round(100 * high, 1)]}
        if vanilla is not None:
            gain, g_low, g_high = paired_gain_ci(correct, vanilla)
            row.update(gain=round(100 * gain, 1), gain_ci=[round(100 * g_low, 1), round(100 * g_high, 1)],
                       p=paired_test(correct, vanilla))
        result["rows"][name] = row
        print(name, row, flush=True)
        write()
        return correct

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        record("fp32 vanilla", model)
        scores_fp = compute_momentum(model, tokenizer, pairs, sites=[args.site], progress=False)
        steered = scores_fp.to_adapter(args.k, args.alpha, model)
        aus_fp = {(au.module, au.dim) for au in steered.get_aus()}
        record("fp32 + fp32-fitted adapter", steered)
        steered.save_pretrained(folder / "adapter-fp32")
        base = steered.unload()
        drop_gguf_quantizer(base)
        base.save_pretrained(folder / "fp32")
        del steered, base, model

        def quantized():
            four_bit = AutoModelForCausalLM.from_pretrained(folder / "fp32", quantization_config=nf4).eval()
            set_bf16_kernel_off(four_bit)
            return four_bit

        four_bit = quantized()
        vanilla = record("nf4 vanilla", four_bit)
        loaded = PeftModel.from_pretrained(four_bit, folder / "adapter-fp32").eval()
        record("nf4 + fp32-fitted adapter (loaded)", loaded, vanilla)
        to_lora(loaded, folder / "lora-nf4")
        loaded.merge_adapter()
        record("nf4 merge of the fp32-fitted adapter", loaded, vanilla)
        del loaded, four_bit

        other = quantized()
        lora = PeftModel.from_pretrained(other, folder / "lora-nf4").eval()
        record("nf4 + LoRA export of the fp32-fitted adapter", lora, vanilla)
        del lora, other

        four_bit = quantized()
        scores_4 = compute_momentum(four_bit, tokenizer, pairs, sites=[args.site], progress=False)
        fitted_4 = scores_4.to_adapter(args.k, args.alpha, four_bit)
        aus_4 = {(au.module, au.dim) for au in fitted_4.get_aus()}
        record("nf4 + nf4-fitted adapter", fitted_4, vanilla)
        result["au_overlap"] = {"shared": len(aus_fp & aus_4), "k": args.k}
        print("AU overlap", result["au_overlap"], flush=True)
        write()


if __name__ == "__main__":
    main()
