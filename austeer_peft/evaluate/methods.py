"""What every method of the comparison shares: its row (:class:`MethodResult`), turning a selected sweep into that
row, the size of what it ships, and the sweep of methods that add fixed vectors instead of scaling AUs (CAA's
relatives: ITI, the fixed-vector ablation), which cannot be an AUSteer adapter.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from ..fitting.selection import Selection
from ..hub.export import save_adapter_folder
from ..hub.facts import attach_card_info
from .baselines import added_vectors
from .runner import SplitResult, evaluate_split
from .sweep import SweepCell, SweepResult, select_cell
from .tasks import Task
from .tasks.base import CHAT_TEMPLATE_CARD_LINE

Vectors = dict[str, tuple[str, torch.Tensor]]  # module -> (side, vector [width]), see baselines.added_vectors


@dataclass
class MethodResult:
    """One row of the comparison table."""

    method: str
    num_steered: int  # steered activations (AUs, or dimensions of the added vector)
    test: SplitResult
    adapter_bytes: int  # size of the saved steering file (0 for vanilla)
    fit_seconds: float  # the pass(es) over the pairs this method needs (0 for vanilla)
    validation_accuracy: Optional[float] = None
    settings: dict[str, Any] = field(default_factory=dict)
    selection: Optional[Selection] = None  # how the shipped setting was chosen (None for vanilla)

    @property
    def shipped(self) -> bool:
        """False when the selection found no setting that beats vanilla: the row then is the unsteered model."""
        return self.selection is None or self.selection.shipped


def method_result(sweep: SweepResult, test: Callable[[], SplitResult], vanilla_test: SplitResult,
                  adapter_bytes: Callable[[SplitResult], int], fit_seconds: float,
                  settings: Callable[[SweepCell], dict]) -> MethodResult:
    """The row of a swept method: its shipped cell scored on test, or, when nothing ships, the unsteered model
    (``test``, ``adapter_bytes`` (given the test result, for the card) and ``settings`` are called only for a shipped
    cell)."""
    chosen = sweep.chosen
    if chosen is None:
        return MethodResult(sweep.method, 0, vanilla_test, 0, fit_seconds, sweep.vanilla.accuracy, {},
                            sweep.selection)
    result = test()
    return MethodResult(sweep.method, chosen.num_aus, result, adapter_bytes(result), fit_seconds, chosen.accuracy,
                        settings(chosen), sweep.selection)


def adapter_bytes(peft_model, adapter_name: str, output: Optional[Path], task: Task, test: SplitResult,
                  vanilla_test: SplitResult) -> int:
    """Size of the adapter's weights file as saved: into ``output/adapters/<name>/`` with its own card, which shows
    its test score next to the plain model's, or into a temporary folder."""
    attach_card_info(peft_model, adapter_name=adapter_name, eval_results=[{
        "task": task.name, "metric": f"accuracy ({test.scoring})", "value": test.accuracy,
        "baseline": vanilla_test.accuracy, "split": "test"}],
        prompt_format=CHAT_TEMPLATE_CARD_LINE if task.metadata.get("chat_template") else None)
    with tempfile.TemporaryDirectory() as scratch:
        folder = output / "adapters" / adapter_name if output is not None else Path(scratch)
        save_adapter_folder(peft_model, adapter_name, folder)
        return (folder / "adapter_model.safetensors").stat().st_size


def vectors_bytes(vectors: Vectors, name: str, output: Optional[Path]) -> int:
    """Size of the added vectors as one safetensors file (only their nonzero entries: index and value per module)."""
    from safetensors.torch import save_file

    tensors = {}
    for module, (side, vector) in vectors.items():
        index = vector.nonzero().flatten()
        tensors[f"{module}.{side}.index"] = index.to(torch.int32)
        tensors[f"{module}.{side}.value"] = vector[index].float().contiguous()
    with tempfile.TemporaryDirectory() as scratch:
        path = (output / "adapters" if output is not None else Path(scratch)) / f"{name}.safetensors"
        save_file(tensors, str(path))
        return path.stat().st_size


def num_added(vectors: Vectors) -> int:
    """Steered activations of an additive steer: the nonzero entries of its vectors."""
    return sum(int(vector.count_nonzero()) for _, vector in vectors.values())


def sweep_added(model, tokenizer, task, cells: Sequence[tuple[Any, float, Vectors]], method: str,
                vanilla_validation: SplitResult, *, scoring: Optional[str], batch_size: int, scope: str,
                selection: str, axes: tuple[str, str], progress: bool) -> tuple[SweepResult, Optional[Vectors]]:
    """Score every ``(setting, strength, vectors)`` cell on the validation split with the vectors added (adapters
    off), select by ``selection`` (simplest: fewest steered activations, then the smaller strength); returns the
    sweep and the shipped vectors (None when nothing ships)."""
    from ..fitting.inputs import unsteered

    started = time.perf_counter()
    scored = []
    with unsteered(model):
        for setting, strength, vectors in tqdm(cells, desc=f"sweep {method}", unit="cell", disable=not progress):
            with added_vectors(model, vectors, scope):
                result = evaluate_split(model, tokenizer, task, "validation", scoring, batch_size=batch_size)
            scored.append(SweepCell(setting, strength, result.accuracy, num_added(vectors), result.correct))
    sweep = SweepResult(method, scored, vanilla_validation, vanilla_validation.scoring,
                        len(vanilla_validation.correct), time.perf_counter() - started, axes=axes)
    select_cell(sweep, rule=selection)
    chosen = sweep.chosen
    shipped = None if chosen is None else \
        next(vectors for setting, strength, vectors in cells if (setting, strength) == (chosen.k, chosen.alpha))
    return sweep, shipped


def test_with_vectors(model, vectors: Vectors, scope: str, evaluate: Callable[[Any, str], SplitResult]
                      ) -> SplitResult:
    """The test split scored with ``vectors`` added and the model's adapters off."""
    from ..fitting.inputs import unsteered

    with unsteered(model), added_vectors(model, vectors, scope):
        return evaluate(model, "test")
