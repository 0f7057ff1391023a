"""``austeer lm-eval``: run EleutherAI's lm-evaluation-harness on a base model with an AUSteer adapter.

lm-eval loads adapters with ``PeftModel.from_pretrained``, which finds the AUSteer method only once ``austeer_peft``
is imported; its own ``lm_eval --model hf --model_args peft=...`` never imports it and fails with ``KeyError:
'AUSTEER'``. This command runs lm-eval's own command line (``lm_eval.__main__.cli_evaluate``, its ``run``
subcommand) in this process, where the method is registered, with ``--model hf`` and ``--model_args`` naming the
base model and the adapter; every other argument (``--tasks``, ``--limit``, ``--num_fewshot``, ``--output_path``,
``--include_path``, ...) goes to lm-eval unchanged. Needs the extra: ``pip install 'austeer-peft[lm-eval]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..hub.facts import ADAPTER_CONFIG_NAME
from ..hub.models import DEFAULT_MODEL, MODEL_ALIASES, resolve_alias
from .arguments import DTYPES, aliases
from .command import Command, CommandError

# lm-eval options this command sets itself, and the option of ours that sets each.
OWN_OPTIONS = {"--model": "--model", "-M": "--model"}
OWN_MODEL_ARGS = {"pretrained": "--model", "peft": "--adapter", "gguf_file": "--model (an alias)",
                  "dtype": "--dtype"}
MODEL_ARGS_OPTIONS = ("--model_args", "-a")

DESCRIPTION = """\
Evaluate a base model, with or without an AUSteer adapter, with lm-evaluation-harness (lm-eval run). AUSteer is
registered with PEFT in this process, so lm-eval's `hf` model loads the adapter through PeftModel.from_pretrained.

  austeer lm-eval --model smollm2-135m --adapter out/adapter --tasks boolq --limit 200
  austeer lm-eval --model my-base --adapter out/adapter --tasks my_task --include_path tasks/ --output_path res/

--model and --adapter are this command's; all other arguments are lm-eval's (see `lm-eval run --help`), except its
--model (always hf here) and the model_args pretrained / peft / gguf_file / dtype, which the options above set.
Run it once without --adapter for the plain model's numbers.
"""


def add_lm_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False  # `--mod` and the like belong to lm-eval, not to abbreviations of ours
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="base model: a local folder, a Hub id, or an offline alias (" + ", ".join(aliases()) +
                             f"); default: {DEFAULT_MODEL}")
    parser.add_argument("--adapter", help="an AUSteer adapter (folder or Hub id); default: the plain model")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="dtype the model is loaded in (default: float32, as the other austeer commands)")


def lm_eval_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The arguments of ``lm-eval run`` for this command's options and the user's other (lm-eval) arguments."""
    for option in extra:
        name = option.split("=", 1)[0]
        if name in OWN_OPTIONS:
            raise CommandError(f"{name} is set by this command (lm-eval's `hf` model); give the base model with "
                               f"{OWN_OPTIONS[name]}.")
    for key in _user_model_args(extra):
        if key in OWN_MODEL_ARGS:
            raise CommandError(f"--model_args {key}=... is set by this command; use {OWN_MODEL_ARGS[key]} instead.")
    if "--tasks" not in extra and "-t" not in extra and not any(a.startswith("--tasks=") for a in extra):
        raise CommandError("lm-eval needs --tasks (e.g. --tasks boolq, or a task of your own with --include_path).")
    model_args = {"pretrained": args.model, "dtype": args.dtype}
    if args.model in MODEL_ALIASES:
        folder, gguf_file = resolve_alias(args.model)
        model_args.update(pretrained=str(folder), gguf_file=gguf_file)
    if args.adapter is not None:
        adapter = Path(args.adapter)
        if adapter.exists() and not (adapter / ADAPTER_CONFIG_NAME).is_file():
            raise CommandError(f"{adapter} has no {ADAPTER_CONFIG_NAME}; --adapter takes an adapter folder (as "
                               "written by `austeer fit` or save_pretrained) or a Hub id.")
        model_args["peft"] = str(adapter) if adapter.exists() else args.adapter
    return ["run", "--model", "hf", "--model_args", json.dumps(model_args), *extra]


def _user_model_args(extra: list[str]) -> list[str]:
    """The keys the user passes in lm-eval's ``--model_args`` (``k=v,k2=v2``, ``k=v k2=v2`` or a JSON object)."""
    keys: list[str] = []
    values: list[str] = []
    collecting = False
    for token in extra:
        name, has_value, value = token.partition("=")
        if name in MODEL_ARGS_OPTIONS:
            collecting = not has_value
            values += [value] if has_value else []
        elif collecting and not token.startswith("-"):
            values.append(token)
        else:
            collecting = False
    for value in values:
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            keys += list(parsed)
        else:
            keys += [pair.split("=", 1)[0].strip() for pair in value.split(",") if pair.strip()]
    return keys


def run_lm_eval(args: argparse.Namespace) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as error:
        raise CommandError(f"lm-evaluation-harness is not installed ({error}); install it with "
                           "pip install 'austeer-peft[lm-eval]'.") from error
    argv = lm_eval_argv(args, list(getattr(args, "extra_args", [])))
    print("lm-eval " + " ".join(argv), file=sys.stderr)
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cli_evaluate()
    except SystemExit as done:  # argparse errors and --help inside lm-eval
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = saved
    return 0


COMMAND = Command(
    name="lm-eval",
    help="evaluate with lm-evaluation-harness (base model + AUSteer adapter)",
    description=DESCRIPTION,
    add_arguments=add_lm_eval_arguments,
    run=run_lm_eval,
    takes_extra_args=True,
)
