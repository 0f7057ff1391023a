"""The README's main job runs end to end (its quick mode: 32 fit pairs, 32 test examples, real SmolLM2)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_end_to_end():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.strip().startswith("vanilla") and "%" in line for line in lines)
    assert any("AUSteer ffn k=1" in line and "%" in line for line in lines)
    assert "adapter" in lines[-1] and "bytes" in lines[-1]
