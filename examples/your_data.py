"""Your own multiple-choice data, end to end with `austeer sweep`: two files, each row with its own answers.

A user's data set often looks like this: ``train.jsonl`` and ``test.jsonl`` with rows
``{"prompt": ..., "choices": [" 51", " 27", " 8"], "answer": 0}`` and three to five choices per row. This example
writes such a pair of files from SVAMP (real math word problems, read from ../shared/data or $AUSTEER_DATA: each
problem's answer among two to four wrong answers, the answers of other problems, in a seeded order) and runs

    austeer sweep --data fit=train.jsonl test=test.jsonl --template "{prompt}" \\
        --choices-column choices --label-column answer --output OUT

which carves the validation split out of the fit file (the note says so), scores every row among its own choices
(summed log-probability, as rows differ in length), sweeps (k, α), and writes results.json, the adapters and the
figures. ``--quick``: 24 fit and 16 validation examples, 24 test examples, a 2 x 2 grid on the ffn site.

    python examples/your_data.py [--model smollm2-135m] [--quick] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from austeer_peft.cli import main as austeer
from austeer_peft.evaluate.tasks import format_number, resolve_data_dir

TEMPLATE = "Solve the math word problem and give the number only.\n\nQuestion: {problem}\nAnswer:"


def write_files(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl (700 problems) and test.jsonl (300), as in the paper's SVAMP split, with 3-5 choices per row."""
    problems = json.loads((resolve_data_dir() / "SVAMP" / "SVAMP.json").read_text())
    rng = np.random.default_rng(seed)
    answers = [format_number(p["Answer"]) for p in problems]
    rows = []
    for problem, answer in zip(problems, answers):
        others = sorted(set(answers) - {answer})
        wrong = [others[i] for i in rng.choice(len(others), size=int(rng.integers(2, 5)), replace=False)]
        choices = [answer, *wrong]
        order = rng.permutation(len(choices))
        rows.append({"prompt": TEMPLATE.format(problem=f"{problem['Body'].strip()} {problem['Question'].strip()}"),
                     "choices": [" " + choices[i] for i in order], "answer": int(np.argsort(order)[0])})
    order = rng.permutation(len(rows))
    paths = folder / "train.jsonl", folder / "test.jsonl"
    for path, part in zip(paths, (order[:700], order[700:])):
        path.write_text("".join(json.dumps(rows[i]) + "\n" for i in part))
    return paths


def run(model: str, quick: bool, workdir: Path) -> dict:
    train, test = write_files(workdir)
    output = workdir / "sweep"
    arguments = ["sweep", "--model", model, "--data", f"fit={train}", f"test={test}", "--template", "{prompt}",
                 "--choices-column", "choices", "--label-column", "answer", "--output", str(output), "--force"]
    if quick:
        arguments += ["--n-fit", "24", "--n-validation", "16", "--n-test", "24", "--sites", "ffn", "--ks", "1", "4",
                      "--alphas", "5", "20", "--batch-size", "8"]
    status = austeer(arguments)
    if status != 0:
        raise SystemExit(status)
    summary = json.loads((output / "results.json").read_text())
    lengths = [len(json.loads(line)["choices"]) for line in train.read_text().splitlines()]
    print(f"Your data: {train.name} + {test.name}, {min(lengths)}-{max(lengths)} choices per row; splits "
          f"{summary['sizes']}; scoring {summary['scoring']}; outputs in {output}")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", type=Path, help="where the two files and the outputs go (default: a temporary "
                                                     "folder, removed afterwards)")
    options = parser.parse_args()
    if options.workdir is not None:
        options.workdir.mkdir(parents=True, exist_ok=True)
        run(options.model, options.quick, options.workdir)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            run(options.model, options.quick, Path(scratch))
