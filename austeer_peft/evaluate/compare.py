"""AUSteer next to its baselines on one task, in one harness: the job behind ``austeer sweep`` and the demo.

For each method every setting is scored on the validation split, the guarded rule of
:mod:`austeer_peft.fitting.selection` decides which one ships, or that none does ("no steer beats vanilla on this
data": the method then gives the unsteered model), and the test split is scored once:

=================  ============================================================================================
vanilla            the unsteered model
AUSteer-<site>     one momentum pass over all sites; per site a (k, α) sweep (:mod:`austeer_peft.sweep`)
block-level        every dimension of the blocks the best AUSteer adapter steers, AUSteer's γ rule, α swept
CAA                mean last-token residual difference added at one layer; layer and multiplier swept
ITI                probes per head, top heads by probe accuracy shifted by α·σ·θ; heads and α swept (:mod:`.heads`)
SADI-HEAD          top heads by mean activation difference scaled element-wise; heads and strength swept
ablation ...       the paper's Table 3 ablations of AUSteer on one site, (k, α) swept (:mod:`.ablations`)
=================  ============================================================================================

ITI, SADI-HEAD and the ablations read the pairs' last-token activations in one more pass over the fit pairs
(:mod:`.activations`); the ablations run on the site of the best AUSteer sweep, as block-level does. ``scope``
chooses the token positions every method steers: ``"all"`` (the AUSteer code: every token) or ``"generated"`` (from
the last prompt token on, SADI's and ITI's position).

Outputs (``output_dir``): ``results.json`` (the table, settings, split notes, timings), ``sweep.csv`` (every cell of
every sweep), ``scores.safetensors`` (the momentum table), ``adapters/<method>/`` (saved adapters), and figures
``heatmap_<method>.png`` and ``au_locations.png`` when matplotlib is installed.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from torch import nn
from tqdm.auto import tqdm

from .activations import pair_activations
from .baselines import ADDITIVE_SCOPES, CAA_LAYER_FRACTIONS, CAA_MULTIPLIERS, block_level_aus, caa_layers
from .baselines import caa_steering, caa_vectors
from .heads import ITI_ALPHAS, ITI_HEADS, SADI_HEADS, SADI_STRENGTHS
from .methods import MethodResult, adapter_bytes, method_result
from .paper_baselines import ABLATION_NAMES, HEAD_BASELINES, Harness, new_adapter, run_ablation, run_iti, run_sadi
from .runner import SplitResult, evaluate_split
from .scoring import bootstrap_ci, paired_gain_ci, paired_test
from ..fitting.selection import NO_STEER_NOTE, SELECTION_RULES
from .tasks import Task
from ..fitting.fit import compute_momentum
from ..fitting.inputs import unsteered
from .sweep import DEFAULT_ALPHAS, DEFAULT_KS, SweepCell, SweepResult, scores_for_sites, select_cell, sweep_aus
from .sweep import sweep_k_alpha, write_sweep_csv

BASELINES = ("block", "caa", *HEAD_BASELINES, *ABLATION_NAMES)
DEFAULT_BASELINES = ("block", "caa")  # what `austeer sweep` runs unless told otherwise
DEFAULT_SITES = ("attention", "ffn")


@dataclass
class Comparison:
    task: str
    split_note: str
    scoring: str
    sizes: dict[str, int]
    methods: list[MethodResult]
    sweeps: list[SweepResult]
    seconds: float
    choices: Optional[list[str]] = None  # the task's shared choices (None: per-row options)
    scope: str = "all"  # token positions every method steered

    def __str__(self) -> str:
        return self.format_table()

    __repr__ = __str__  # print(comparison) and the REPL show the table, not every per-example list

    def table(self) -> list[dict[str, Any]]:
        """Rows of the results table: test accuracy and its gain over vanilla, each with a 95 % bootstrap CI, the
        paired test against vanilla, and whether the method shipped a steer."""
        vanilla = self.methods[0].test.correct
        rows = []
        for method in self.methods:
            mean, low, high = bootstrap_ci(method.test.correct)
            gain, gain_low, gain_high = paired_gain_ci(method.test.correct, vanilla)
            rows.append({
                "method": method.method, "shipped": method.shipped,
                "note": "" if method.selection is None else method.selection.note,
                "steered": method.num_steered, "test_accuracy": round(100 * mean, 2),
                "ci_low": round(100 * low, 2), "ci_high": round(100 * high, 2),
                "gain": round(100 * gain, 2), "gain_ci_low": round(100 * gain_low, 2),
                "gain_ci_high": round(100 * gain_high, 2),
                "p_vs_vanilla": None if method is self.methods[0] or not method.shipped else
                paired_test(vanilla, method.test.correct),
                "adapter_bytes": method.adapter_bytes, "fit_seconds": round(method.fit_seconds, 1),
                "validation_accuracy": None if method.validation_accuracy is None else
                round(100 * method.validation_accuracy, 2),
                **({"also_" + name: round(100 * sum(v) / len(v), 2) for name, v in method.test.also.items()}),
                "predicted": self._predicted(method.test),
                **({"metrics": _rounded(method.test.metrics)} if method.test.metrics is not None else {}),
                "settings": method.settings,
                "selection": None if method.selection is None else method.selection.as_dict(),
            })
        return rows

    def _predicted(self, test: SplitResult) -> Optional[dict[str, float]]:
        """Percent of test examples answered with each choice: shows when a gain is a shifted preference."""
        if test.predicted is None:
            return None
        return {name: round(100 * share, 1) for name, share in test.predicted_shares(self.choices).items()}

    def format_table(self) -> str:
        sizes = ", ".join(f"{split} {size}" for split, size in self.sizes.items())
        lines = [f"{self.task}: {sizes} examples; scoring {self.scoring}; scope {self.scope}; {self.split_note}",
                 f"{'method':<36} {'#steered':>9} {'test accuracy (95 % CI)':>24} {'gain vs vanilla (95 % CI)':>26} "
                 f"{'p':>8} {'adapter bytes':>13} {'fit s':>7}  {'answers (% of test)':<22} settings"]
        for row in self.table():
            accuracy = f"{row['test_accuracy']:.1f} ({row['ci_low']:.1f}–{row['ci_high']:.1f})"
            gain = "" if row["method"] == "vanilla" else \
                f"{row['gain']:+.1f} ({row['gain_ci_low']:+.1f}–{row['gain_ci_high']:+.1f})"
            p_value = "" if row["p_vs_vanilla"] is None else f"{row['p_vs_vanilla']:.3g}"
            answers = " · ".join(f"{name.strip()} {share:.0f}" for name, share in (row["predicted"] or {}).items())
            settings = ", ".join(f"{key}={value}" for key, value in row["settings"].items())
            if not row["shipped"]:
                gain, settings = "not shipped", NO_STEER_NOTE
            lines.append(f"{row['method']:<36} {row['steered']:>9} {accuracy:>24} {gain:>26} {p_value:>8} "
                         f"{row['adapter_bytes']:>13} {row['fit_seconds']:>7.1f}  {answers:<22} {settings}")
        rows = [row for row in self.table() if "metrics" in row]
        if rows:  # open generation: the accuracy above is "non-toxic and fluent"; its parts, and the text quality
            lines.append(f"{'method':<20} {'non-toxic %':>11} {'fluent %':>9} {'mean toxicity':>13} "
                         f"{'perplexity':>10} {'distinct-1':>10} {'distinct-2':>10}   (test; scorer "
                         f"{rows[0]['metrics']['scorer']}, not Perspective)")
            for row in rows:
                m = row["metrics"]
                lines.append(f"{row['method']:<20} {100 * m['detox_rate']:>11.1f} {100 * m['fluent_rate']:>9.1f} "
                             f"{m['mean_toxicity']:>13.3f} {m['perplexity']:>10.2f} {m['distinct_1']:>10.3f} "
                             f"{m['distinct_2']:>10.3f}")
        return "\n".join(lines)


def compare_methods(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    *,
    sites: Sequence[str] = DEFAULT_SITES,
    ks: Sequence[int] = DEFAULT_KS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    baselines: Sequence[str] = DEFAULT_BASELINES,
    caa_multipliers: Sequence[float] = CAA_MULTIPLIERS,
    caa_layer_fractions: Sequence[float] = CAA_LAYER_FRACTIONS,
    iti_heads: Sequence[int] = ITI_HEADS,
    iti_alphas: Sequence[float] = ITI_ALPHAS,
    sadi_heads: Sequence[int] = SADI_HEADS,
    sadi_strengths: Sequence[float] = SADI_STRENGTHS,
    scoring: Optional[str] = None,
    scope: str = "all",
    batch_size: int = 16,
    output_dir: Optional[Union[str, Path]] = None,
    progress: bool = True,
    selection: str = "guarded",
    seed: int = 0,
    on_method: Optional[Callable[["Comparison"], None]] = None,
) -> Comparison:
    """Fit, sweep on ``task.validation``, test once on ``task.test``: vanilla, AUSteer per site, then baselines
    (any of :data:`BASELINES`: ``block``, ``caa``, ``iti``, ``sadi``, and the ablations ``random``, ``mean-diff``,
    ``fixed-vector``, ``fixed-strength``).

    ``selection="most-accurate"`` ships every method's most accurate cell unchecked (the rule before the guarded one;
    for comparisons). ``scope``: ``"all"`` steers every token, ``"generated"`` from the last prompt token on.
    ``on_method`` is called with the comparison so far after each method, vanilla included (e.g. to write partial
    results; its last row is the method just scored).
    ``model`` is a plain transformers model; it comes back wrapped (a PeftModel holding one adapter per AUSteer-based
    method), as with ``get_peft_model``.
    """
    if selection not in SELECTION_RULES:
        raise ValueError(f"Unknown selection {selection!r}; choose from {list(SELECTION_RULES)}.")
    if scope not in ADDITIVE_SCOPES:
        raise ValueError(f"Unknown scope {scope!r}; choose from {list(ADDITIVE_SCOPES)}.")
    unknown = [name for name in baselines if name not in BASELINES]
    if unknown:
        raise ValueError(f"Unknown baselines {unknown}; choose from {list(BASELINES)}.")
    if "sadi" in baselines or "iti" in baselines:
        if "attention" not in sites:
            raise ValueError("ITI and SADI-HEAD steer attention heads; add 'attention' to `sites`.")
    started = time.perf_counter()
    output = Path(output_dir) if output_dir is not None else None
    if output is not None:
        (output / "adapters").mkdir(parents=True, exist_ok=True)
    pairs = task.pairs("fit")

    def evaluate(current, split):
        return evaluate_split(current, tokenizer, task, split, scoring, batch_size=batch_size, progress=progress)

    vanilla_validation, vanilla_test = evaluate(model, "validation"), evaluate(model, "test")
    methods = [MethodResult("vanilla", 0, vanilla_test, 0, 0.0, vanilla_validation.accuracy)]
    sweeps: list[SweepResult] = []

    def comparison() -> Comparison:
        return Comparison(task.name, task.split_note, vanilla_test.scoring, task.sizes, methods, sweeps,
                          time.perf_counter() - started, task.choices, scope)

    def add(row: MethodResult) -> None:
        methods.append(row)
        if on_method is not None:
            on_method(comparison())

    if on_method is not None:
        on_method(comparison())  # the vanilla row

    # AUSteer: one momentum pass over all sites, one sweep per site.
    fit_started = time.perf_counter()
    scores = compute_momentum(model, tokenizer, pairs, sites=list(sites), batch_size=batch_size, progress=progress)
    fit_seconds = time.perf_counter() - fit_started
    if output is not None:
        scores.save(output / "scores.safetensors")
    peft_model = model
    for site in sites:
        name = f"austeer_{site}"
        peft_model = new_adapter(peft_model, scores_for_sites(scores, site), name, scope)
        sweep, peft_model = sweep_k_alpha(peft_model, tokenizer, scores_for_sites(scores, site), task, "validation",
                                          ks, alphas, scoring=scoring, batch_size=batch_size, adapter_name=name,
                                          method=f"AUSteer-{site}", vanilla=vanilla_validation, progress=progress,
                                          selection=selection)
        sweeps.append(sweep)
        add(method_result(sweep, lambda: evaluate(peft_model, "test"), vanilla_test,
                          lambda test: adapter_bytes(peft_model, name, output, task, test, vanilla_test), fit_seconds,
                          lambda cell: {"k": cell.k, "alpha": cell.alpha}))
    # The AUSteer site whose steer ships with the best validation accuracy; when none ships, the site of the most
    # accurate cell (block-level and the ablations are judged by their own selection either way).
    site_sweep = max(sweeps, key=lambda s: (s.chosen is not None, (s.chosen or s.best).accuracy))
    best_site = site_sweep.method.removeprefix("AUSteer-")

    if "block" in baselines:
        cell = site_sweep.chosen or site_sweep.best
        site_scores = scores_for_sites(scores, best_site)
        blocks = list(dict.fromkeys(au.module for au in site_scores.select(cell.k, cell.alpha)))
        peft_model = new_adapter(peft_model, site_scores, "block_level", scope)
        cells = [(None, alpha, block_level_aus(site_scores, blocks, alpha)) for alpha in alphas]
        cells = [(len(aus), alpha, aus) for _, alpha, aus in cells]
        block_sweep, peft_model = sweep_aus(peft_model, tokenizer, task, cells, "validation",
                                            adapter_name="block_level", method="block-level", scoring=scoring,
                                            batch_size=batch_size, vanilla=vanilla_validation, progress=progress,
                                            selection=selection)
        sweeps.append(block_sweep)
        add(method_result(block_sweep, lambda: evaluate(peft_model, "test"), vanilla_test,
                          lambda test: adapter_bytes(peft_model, "block_level", output, task, test, vanilla_test),
                          fit_seconds,
                          lambda cell: {"blocks": blocks, "alpha": cell.alpha}))

    if "caa" in baselines:
        add(_caa(peft_model, tokenizer, task, pairs, caa_multipliers, caa_layer_fractions, evaluate, sweeps,
                 vanilla_validation, vanilla_test, scoring, batch_size, output, progress, selection, scope))

    others = [name for name in baselines if name in HEAD_BASELINES or name in ABLATION_NAMES]
    if others:
        harness = Harness(tokenizer, task, scoring, batch_size, scope, selection, progress, output,
                          vanilla_validation, vanilla_test, evaluate, sweeps)
        activation_started = time.perf_counter()
        activations = pair_activations(peft_model, tokenizer, pairs, list(sites), batch_size=batch_size,
                                       progress=progress)
        activation_seconds = time.perf_counter() - activation_started
        if "iti" in baselines:
            add(run_iti(harness, peft_model, activations, activation_seconds, iti_heads, iti_alphas, seed))
        if "sadi" in baselines:
            peft_model, row = run_sadi(harness, peft_model, scores_for_sites(scores, "attention"), activations,
                                       activation_seconds, sadi_heads, sadi_strengths)
            add(row)
        for name in (name for name in ABLATION_NAMES if name in baselines):
            peft_model, row = run_ablation(harness, peft_model, name, scores_for_sites(scores, best_site),
                                           activations, ks, alphas, fit_seconds + activation_seconds, seed)
            add(row)

    result = comparison()
    if output is not None:
        _write_outputs(result, scores, peft_model, output)
    return result


def _caa(model, tokenizer, task, pairs, multipliers, layer_fractions, evaluate, sweeps, vanilla_validation,
         vanilla_test, scoring, batch_size, output, progress, selection, scope) -> MethodResult:
    """CAA: one pass for the vectors of all layers, a (layer, multiplier) sweep on validation, one test run."""
    disabled = unsteered(model)
    fit_started = time.perf_counter()
    vectors = caa_vectors(model, tokenizer, pairs, batch_size=batch_size, progress=progress)
    fit_seconds = time.perf_counter() - fit_started
    cells = []
    grid = [(layer, multiplier) for layer in caa_layers(vectors.vectors.shape[0], layer_fractions)
            for multiplier in multipliers]
    with disabled:
        for layer, multiplier in tqdm(grid, desc="sweep CAA", unit="cell", disable=not progress):
            with caa_steering(model, layer, vectors.vectors[layer], multiplier, scope):
                result = evaluate_split(model, tokenizer, task, "validation", scoring, batch_size=batch_size)
            cells.append(SweepCell(layer, multiplier, result.accuracy, vectors.vectors.shape[1], result.correct))
        sweep = SweepResult("CAA", cells, vanilla_validation, vanilla_validation.scoring,
                            len(vanilla_validation.correct), time.perf_counter() - fit_started - fit_seconds,
                            axes=("layer", "multiplier"))
        select_cell(sweep, cost=lambda cell: (cell.alpha, cell.k), rule=selection)  # simplest: the weaker multiplier
        chosen = sweep.chosen
        if chosen is not None:
            with caa_steering(model, chosen.k, vectors.vectors[chosen.k], chosen.alpha, scope):
                test = evaluate(model, "test")
    sweeps.append(sweep)

    def size(_test: SplitResult) -> int:
        if output is None:
            return 4 * vectors.vectors.shape[1]
        return vectors.save(output / "adapters" / "caa.safetensors", chosen.k)

    return method_result(sweep, lambda: test, vanilla_test, size, fit_seconds,
                          lambda cell: {"layer": cell.k, "multiplier": cell.alpha})


def _rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    return {name: round(value, 6) if isinstance(value, float) else value for name, value in metrics.items()}


def _write_outputs(comparison: Comparison, scores, peft_model, output: Path) -> None:
    summary = {"task": comparison.task, "split_note": comparison.split_note, "scoring": comparison.scoring,
               "scope": comparison.scope,
               "sizes": comparison.sizes, "seconds": round(comparison.seconds, 1), "results": comparison.table(),
               "sweep_seconds": {sweep.method: round(sweep.seconds, 1) for sweep in comparison.sweeps}}
    (output / "results.json").write_text(json.dumps(summary, indent=2))
    write_sweep_csv(comparison.sweeps, output / "sweep.csv")
    try:
        from .plots import plot_au_locations, plot_sweep_heatmap

        for sweep in comparison.sweeps:
            if sweep.method.startswith("AUSteer"):
                plot_sweep_heatmap(sweep, output / f"heatmap_{sweep.method.removeprefix('AUSteer-')}.png")
        austeer = {name: peft_model.get_aus(name) for name in peft_model.peft_config if name.startswith("austeer_")}
        plot_au_locations(austeer, scores.modules, output / "au_locations.png")
    except ImportError as error:
        warnings.warn(f"No figures written: {error}", stacklevel=2)
