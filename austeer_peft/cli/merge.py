"""``austeer merge``: fold an adapter into its base model and save a plain transformers checkpoint (``--output``) or
a GGUF file for llama.cpp, Ollama and LM Studio (``--gguf``) for serving."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..hub.export import merge_and_save
from ..hub.gguf import merge_to_gguf
from .arguments import DTYPES, aliases, refuse_nonempty
from .command import Command, CommandError


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="base model: a local folder, a Hub id, or an alias (" + ", ".join(aliases()) + "); "
                             "with --gguf: a .gguf file or an alias")
    parser.add_argument("--adapter", required=True, help="the AUSteer adapter: a local folder or a Hub id")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", type=Path, help="folder for the merged transformers checkpoint")
    target.add_argument("--gguf", type=Path, help="GGUF file to write (for llama.cpp, Ollama, LM Studio): the source "
                                                  "GGUF with the adapter folded into the tensors it touches")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="with --output: dtype to load, merge and save in (default: float32, which reproduces "
                             "the steered logits up to float32 rounding); a GGUF keeps each tensor's own type")
    parser.add_argument("--force", action="store_true", help="write into --output even if it is not empty, or "
                                                             "replace an existing --gguf file")


def run_merge(args: argparse.Namespace) -> int:
    if args.gguf is not None:
        return run_merge_gguf(args)
    refuse_nonempty(args.output, args.force)
    output = merge_and_save(args.model, args.adapter, args.output, dtype=getattr(torch, args.dtype or "float32"))
    files = sorted(p.name for p in output.iterdir() if p.is_file())
    print(f"Merged {args.adapter} into {args.model}: {output} ({', '.join(files)}).")
    print(f"Load it with plain transformers: AutoModelForCausalLM.from_pretrained({str(output)!r})")
    return 0


def run_merge_gguf(args: argparse.Namespace) -> int:
    if args.dtype is not None:
        raise CommandError("--dtype applies to --output only: a merged GGUF keeps each tensor's own type (touched "
                           "tensors the gguf package cannot encode become Q8_0). Drop --dtype.")
    if args.gguf.exists() and not args.force:
        raise CommandError(f"{args.gguf} exists; pass --force to replace it.")
    args.gguf.parent.mkdir(parents=True, exist_ok=True)
    result = merge_to_gguf(args.model, args.adapter, args.gguf)
    print(f"Merged {args.adapter} into {result.source.name}: {result.output} ({len(result.changes)} tensors "
          f"re-encoded, {result.n_copied} copied byte for byte, all metadata kept).")
    for change in result.changes:
        note = f", TYPE CHANGED {change.source_type} -> {change.written_type}" if change in result.type_changes else ""
        print(f"  {change.name}: {change.n_scaled} {change.scaled} scaled, {change.written_type}, max |error| "
              f"{change.max_error:.3g} (weights up to {change.max_abs:.3g}){note}")
    if result.type_changes:
        print(f"{len(result.type_changes)} tensors changed type: the gguf package cannot encode their source type.")
    else:
        print("No tensor changed type.")
    print(f"Run it with llama.cpp (llama-cli -m {result.output}), Ollama (a Modelfile `FROM {result.output}`, then "
          "`ollama create`) or LM Studio (import the file).")
    return 0


COMMAND = Command(
    "merge", "fold an adapter into its base model and save a plain transformers checkpoint",
    "Fold an AUSteer adapter into its base model's weights and save the result: safetensors weights,\n"
    "config and tokenizer. The checkpoint loads with AutoModelForCausalLM.from_pretrained(OUTPUT), without\n"
    "austeer-peft, and gives the steered outputs. GGUF models (the aliases) are unpacked and saved as\n"
    "ordinary safetensors. Adapters on the `residual` site cannot be merged (no single weight produces a\n"
    "decoder layer's output).\n\n"
    "With --gguf instead of --output, the source must be a GGUF file (or an alias) and the result is a GGUF\n"
    "file for llama.cpp, Ollama and LM Studio: tensors the adapter does not touch are copied byte for byte,\n"
    "with every metadata field (tokenizer, chat template); touched tensors are re-encoded in their own type,\n"
    "or in Q8_0 where the gguf package cannot encode it (K-quants); the command lists them.\n\n"
    "examples:\n  austeer merge --model smollm2-135m --adapter out/adapter --output merged/\n"
    "  austeer merge --model smollm2-135m --adapter out/adapter --gguf smollm2-steered.gguf",
    add_merge_arguments, run_merge,
)
