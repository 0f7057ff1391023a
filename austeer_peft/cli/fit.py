"""``austeer fit``: fit one AUSteer adapter on a task's fit split and save it with its momentum table.

The adapter's defaults (sites, ``k``, ``α``) are :class:`~austeer_peft.AUSteerConfig`'s.
"""

from __future__ import annotations

import argparse
import json
import time

from ..fitting.fit import fit_austeer
from .arguments import (
    CONFIG_DEFAULTS,
    add_model_and_task_arguments,
    add_output_arguments,
    add_sites_argument,
    is_main_process,
    load_model_from_args,
    load_task_from_args,
    output_folder,
)
from .command import Command


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_task_arguments(parser)
    group = parser.add_argument_group("steering")
    sites = list(CONFIG_DEFAULTS.sites)
    add_sites_argument(group, sites, f"where the atomic units live (default: {' '.join(sites)}); several sites "
                                     "compete in one top-k")
    group.add_argument("--k", type=int, default=CONFIG_DEFAULTS.k,
                       help=f"number of AUs to steer (default: {CONFIG_DEFAULTS.k})")
    group.add_argument("--alpha", type=float, default=CONFIG_DEFAULTS.alpha,
                       help=f"steering strength α (default: {CONFIG_DEFAULTS.alpha:g})")
    add_output_arguments(parser, "folder for adapter/ (the PEFT adapter), scores.safetensors and results.json")


def run_fit(args: argparse.Namespace) -> int:
    output = output_folder(args.output, args.force)
    task = load_task_from_args(args)
    model, tokenizer = load_model_from_args(args)
    started = time.perf_counter()
    result = fit_austeer(model, tokenizer, task.pairs("fit"), sites=args.sites, k=args.k, alpha=args.alpha,
                         batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    if not is_main_process():  # under torchrun every process fits the same adapter; one writes it
        return 0
    result.peft_model.save_pretrained(str(output / "adapter"))
    result.scores.save(output / "scores.safetensors")
    aus = result.peft_model.get_aus()
    summary = {"task": task.name, "split_note": task.split_note, "model": args.model, "sites": args.sites,
               "k": args.k, "alpha": args.alpha, "num_pairs": result.scores.num_pairs, "fit_seconds": round(seconds, 1),
               "adapter_bytes": (output / "adapter" / "adapter_model.safetensors").stat().st_size,
               "aus": [au._asdict() for au in aus]}
    (output / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"Fitted {len(aus)} AUs on {result.scores.num_pairs} pairs of {task.name} in {seconds:.0f} s: "
          f"{output / 'adapter'} ({summary['adapter_bytes']} bytes).")
    print(f"Other (k, α) without a new pass: MomentumScores.load({str(output / 'scores.safetensors')!r})"
          ".to_adapter(k, alpha, model); or run `austeer sweep`.")
    return 0


COMMAND = Command(
    "fit", "fit an AUSteer adapter on the fit split of a task (one pass, no training)",
    "Count activation momentum over the contrastive pairs of a task's fit split, keep the top-k atomic\n"
    "units over all layers of the chosen sites and save the adapter (PEFT format), the full momentum table\n"
    "and results.json into --output.\n\n"
    "Under torchrun (--nproc_per_node N) the pairs are split over the processes and only rank 0 writes.\n\n"
    "examples:\n"
    "  austeer fit --task sst2 --sites ffn --k 1 --alpha 50 --output out/\n"
    "  austeer fit --model gemma3-270m --task copa --sites attention ffn --output out-gemma/\n"
    "  austeer fit --data mine.jsonl --template 'Q: {question}\\nA:' --choices ' yes' ' no' --output out/",
    add_fit_arguments, run_fit,
)
