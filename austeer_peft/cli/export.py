"""``austeer export``: write an AUSteer adapter as a stock PEFT adapter that serving engines load (LoRA or IA3)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..hub.export import to_ia3
from ..hub.facts import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from ..hub.lora import to_lora
from ..hub.models import MODEL_ALIASES, load_model
from .arguments import DTYPES, add_output_arguments, aliases, refuse_nonempty
from .command import Command, CommandError

FORMATS = ("lora", "ia3")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="base model the adapter was fitted on: a local folder, a Hub id, or an alias (" +
                             ", ".join(aliases()) + "); the LoRA is built from its weights")
    parser.add_argument("--adapter", required=True, help="the AUSteer adapter: a local folder or a Hub id")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="lora: exact LoRA for per-request serving (vLLM, SGLang, llama.cpp server, PEFT mixed "
                             "batches); ia3: IA3 vectors (plain PEFT)")
    add_output_arguments(parser, "folder for the exported adapter")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="dtype to load the base model in (default: float32; the LoRA factors are float32)")
    parser.add_argument("--max-rank", type=int,
                        help="lora: refuse when a module needs a larger rank (the engine's LoRA rank limit)")
    parser.add_argument("--uniform-rank", action="store_true",
                        help="lora: one rank for every module, zero-padded (llama.cpp scales each tensor by "
                             "lora_alpha / its own rank)")


def run_export(args: argparse.Namespace) -> int:
    from peft import PeftModel
    from transformers import GgufConfig

    if args.format != "lora" and (args.max_rank is not None or args.uniform_rank):
        raise CommandError("--max-rank and --uniform-rank only apply to --format lora.")
    refuse_nonempty(args.output, args.force)
    # GGUF aliases unpack into dense weights, which the LoRA factors are built from.
    kwargs = {"quantization_config": GgufConfig(dequantize=True)} if args.model in MODEL_ALIASES else {}
    base, _ = load_model(args.model, dtype=getattr(torch, args.dtype), **kwargs)
    peft_model = PeftModel.from_pretrained(base, str(args.adapter))
    if args.format == "lora":
        output = to_lora(peft_model, args.output, max_rank=args.max_rank, uniform_rank=args.uniform_rank)
    else:
        output = to_ia3(peft_model, args.output)
    size = (output / ADAPTER_WEIGHTS_NAME).stat().st_size
    source = Path(args.adapter) / ADAPTER_WEIGHTS_NAME
    compared = f" (the AUSteer adapter file: {source.stat().st_size:,} bytes)" if source.is_file() else ""
    print(f"Exported {args.adapter} as a {args.format.upper()} adapter to {output}.")
    print(f"  {ADAPTER_WEIGHTS_NAME}: {size:,} bytes{compared}")
    if args.format == "lora":
        config = json.loads((output / ADAPTER_CONFIG_NAME).read_text())
        targets = len(config["target_modules"] or []) + len(config["target_parameters"] or [])
        print(f"  largest rank {config['r']} over {targets} weights; lora_alpha = rank, so the scaling is 1")
    print(f"Load it with plain peft: PeftModel.from_pretrained(base, {str(output)!r})")
    return 0


COMMAND = Command(
    "export", "write an adapter as a stock PEFT LoRA or IA3 adapter for serving engines",
    "Write an AUSteer adapter as an ordinary PEFT adapter that reproduces it: --format lora (one LoRA per\n"
    "steered weight, rank = its number of AUs, scaling 1; served per request by vLLM, SGLang, llama.cpp's\n"
    "server and PEFT's mixed batches) or --format ia3 (IA3 vectors). Neither needs austeer-peft to load.\n"
    "Adapters on the `residual` site, or with a token scope other than `all`, cannot be exported.\n\n"
    "example:\n  austeer export --model smollm2-135m --adapter out/adapter --format lora --output lora/",
    add_export_arguments, run_export,
)
