"""The ``austeer`` command line: the parser, ``main``, and the list of subcommands.

Each subcommand is a :class:`Command` in :data:`COMMANDS` (the registry lives in ``cli/command.py``), defined in its
own module (``fit``, ``evaluate_cmd`` for ``eval``, ``sweep``, ``merge``, ``export``, ``push``, ``inspect``,
``lm_eval`` for ``lm-eval``) on top of the shared arguments of ``cli/arguments.py``. A new subcommand is two
functions and one :func:`register_command` call; ``main`` needs no change.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from . import evaluate_cmd, export, fit, inspect, lm_eval, merge, push, sweep
from ..hub.facts import package_version
from .command import COMMANDS, Command, CommandError, register_command

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
  austeer export --model smollm2-135m --adapter out/adapter --format lora --output lora/
                                                  an exact LoRA for per-request serving (vLLM, SGLang, ...)
  austeer push --adapter out/adapter --repo-id you/my-adapter
                                                  share the adapter (with its model card) on the Hub
  austeer lm-eval --adapter out/adapter --tasks boolq
                                                  lm-evaluation-harness on the steered model

Run `austeer <command> --help` for the options of a command (`python -m austeer_peft.cli` works too).
"""

# The built-in subcommands, in the order `austeer --help` lists them.
for _module in (fit, evaluate_cmd, sweep, merge, export, push, inspect, lm_eval):
    register_command(_module.COMMAND)
del _module


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
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command is None or not COMMANDS[args.command].takes_extra_args):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command].run(args)
    except (CommandError, ValueError, OSError) as error:
        print(f"austeer {args.command}: error: {error}", file=sys.stderr)
        return 1


def _version() -> str:
    return package_version()


__all__ = ["COMMANDS", "Command", "CommandError", "DESCRIPTION", "build_parser", "main", "register_command"]
