"""The ``austeer`` command line: one subcommand per job.

Each subcommand is a :class:`Command` in :data:`COMMANDS`: a function that adds its arguments to its subparser and a
function that runs it (returning the exit status). A new subcommand is two functions and one
:func:`register_command` call; ``main`` needs no change.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DESCRIPTION = """\
AUSteer: fine-grained activation steering as a PEFT method. An adapter rescales a few single activation dimensions
(atomic units) of a language model by fixed factors; it is a few hundred bytes and folds exactly into the weights.

Typical workflow:
  austeer sweep --task sst2 --output out/         fit, sweep (k, α) on validation, test once; with baselines
  austeer fit --task sst2 --sites ffn --k 1 --alpha 50 --output out/
                                                  fit one adapter (out/adapter) and keep its momentum table
  austeer eval --task sst2 --adapter out/adapter  test accuracy vs the plain model, with CI and paired test
  austeer inspect out/adapter                     what an adapter steers, and how large it is
  austeer merge --model smollm2-135m --adapter out/adapter --output merged/
                                                  a plain transformers checkpoint for serving
  austeer push --adapter out/adapter --repo-id you/my-adapter
                                                  share the adapter (with its model card) on the Hub

Run `austeer <command> --help` for the options of a command (`python -m austeer_peft.cli` works too).
"""


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, longer description, argument setup and runner."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register_command(command: Command) -> Command:
    """Add a subcommand to ``austeer`` (later registrations of the same name replace earlier ones)."""
    COMMANDS[command.name] = command
    return command


class CommandError(Exception):
    """A problem the user can fix (bad path, wrong adapter): printed as one line, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="austeer", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for command in COMMANDS.values():
        subparser = subparsers.add_parser(command.name, help=command.help, description=command.description,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(subparser)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``austeer`` and ``python -m austeer_peft.cli``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command].run(args)
    except (CommandError, ValueError, OSError) as error:
        print(f"austeer {args.command}: error: {error}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------------- task and model


def add_model_and_task_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", default="smollm2-135m",
                       help="a local folder, a Hub id, or an offline alias (" + ", ".join(_aliases()) +
                            "); default: smollm2-135m")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    group.add_argument("--task", help="built-in task: copa, boolq, sst2, svamp, mawps (read from --data-dir)")
    group.add_argument("--data-dir", help="folder of the built-in tasks' files (default: $AUSTEER_DATA or "
                                          "../shared/data)")
    group.add_argument("--data", help="your own data instead of --task: a .jsonl/.json/.csv/.tsv file")
    group.add_argument("--template", help="with --data: prompt template over its columns, e.g. 'Q: {question}\\nA:'")
    group.add_argument("--choices", nargs="+", help="with --data: the answer strings, e.g. ' yes' ' no'")
    group.add_argument("--label-column", default="label", help="with --data --choices: the correct choice's column")
    group.add_argument("--answer-column", help="with --data: a numeric answer column (generation task)")
    group.add_argument("--n-fit", type=int, help="examples to fit on (default: the task's)")
    group.add_argument("--n-validation", type=int, help="examples to pick settings on (default: the task's, <= 100)")
    group.add_argument("--n-test", type=int, help="score only the first N test examples (default: all)")
    group.add_argument("--seed", type=int, default=0, help="seed of the splits (default: 0)")
    group.add_argument("--scoring", choices=["restricted", "greedy", "loglik", "number"],
                       help="restricted: first-token score among the choices (default for choice tasks); greedy: "
                            "the paper's metric, greedy next token over the whole vocabulary; loglik: summed "
                            "log-probability of each option; number: last number of a greedy generation")
    group.add_argument("--batch-size", type=int, default=16, help="examples (or pairs) per forward pass")


def load_task_from_args(args: argparse.Namespace):
    from ..evaluate import load_task, load_user_task

    if (args.task is None) == (args.data is None):
        raise CommandError("give either --task (a built-in task) or --data with --template (your own data).")
    if args.task is not None:
        task = load_task(args.task, data_dir=args.data_dir, n_fit=args.n_fit, n_validation=args.n_validation,
                         seed=args.seed)
    else:
        if args.template is None:
            raise CommandError("--data needs --template (the prompt, e.g. 'Q: {question}\\nA:').")
        task = load_user_task(args.data, args.template.replace("\\n", "\n"), choices=args.choices,
                              label_column=args.label_column, answer_column=args.answer_column, n_fit=args.n_fit,
                              n_validation=args.n_validation, seed=args.seed)
    if args.n_test is not None and args.n_test < len(task.test):
        task.test = task.test.select(range(args.n_test))
        task.split_note += f" Test scored on its first {args.n_test} examples only."
    return task


def load_model_from_args(args: argparse.Namespace):
    import torch

    from ..hub.models import load_model

    return load_model(args.model, dtype=getattr(torch, args.dtype))


def _refuse_nonempty(path: Path, force: bool) -> None:
    if path.exists() and any(path.iterdir()) and not force:
        raise CommandError(f"{path} is not empty; pass --force to write into it anyway.")


def _output_folder(path: Path, force: bool) -> Path:
    _refuse_nonempty(path, force)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------- fit


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_task_arguments(parser)
    group = parser.add_argument_group("steering")
    group.add_argument("--sites", nargs="+", default=["attention"],
                       choices=["attention", "ffn", "ffn_inner", "residual"],
                       help="where the atomic units live (default: attention); several sites compete in one top-k")
    group.add_argument("--k", type=int, default=100, help="number of AUs to steer (default: 100)")
    group.add_argument("--alpha", type=float, default=15.0, help="steering strength α (default: 15)")
    parser.add_argument("--output", required=True, type=Path,
                        help="folder for adapter/ (the PEFT adapter), scores.safetensors and results.json")
    parser.add_argument("--force", action="store_true", help="write into --output even if it is not empty")


def run_fit(args: argparse.Namespace) -> int:
    import time

    from ..fitting.fit import fit_austeer

    output = _output_folder(args.output, args.force)
    task = load_task_from_args(args)
    model, tokenizer = load_model_from_args(args)
    started = time.perf_counter()
    result = fit_austeer(model, tokenizer, task.pairs("fit"), sites=args.sites, k=args.k, alpha=args.alpha,
                         batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    if not _is_main_process():  # under torchrun every process fits the same adapter; one writes it
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


register_command(Command(
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
))


# ---------------------------------------------------------------------------------------------------- eval


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_task_arguments(parser)
    parser.add_argument("--adapter", help="an AUSteer adapter (folder or Hub id) to evaluate; default: the plain model")
    parser.add_argument("--split", default="test", choices=["fit", "validation", "test"],
                        help="split to score (default: test)")
    parser.add_argument("--output", type=Path, help="also write results.json (per-example results) here")


def run_eval(args: argparse.Namespace) -> int:
    from ..evaluate import bootstrap_ci, paired_test
    from ..evaluate.runner import evaluate_split

    task = load_task_from_args(args)
    model, tokenizer = load_model_from_args(args)
    vanilla = evaluate_split(model, tokenizer, task, args.split, args.scoring, batch_size=args.batch_size,
                             progress=True)
    results = {"vanilla": vanilla}
    if args.adapter is not None:
        from peft import PeftModel

        steered = PeftModel.from_pretrained(model, args.adapter)
        results["adapter"] = evaluate_split(steered, tokenizer, task, args.split, args.scoring,
                                            batch_size=args.batch_size, progress=True)
    print(f"{task.name}, {args.split} split ({len(vanilla.correct)} examples), scoring {vanilla.scoring}. "
          f"{task.split_note}")
    summary = {"task": task.name, "split": args.split, "split_note": task.split_note, "model": args.model,
               "adapter": args.adapter, "scoring": vanilla.scoring, "results": {}}
    for name, result in results.items():
        mean, low, high = bootstrap_ci(result.correct)
        line = f"  {name:<8} {100 * mean:5.1f} %  (95 % CI {100 * low:.1f}–{100 * high:.1f})"
        if name == "adapter":
            p_value = paired_test(vanilla.correct, result.correct)
            line += f"  paired test vs vanilla p = {p_value:.3g}"
        shares = result.predicted_shares(task.choices)
        if shares is not None:
            line += "  answers: " + " · ".join(f"{c.strip()} {100 * share:.0f} %" for c, share in shares.items())
        print(line)
        summary["results"][name] = {"accuracy": mean, "ci": [low, high], "correct": result.correct,
                                    **{f"also_{k}": sum(v) / len(v) for k, v in result.also.items()},
                                    "predicted": shares}
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "results.json").write_text(json.dumps(summary, indent=2))
    return 0


register_command(Command(
    "eval", "score a model (and optionally an adapter) on a task split, with a 95%% CI and a paired test",
    "Score the plain model on a split of a task and, with --adapter, the steered model on the same\n"
    "examples: accuracy with a 95 % bootstrap confidence interval, and McNemar's paired test between them.\n\n"
    "examples:\n"
    "  austeer eval --task sst2 --adapter out/adapter\n"
    "  austeer eval --task boolq --n-test 500 --scoring greedy",
    add_eval_arguments, run_eval,
))


# ---------------------------------------------------------------------------------------------------- sweep


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from ..evaluate.sweep import DEFAULT_ALPHAS, DEFAULT_KS

    add_model_and_task_arguments(parser)
    group = parser.add_argument_group("sweep")
    group.add_argument("--sites", nargs="+", default=["attention", "ffn"],
                       choices=["attention", "ffn", "ffn_inner", "residual"],
                       help="one AUSteer method per site, all from one momentum pass (default: attention ffn)")
    group.add_argument("--ks", nargs="+", type=int, default=list(DEFAULT_KS), help="k grid (default: %(default)s)")
    group.add_argument("--alphas", nargs="+", type=float, default=list(DEFAULT_ALPHAS),
                       help="α grid (default: %(default)s)")
    group.add_argument("--baselines", nargs="*", default=["block", "caa"], choices=["block", "caa"],
                       help="baselines in the same harness (default: block caa; none: --baselines)")
    parser.add_argument("--output", required=True, type=Path,
                        help="folder for results.json, sweep.csv, scores.safetensors, adapters/ and the figures")
    parser.add_argument("--force", action="store_true", help="write into --output even if it is not empty")


def run_sweep(args: argparse.Namespace) -> int:
    from ..evaluate.compare import compare_methods

    output = _output_folder(args.output, args.force)
    task = load_task_from_args(args)
    model, tokenizer = load_model_from_args(args)
    print(f"{task.name}: {task.sizes}. {task.split_note}")
    comparison = compare_methods(model, tokenizer, task, sites=args.sites, ks=args.ks, alphas=args.alphas,
                                 baselines=args.baselines, scoring=args.scoring, batch_size=args.batch_size,
                                 output_dir=output)
    print(comparison.format_table())
    print(f"Done in {comparison.seconds:.0f} s; outputs in {output}.")
    return 0


register_command(Command(
    "sweep", "fit, sweep (k, α) on validation, test once; AUSteer per site next to vanilla, block-level and CAA",
    "The full evaluation of AUSteer on a task. One momentum pass over the fit split covers all --sites;\n"
    "for each site every (k, α) cell of the grid is scored on the validation split (no refit per cell)\n"
    "and the best cell is scored once on the test split. The baselines run in the same harness on the same\n"
    "splits: block-level steering (every dimension of the blocks AUSteer chose, α swept) and CAA (mean\n"
    "residual difference at one layer, layer and multiplier swept). Prints the table and writes\n"
    "results.json, sweep.csv, scores.safetensors, adapters/, heatmap_<site>.png and au_locations.png.\n\n"
    "examples:\n"
    "  austeer sweep --task sst2 --output out/\n"
    "  austeer sweep --model gemma3-270m --task copa --n-test 200 --output out-gemma/\n"
    "  austeer sweep --task boolq --sites attention --baselines --ks 1 4 16 --alphas 10 50 --output out/",
    add_sweep_arguments, run_sweep,
))


# ---------------------------------------------------------------------------------------------------- merge


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="base model: a local folder, a Hub id, or an alias (" + ", ".join(_aliases()) + ")")
    parser.add_argument("--adapter", required=True, help="the AUSteer adapter: a local folder or a Hub id")
    parser.add_argument("--output", required=True, type=Path, help="folder for the merged checkpoint")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype to load, merge and save in (default: float32, which reproduces the steered "
                             "logits up to float32 rounding)")
    parser.add_argument("--force", action="store_true", help="write into --output even if it is not empty")


def run_merge(args: argparse.Namespace) -> int:
    import torch

    from ..hub.export import merge_and_save

    _refuse_nonempty(args.output, args.force)
    output = merge_and_save(args.model, args.adapter, args.output, dtype=getattr(torch, args.dtype))
    files = sorted(p.name for p in output.iterdir() if p.is_file())
    print(f"Merged {args.adapter} into {args.model}: {output} ({', '.join(files)}).")
    print(f"Load it with plain transformers: AutoModelForCausalLM.from_pretrained({str(output)!r})")
    return 0


register_command(Command(
    "merge", "fold an adapter into its base model and save a plain transformers checkpoint",
    "Fold an AUSteer adapter into its base model's weights and save the result: safetensors weights,\n"
    "config and tokenizer. The checkpoint loads with AutoModelForCausalLM.from_pretrained(OUTPUT), without\n"
    "austeer-peft, and gives the steered outputs. GGUF models (the aliases) are unpacked and saved as\n"
    "ordinary safetensors. Adapters on the `residual` site cannot be merged (no single weight produces a\n"
    "decoder layer's output).\n\n"
    "example:\n  austeer merge --model smollm2-135m --adapter out/adapter --output merged/",
    add_merge_arguments, run_merge,
))


# ---------------------------------------------------------------------------------------------------- push


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, type=Path,
                        help="folder an adapter was saved to (peft_model.save_pretrained(folder))")
    parser.add_argument("--repo-id", required=True,
                        help="Hub repository, e.g. your-name/my-adapter (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to push to (default: main)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", help="commit message (default: 'Upload AUSteer adapter')")
    parser.add_argument("--token", help="Hub token (default: the one saved by `hf auth login`, or HF_TOKEN)")
    parser.add_argument("--tag", action="append", dest="tags", default=None, metavar="TAG",
                        help="extra tag for the model card (repeatable)")


def run_push(args: argparse.Namespace) -> int:
    from ..hub.export import push_to_hub

    commit = push_to_hub(args.adapter, args.repo_id, commit_message=args.commit_message,
                         private=True if args.private else None, token=args.token, revision=args.revision,
                         create_pr=args.create_pr, tags=args.tags)
    url = getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or args.repo_id
    print(f"Pushed {args.adapter} to {args.repo_id}: {url}")
    return 0


register_command(Command(
    "push", "upload a saved adapter and its model card to the Hugging Face Hub",
    "Upload adapter_config.json, adapter_model.safetensors and the model card (README.md) of a saved\n"
    "AUSteer adapter in one commit. The card written by save_pretrained is uploaded as it is; a folder\n"
    "without one gets a card made from its files. Log in first with `hf auth login` (or set HF_TOKEN).\n\n"
    "example:\n  austeer push --adapter out/adapter --repo-id your-name/my-adapter",
    add_push_arguments, run_push,
))


# ---------------------------------------------------------------------------------------------------- inspect


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="a saved adapter: a local folder or a Hub id")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of the adapter")
    parser.add_argument("--all", action="store_true", help="list every AU (default: up to 8 per module)")
    parser.add_argument("--json", action="store_true", help="print the config and all AUs as JSON")


def run_inspect(args: argparse.Namespace) -> int:
    from ..hub.cards import facts_from_folder, site_and_layer

    folder = _adapter_folder(args.adapter, args.revision)
    facts = facts_from_folder(folder)
    config, aus = facts.config, facts.aus
    modules: dict[str, list] = {}
    for au in aus:
        modules.setdefault(au.module, []).append(au)
    if args.json:
        print(json.dumps({"adapter": args.adapter, "file_size": facts.file_size, "config": config.to_dict(),
                          "aus": [au._asdict() for au in aus]}, indent=2, default=str))
        return 0

    sites = ", ".join(config.sites) if config.target_modules is None else \
        f"target_modules={config.target_modules} ({config.position})"
    rows = [("adapter", args.adapter),
            ("base model", f"{config.base_model_name_or_path or 'not recorded'}"
                           f"{f' ({config.base_model_type})' if config.base_model_type else ''}"),
            ("sites", sites),
            ("k, alpha", f"{config.k}, {config.alpha:g}"),
            ("file", f"adapter_model.safetensors, {facts.file_size:,} bytes"),
            ("steered", f"{len(aus)} AUs in {len(modules)} modules")]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name + ':':<{width + 2}}{value}")

    columns = list(config.sites) if config.target_modules is None else ["target_modules"]
    by_layer: dict = {}
    for au in aus:
        site, layer = site_and_layer(au.module, config)
        column = columns[0] if config.target_modules is not None else site or "other"
        by_layer.setdefault(layer, Counter())[column] += 1
    if by_layer:
        print("\nAUs per layer:")
        for layer in sorted(by_layer, key=lambda x: (x is None, x or 0)):
            counts = ", ".join(f"{column} {by_layer[layer][column]}" for column in [*columns, "other"]
                               if by_layer[layer][column])
            print(f"  layer {'-' if layer is None else layer:>3}: {counts}")

    print("\nAUs per module (dim: γ):")
    name_width = max((len(name) for name in modules), default=0)
    for name, module_aus in modules.items():
        shown = module_aus if args.all else module_aus[:8]
        listed = ", ".join(f"{au.dim}: {au.gamma:+.4g}" for au in shown)
        more = f", ... {len(module_aus) - len(shown)} more (--all)" if len(shown) < len(module_aus) else ""
        count = f"{len(module_aus)} AU" + ("" if len(module_aus) == 1 else "s")
        print(f"  {name:<{name_width}}  width {config.steered_modules[name]:>5}  {count:>8}  {listed}{more}")
    return 0


def _adapter_folder(adapter: str, revision: Optional[str] = None) -> Path:
    """A local folder holding the adapter's files: the folder itself, or the Hub snapshot in the local cache."""
    if os.path.isdir(adapter):
        return Path(adapter)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(adapter, revision=revision,
                                      allow_patterns=["adapter_config.json", "adapter_model.safetensors", "README.md"]))
    except Exception as error:  # huggingface_hub raises many kinds; all mean "cannot get it"
        raise CommandError(f"{adapter!r} is neither a local folder nor a Hub repository that can be fetched "
                           f"({type(error).__name__}: {error})") from None


register_command(Command(
    "inspect", "show what a saved adapter steers: config, AUs per layer and module, file size",
    "Print an AUSteer adapter's configuration, its atomic units per layer and per module (dimension: γ)\n"
    "and the size of its weights file.\n\n"
    "examples:\n  austeer inspect out/adapter\n  austeer inspect your-name/my-adapter --all",
    add_inspect_arguments, run_inspect,
))


# ---------------------------------------------------------------------------------------------------- helpers


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _aliases() -> list[str]:
    from ..hub.models import MODEL_ALIASES

    return sorted(MODEL_ALIASES)


def _version() -> str:
    from .. import __version__

    return __version__

