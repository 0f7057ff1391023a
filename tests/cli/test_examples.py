"""Examples run end to end: the README's main job (quick mode: 32 fit pairs, 32 test examples, real SmolLM2) and the
offline tiny-model examples for quantized and MoE models."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_example(name: str, *arguments: str) -> list[str]:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *arguments], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


@pytest.mark.real
def test_quickstart_runs_end_to_end():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.strip().startswith("vanilla") and "%" in line for line in lines)
    assert any("AUSteer ffn k=1" in line and "%" in line for line in lines)
    assert "adapter" in lines[-1] and "bytes" in lines[-1]


def test_quantized_4bit_example_fits_loads_steers_and_merges():
    lines = run_example("quantized_4bit.py", "--quant-type", "fp4")
    figures = {}
    for line in lines:
        label, _, value = line.strip().rpartition(" ")
        if value.replace(".", "").replace("e-", "").replace("e+", "").isdigit():
            figures[label.split("(")[0].strip()] = float(value)
    # The re-quantization error of a merge is far below the steering it keeps.
    assert figures["steered vs unsteered 4-bit"] > 2 * figures["merged vs unmerged steered 4-bit"] > 0
    assert any("bit-identical" in line for line in lines)
    assert lines[-1].startswith("fit on the 4-bit model:")


def test_moe_example_fits_steers_and_merges_exactly():
    lines = run_example("moe.py")
    assert any(line.strip().startswith("expert-level AU") for line in lines)
    assert "unmerge restores every weight bit-exactly: True" in lines[-2]
    assert "reloads identically" in lines[-1]


def _your_data_example(tmp_path, model: str, capsys) -> tuple[list[str], dict]:
    """Run examples/your_data.py in this process (its `run`, as `python examples/your_data.py --quick` does)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads, and loses much on a busy machine
    try:
        return _run_your_data(tmp_path, model, capsys)
    finally:
        torch.set_num_threads(threads)


def _run_your_data(tmp_path, model: str, capsys) -> tuple[list[str], dict]:
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("your_data", ROOT / "examples" / "your_data.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    (tmp_path / "work").mkdir()
    example.run(model, quick=True, workdir=tmp_path / "work")
    lines = capsys.readouterr().out.splitlines()
    return lines, json.loads((tmp_path / "work" / "sweep" / "results.json").read_text())


def _check_your_data_run(lines: list[str], summary: dict) -> None:
    assert summary["sizes"] == {"fit": 24, "validation": 16, "test": 24} and summary["scoring"] == "loglik"
    assert "16 of the 700 fit examples were carved out for validation" in summary["split_note"]
    assert summary["chat_template"] is False and summary["data"][0].startswith("fit=")
    methods = [row["method"] for row in summary["results"]]
    assert methods[:2] == ["vanilla", "AUSteer-ffn"] and {"block-level", "CAA"} <= set(methods)
    assert lines[-1].startswith("Your data: train.jsonl + test.jsonl, 3-5 choices per row;")


def test_your_data_example_sweeps_two_files_with_per_row_choices(tmp_path, capsys):
    """`austeer sweep` on train.jsonl + test.jsonl with 3-5 choices per row, end to end (a tiny model, for speed)."""
    from conftest import tiny_checkpoint

    _check_your_data_run(*_your_data_example(tmp_path, str(tiny_checkpoint(tmp_path / "model")), capsys))


