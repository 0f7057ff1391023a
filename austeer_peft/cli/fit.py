"""``austeer fit``: fit one AUSteer adapter on a task's fit split and save it with its momentum table.

The adapter's defaults (sites, ``k``, ``α``) are :class:`~austeer_peft.AUSteerConfig`'s; ``--k auto --alpha auto``
chooses them on held-out pairs. Either way the steer ships only if it beats vanilla on the validation split (the
guarded rule of :mod:`austeer_peft.fitting.selection`, with this one setting as the only candidate); otherwise no
adapter is written and the command says so.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

from ..evaluate.runner import evaluate_split
from ..evaluate.tasks.base import CHAT_TEMPLATE_CARD_LINE
from ..fitting.fit import fit_austeer
from ..fitting.inputs import unsteered
from ..fitting.selection import Candidate, Selection, guarded_choice
from ..hub.facts import attach_card_info
from .arguments import (
    CONFIG_DEFAULTS,
    add_model_and_task_arguments,
    add_selection_argument,
    add_output_arguments,
    add_sites_argument,
    check_run_arguments,
    check_steering_arguments,
    is_main_process,
    load_model_from_args,
    load_task_from_args,
    prepare_task,
    run_facts,
    staged_output,
)
from .command import Command


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_task_arguments(parser)
    group = parser.add_argument_group("steering")
    sites = list(CONFIG_DEFAULTS.sites)
    add_sites_argument(group, sites, f"where the atomic units live (default: {' '.join(sites)}); several sites "
                                     "compete in one top-k")
    group.add_argument("--k", type=auto_or(int), default=CONFIG_DEFAULTS.k,
                       help=f"number of AUs to steer, or 'auto' (default: {CONFIG_DEFAULTS.k})")
    group.add_argument("--alpha", type=auto_or(float), default=CONFIG_DEFAULTS.alpha,
                       help=f"steering strength α, or 'auto' (default: {CONFIG_DEFAULTS.alpha:g})")
    add_selection_argument(group)
    resume = parser.add_argument_group("long fits")
    resume.add_argument("--checkpoint", type=Path, metavar="FILE",
                        help="write the partial counts to FILE (e.g. counts.safetensors) as the fit goes; run the "
                             "same command again after a crash to resume from it (outside --output, or rerun with "
                             "--force; one file per process under torchrun; not with --k/--alpha auto)")
    resume.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                        help="batches between two checkpoint writes (default: 10)")
    add_output_arguments(parser, "folder for adapter/ (the PEFT adapter), scores.safetensors and results.json")


def auto_or(kind):
    """An argparse type: ``"auto"`` or a number of ``kind``."""
    def parse(text: str):
        return text if text == "auto" else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def run_fit(args: argparse.Namespace) -> int:
    check_steering_arguments(args.sites, [args.k], [args.alpha])
    check_run_arguments(args)
    task = load_task_from_args(args)  # every row is checked before the model loads
    with staged_output(args.output, args.force) as staging:  # files land in --output only if the run ends well
        model, tokenizer = load_model_from_args(args)
        task = prepare_task(task, tokenizer, args)
        summary, result, check = fit_and_write(args, task, model, tokenizer, staging)
    if summary is None:  # a process other than rank 0 under torchrun
        return 0
    output = args.output
    if not summary["shipped"]:
        reason = (check or result.auto.selection).note
        print(f"No adapter written: {reason}. Scores and results.json are in {output}; `austeer sweep` tries a grid.")
        return 0
    print(f"Fitted {len(summary['aus'])} AUs on {result.scores.num_pairs} pairs of {task.name} in "
          f"{summary['fit_seconds']:.0f} s: {output / 'adapter'} ({summary['adapter_bytes']} bytes)."
          + (f" Validation: {check.note}." if check else ""))
    print(f"Other (k, α) without a new pass: MomentumScores.load({str(output / 'scores.safetensors')!r})"
          ".to_adapter(k, alpha, model); or run `austeer sweep`.")
    return 0


def fit_and_write(args: argparse.Namespace, task, model, tokenizer, folder):
    """Fit, check on validation, and write scores, results.json and (if it ships) the adapter into ``folder``;
    returns ``(summary, fit result, validation check)``, with summary None on processes that do not write."""
    started = time.perf_counter()
    result = fit_austeer(model, tokenizer, task.pairs("fit"), sites=args.sites, k=args.k, alpha=args.alpha,
                         batch_size=args.batch_size, checkpoint=args.checkpoint,
                         checkpoint_every=args.checkpoint_every)
    seconds = time.perf_counter() - started
    check = check_on_validation(result, tokenizer, task, args)
    if not is_main_process():  # under torchrun every process fits the same adapter; one writes it
        return None, result, check
    result.scores.save(folder / "scores.safetensors")
    aus = result.peft_model.get_aus()
    config = result.peft_model.peft_config["default"]
    summary = {"task": task.name, "split_note": task.split_note, "sizes": task.sizes, **run_facts(args, task),
               "sites": args.sites, "k": config.k, "alpha": config.alpha, "num_pairs": result.scores.num_pairs,
               "fit_seconds": round(seconds, 1), "shipped": bool(aus),
               "selection": None if check is None else check.as_dict(),
               "auto": None if result.auto is None else result.auto.selection.as_dict()}
    if aus:
        if args.chat_template:
            attach_card_info(result.peft_model, prompt_format=CHAT_TEMPLATE_CARD_LINE)
        result.save_pretrained(folder / "adapter")
        summary["adapter_bytes"] = (folder / "adapter" / "adapter_model.safetensors").stat().st_size
        summary["aus"] = [au._asdict() for au in aus]
    (folder / "results.json").write_text(json.dumps(summary, indent=2))
    return summary, result, check


def check_on_validation(result, tokenizer, task, args) -> Optional[Selection]:
    """The no-harm check of the fitted steer on the validation split (None when there is nothing to check: no
    validation examples, or no steer left by the automatic (k, α)); a steer that fails it is removed."""
    peft_model = result.peft_model
    if not len(task.validation) or not peft_model.get_aus():
        return None
    steered = evaluate_split(peft_model, tokenizer, task, "validation", args.scoring, batch_size=args.batch_size)
    with unsteered(peft_model):
        vanilla = evaluate_split(peft_model, tokenizer, task, "validation", args.scoring, batch_size=args.batch_size)
    config = peft_model.peft_config["default"]
    check = guarded_choice([Candidate((config.k, config.alpha), steered.correct, (0,))], vanilla.correct,
                           rule=args.selection)
    if not check.shipped:
        peft_model.set_aus([])
    return check


COMMAND = Command(
    "fit", "fit an AUSteer adapter on the fit split of a task (one pass, no training)",
    "Count activation momentum over the contrastive pairs of a task's fit split, keep the top-k atomic\n"
    "units over all layers of the chosen sites and save the adapter (PEFT format), the full momentum table\n"
    "and results.json into --output. The adapter is written only if it beats the plain model on the\n"
    "validation split (out of fold, one-sided sign test p < 0.05; --selection most-accurate skips the\n"
    "check); otherwise results.json and the output say that no steer beats vanilla on this data.\n\n"
    "Under torchrun (--nproc_per_node N) the pairs are split over the processes and only rank 0 writes.\n\n"
    "examples:\n"
    "  austeer fit --task sst2 --sites ffn --k 1 --alpha 50 --output out/\n"
    "  austeer fit --model gemma3-270m --task copa --sites attention ffn --output out-gemma/\n"
    "  austeer fit --data mine.jsonl --template 'Q: {question}\\nA:' --choices ' yes' ' no' --output out/\n"
    "  austeer fit --task boolq --checkpoint counts.safetensors --output out/   # rerun it to resume after a crash\n"
    "  austeer fit --data fit=train.jsonl test=test.jsonl --template '{prompt}' --choices-column choices \\\n"
    "      --label-column answer --model ~/models/my-model.Q4_K_M.gguf --chat-template --output out/",
    add_fit_arguments, run_fit,
)
