"""`austeer export --format lora|ia3`: the exported adapters load with plain PEFT and reproduce the steering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import logits, tiny_model
from peft import PeftModel, get_peft_model
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from austeer_peft import AUSteerConfig
from austeer_peft.cli import main


@pytest.fixture
def folders(tmp_path):
    """A tiny base checkpoint with a toy tokenizer, an AUSteer adapter on it, and the steered logits' model."""
    tiny_model("llama").save_pretrained(tmp_path / "base")
    vocabulary = {f"t{i}": i for i in range(101)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="t0")),
                            eos_token="t2").save_pretrained(tmp_path / "base")
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites=["attention", "ffn"]))
    model.set_aus([(("attention", 0), 3, 1.5), (("attention", 0), 9, -0.25), (("ffn", 1), 2, 2.0)])
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path, model


@pytest.mark.parametrize("export_format", ["lora", "ia3"])
def test_export_writes_an_adapter_plain_peft_loads(folders, export_format, input_ids, capsys):
    tmp_path, model = folders
    args = ["export", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
            "--format", export_format, "--output", str(tmp_path / "out")]
    assert main(args) == 0
    out = capsys.readouterr().out
    size = (tmp_path / "out" / "adapter_model.safetensors").stat().st_size
    austeer_size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert f"adapter_model.safetensors: {size:,} bytes (the AUSteer adapter file: {austeer_size:,} bytes)" in out
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == export_format.upper()
    if export_format == "lora":
        assert "largest rank 2 over 2 weights; lora_alpha = rank, so the scaling is 1" in out
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    exported = PeftModel.from_pretrained(base, tmp_path / "out")
    torch.testing.assert_close(logits(exported, input_ids), logits(model, input_ids), rtol=0, atol=1e-5)


def test_export_errors_are_one_line(folders, capsys):
    tmp_path, _ = folders
    common = ["export", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    assert main([*common, "--format", "ia3", "--max-rank", "4", "--output", str(tmp_path / "a")]) == 1
    assert "--max-rank and --uniform-rank only apply to --format lora" in capsys.readouterr().err
    assert main([*common, "--format", "lora", "--max-rank", "1", "--output", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("austeer export: error: The LoRA export needs rank 2 on model.layers.0.self_attn.o_proj")
    assert not Path(tmp_path / "b").exists()
