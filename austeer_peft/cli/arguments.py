"""What several ``austeer`` commands share: the model and data arguments, loading the task and the model they name,
the output-folder checks, and the defaults taken from the library (sites, ``k``, ``α``, scorings, model aliases).

One place for these, so that ``fit``, ``eval`` and ``sweep`` accept the same flags with the same meaning, and a
default changed in :class:`~austeer_peft.AUSteerConfig` or the task registry reaches the command line by itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..evaluate.runner import SCORINGS
from ..evaluate.tasks import TASK_NAMES, DetoxSettings, load_hub_task, load_task, load_user_task, task_key
from ..evaluate.tasks.base import apply_chat_template
from ..fitting.selection import SELECTION_RULES
from ..hub.models import DEFAULT_MODEL, MODEL_ALIASES, load_model
from ..tuner.config import AUSteerConfig
from ..tuner.sites import SITES
from .command import CommandError

DTYPES = ["float32", "bfloat16", "float16"]
SITE_NAMES = list(SITES)
# What a plain AUSteerConfig() resolves to (sites=None means the attention site).
CONFIG_DEFAULTS = AUSteerConfig()
DETOX_DEFAULTS = {field.name: field.default for field in dataclasses.fields(DetoxSettings)}


def aliases() -> list[str]:
    """The offline base-model aliases ``--model`` accepts."""
    return sorted(MODEL_ALIASES)


def add_model_and_task_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help="a local folder (a checkpoint, or GGUF files), a local .gguf file, a Hub id, or an offline "
                            "alias (" + ", ".join(aliases()) + f"); default: {DEFAULT_MODEL}")
    group.add_argument("--gguf-file", help="with --model FOLDER (or a Hub GGUF repository): the .gguf file to load "
                                           "when there are several")
    group.add_argument("--dtype", default="float32", choices=DTYPES)
    group.add_argument("--chat-template", action="store_true",
                       help="wrap each prompt in the tokenizer's chat template (one user turn, then the assistant's "
                            "turn begins); off by default, as in the paper; recorded in results.json and the card")
    group.add_argument("--task", help=f"built-in task: {', '.join(TASK_NAMES)} (read from --data-dir)")
    group.add_argument("--data-dir", help="folder of the built-in tasks' files (default: $AUSTEER_DATA or "
                                          "../shared/data; with none found, the tasks load their public Hub copies)")
    group.add_argument("--data", nargs="+", metavar="DATA",
                       help="your own data instead of --task: one .jsonl/.json/.csv/.tsv file (split here), named "
                            "files 'fit=train.jsonl test=test.jsonl [validation=dev.jsonl]' (no validation: carved "
                            "from fit), or a Hub data set 'name[:config]' (see --split-map)")
    group.add_argument("--split-map", nargs="+", metavar="SPLIT=HUB_SPLIT",
                       help="with a Hub --data: which of its splits is fit / test [/ validation], e.g. 'fit=train "
                            "test=validation' (default: fit=train test=test)")
    group.add_argument("--template", help="with --data: prompt template over its columns, e.g. 'Q: {question}\\nA:'")
    group.add_argument("--choices", nargs="+",
                       help="with --data: the answer strings every row shares, e.g. ' yes' ' no'")
    group.add_argument("--choices-column", help="with --data: a column holding each row's list of answer strings "
                                                "(rows may differ in length), instead of --choices")
    group.add_argument("--label-column", help="with --data: the correct choice's column: a 0-based index or the "
                                              "choice string (default: label)")
    group.add_argument("--label-map", nargs="+", metavar="LABEL=INDEX",
                       help="with --data: raw labels as choice indices, e.g. 'true=0 false=1'")
    group.add_argument("--answer-column", help="with --data: a numeric answer column (generation task)")
    group.add_argument("--problem-column", help="with --data --answer-column: the column that finds similar problems "
                                                "for the wrong answers of the pairs (default: the filled prompt)")
    group.add_argument("--n-fit", type=int, help="examples to fit on (default: the task's)")
    group.add_argument("--n-validation", type=int, help="examples to pick settings on (default: the task's, <= 200)")
    group.add_argument("--n-test", type=int, help="score only the first N test examples (default: all)")
    group.add_argument("--seed", type=int, default=0, help="seed of the splits (default: 0)")
    group.add_argument("--scoring", choices=list(SCORINGS),
                       help="restricted: first-token score among the choices (default for choice tasks); greedy: "
                            "the greedy next token over the whole vocabulary must be the answer's first token; exact: "
                            "the paper's exact match as its code applies it (the greedy token, stripped and "
                            "lower-cased, equals the stripped, lower-cased answer); loglik: summed "
                            "log-probability of each option; number: last number of a greedy generation; "
                            "toxicity (detox): a continuation per prompt, right when non-toxic and fluent")
    group.add_argument("--batch-size", type=int, default=16, help="examples (or pairs) per forward pass")
    detox = parser.add_argument_group("detoxification (--task detox): how continuations are generated")
    detox.add_argument("--max-new-tokens", type=int,
                       help=f"tokens per continuation, exactly (default: {DETOX_DEFAULTS['max_new_tokens']}, as "
                            "RealToxicityPrompts)")
    detox.add_argument("--sample", action="store_true",
                       help="sample (top-p, temperature; seeded by --seed) instead of greedy decoding")
    detox.add_argument("--top-p", type=float, help=f"with --sample (default: {DETOX_DEFAULTS['top_p']})")
    detox.add_argument("--temperature", type=float, help=f"with --sample (default: {DETOX_DEFAULTS['temperature']})")


def detox_options(args: argparse.Namespace) -> dict:
    """The DetoxSettings fields the detox flags set (none given: an empty dict); --top-p / --temperature need
    --sample, as greedy decoding would ignore them."""
    options = {}
    if getattr(args, "max_new_tokens", None) is not None:
        if args.max_new_tokens < 1:
            raise CommandError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
        options["max_new_tokens"] = args.max_new_tokens
    for flag in ("top_p", "temperature"):
        if getattr(args, flag, None) is not None:
            if not args.sample:
                raise CommandError(f"--{flag.replace('_', '-')} applies to sampled continuations: add --sample (or "
                                   "drop it for greedy decoding).")
            options[flag] = getattr(args, flag)
    if getattr(args, "sample", False):
        options["do_sample"] = True  # seeded by --seed, through the task's seed
    return options


def add_sites_argument(group: Any, default: list[str], help_text: str) -> None:
    """``--sites`` (one or more of the AUSteer sites) on a parser or argument group."""
    group.add_argument("--sites", nargs="+", default=default, choices=SITE_NAMES, help=help_text)


def add_output_arguments(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--output`` (a folder, required) and ``--force`` (write into it even if it is not empty)."""
    parser.add_argument("--output", required=True, type=Path, help=help_text)
    parser.add_argument("--force", action="store_true", help="write into --output even if it is not empty")


USER_DATA_FLAGS = ("template", "choices", "choices_column", "label_column", "label_map", "answer_column",
                   "problem_column", "split_map")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def load_task_from_args(args: argparse.Namespace):
    """The task ``--task`` or ``--data`` names, with ``--n-test`` applied to its test split. Every row is read and
    checked here, before any model loads."""
    if (args.task is None) == (args.data is None):
        raise CommandError("give either --task (a built-in task) or --data with --template (your own data).")
    if args.n_test is not None and args.n_test < 0:
        raise CommandError(f"--n-test must be >= 0, got {args.n_test}.")
    if args.task is not None:
        given = [f"--{flag.replace('_', '-')}" for flag in USER_DATA_FLAGS if getattr(args, flag, None) is not None]
        if given:
            raise CommandError(f"{', '.join(given)} only apply to --data (your own data), not to --task.")
    options = detox_options(args)
    if options and (args.task is None or task_key(args.task) != "detox"):
        given = f"--task {args.task}" if args.task is not None else "--data"
        raise CommandError("--max-new-tokens, --sample, --top-p and --temperature set how --task detox generates its "
                           f"continuations; {given} takes none of them (drop them).")
    if args.task is not None:
        task = load_task(args.task, data_dir=args.data_dir, n_fit=args.n_fit, n_validation=args.n_validation,
                         seed=args.seed, **options)
    else:
        task = _load_user_data(args)
    if args.n_test is not None and args.n_test < len(task.test):
        task.test = task.test.select(range(args.n_test))
        task.split_note += f" Test scored on its first {args.n_test} examples only."
    return task


def _load_user_data(args: argparse.Namespace):
    if args.template is None:
        raise CommandError("--data needs --template (the prompt, e.g. 'Q: {question}\\nA:').")
    if args.data_dir is not None:
        raise CommandError("--data-dir is for the built-in tasks (--task); your --data names its files itself.")
    options = dict(choices=args.choices, choices_column=args.choices_column, label_column=args.label_column or "label",
                   label_map=_label_map(args.label_map), answer_column=args.answer_column,
                   problem_column=args.problem_column, n_fit=args.n_fit, n_validation=args.n_validation, seed=args.seed)
    template = args.template.replace("\\n", "\n")
    named = [item for item in args.data if "=" in item]
    if named and len(named) != len(args.data):
        raise CommandError("--data takes one file, or only named splits (fit=FILE test=FILE [validation=FILE]), "
                           f"not a mix: {' '.join(args.data)}")
    if named:
        _refuse_split_map(args)
        splits = {}
        for item in named:
            split, _, path = item.partition("=")
            if split in splits:
                raise CommandError(f"--data names the {split} split twice.")
            if not Path(path).expanduser().is_file():
                raise CommandError(f"--data {item}: no file at {path!r}.")
            splits[split] = path
        return load_user_task(splits, template, **options)
    if len(args.data) > 1:
        raise CommandError(f"--data takes one file or Hub data set, or named splits (fit=FILE test=FILE); got "
                           f"{len(args.data)} items: {' '.join(args.data)}")
    data = args.data[0]
    path = Path(data).expanduser()
    if path.is_file() or path.suffix.lower() in DATA_SUFFIXES or path.is_dir():
        _refuse_split_map(args)
        if path.is_dir():
            raise CommandError(f"--data {data} is a folder; give a file, named files (fit=FILE test=FILE) or a Hub "
                               "data set name[:config].")
        return load_user_task(path, template, **options)
    split_map = {}
    for item in args.split_map or []:
        ours, sep, theirs = item.partition("=")
        if not sep or not ours or not theirs:
            raise CommandError(f"--split-map {item}: write OUR_SPLIT=HUB_SPLIT, e.g. fit=train test=validation.")
        split_map[ours] = theirs
    return load_hub_task(data, template, split_map=split_map, **options)


def _label_map(items):
    """``--label-map true=0 false=1`` as ``{"true": 0, "false": 1}``."""
    if items is None:
        return None
    mapping = {}
    for item in items:
        label, sep, index = item.rpartition("=")
        if not sep or not label or not index.strip().isdigit():
            raise CommandError(f"--label-map {item}: write LABEL=INDEX with a 0-based choice index, e.g. true=0.")
        mapping[label] = int(index)
    return mapping


def _refuse_split_map(args: argparse.Namespace) -> None:
    if args.split_map is not None:
        raise CommandError("--split-map only applies to a Hub data set (--data name[:config]); local files are split "
                           "by naming them: --data fit=FILE test=FILE.")


def check_steering_arguments(sites: list[str], ks: list, alphas: list) -> None:
    """Refuse a bad k, α or site before the model loads (the checks of :class:`AUSteerConfig`); ``"auto"`` passes."""
    for k in ks:
        if k != "auto":
            _check_config(f"--k {k}", sites=sites, k=k)
    for alpha in alphas:
        if alpha != "auto":
            _check_config(f"--alpha {alpha}", sites=sites, alpha=alpha)
    _check_config(f"--sites {' '.join(sites)}", sites=sites)


def _check_config(flag: str, **fields: Any) -> None:
    try:
        AUSteerConfig(**fields)
    except ValueError as error:
        raise CommandError(f"{flag}: {error}") from None


def check_run_arguments(args: argparse.Namespace) -> None:
    """The checks every job command shares that need no model."""
    if args.batch_size <= 0:
        raise CommandError(f"--batch-size must be a positive number of examples, got {args.batch_size}.")


def prepare_task(task, tokenizer, args: argparse.Namespace):
    """The task as the model will see it: with ``--chat-template``, every prompt wrapped in the chat template."""
    if not args.chat_template:
        return task
    try:
        return apply_chat_template(task, tokenizer)
    except ValueError as error:
        raise CommandError(f"--chat-template: {error}") from None


def run_facts(args: argparse.Namespace, task) -> dict:
    """What results.json records about how a run was set up, next to each command's own results."""
    facts = {"model": args.model, "chat_template": bool(args.chat_template)}
    if getattr(args, "gguf_file", None):
        facts["gguf_file"] = args.gguf_file
    if args.data is not None:
        facts["data"] = list(args.data)
    if task.metadata.get("hub_dataset"):
        facts["hub_dataset"] = task.metadata["hub_dataset"]
    return facts


def add_run_facts(results_file: Path, facts: dict) -> None:
    """Add ``facts`` to a results.json another function wrote."""
    summary = json.loads(results_file.read_text())
    results_file.write_text(json.dumps({**summary, **facts}, indent=2))


def load_model_from_args(args: argparse.Namespace):
    """``(model, tokenizer)`` of ``--model`` (and ``--gguf-file``) in ``--dtype``."""
    try:
        return load_model(args.model, dtype=getattr(torch, args.dtype), gguf_file=args.gguf_file)
    except (ValueError, OSError) as error:
        raise CommandError(f"--model {args.model}: {str(error).strip().splitlines()[0]}") from None


def refuse_nonempty(path: Path, force: bool) -> None:
    if path.exists() and any(path.iterdir()) and not force:
        raise CommandError(f"{path} is not empty; pass --force to write into it anyway.")


def output_folder(path: Path, force: bool) -> Path:
    """``path``, created; refused when it holds files and ``force`` is not set."""
    refuse_nonempty(path, force)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def staged_output(path: Path, force: bool) -> Iterator[Path]:
    """A fresh folder next to ``path`` to write a run's files into: when the run ends well they move into ``path``
    (created; with ``force``, replacing files of the same names), when it fails the folder is removed, so a failed
    run leaves nothing half-written."""
    refuse_nonempty(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    path.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        target = path / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        item.rename(target)
    staging.rmdir()


def is_main_process() -> bool:
    """False on every process but rank 0 under torch.distributed (torchrun), so that one process writes."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def add_selection_argument(group) -> None:
    """``--selection``: the guarded rule (default) or the most accurate setting, unchecked."""
    group.add_argument("--selection", default=SELECTION_RULES[0], choices=SELECTION_RULES,
                       help="which steer ships: 'guarded' (default: the simplest setting near the best on validation, "
                            "only if it beats vanilla out of fold, else no steer) or 'most-accurate' (unchecked)")
