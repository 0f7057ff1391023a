"""lm-evaluation-harness on AUSteer adapters, offline: a local YAML task over COPA rows from ../shared/data, scored by
lm-eval (its Python route, HFLM(pretrained=peft_model), and `austeer lm-eval`, its command line) and by our `loglik`
scorer; both must mark the same rows correct, with and without the adapter."""

from __future__ import annotations

import json
import sys

import lm_eval  # noqa: F401  (the extra austeer-peft[lm-eval]; `make test` installs it)
import pytest
import torch
from conftest import DATA_DIR, char_tokenizer
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from austeer_peft import AUSteerConfig
from austeer_peft.cli import main
from austeer_peft.evaluate import load_task
from austeer_peft.evaluate.runner import evaluate_split


TASK = "austeer_copa_subset"
N_ROWS = 24


def task_yaml(data_file) -> str:
    # Columns as written by the test; target_delimiter "" so that each continuation is exactly our option string.
    return "\n".join([
        f"task: {TASK}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data_file}",
        "test_split: test", "output_type: multiple_choice", "doc_to_text: prompt", "doc_to_choice: choices",
        "doc_to_target: label", 'target_delimiter: ""', "metric_list:", "  - metric: acc", ""])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """COPA test rows as a JSON-lines file and an lm-eval task over it; a tiny Llama whose vocabulary is the
    character tokenizer's (so lm-eval resizes nothing) saved with that tokenizer; and an adapter for it."""
    root = tmp_path_factory.mktemp("lm_eval")
    task = load_task("copa", data_dir=DATA_DIR)
    task.test = task.test.select(range(N_ROWS))
    rows = [{"prompt": r["prompt"], "choices": r["choices"], "label": r["label"]} for r in task.test]
    data_file = root / "copa.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tasks").mkdir()
    (root / "tasks" / f"{TASK}.yaml").write_text(task_yaml(data_file))

    tokenizer = char_tokenizer()
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer),
                                  max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    peft_model = get_peft_model(model, AUSteerConfig(sites=["attention", "ffn"]))
    peft_model.set_aus([(("ffn", 1), d, 8.0) for d in range(0, 32, 3)] + [(("attention", 0), 5, -0.9)])
    peft_model.save_pretrained(root / "adapter")
    return root, task, tokenizer


def ours(root, task, tokenizer, adapter: bool) -> list[bool]:
    model = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    if adapter:
        model = PeftModel.from_pretrained(model, root / "adapter")
    return evaluate_split(model, tokenizer, task, "test", "loglik", batch_size=8).correct


def per_row(samples: list[dict]) -> list[bool]:
    return [bool(s["acc"]) for s in sorted(samples, key=lambda s: s["doc_id"])]


def test_python_route_matches_our_loglik_scorer(setup):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    root, task, tokenizer = setup
    results = {}
    for adapter in (False, True):
        model = AutoModelForCausalLM.from_pretrained(root / "base").eval()
        if adapter:
            model = PeftModel.from_pretrained(model, root / "adapter")
        out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8), tasks=[TASK],
                              task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False),
                              log_samples=True)
        results[adapter] = per_row(out["samples"][TASK])
        assert out["results"][TASK]["acc,none"] == pytest.approx(sum(results[adapter]) / N_ROWS)
        assert results[adapter] == ours(root, task, tokenizer, adapter)
    assert results[True] != results[False]  # the adapter changes answers, so the comparison covers steering


def test_command_line_matches_our_loglik_scorer(setup, tmp_path, capsys, monkeypatch):
    """lm-eval's command line indexes its ~6000 built-in task files first (over a minute on a loaded CI machine);
    this test only needs its own task, so lm-eval's TaskManager is told to skip them, as the Python route can."""
    import lm_eval.tasks

    task_manager_init = lm_eval.tasks.TaskManager.__init__
    monkeypatch.setattr(lm_eval.tasks.TaskManager, "__init__",
                        lambda self, *a, **kw: task_manager_init(self, *a, **{**kw, "include_defaults": False}))
    root, task, tokenizer = setup
    for adapter in (False, True):
        out = tmp_path / f"adapter-{adapter}"
        argv = ["lm-eval", "--model", str(root / "base"), "--tasks", TASK, "--include_path", str(root / "tasks"),
                "--device", "cpu", "--batch_size", "8", "--log_samples", "--output_path", str(out)]
        assert main(argv + (["--adapter", str(root / "adapter")] if adapter else [])) == 0
        samples = [json.loads(line) for f in out.rglob(f"samples_{TASK}_*.jsonl") for line in f.open()]
        assert len(samples) == N_ROWS
        assert per_row(samples) == ours(root, task, tokenizer, adapter)
    assert "acc" in capsys.readouterr().out  # lm-eval's own table


@pytest.mark.parametrize("extra, message", [
    (["--model_args", "pretrained=gpt2"], "pretrained=... is set by this command; use --model"),
    (["-a", "dtype=float16,batch_size=2"], "dtype=... is set by this command; use --dtype"),
    (["--model_args", '{"peft": "x"}'], "peft=... is set by this command; use --adapter"),
    (["-M", "vllm"], "-M is set by this command"),
    ([], "lm-eval needs --tasks"),
])
def test_arguments_this_command_sets_are_refused(extra, message, capsys):
    tasks = [] if not extra else ["--tasks", "x"]
    assert main(["lm-eval", "--model", "some/model", *tasks, *extra]) == 1
    assert message in capsys.readouterr().err


def test_missing_adapter_config_and_missing_lm_eval_are_clear_errors(tmp_path, capsys, monkeypatch):
    assert main(["lm-eval", "--model", "m", "--adapter", str(tmp_path), "--tasks", "x"]) == 1
    assert "has no adapter_config.json" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)  # as if lm-eval were not installed
    assert main(["lm-eval", "--model", "m", "--tasks", "x"]) == 1
    assert "pip install 'austeer-peft[lm-eval]'" in capsys.readouterr().err


def test_other_commands_still_refuse_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "some/adapter", "--tasks", "x"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --tasks x" in capsys.readouterr().err
