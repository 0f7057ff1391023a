"""Your data on the command line as in Python: named split files, per-row choices, a Hub data set, local GGUF
models, the chat template; every bad input is one clean line, found before the model loads, with nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import tiny_checkpoint

from austeer_peft.cli import main
from austeer_peft.cli.arguments import staged_output
from austeer_peft.evaluate.tasks import hub
from austeer_peft.hub.models import resolve_gguf


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def one_thread():
    """A tiny model gains nothing from threads, and loses much on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mc_rows(n: int, start: int = 0) -> list[dict]:
    """Rows as a user brings them: a prompt, three to five answers of its own, the index of the right one."""
    colours = [" red", " green", " blue", " cyan", " pink"]
    return [{"prompt": f"Item {i}: which colour?", "choices": colours[: 3 + i % 3], "answer": i % (3 + i % 3)}
            for i in range(start, start + n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def two_files(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", mc_rows(40)), write_jsonl(tmp_path / "test.jsonl", mc_rows(12, 40))


def user_args(train, test, *extra):
    return ["--data", f"fit={train}", f"test={test}", "--template", "{prompt}", "--choices-column", "choices",
            "--label-column", "answer", *extra]


def test_fit_on_two_files_with_per_row_choices_and_the_chat_template(tmp_path, two_files, capsys, one_thread):
    model = str(tiny_checkpoint(tmp_path / "model"))
    out = tmp_path / "fit"
    assert main(["fit", "--model", model, *user_args(*two_files), "--n-validation", "8", "--sites", "ffn", "--k", "2",
                 "--alpha", "5", "--selection", "most-accurate", "--chat-template", "--batch-size", "8",
                 "--output", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["sizes"] == {"fit": 32, "validation": 8, "test": 12}
    assert "no validation split given, so 8 of the 40 fit examples were carved out" in summary["split_note"]
    assert "chat template" in summary["split_note"] and summary["chat_template"] is True
    assert summary["data"] == [f"fit={two_files[0]}", f"test={two_files[1]}"] and summary["model"] == model
    card = (out / "adapter" / "README.md").read_text()
    assert "Prompts: fitted and evaluated with each prompt wrapped in the base model's chat template" in card
    assert "prompt_format:" in card.split("---")[1]  # in the front matter too, so a re-rendered card keeps it
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]

    from austeer_peft.hub.cards import adapter_card_from_folder

    assert "Prompts: fitted and evaluated" in str(adapter_card_from_folder(out / "adapter"))


def test_sweep_adapter_cards_say_the_prompts_were_chat_templated(tmp_path, two_files, one_thread):
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(tiny_checkpoint(tmp_path / "model")), *user_args(*two_files),
                 "--n-validation", "8", "--sites", "ffn", "--ks", "2", "--alphas", "5", "--baselines",
                 "--selection", "most-accurate", "--chat-template", "--batch-size", "8", "--output", str(out)]) == 0
    card = (out / "adapters" / "austeer_ffn" / "README.md").read_text()  # most-accurate: the one cell ships
    assert "Prompts: fitted and evaluated with each prompt wrapped in the base model's chat template" in card


@pytest.mark.parametrize("arguments, expected", [
    (["--k", "0"], "--k 0: `k` must be a positive integer"),
    (["--alpha", "nan"], "--alpha nan: `alpha` must be a finite number > 0"),
    (["--batch-size", "0"], "--batch-size must be a positive number"),
    (["--template", "Q: {question}"], "train.jsonl: the template field {question} is not a column (columns: prompt, "
                                      "choices, answer); fix the template (--template) or the data."),
    (["--label-column", "gold"], "train.jsonl: no column 'gold' (columns: prompt, choices, answer); name the right "
                                 "one with label_column (--label-column)."),
    (["--choices", " a", " b"], "Give either choices (shared by every row) or choices_column (per row), not both."),
    (["--split-map", "fit=train"], "--split-map only applies to a Hub data set"),
    (["--data-dir", "."], "--data-dir is for the built-in tasks"),
])
def test_bad_arguments_are_one_line_before_the_model_loads(tmp_path, two_files, capsys, arguments, expected):
    out = tmp_path / "out"
    # The model does not exist: reaching it would be a different error.
    base = ["fit", "--model", str(tmp_path / "no-model"), *user_args(*two_files), "--output", str(out)]
    assert main(base + arguments) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    assert expected in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.jsonl", "train.jsonl"]  # no output folder


@pytest.mark.parametrize("bad_row, expected", [
    ({"prompt": "x", "choices": " red", "answer": 0}, "train.jsonl, row 31: column 'choices' holds ' red' (string), "
                                                       "but row 1 holds a list; give the column the same type"),
    ({"prompt": "x", "choices": [" red"], "answer": 0}, "train.jsonl, row 31: column 'choices' holds [' red']; each "
                                                         "row needs a list of at least two non-empty answer strings"),
    ({"prompt": "x", "choices": [" a", " b"], "answer": 2}, "train.jsonl, row 31: label 2 in column 'answer' is "
                                                            "index 2, out of range for 2 choices"),
    ({"prompt": None, "choices": [" a", " b"], "answer": 0}, "train.jsonl, row 31: column 'prompt' (a template "
                                                             "field) is empty"),
])
def test_a_bad_row_is_named_by_file_row_and_column(tmp_path, capsys, bad_row, expected):
    rows = mc_rows(40)
    rows[30] = bad_row
    train, test = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "test.jsonl", mc_rows(5))
    assert main(["sweep", "--model", str(tmp_path / "no-model"), *user_args(train, test),
                 "--output", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert expected in error and error.count("\n") == 1, error
    assert not (tmp_path / "out").exists()


def test_bad_files_and_data_arguments(tmp_path, two_files, capsys):
    train, test = two_files
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "choices": [" x", " y"], "answer": 0}\n{"prompt": "b", \n')
    cases = [
        (user_args(broken, test), "broken.jsonl, line 2: not valid JSON"),
        (user_args(train, tmp_path / "missing.jsonl"), f"no file at '{tmp_path / 'missing.jsonl'}'"),
        (["--data", str(train), f"test={test}", "--template", "{prompt}"], "not a mix"),
        (["--data", f"fit={train}", f"fit={test}", "--template", "{prompt}"], "names the fit split twice"),
        (["--data", f"fit={train}", f"dev={test}", "--template", "{prompt}", "--choices-column", "choices",
          "--label-column", "answer"], "give 'fit' (or 'train') and 'test'"),
        (["--task", "sst2", "--choices-column", "choices"], "--choices-column only apply to --data"),
        (["--data", str(tmp_path / "mine.csv"), "--template", "{prompt}", "--choices", " a", " b"],
         "No data file at"),
    ]
    for arguments, expected in cases:
        assert main(["eval", "--model", str(tmp_path / "no-model"), *arguments]) == 1
        error = capsys.readouterr().err
        assert expected in error and error.count("\n") == 1, (arguments, error)


def test_hub_data_set_on_the_command_line(tmp_path, monkeypatch, capsys):
    """`--data name:config --split-map ...` reaches datasets.load_dataset with those splits (offline here)."""
    from datasets import Dataset

    asked, real_load_dataset = [], hub.load_dataset

    def fake_load_dataset(name, config=None, split=None):
        asked.append((name, config, split))
        return Dataset.from_list(mc_rows(20 if split == "train" else 6))

    monkeypatch.setattr(hub, "load_dataset", fake_load_dataset)
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--data", "someone/colours:v2", "--split-map",
                 "fit=train", "test=validation", "--template", "{prompt}", "--choices-column", "choices",
                 "--label-column", "answer"]) == 1
    assert sorted(asked) == [("someone/colours", "v2", "train"), ("someone/colours", "v2", "validation")]
    assert "--model" in capsys.readouterr().err  # the data was fine; the (missing) model failed next
    monkeypatch.setattr(hub, "load_dataset", real_load_dataset)
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at start-up (CI) sets it
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    assert main(["eval", "--data", "someone/colours", "--template", "{prompt}", "--choices-column", "choices"]) == 1
    error = capsys.readouterr().err
    assert "Cannot load the Hub data set someone/colours" in error and error.count("\n") == 1


def test_a_run_that_fails_after_the_model_loaded_writes_nothing(tmp_path, two_files, capsys):
    model = str(tiny_checkpoint(tmp_path / "model", chat_template=False))
    out = tmp_path / "out"
    assert main(["sweep", "--model", model, *user_args(*two_files), "--chat-template", "--output", str(out)]) == 1
    assert "--chat-template: the tokenizer has no chat template" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_staged_output_moves_files_only_on_success(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_output(tmp_path / "run", force=False) as folder:
            (folder / "results.json").write_text("{}")
            raise RuntimeError("row 900")
    assert sorted(os.listdir(tmp_path)) == []
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("kept")
    (tmp_path / "run" / "results.json").write_text("old")
    with staged_output(tmp_path / "run", force=True) as folder:
        (folder / "results.json").write_text("new")
        (folder / "adapters").mkdir()
    assert sorted(os.listdir(tmp_path / "run")) == ["adapters", "old.txt", "results.json"]
    assert (tmp_path / "run" / "results.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["run"]


def test_gguf_files_and_folders_resolve(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "model.Q4_K_M.gguf").write_bytes(b"")
    assert resolve_gguf(str(one)) == (str(one), "model.Q4_K_M.gguf")
    assert resolve_gguf(str(one / "model.Q4_K_M.gguf")) == (str(one), "model.Q4_K_M.gguf")
    (one / "model.Q8_0.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="holds 2 GGUF files \\(model.Q4_K_M.gguf, model.Q8_0.gguf\\); pick one "
                                         "with --gguf-file"):
        resolve_gguf(str(one))
    assert resolve_gguf(str(one), "model.Q8_0.gguf") == (str(one), "model.Q8_0.gguf")
    with pytest.raises(FileNotFoundError, match="has no GGUF file 'other.gguf'"):
        resolve_gguf(str(one), "other.gguf")
    (one / "config.json").write_text("{}")  # a checkpoint folder: loaded as one, its GGUF files aside
    assert resolve_gguf(str(one)) == (str(one), None)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_gguf(str(tmp_path / "notes.txt"))
    assert resolve_gguf("someone/model-GGUF", "model.gguf") == ("someone/model-GGUF", "model.gguf")


@pytest.mark.real
def test_a_folder_holding_a_gguf_file_loads_as_llama_cpp_users_keep_models(tmp_path):
    """The failure the issue measured ("Couldn't instantiate the backend tokenizer"): a folder with a GGUF file."""
    import torch

    from austeer_peft.hub.models import load_model, resolve_alias

    folder, name = resolve_alias("smollm2-135m")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / name).symlink_to(folder / name)
    model, tokenizer = load_model(str(tmp_path / "models"))
    ids = tokenizer("Review: a fine film\nSentiment:", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert tokenizer.chat_template  # SmolLM2-Instruct's GGUF carries its chat template


def test_label_map_and_problem_column_as_in_python(tmp_path, capsys):
    from austeer_peft.cli import build_parser
    from austeer_peft.cli.arguments import load_task_from_args
    from austeer_peft.evaluate import load_user_task

    path = write_jsonl(tmp_path / "even.jsonl", [{"q": f"Is {i} even?", "truth": i % 2 == 0} for i in range(20)])
    args = build_parser().parse_args(["fit", "--data", str(path), "--template", "{q}", "--choices", " yes", " no",
                                      "--label-column", "truth", "--label-map", "true=0", "false=1", "--output", "x"])
    task = load_task_from_args(args)
    python = load_user_task(path, "{q}", choices=[" yes", " no"], label_column="truth", label_map={True: 0, False: 1})
    for split in ("fit", "validation", "test"):
        assert task.split(split)["label"] == python.split(split)["label"]
        assert task.split(split)["prompt"] == python.split(split)["prompt"]
    assert task.test["label"] == [int(prompt.split()[1]) % 2 for prompt in task.test["prompt"]]  # even -> " yes"

    math = write_jsonl(tmp_path / "math.jsonl", [{"q": f"What is {i} + {i}?", "topic": f"doubling {i % 3}",
                                                  "y": 2 * i} for i in range(12)])
    args = build_parser().parse_args(["fit", "--data", str(math), "--template", "{q}", "--answer-column", "y",
                                      "--problem-column", "topic", "--output", "x"])
    assert load_task_from_args(args).test["problem"] == \
        load_user_task(math, "{q}", answer_column="y", problem_column="topic").test["problem"]
    assert main(["fit", "--data", str(path), "--template", "{q}", "--choices", " yes", " no", "--label-map", "true",
                 "--output", str(tmp_path / "out")]) == 1
    assert "--label-map true: write LABEL=INDEX" in capsys.readouterr().err
