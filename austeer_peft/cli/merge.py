"""``austeer merge``: fold an adapter into its base model and save a plain transformers checkpoint for serving."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..hub.export import merge_and_save
from .arguments import DTYPES, aliases, refuse_nonempty
from .command import Command


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="base model: a local folder, a Hub id, or an alias (" + ", ".join(aliases()) + ")")
    parser.add_argument("--adapter", required=True, help="the AUSteer adapter: a local folder or a Hub id")
    parser.add_argument("--output", required=True, type=Path, help="folder for the merged checkpoint")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="dtype to load, merge and save in (default: float32, which reproduces the steered "
                             "logits up to float32 rounding)")
    parser.add_argument("--force", action="store_true", help="write into --output even if it is not empty")


def run_merge(args: argparse.Namespace) -> int:
    refuse_nonempty(args.output, args.force)
    output = merge_and_save(args.model, args.adapter, args.output, dtype=getattr(torch, args.dtype))
    files = sorted(p.name for p in output.iterdir() if p.is_file())
    print(f"Merged {args.adapter} into {args.model}: {output} ({', '.join(files)}).")
    print(f"Load it with plain transformers: AutoModelForCausalLM.from_pretrained({str(output)!r})")
    return 0


COMMAND = Command(
    "merge", "fold an adapter into its base model and save a plain transformers checkpoint",
    "Fold an AUSteer adapter into its base model's weights and save the result: safetensors weights,\n"
    "config and tokenizer. The checkpoint loads with AutoModelForCausalLM.from_pretrained(OUTPUT), without\n"
    "austeer-peft, and gives the steered outputs. GGUF models (the aliases) are unpacked and saved as\n"
    "ordinary safetensors. Adapters on the `residual` site cannot be merged (no single weight produces a\n"
    "decoder layer's output).\n\n"
    "example:\n  austeer merge --model smollm2-135m --adapter out/adapter --output merged/",
    add_merge_arguments, run_merge,
)
