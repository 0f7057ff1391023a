"""``austeer sweep``: the full evaluation of AUSteer on a task (fit, (k, α) grid on validation, test once) next to
the plain model and the baselines, with its table, files and figures.

The grid defaults are :data:`~austeer_peft.evaluate.sweep.DEFAULT_KS` / ``DEFAULT_ALPHAS``.
"""

from __future__ import annotations

import argparse

from ..evaluate.baselines import ADDITIVE_SCOPES
from ..evaluate.compare import BASELINES, DEFAULT_BASELINES, DEFAULT_SITES, compare_methods
from ..evaluate.sweep import DEFAULT_ALPHAS, DEFAULT_KS
from .arguments import (
    add_model_and_task_arguments,
    add_selection_argument,
    add_output_arguments,
    add_run_facts,
    add_sites_argument,
    check_run_arguments,
    check_steering_arguments,
    load_model_from_args,
    load_task_from_args,
    prepare_task,
    run_facts,
    staged_output,
)
from .command import Command


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_task_arguments(parser)
    group = parser.add_argument_group("sweep")
    add_sites_argument(group, list(DEFAULT_SITES), "one AUSteer method per site, all from one momentum pass "
                                                   f"(default: {' '.join(DEFAULT_SITES)})")
    group.add_argument("--ks", nargs="+", type=int, default=list(DEFAULT_KS), help="k grid (default: %(default)s)")
    group.add_argument("--alphas", nargs="+", type=float, default=list(DEFAULT_ALPHAS),
                       help="α grid (default: %(default)s)")
    group.add_argument("--baselines", nargs="*", default=list(DEFAULT_BASELINES), choices=list(BASELINES),
                       help="baselines in the same harness: block, caa, iti, sadi (SADI-HEAD), and the paper's Table 3 "
                            "ablations random, mean-diff, fixed-vector, fixed-strength (default: block caa; none: "
                            "--baselines)")
    group.add_argument("--scope", default="all", choices=list(ADDITIVE_SCOPES),
                       help="token positions every method steers: all (every token, as the AUSteer code) or "
                            "generated (from the last prompt token on, as SADI and ITI); default: all")
    add_selection_argument(group)
    add_output_arguments(parser, "folder for results.json, sweep.csv, scores.safetensors, adapters/ and the figures")


def run_sweep(args: argparse.Namespace) -> int:
    check_steering_arguments(args.sites, args.ks, args.alphas)
    check_run_arguments(args)
    task = load_task_from_args(args)  # every row is checked before the model loads
    with staged_output(args.output, args.force) as staging:  # files land in --output only if the run ends well
        model, tokenizer = load_model_from_args(args)
        task = prepare_task(task, tokenizer, args)
        print(f"{task.name}: {task.sizes}. {task.split_note}")
        comparison = compare_methods(model, tokenizer, task, sites=args.sites, ks=args.ks, alphas=args.alphas,
                                     baselines=args.baselines, scoring=args.scoring, scope=args.scope,
                                     batch_size=args.batch_size, output_dir=staging, selection=args.selection,
                                     seed=args.seed)
        add_run_facts(staging / "results.json", run_facts(args, task))
    print(comparison.format_table())
    print(f"Done in {comparison.seconds:.0f} s; outputs in {args.output}.")
    return 0


COMMAND = Command(
    "sweep", "fit, sweep (k, α) on validation, test once; AUSteer per site next to vanilla, block-level and CAA",
    "The full evaluation of AUSteer on a task. One momentum pass over the fit split covers all --sites;\n"
    "for each site every (k, α) cell of the grid is scored on the validation split (no refit per cell);\n"
    "the simplest cell within one standard error of the best ships if, chosen without each validation fold,\n"
    "it beats vanilla on that fold (else no steer ships), and it is scored once on the test split. The\n"
    "baselines run in the same harness on the same\n"
    "splits: block-level steering (every dimension of the blocks AUSteer chose, α swept) and CAA (mean\n"
    "residual difference at one layer, layer and multiplier swept), and on request ITI, SADI-HEAD and the\n"
    "paper's ablations (--baselines iti sadi random mean-diff fixed-vector fixed-strength). --scope generated\n"
    "steers from the last prompt token on instead of every token. Prints the table and writes\n"
    "results.json, sweep.csv, scores.safetensors, adapters/, heatmap_<site>.png and au_locations.png.\n\n"
    "examples:\n"
    "  austeer sweep --task sst2 --output out/\n"
    "  austeer sweep --model gemma3-270m --task copa --n-test 200 --output out-gemma/\n"
    "  austeer sweep --task boolq --sites attention --baselines --ks 1 4 16 --alphas 10 50 --output out/\n"
    "  austeer sweep --task copa --baselines block caa iti sadi --scope generated --scoring exact --output out/\n"
    "  austeer sweep --data fit=train.jsonl test=test.jsonl --template '{prompt}' --choices-column choices \\\n"
    "      --label-column answer --output out-mine/\n"
    "  austeer sweep --data nyu-mll/glue:sst2 --split-map fit=train test=validation --template 'Review: {sentence}\\n"
    "Sentiment:' \\\n      --choices ' negative' ' positive' --output out-glue/",
    add_sweep_arguments, run_sweep,
)
