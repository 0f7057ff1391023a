"""Files written before the layout change load after it: the adapter (adapter_config.json + the AU table) and the
momentum scores file, written by the flat-layout code (tests/data/written-before-the-layout-change/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_model
from peft import PeftModel

from austeer_peft import MomentumScores

OLD = Path(__file__).resolve().parent / "data" / "written-before-the-layout-change"


def test_an_adapter_saved_before_the_layout_change_loads_with_the_same_aus():
    expected = json.loads((OLD / "expected.json").read_text())["aus"]
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), OLD / "adapter")
    loaded = peft_model.get_aus()
    assert [(au.module, au.dim) for au in loaded] == [(module, dim) for module, dim, _ in expected]
    assert [au.gamma for au in loaded] == pytest.approx([gamma for *_, gamma in expected], rel=1e-6)


def test_a_scores_file_written_before_the_layout_change_loads_and_selects_the_same_adapter():
    expected = json.loads((OLD / "expected.json").read_text())
    scores = MomentumScores.load(OLD / "scores.safetensors")
    assert scores.num_pairs == expected["num_pairs"] == 12
    for module, counts in expected["n_pos"].items():
        assert scores.n_pos[module].tolist() == counts
    selected = sorted(scores.select(6, 10.0))
    old = sorted(tuple(au) for au in expected["aus"])
    assert [(au.module, au.dim) for au in selected] == [(module, dim) for module, dim, _ in old]
    assert [au.gamma for au in selected] == pytest.approx([gamma for *_, gamma in old], rel=1e-6)
