"""The (k, α) sweep: every cell of a grid is an adapter built from one MomentumScores table (no new momentum pass),
scored on a labelled validation split; the cell that ships is chosen by :mod:`austeer_peft.fitting.selection`.

That rule ships the simplest cell within one standard error of the best, and only when its choice, made without
each validation fold in turn, beats vanilla on that fold (one-sided sign test, p < 0.05); otherwise no steer ships
and the adapter steers nothing. The most accurate cell (the rule before) is kept as ``SweepResult.best``.

Default grid: k in {1, 4, 16, 64, 100} and α in {2, 5, 10, 20, 50}: 25 cells instead of the paper's 56 (k 1..100 × α
1..100), so a 4x larger validation split costs less than twice the time, and fewer cells compete on noise. α = 1 barely
moves any model here and α = 100 breaks the greedy answer in most cells measured (bench/RESULTS.md).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from .runner import SplitResult, evaluate_split
from .tasks import Task
from ..tuner.aus import AU
from ..fitting.inputs import unsteered
from ..fitting.scores import MomentumScores, check_alpha
from ..fitting.selection import Candidate, Selection, guarded_choice

DEFAULT_KS = (1, 4, 16, 64, 100)
DEFAULT_ALPHAS = (2, 5, 10, 20, 50)


@dataclass
class SweepCell:
    """One scored grid cell: ``num_aus`` steered activations at strength ``alpha``."""

    k: int
    alpha: float
    accuracy: float
    num_aus: int
    correct: list[bool] = field(repr=False)


@dataclass
class SweepResult:
    """All cells of one method's sweep on one split, in grid order, and the vanilla score on the same split."""

    method: str
    cells: list[SweepCell]
    vanilla: Optional[SplitResult]
    scoring: str
    num_examples: int
    seconds: float
    axes: tuple[str, str] = ("k", "alpha")  # what a cell's two settings are called (CAA: layer, multiplier)
    selection: Optional[Selection] = None  # filled by select_cell; None until then

    @property
    def best(self) -> SweepCell:
        """Most accurate cell (the rule before the guarded selection); ties: fewer steered activations, then α."""
        return max(self.cells, key=lambda cell: (cell.accuracy, -cell.num_aus, -cell.alpha))

    @property
    def chosen(self) -> Optional[SweepCell]:
        """The cell that ships, or None when no steer beats vanilla (see :func:`select_cell`)."""
        if self.selection is None:
            raise ValueError("This sweep has no selection yet; call select_cell(sweep) first.")
        return None if self.selection.chosen is None else self._cell(self.selection.chosen)

    def _cell(self, key: tuple) -> SweepCell:
        return next(cell for cell in self.cells if (cell.k, cell.alpha) == key)

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per cell, as written to ``sweep.csv``."""
        best, chosen = self.best, self.chosen if self.selection is not None else None
        first, second = self.axes
        return [{"method": self.method, first: cell.k, second: cell.alpha, "num_steered": cell.num_aus,
                 "accuracy": round(cell.accuracy, 6), "num_examples": self.num_examples, "scoring": self.scoring,
                 "most_accurate": cell is best, "shipped": cell is chosen} for cell in self.cells]


def select_cell(sweep: SweepResult, cost=lambda cell: (cell.num_aus, cell.alpha), rule: str = "guarded") -> Selection:
    """Decide which cell of ``sweep`` ships (or none) by ``rule`` (see :func:`~austeer_peft.fitting.selection.
    guarded_choice`), and record it on the sweep. ``cost`` orders the cells from simplest: fewer steered
    activations, then the smaller strength."""
    if sweep.vanilla is None:
        raise ValueError(f"Sweep {sweep.method!r} has no vanilla result to compare with.")
    candidates = [Candidate((cell.k, cell.alpha), cell.correct, cost(cell)) for cell in sweep.cells]
    sweep.selection = guarded_choice(candidates, sweep.vanilla.correct, rule=rule)
    return sweep.selection


def sweep_k_alpha(
    model: nn.Module,
    tokenizer: Any,
    scores: MomentumScores,
    task: Task,
    split: Union[str, Dataset] = "validation",
    ks: Sequence[int] = DEFAULT_KS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    scoring: Optional[str] = None,
    batch_size: int = 16,
    adapter_name: str = "default",
    method: str = "austeer",
    vanilla: Optional[SplitResult] = None,
    progress: bool = True,
    selection: str = "guarded",
):
    """Score every (k, α) cell on ``split`` and leave the cell that ships set on the returned PeftModel (no AUs when
    none ships: ``sweep.chosen`` is then None).

    ``model`` is the base model the scores were counted on, or a PeftModel holding it (``adapter_name`` is added or
    replaced). Values of ``k`` above the number of candidate AUs are dropped. ``vanilla`` (the unsteered result on
    the same split) is computed once if not given. Returns ``(SweepResult, peft_model)``.
    """
    ks = sorted({k for k in ks if k <= scores.num_aus})
    if not ks:
        raise ValueError(f"No k of the grid fits the {scores.num_aus} candidate AUs; use smaller values of k.")
    alphas = [check_alpha(alpha) for alpha in alphas]
    cells = [(k, alpha, scores.select(k, alpha)) for k in ks for alpha in alphas]
    peft_model = scores.to_adapter(ks[0], alphas[0], model, adapter_name=adapter_name)
    return _sweep(peft_model, tokenizer, task, split, cells, adapter_name, method, scoring, batch_size, vanilla,
                  progress, selection)


def sweep_aus(
    peft_model: nn.Module,
    tokenizer: Any,
    task: Task,
    cells: Sequence[tuple[int, float, list[AU]]],
    split: Union[str, Dataset] = "validation",
    *,
    adapter_name: str = "default",
    method: str = "austeer",
    scoring: Optional[str] = None,
    batch_size: int = 16,
    vanilla: Optional[SplitResult] = None,
    progress: bool = True,
    selection: str = "guarded",
):
    """Like :func:`sweep_k_alpha` for AU sets made by the caller (e.g. block-level steering): ``cells`` are
    ``(k, alpha, aus)``; ``peft_model`` already has the AUSteer adapter ``adapter_name``."""
    return _sweep(peft_model, tokenizer, task, split, list(cells), adapter_name, method, scoring, batch_size, vanilla,
                  progress, selection)


def _sweep(peft_model, tokenizer, task, split, cells, adapter_name, method, scoring, batch_size, vanilla, progress,
           selection):
    started = time.perf_counter()
    if vanilla is None:
        with unsteered(peft_model):
            vanilla = evaluate_split(peft_model, tokenizer, task, split, scoring, batch_size=batch_size)
    scored = []
    for k, alpha, aus in tqdm(cells, desc=f"sweep {method}", unit="cell", disable=not progress):
        peft_model.set_aus(aus, adapter_name=adapter_name)
        result = evaluate_split(peft_model, tokenizer, task, split, scoring, batch_size=batch_size)
        scored.append(SweepCell(k, alpha, result.accuracy, len(aus), result.correct))
    sweep = SweepResult(method, scored, vanilla, vanilla.scoring, len(vanilla.correct),
                        time.perf_counter() - started)
    select_cell(sweep, rule=selection)
    chosen = sweep.chosen
    chosen_aus = [] if chosen is None else \
        next(aus for k, alpha, aus in cells if (k, alpha) == (chosen.k, chosen.alpha))
    peft_model.set_aus(chosen_aus, adapter_name=adapter_name)
    if chosen is not None:
        config = peft_model.peft_config[adapter_name]
        config.k, config.alpha = chosen.k, chosen.alpha
    return sweep, peft_model


def scores_for_sites(scores: MomentumScores, sites: Union[str, Sequence[str]]) -> MomentumScores:
    """The part of a momentum table that lies on ``sites`` (one pass over several sites serves one sweep per site)."""
    sites = [sites] if isinstance(sites, str) else list(sites)
    if scores.sites is None or not set(sites) <= set(scores.sites):
        raise ValueError(f"These scores were counted on sites={scores.sites}, not on {sites}.")
    modules = [m for m in scores.modules if m.site in sites]
    return MomentumScores(modules=modules, n_pos={m.name: scores.n_pos[m.name] for m in modules},
                          n_neg={m.name: scores.n_neg[m.name] for m in modules}, num_pairs=scores.num_pairs,
                          model_type=scores.model_type, sites=[s for s in scores.sites if s in sites])


def write_sweep_csv(sweeps: Sequence[SweepResult], path: Union[str, Path]) -> Path:
    """All cells of all sweeps in one CSV (one row per method and cell, with the vanilla score of its split)."""
    path = Path(path)
    rows = []
    for sweep in sweeps:
        vanilla = sweep.vanilla.accuracy if sweep.vanilla is not None else None
        rows += [{**row, "vanilla_accuracy": None if vanilla is None else round(vanilla, 6)} for row in sweep.rows()]
    columns = list(dict.fromkeys(column for row in rows for column in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
