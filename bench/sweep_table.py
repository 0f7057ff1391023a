"""Markdown table of one or more `austeer sweep` runs (their results.json), as pasted into bench/RESULTS.md.

    python bench/sweep_table.py out-sst2/results.json out-copa/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(path: Path) -> str:
    summary = json.loads(path.read_text())
    sizes = summary["sizes"]
    lines = [f"**{summary['task']}** — fit {sizes['fit']}, validation {sizes['validation']}, test {sizes['test']}; "
             f"scoring `{summary['scoring']}`; {summary['split_note']} Whole run {summary['seconds'] / 60:.0f} min.",
             "",
             "| method | #steered | test accuracy (95 % CI) | p vs vanilla | greedy (paper metric) | validation | "
             "adapter bytes | fit s | chosen | answers (% of test) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["results"]:
        settings = row["settings"]
        if "blocks" in settings:
            chosen = f"{len(settings['blocks'])} blocks, α={settings['alpha']:g}"
        elif "layer" in settings:
            chosen = f"layer {settings['layer']}, ×{settings['multiplier']:g}"
        elif settings:
            chosen = f"k={settings['k']}, α={settings['alpha']:g}"
        else:
            chosen = ""
        p_value = "" if row["p_vs_vanilla"] is None else f"{row['p_vs_vanilla']:.2g}"
        greedy = row.get("also_greedy")
        lines.append(f"| {row['method']} | {row['steered']} | {row['test_accuracy']:.1f} ({row['ci_low']:.1f}–"
                     f"{row['ci_high']:.1f}) | {p_value} | {'' if greedy is None else f'{greedy:.1f}'} | "
                     f"{row['validation_accuracy']:.0f} | {row['adapter_bytes']} | {row['fit_seconds']:.0f} | "
                     f"{chosen} | {answers(row.get('predicted'))} |")
    return "\n".join(lines)


def answers(shares) -> str:
    """"yes 62 · no 38": how often each choice was the answer (runs before this column existed show nothing)."""
    if not shares:
        return ""
    return " · ".join(f"{name.strip()} {share:.0f}" for name, share in shares.items())


if __name__ == "__main__":
    print("\n\n".join(table(Path(p)) for p in sys.argv[1:]))
