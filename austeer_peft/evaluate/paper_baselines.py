"""ITI, SADI-HEAD and the Table 3 ablations as rows of :func:`~austeer_peft.evaluate.compare.compare_methods`: the
same pairs, splits, scoring, token scope and selection rule as AUSteer, block-level and CAA, and a sweep of the same
size (5 x 5 cells by default). The methods themselves are in :mod:`.heads` and :mod:`.ablations`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..fitting.scores import MomentumScores
from .ablations import fixed_strength_aus, fixed_vector, mean_difference_aus, mean_difference_ranking, random_aus
from .activations import PairActivations
from .heads import ITI_ALPHAS, ITI_HEADS, SADI_HEADS, SADI_STRENGTHS, iti_probes, sadi_head_aus, sadi_head_ranking
from .methods import MethodResult, adapter_bytes, method_result, sweep_added, test_with_vectors, vectors_bytes
from .runner import SplitResult
from .sweep import SweepResult, sweep_aus

HEAD_BASELINES = ("iti", "sadi")
ABLATION_NAMES = {"random": "random AUs", "mean-diff": "mean-diff AUs", "fixed-vector": "fixed vector",
                  "fixed-strength": "fixed strength"}


@dataclass
class Harness:
    """What every method of one comparison shares."""

    tokenizer: Any
    task: Any
    scoring: Optional[str]
    batch_size: int
    scope: str
    selection: str
    progress: bool
    output: Optional[Path]
    vanilla_validation: SplitResult
    vanilla_test: SplitResult
    evaluate: Callable[[Any, str], SplitResult]  # (model, split) -> result
    sweeps: list[SweepResult]


def new_adapter(peft_model, scores: MomentumScores, name: str, scope: str):
    """An empty AUSteer adapter ``name`` on the modules ``scores`` counted, with token ``scope``."""
    peft_model = scores.to_adapter(1, 1.0, peft_model, adapter_name=name)
    if scope != "all":
        peft_model.set_scope(scope, adapter_name=name)
    return peft_model


def _au_method(harness: Harness, peft_model, scores: MomentumScores, name: str, method: str, cells,
               fit_seconds: float, settings) -> tuple[Any, MethodResult]:
    """Sweep AU cells ``(setting, strength, aus)`` through a fresh adapter ``name`` and make the method's row."""
    peft_model = new_adapter(peft_model, scores, name, harness.scope)
    sweep, peft_model = sweep_aus(peft_model, harness.tokenizer, harness.task, cells, "validation",
                                  adapter_name=name, method=method, scoring=harness.scoring,
                                  batch_size=harness.batch_size, vanilla=harness.vanilla_validation,
                                  progress=harness.progress, selection=harness.selection)
    harness.sweeps.append(sweep)
    row = method_result(sweep, lambda: harness.evaluate(peft_model, "test"), harness.vanilla_test,
                        lambda test: adapter_bytes(peft_model, name, harness.output, harness.task, test,
                                                 harness.vanilla_test), fit_seconds, settings)
    return peft_model, row


def _added_method(harness: Harness, model, method: str, file_name: str, cells, axes, fit_seconds: float,
                  settings) -> MethodResult:
    sweep, vectors = sweep_added(model, harness.tokenizer, harness.task, cells, method, harness.vanilla_validation,
                                 scoring=harness.scoring, batch_size=harness.batch_size, scope=harness.scope,
                                 selection=harness.selection, axes=axes, progress=harness.progress)
    harness.sweeps.append(sweep)
    return method_result(sweep, lambda: test_with_vectors(model, vectors, harness.scope, harness.evaluate),
                         harness.vanilla_test, lambda _test: vectors_bytes(vectors, file_name, harness.output),
                         fit_seconds, settings)


def run_iti(harness: Harness, model, activations: PairActivations, fit_seconds: float,
            heads: Sequence[int] = ITI_HEADS, alphas: Sequence[float] = ITI_ALPHAS, seed: int = 0) -> MethodResult:
    started = time.perf_counter()
    probes = iti_probes(activations, seed=seed)
    fit_seconds += time.perf_counter() - started
    heads = sorted({n for n in heads if n <= probes.accuracy.numel()})
    cells = [(n, float(alpha), probes.vectors(n, float(alpha))) for n in heads for alpha in alphas]
    return _added_method(harness, model, "ITI", "iti", cells, ("heads", "alpha"), fit_seconds,
                         lambda cell: {"heads": cell.k, "alpha": cell.alpha,
                                       "probe_accuracy_of_weakest": round(float(
                                           probes.accuracy.flatten().sort(descending=True).values[cell.k - 1]), 3)})


def run_sadi(harness: Harness, peft_model, attention_scores: MomentumScores, activations: PairActivations,
             fit_seconds: float, heads: Sequence[int] = SADI_HEADS, strengths: Sequence[float] = SADI_STRENGTHS
             ) -> tuple[Any, MethodResult]:
    ranking = sadi_head_ranking(activations)
    heads = sorted({n for n in heads if n <= len(ranking)})
    cells = [(n, float(s), sadi_head_aus(ranking, n, float(s), activations.head_dim)) for n in heads for s in strengths]
    return _au_method(harness, peft_model, attention_scores, "sadi_head", "SADI-HEAD", cells, fit_seconds,
                      lambda cell: {"heads": cell.k, "strength": cell.alpha,
                                    "chosen_heads": [f"{m}#{h}" for m, h in ranking[:cell.k]]})


def run_ablation(harness: Harness, peft_model, name: str, site_scores: MomentumScores, activations: PairActivations,
                 ks: Sequence[int], alphas: Sequence[float], fit_seconds: float, seed: int = 0
                 ) -> tuple[Any, MethodResult]:
    """One Table 3 ablation on the site of ``site_scores`` (see :mod:`.ablations`)."""
    site = site_scores.sites[0]
    method = f"ablation {ABLATION_NAMES[name]} ({site})"
    ks = sorted({k for k in ks if k <= site_scores.num_aus})
    settings = lambda cell: {"k": cell.k, "alpha": cell.alpha, "site": site}  # noqa: E731
    if name == "fixed-vector":
        cells = [(k, float(a), fixed_vector(site_scores, activations, k, float(a))) for k in ks for a in alphas]
        return peft_model, _added_method(harness, peft_model, method, f"ablation_fixed_vector_{site}", cells,
                                         ("k", "alpha"), fit_seconds, settings)
    if name == "random":
        make = lambda k, a: random_aus(site_scores, k, a, seed)  # noqa: E731
    elif name == "mean-diff":
        ranking = mean_difference_ranking(site_scores, activations)
        make = lambda k, a: mean_difference_aus(site_scores, ranking, k, a)  # noqa: E731
    elif name == "fixed-strength":
        make = lambda k, a: fixed_strength_aus(site_scores, k, a)  # noqa: E731
    else:
        raise ValueError(f"Unknown ablation {name!r}; choose from {list(ABLATION_NAMES)}.")
    cells = [(k, float(a), make(k, float(a))) for k in ks for a in alphas]
    return _au_method(harness, peft_model, site_scores, f"ablation_{name.replace('-', '_')}_{site}", method, cells,
                      fit_seconds, settings)
