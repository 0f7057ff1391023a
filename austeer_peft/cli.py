"""The ``austeer`` command line: one subcommand per job.

Each subcommand is a :class:`Command` in :data:`COMMANDS`: a function that adds its arguments to its subparser and a
function that runs it (returning the exit status). A new subcommand (``fit``, ``eval``, ``sweep``) is two functions
and one :func:`register_command` call; ``main`` needs no change.
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

    from .export import merge_and_save

    if args.output.exists() and any(args.output.iterdir()) and not args.force:
        raise CommandError(f"{args.output} is not empty; pass --force to write into it anyway.")
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
    from .export import push_to_hub

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
    from .cards import facts_from_folder, site_and_layer

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


def _aliases() -> list[str]:
    from .models import MODEL_ALIASES

    return sorted(MODEL_ALIASES)


def _version() -> str:
    from . import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
