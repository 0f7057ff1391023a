"""Figures of a sweep: the (k, α) accuracy heatmap (paper Figure 10) and where the selected AUs sit, layer by site
(paper Figure 11). Needs matplotlib (``pip install "austeer-peft[plots]"``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

from ..tuner.sites import SiteModule
from .sweep import SweepResult


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('Plots need matplotlib: pip install "austeer-peft[plots]" (or pip install matplotlib).') \
            from None
    return plt


def plot_sweep_heatmap(sweep: SweepResult, path: Union[str, Path], title: Optional[str] = None) -> Path:
    """Validation accuracy of every (k, α) cell, the shipped and the most accurate cell outlined, vanilla in the
    title."""
    plt = _pyplot()
    ks = sorted({cell.k for cell in sweep.cells})
    alphas = sorted({cell.alpha for cell in sweep.cells})
    grid = [[float("nan")] * len(alphas) for _ in ks]
    for cell in sweep.cells:
        grid[ks.index(cell.k)][alphas.index(cell.alpha)] = 100 * cell.accuracy
    figure, axes = plt.subplots(figsize=(1.0 + 0.8 * len(alphas), 1.0 + 0.5 * len(ks)))
    image = axes.imshow(grid, cmap="viridis", aspect="auto")
    for row, k in enumerate(ks):
        for column, alpha in enumerate(alphas):
            axes.text(column, row, f"{grid[row][column]:.1f}", ha="center", va="center", fontsize=7, color="white")
    # Red: the cell that ships; dashed white: the most accurate cell when it is another one (or nothing ships).
    shipped = sweep.chosen if sweep.selection is not None else None
    for cell, style in ((sweep.best, {"edgecolor": "white", "linestyle": "--"}), (shipped, {"edgecolor": "red"})):
        if cell is not None:
            axes.add_patch(plt.Rectangle((alphas.index(cell.alpha) - 0.5, ks.index(cell.k) - 0.5), 1, 1, fill=False,
                                         linewidth=2, **style))
    axes.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    axes.set_yticks(range(len(ks)), [str(k) for k in ks])
    axes.set_xlabel("α")
    axes.set_ylabel("k (steered AUs)")
    vanilla = f"vanilla {100 * sweep.vanilla.accuracy:.1f} %" if sweep.vanilla is not None else ""
    shipped_note = "" if sweep.selection is None or sweep.selection.shipped else "; no steer shipped"
    axes.set_title(title or f"{sweep.method}: validation accuracy (%) on {sweep.num_examples}\n{vanilla}{shipped_note}",
                   fontsize=9)  # two lines: one is wider than the figure
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_au_locations(aus_by_method: Mapping[str, Sequence], modules: Sequence[SiteModule],
                      path: Union[str, Path]) -> Path:
    """How many selected AUs each (site, layer) holds, one panel row per method (AUs as ``AU``/``(module, dim, γ)``)."""
    plt = _pyplot()
    by_name = {m.name: m for m in modules}
    layers = sorted({m.layer for m in modules if m.layer is not None})
    figure, all_axes = plt.subplots(len(aus_by_method), 1, squeeze=False,
                                    figsize=(max(6.0, 0.25 * len(layers) + 2), 1.6 * len(aus_by_method) + 0.6))
    for axes, (method, aus) in zip(all_axes[:, 0], aus_by_method.items()):
        sites = []
        counts: dict[tuple[str, int], int] = {}
        for au in aus:
            module = by_name[au[0]]
            site = module.site or module.name
            if site not in sites:
                sites.append(site)
            counts[site, module.layer] = counts.get((site, module.layer), 0) + 1
        if not aus:  # nothing shipped for this method
            axes.set_axis_off()
            axes.set_title(f"{method}: no steer shipped", fontsize=9)
            continue
        grid = [[counts.get((site, layer), 0) for layer in layers] for site in sites]
        axes.imshow(grid, cmap="Blues", aspect="auto", vmin=0)
        for row, site in enumerate(sites):
            for column, layer in enumerate(layers):
                if grid[row][column]:
                    axes.text(column, row, str(grid[row][column]), ha="center", va="center", fontsize=7)
        axes.set_yticks(range(len(sites)), sites)
        axes.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
        axes.set_title(f"{method}: {len(aus)} AUs", fontsize=9)
    all_axes[-1, 0].set_xlabel("layer")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
