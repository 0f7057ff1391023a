"""Evaluation tasks: the paper's data sets (COPA, BoolQ, WinoGrande, SST-2, SVAMP, MAWPS, RealToxicityPrompts) and
user data, loaded into one uniform :class:`Task` with deterministic ``fit`` / ``validation`` / ``test`` splits.

Every split is a ``datasets.Dataset`` with a ``prompt`` column (the filled template) and either
``choices`` + ``label`` (choice tasks: ``label`` indexes ``choices``) or ``answer`` (generation tasks: a float), or,
for the open-generation task ``detox``, prompts to continue (and ``chosen`` / ``rejected`` in its fit split), so the
fit, the hyper-parameter sweep and the scoring never need to know which data set they run on.

This package holds one module per data set, the shared :class:`Task` type and splitting (``base``), the number-answer
helpers (``generation``) and user data (``user``); this file is the registry. Adding a data set is one module with a
``load_<name>(data_dir, n_fit, n_validation, seed) -> Task`` function plus one line in :data:`TASK_LOADERS`.

Split sizes (seed 0 unless told otherwise; the test split never depends on ``n_fit`` / ``n_validation``):

==========  ==========================================  ===================================  =========================
task        fit (default)                                validation (default)                 test
==========  ==========================================  ===================================  =========================
copa        300 of copa-dev.xml                          200 of copa-dev.xml (disjoint)       copa-test.xml, 500
boolq       800 of the first 1000 of a seeded            200 of that same 1000 (disjoint)     the other 2270 of
            permutation of val.jsonl                                                          val.jsonl
winogrande  1000 of train_xl_first2000.jsonl             200 of the same 2000 (disjoint)      dev.jsonl, 1267
sst2        500 sampled from train.tsv                   200 more from train.tsv (disjoint)   dev.tsv, 872
svamp       500 of the first 700 of a seeded             200 of that same 700 (disjoint)      the other 300
            permutation of SVAMP.json                                                         (as the paper's Table 6)
mawps       1000 of fold0_train.csv                      200 of fold0_train.csv (disjoint)    fold0_dev.csv, 384
detox       454 pairs of nontoxic.jsonl (RealToxicity-   200 of a seeded permutation of       the other 996 of it
            Prompts; see ``detox``)                      toxic.jsonl (challenging prompts)
==========  ==========================================  ===================================  =========================

Within a held-out pool the validation examples come first in the permutation and the fit examples after them, so
changing ``n_fit`` never changes the validation split either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from ...fitting.pairs import wrong_answers
from .base import (
    DATA_ENV_VAR,
    DEFAULT_N_VALIDATION,
    ContrastivePair,
    PathLike,
    Task,
    apply_chat_template,
    resolve_data_dir,
)
from .boolq import BOOLQ_CHOICES, BOOLQ_TEMPLATE, load_boolq
from .copa import COPA_CHOICES, COPA_TEMPLATE, load_copa
from .detox import DetoxSettings, load_detox
from .generation import MATH_TEMPLATE, format_number
from .mawps import load_mawps, unmask_numbers
from .sst2 import SST2_CHOICES, SST2_TEMPLATE, load_sst2
from .svamp import load_svamp
from .hub import HubSource, load_hub_splits
from .user import load_hub_task, load_user_task
from .winogrande import WINOGRANDE_CHOICES, WINOGRANDE_TEMPLATE, load_winogrande

TaskLoader = Callable[..., Task]  # (data_dir=None, n_fit=None, n_validation=None, seed=0) -> Task

# The built-in tasks, by the name `load_task` and `austeer --task` take.
TASK_LOADERS: dict[str, TaskLoader] = {
    "copa": load_copa,
    "boolq": load_boolq,
    "sst2": load_sst2,
    "svamp": load_svamp,
    "mawps": load_mawps,
    "winogrande": load_winogrande,
    "detox": load_detox,
}
TASK_ALIASES = {"realtoxicityprompts": "detox", "rtp": "detox"}
TASK_NAMES = tuple(TASK_LOADERS)


def task_key(name: str) -> str:
    """The registry key a task name stands for: case, ``-`` and ``_`` ignored, aliases resolved."""
    key = name.lower().replace("-", "").replace("_", "")
    return TASK_ALIASES.get(key, key)


def load_task(name: str, data_dir: Optional[PathLike] = None, n_fit: Optional[int] = None,
              n_validation: Optional[int] = None, seed: int = 0, **options) -> Task:
    """Load one of the built-in tasks by name (one of :data:`TASK_NAMES`; case, ``-`` and ``_`` are ignored).
    ``options`` go to the tasks that take some (``detox``: the fields of :class:`DetoxSettings`, e.g.
    ``max_new_tokens=32, do_sample=True``); any other task refuses them.

    Example:
        ```py
        >>> task = load_task("copa")
        >>> task.sizes
        {'fit': 300, 'validation': 200, 'test': 500}
        >>> prompt, chosen, rejected = task.pairs("fit")[0]
        ```
    """
    key = task_key(name)
    if key not in TASK_LOADERS:
        raise ValueError(f"Unknown task {name!r}; expected one of {', '.join(TASK_NAMES)} (or use load_user_task).")
    if options and key != "detox":
        raise ValueError(f"The task {name!r} takes no options ({', '.join(sorted(options))}); only 'detox' does "
                         "(how its continuations are generated and scored).")
    return TASK_LOADERS[key](data_dir=data_dir, n_fit=n_fit, n_validation=n_validation, seed=seed, **options)


__all__ = [
    "BOOLQ_CHOICES",
    "BOOLQ_TEMPLATE",
    "COPA_CHOICES",
    "COPA_TEMPLATE",
    "ContrastivePair",
    "DATA_ENV_VAR",
    "DetoxSettings",
    "DEFAULT_N_VALIDATION",
    "MATH_TEMPLATE",
    "SST2_CHOICES",
    "SST2_TEMPLATE",
    "TASK_LOADERS",
    "TASK_NAMES",
    "Task",
    "WINOGRANDE_CHOICES",
    "WINOGRANDE_TEMPLATE",
    "apply_chat_template",
    "format_number",
    "load_boolq",
    "HubSource",
    "load_copa",
    "load_hub_splits",
    "load_hub_task",
    "load_detox",
    "load_mawps",
    "load_sst2",
    "load_svamp",
    "load_task",
    "load_user_task",
    "load_winogrande",
    "resolve_data_dir",
    "task_key",
    "unmask_numbers",
    "wrong_answers",
]
