"""What several ``austeer`` commands share: the model and data arguments, loading the task and the model they name,
the output-folder checks, and the defaults taken from the library (sites, ``k``, ``α``, scorings, model aliases).

One place for these, so that ``fit``, ``eval`` and ``sweep`` accept the same flags with the same meaning, and a
default changed in :class:`~austeer_peft.AUSteerConfig` or the task registry reaches the command line by itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..evaluate.runner import SCORINGS
from ..evaluate.tasks import TASK_NAMES, load_task, load_user_task
from ..fitting.selection import SELECTION_RULES
from ..hub.models import DEFAULT_MODEL, MODEL_ALIASES, load_model
from ..tuner.config import AUSteerConfig
from ..tuner.sites import SITES
from .command import CommandError

DTYPES = ["float32", "bfloat16", "float16"]
SITE_NAMES = list(SITES)
# What a plain AUSteerConfig() resolves to (sites=None means the attention site).
CONFIG_DEFAULTS = AUSteerConfig()


def aliases() -> list[str]:
    """The offline base-model aliases ``--model`` accepts."""
    return sorted(MODEL_ALIASES)


def add_model_and_task_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help="a local folder, a Hub id, or an offline alias (" + ", ".join(aliases()) +
                            f"); default: {DEFAULT_MODEL}")
    group.add_argument("--dtype", default="float32", choices=DTYPES)
    group.add_argument("--task", help=f"built-in task: {', '.join(TASK_NAMES)} (read from --data-dir)")
    group.add_argument("--data-dir", help="folder of the built-in tasks' files (default: $AUSTEER_DATA or "
                                          "../shared/data)")
    group.add_argument("--data", help="your own data instead of --task: a .jsonl/.json/.csv/.tsv file")
    group.add_argument("--template", help="with --data: prompt template over its columns, e.g. 'Q: {question}\\nA:'")
    group.add_argument("--choices", nargs="+", help="with --data: the answer strings, e.g. ' yes' ' no'")
    group.add_argument("--label-column", default="label", help="with --data --choices: the correct choice's column")
    group.add_argument("--answer-column", help="with --data: a numeric answer column (generation task)")
    group.add_argument("--n-fit", type=int, help="examples to fit on (default: the task's)")
    group.add_argument("--n-validation", type=int, help="examples to pick settings on (default: the task's, <= 200)")
    group.add_argument("--n-test", type=int, help="score only the first N test examples (default: all)")
    group.add_argument("--seed", type=int, default=0, help="seed of the splits (default: 0)")
    group.add_argument("--scoring", choices=list(SCORINGS),
                       help="restricted: first-token score among the choices (default for choice tasks); greedy: "
                            "the paper's metric, greedy next token over the whole vocabulary; loglik: summed "
                            "log-probability of each option; number: last number of a greedy generation; toxicity "
                            "(detox): a continuation per prompt, right when non-toxic and fluent")
    group.add_argument("--batch-size", type=int, default=16, help="examples (or pairs) per forward pass")


def add_sites_argument(group: Any, default: list[str], help_text: str) -> None:
    """``--sites`` (one or more of the AUSteer sites) on a parser or argument group."""
    group.add_argument("--sites", nargs="+", default=default, choices=SITE_NAMES, help=help_text)


def add_output_arguments(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--output`` (a folder, required) and ``--force`` (write into it even if it is not empty)."""
    parser.add_argument("--output", required=True, type=Path, help=help_text)
    parser.add_argument("--force", action="store_true", help="write into --output even if it is not empty")


def load_task_from_args(args: argparse.Namespace):
    """The task ``--task`` or ``--data`` names, with ``--n-test`` applied to its test split."""
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
    """``(model, tokenizer)`` of ``--model`` in ``--dtype``."""
    return load_model(args.model, dtype=getattr(torch, args.dtype))


def refuse_nonempty(path: Path, force: bool) -> None:
    if path.exists() and any(path.iterdir()) and not force:
        raise CommandError(f"{path} is not empty; pass --force to write into it anyway.")


def output_folder(path: Path, force: bool) -> Path:
    """``path``, created; refused when it holds files and ``force`` is not set."""
    refuse_nonempty(path, force)
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_main_process() -> bool:
    """False on every process but rank 0 under torch.distributed (torchrun), so that one process writes."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def add_selection_argument(group) -> None:
    """``--selection``: the guarded rule (default) or the most accurate setting, unchecked."""
    group.add_argument("--selection", default=SELECTION_RULES[0], choices=SELECTION_RULES,
                       help="which steer ships: 'guarded' (default: the simplest setting near the best on validation, "
                            "only if it beats vanilla out of fold, else no steer) or 'most-accurate' (unchecked)")
