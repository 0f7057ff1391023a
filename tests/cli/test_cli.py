"""The `austeer` command line (merge, push, inspect), `python -m austeer_peft.cli`, and the examples."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from austeer_peft import AUSteerConfig
from austeer_peft.cli import COMMANDS, Command, main, register_command

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def saved_adapter(folder: Path, family: str = "llama"):
    model = get_peft_model(tiny_model(family), AUSteerConfig(sites=["attention", "ffn"], k=3, alpha=4.0))
    model.set_aus([(("attention", 0), 3, 1.5), (("attention", 0), 9, -0.25), (("ffn", 1), 2, 2.0)])
    model.save_pretrained(folder)
    return model


def base_folder(folder: Path, family: str = "llama") -> Path:
    """A tiny base checkpoint with a toy tokenizer, as `austeer merge --model` needs one."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tiny_model(family).save_pretrained(folder)
    vocabulary = {f"t{i}": i for i in range(101)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="t0")),
                            eos_token="t2").save_pretrained(folder)
    return folder


def run_module(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def test_help_lists_commands_and_a_workflow(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("merge", "push", "inspect"):
        assert name in out
    assert "Typical workflow" in out and "austeer merge --model smollm2-135m" in out


def test_sweep_runs_the_papers_baselines_with_a_scope_and_exact_match(tmp_path, capsys):
    model = str(real_task_model_folder(tmp_path / "model"))
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", model, *SLICE, "--sites", "attention", "--ks", "1", "--alphas", "5",
                 "--baselines", "iti", "sadi", "fixed-strength", "--scope", "generated", "--scoring", "exact",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "scoring exact; scope generated" in printed
    summary = json.loads((out / "results.json").read_text())
    assert (summary["scope"], summary["scoring"]) == ("generated", "exact")
    assert [row["method"] for row in summary["results"]] == \
        ["vanilla", "AUSteer-attention", "ITI", "SADI-HEAD", "ablation fixed strength (attention)"]
    assert all({"also_restricted", "also_greedy"} <= set(row) for row in summary["results"])
    with pytest.raises(SystemExit):
        main(["sweep", *SLICE, "--scope", "prompt", "--output", str(tmp_path / "x")])
    assert "invalid choice: 'prompt'" in capsys.readouterr().err


@pytest.mark.parametrize("command, expected", [
    ("merge", ["--model", "--adapter", "--output", "smollm2-135m", "austeer-peft", "residual"]),
    ("push", ["--adapter", "--repo-id", "--private", "README.md"]),
    ("inspect", ["adapter", "--all", "--json"]),
])
def test_each_command_has_help(capsys, command, expected):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert all(text in out for text in expected), out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "Typical workflow" in capsys.readouterr().out


def test_inspect_prints_config_aus_and_size(tmp_path, capsys):
    saved_adapter(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert "sites:      attention, ffn" in out and "k, alpha:   3, 4" in out
    assert f"adapter_model.safetensors, {size:,} bytes" in out
    assert "steered:    3 AUs in 2 modules" in out
    assert "layer   0: attention 2" in out and "layer   1: ffn 1" in out
    assert re.search(r"model\.layers\.0\.self_attn\.o_proj +width +32 +2 AUs +3: \+1\.5, 9: -0\.25\n", out)
    assert re.search(r"model\.layers\.1\.mlp +width +32 +1 AU +2: \+2\n", out)


def test_inspect_json(tmp_path, capsys):
    model = saved_adapter(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["peft_type"] == "AUSTEER" and report["config"]["k"] == 3
    assert [(a["module"], a["dim"], a["gamma"]) for a in report["aus"]] == [tuple(au) for au in model.get_aus()]


def test_inspect_truncates_long_modules(tmp_path, capsys):
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites="attention"))
    model.set_aus([(("attention", 1), d, 0.5) for d in range(12)])
    model.save_pretrained(tmp_path)
    main(["inspect", str(tmp_path)])
    assert "... 4 more (--all)" in capsys.readouterr().out
    main(["inspect", str(tmp_path), "--all"])
    assert "11: +0.5" in capsys.readouterr().out


def test_inspect_unknown_adapter_is_one_line_error(tmp_path, capsys):
    assert main(["inspect", "nobody/nothing-here"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("austeer inspect: error:") and "neither a local folder nor a Hub repository" in err


def test_merge_writes_a_plain_checkpoint(tmp_path, capsys, input_ids):
    base = base_folder(tmp_path / "base")
    model = saved_adapter(tmp_path / "adapter")
    with torch.no_grad():
        steered = model(input_ids).logits
    assert main(["merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"),
                 "--output", str(tmp_path / "merged")]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, steered, rtol=0, atol=1e-5)


def test_merge_errors_are_one_line(tmp_path, capsys):
    base = base_folder(tmp_path / "base")
    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites=["residual"]))
    model.set_aus([(("residual", 0), 1, 1.0)])
    model.save_pretrained(tmp_path / "residual")
    assert main(["merge", "--model", str(base), "--adapter", str(tmp_path / "residual"),
                 "--output", str(tmp_path / "out")]) == 1
    assert "residual" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["merge", "--model", str(base), "--adapter", str(tmp_path / "residual"),
                 "--output", str(tmp_path / "full")]) == 1
    assert "is not empty; pass --force" in capsys.readouterr().err


def test_commands_can_be_added(capsys):
    def add_arguments(parser):
        parser.add_argument("--n", type=int, default=1)

    def run(args):
        print(f"ran with n={args.n}")
        return 0

    register_command(Command("hello", "say hello", "A test command.", add_arguments, run))
    try:
        assert main(["hello", "--n", "3"]) == 0
        assert "ran with n=3" in capsys.readouterr().out
    finally:
        del COMMANDS["hello"]


def test_python_m_austeer_peft_cli(tmp_path):
    saved_adapter(tmp_path / "adapter")
    done = run_module("-m", "austeer_peft.cli", "inspect", str(tmp_path / "adapter"))
    assert done.returncode == 0 and "3 AUs in 2 modules" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("example, expected", [
    ("hub.py", "AutoPeftModelForCausalLM.from_pretrained loads base and adapter: same logits"),
    ("merge_for_serving.py", "Plain transformers (austeer_peft imported: False)"),
])
def test_examples_run_offline(tmp_path, example, expected):
    done = run_module(str(ROOT / "examples" / example), "--workdir", str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in done.stdout


# ---------------------------------------------------------------------------------------------------- fit, eval, sweep


def real_task_model_folder(folder: Path) -> Path:
    """A tiny Llama and a word-level tokenizer over the words of a 48-example slice of SST-2 (fit, validation and
    test: 16 each), saved as a checkpoint `--model` can take, so the CLI runs end to end on real data in seconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    from austeer_peft.evaluate import load_task

    task = load_task("sst2", n_fit=16, n_validation=16)
    texts = [*task.fit["prompt"], *task.validation["prompt"], *task.test.select(range(16))["prompt"], *task.choices]
    vocabulary = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    splitter = pre_tokenizers.Whitespace()
    for text in texts:
        for word, _ in splitter.pre_tokenize_str(text):
            vocabulary.setdefault(word, len(vocabulary))
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  vocab_size=len(vocabulary), max_position_embeddings=128, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


SLICE = ["--task", "sst2", "--n-fit", "16", "--n-validation", "16", "--n-test", "16", "--batch-size", "8"]


def test_sweep_fit_eval_end_to_end_on_a_real_task_slice(tmp_path, capsys):
    model = str(real_task_model_folder(tmp_path / "model"))
    out = tmp_path / "sweep"
    # The old rule (the most accurate cell, unchecked) so that every method ships and the files can be compared;
    # the guarded default is tested in tests/test_sweep.py.
    assert main(["sweep", "--model", model, *SLICE, "--ks", "1", "4", "--alphas", "5", "50",
                 "--selection", "most-accurate", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    for method in ("vanilla", "AUSteer-attention", "AUSteer-ffn", "block-level", "CAA"):
        assert method in printed
    assert "Test scored on its first 16 examples only." in printed
    assert "answers (% of test)" in printed and "positive" in printed.split("answers (% of test)")[1]
    summary = json.loads((out / "results.json").read_text())
    assert summary["sizes"] == {"fit": 16, "validation": 16, "test": 16}
    assert [row["method"] for row in summary["results"]][:3] == ["vanilla", "AUSteer-attention", "AUSteer-ffn"]
    expected = {"results.json", "sweep.csv", "scores.safetensors", "adapters", "heatmap_attention.png",
                "heatmap_ffn.png", "au_locations.png"}
    assert expected <= {p.name for p in out.iterdir()}

    # `austeer eval` of the saved best ffn adapter reproduces the sweep's test accuracy.
    ffn = next(row for row in summary["results"] if row["method"] == "AUSteer-ffn")
    assert main(["eval", "--model", model, *SLICE, "--adapter", str(out / "adapters" / "austeer_ffn"),
                 "--output", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert round(100 * evaluated["results"]["adapter"]["accuracy"], 2) == ffn["test_accuracy"]
    assert round(100 * evaluated["results"]["vanilla"]["accuracy"], 2) == summary["results"][0]["test_accuracy"]
    assert "paired test vs vanilla" in capsys.readouterr().out
    # Both report how often each choice was the answer, the same way.
    for name, row in (("vanilla", summary["results"][0]), ("adapter", ffn)):
        shares = evaluated["results"][name]["predicted"]
        assert {c: round(100 * v, 1) for c, v in shares.items()} == row["predicted"]

    # `austeer fit` with the sweep's best (k, α) on the same pairs gives the same AUs.
    assert main(["fit", "--model", model, *SLICE, "--sites", "ffn", "--k", str(ffn["settings"]["k"]),
                 "--alpha", str(ffn["settings"]["alpha"]), "--selection", "most-accurate",
                 "--output", str(tmp_path / "fit")]) == 0
    fitted = json.loads((tmp_path / "fit" / "results.json").read_text())
    swept = json.loads((out / "adapters" / "austeer_ffn" / "adapter_config.json").read_text())
    assert fitted["num_pairs"] == 16 and fitted["adapter_bytes"] > 0
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "fit" / "adapter" / "adapter_model.safetensors")["austeer_table_index"],
                       load_file(out / "adapters" / "austeer_ffn" / "adapter_model.safetensors")["austeer_table_index"])
    assert swept["k"] == ffn["settings"]["k"]


def test_fit_with_automatic_k_and_alpha_reports_its_checks_and_writes_only_a_steer_that_passes(tmp_path, capsys):
    model = str(real_task_model_folder(tmp_path / "model"))
    out = tmp_path / "fit"
    assert main(["fit", "--model", model, *SLICE, "--sites", "ffn", "--k", "auto", "--alpha", "auto",
                 "--output", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    printed = capsys.readouterr().out
    assert summary["sizes"] == {"fit": 16, "validation": 16, "test": 16}
    assert summary["auto"]["num_examples"] == 16 and summary["auto"]["rule"] == "guarded"  # every pair held out once
    assert (out / "scores.safetensors").exists()
    if summary["shipped"]:  # passed both the held-out pairs' check and the validation check
        assert summary["auto"]["shipped"] and summary["selection"]["shipped"] and (out / "adapter").is_dir()
    else:
        assert not (out / "adapter").exists() and "No adapter written" in printed
        assert "no steer beats vanilla on this data" in printed
    with pytest.raises(SystemExit):
        main(["fit", "--model", model, *SLICE, "--k", "many", "--output", str(tmp_path / "bad")])
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_task_arguments_are_checked(tmp_path, capsys):
    assert main(["fit", "--output", str(tmp_path / "a")]) == 1
    assert "give either --task" in capsys.readouterr().err
    assert main(["fit", "--data", "x.jsonl", "--output", str(tmp_path / "b")]) == 1
    assert "--data needs --template" in capsys.readouterr().err
    assert main(["eval", "--task", "nope"]) == 1
    assert "Unknown task 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("command, expected", [
    ("fit", ["--sites", "--k", "--alpha", "--task", "--data", "--template", "austeer fit --task sst2"]),
    ("eval", ["--adapter", "--split", "--scoring", "greedy", "paired"]),
    ("sweep", ["--ks", "--alphas", "--baselines", "block-level", "CAA", "heatmap", "--scope", "SADI-HEAD", "exact"]),
])
def test_job_commands_have_help(capsys, command, expected):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert all(text in out for text in expected), out


def test_defaults_come_from_the_library(capsys):
    """Sites, k, α, the sweep grid and the task list are read from the library, not repeated in the CLI."""
    from austeer_peft import SITES
    from austeer_peft.evaluate.sweep import DEFAULT_ALPHAS, DEFAULT_KS
    from austeer_peft.evaluate.tasks import TASK_NAMES
    from austeer_peft.cli import build_parser

    parser = build_parser()
    fit = parser.parse_args(["fit", "--task", "copa", "--output", "x"])
    config = AUSteerConfig()
    assert (fit.sites, fit.k, fit.alpha) == (config.sites, config.k, config.alpha) == (["attention"], 100, 15.0)
    sweep = parser.parse_args(["sweep", "--task", "copa", "--output", "x"])
    assert sweep.ks == list(DEFAULT_KS) and sweep.alphas == list(DEFAULT_ALPHAS)
    assert parser.parse_args(["fit", "--sites", *SITES, "--output", "x"]).sites == list(SITES)
    with pytest.raises(SystemExit):
        parser.parse_args(["fit", "--sites", "nowhere", "--output", "x"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    task_help = " ".join(capsys.readouterr().out.split())
    assert f"built-in task: {', '.join(TASK_NAMES)} (read from --data-dir)" in task_help
    assert "winogrande" in TASK_NAMES


def test_eval_on_the_detox_task_reports_toxicity_fluency_and_diversity(tmp_path, capsys):
    """`austeer eval --task detox` with the default offline scorer: the detoxified share and its parts."""
    model = str(real_task_model_folder(tmp_path / "model"))
    assert main(["eval", "--model", model, "--task", "realtoxicityprompts", "--n-validation", "6", "--split",
                 "validation", "--batch-size", "6", "--output", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "scoring toxicity" in printed and "non-toxic" in printed and "distinct-1/2" in printed
    vanilla = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]["vanilla"]
    assert len(vanilla["correct"]) == 6 and vanilla["metrics"]["scorer"] == "alt-profanity-check"
    assert vanilla["accuracy"] <= vanilla["metrics"]["detox_rate"]  # the fluency guard only removes prompts


def test_detox_generation_flags_reach_the_task_and_its_continuations(tmp_path, capsys):
    """`--max-new-tokens 3 --sample --top-p 0.8`: the continuations are sampled 3-token ones (split note and
    metrics in results.json say so, with the run's seed), and the same seed gives the same continuations."""
    model = str(real_task_model_folder(tmp_path / "model"))
    runs = []
    for run in ("a", "b"):
        assert main(["eval", "--model", model, "--task", "detox", "--n-validation", "4", "--split", "validation",
                     "--batch-size", "4", "--max-new-tokens", "3", "--sample", "--top-p", "0.8", "--seed", "0",
                     "--output", str(tmp_path / run)]) == 0
        results = json.loads((tmp_path / run / "results.json").read_text())
        assert "3 new tokens, sampled (top-p 0.8, temperature 1.0, seed 0)" in results["split_note"]
        metrics = results["results"]["vanilla"]["metrics"]
        assert metrics["max_new_tokens"] == 3 and metrics["decoding"] == "sampled"
        runs.append(metrics)
    assert runs[0] == runs[1]
    greedy = tmp_path / "greedy"
    assert main(["eval", "--model", model, "--task", "detox", "--n-validation", "4", "--split", "validation",
                 "--batch-size", "4", "--max-new-tokens", "3", "--output", str(greedy)]) == 0
    assert json.loads((greedy / "results.json").read_text())["results"]["vanilla"]["metrics"]["decoding"] == "greedy"
    capsys.readouterr()


@pytest.mark.parametrize("flags, message", [
    (["--task", "detox", "--top-p", "0.8"], "add --sample"),
    (["--task", "detox", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--task", "sst2", "--max-new-tokens", "8"], "--task sst2 takes none of them"),
    (["--task", "copa", "--sample"], "--task copa takes none of them"),
])
def test_detox_generation_flags_are_refused_where_they_do_not_apply(tmp_path, capsys, flags, message):
    assert main(["eval", "--model", str(tmp_path / "never-loaded"), *flags, "--output", str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err
