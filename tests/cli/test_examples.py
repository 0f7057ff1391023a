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
