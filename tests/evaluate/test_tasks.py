"""Task loaders on the real data files (../shared/data): counts, labels, exact templates, deterministic disjoint
splits, contrastive pairs, and user data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from austeer_peft.evaluate import tasks as T
from austeer_peft.evaluate import load_task, load_user_task, parse_last_number
from austeer_peft.evaluate.tasks import base, copa, mawps, sst2, winogrande


@pytest.fixture(scope="module")
def data_dir():
    return T.resolve_data_dir()  # the real data must be there (../shared/data or $AUSTEER_DATA): no skip


@pytest.fixture(scope="module")
def loaded(data_dir):
    """Every built-in task, loaded once with the defaults (seed 0)."""
    return {name: load_task(name, data_dir=data_dir) for name in T.TASK_NAMES}


def _ids(dataset):
    return list(dataset["id"])


def _assert_disjoint(task):
    fit, validation, test = set(_ids(task.fit)), set(_ids(task.validation)), set(_ids(task.test))
    assert len(fit) == len(task.fit) and len(validation) == len(task.validation) and len(test) == len(task.test)
    assert not fit & validation and not fit & test and not validation & test


# ------------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "name, kind, sizes",
    [
        ("copa", "choice", {"fit": 300, "validation": 200, "test": 500}),
        ("boolq", "choice", {"fit": 800, "validation": 200, "test": 2270}),
        ("sst2", "choice", {"fit": 500, "validation": 200, "test": 872}),
        ("svamp", "generation", {"fit": 500, "validation": 200, "test": 300}),
        ("mawps", "generation", {"fit": 1000, "validation": 200, "test": 384}),
        ("winogrande", "choice", {"fit": 1000, "validation": 200, "test": 1267}),
    ],
)
def test_default_split_sizes_and_disjoint(loaded, name, kind, sizes):
    task = loaded[name]
    assert task.name == name and task.kind == kind
    assert task.sizes == sizes
    _assert_disjoint(task)
    assert task.split_note
    for split in ("fit", "validation", "test"):
        columns = set(task.split(split).column_names)
        assert "prompt" in columns
        assert ({"choices", "label"} <= columns) if kind == "choice" else ({"answer"} <= columns)


def test_raw_file_counts(data_dir):
    assert len(copa.read_copa(data_dir / "COPA" / "copa-dev.xml")) == 500
    assert len(copa.read_copa(data_dir / "COPA" / "copa-test.xml")) == 500
    assert len(sst2.read_sst2(data_dir / "SST-2" / "dev.tsv")) == 872
    assert len(sst2.read_sst2(data_dir / "SST-2" / "train.tsv")) == 67349
    assert len(mawps.read_mawps(data_dir / "MAWPS" / "fold0_train.csv")) == 1537
    assert len(mawps.read_mawps(data_dir / "MAWPS" / "fold0_dev.csv")) == 384
    assert len(winogrande.read_winogrande(data_dir / "WinoGrande" / "dev.jsonl")) == 1267
    assert len(winogrande.read_winogrande(data_dir / "WinoGrande" / "train_xl_first2000.jsonl")) == 2000


def test_labels_in_range(loaded):
    for name in ("copa", "boolq", "sst2", "winogrande"):
        task = loaded[name]
        for split in ("fit", "validation", "test"):
            data = task.split(split)
            assert all(c == task.choices for c in data["choices"])
            assert set(data["label"]) <= {0, 1}
    # BoolQ: 2033 true (" yes" = 0) / 1237 false over the whole file
    boolq = loaded["boolq"]
    labels = list(boolq.fit["label"]) + list(boolq.validation["label"]) + list(boolq.test["label"])
    assert len(labels) == 3270 and labels.count(0) == 2033 and labels.count(1) == 1237


# ------------------------------------------------------------------------------------------------- templates


def test_copa_template_exact(loaded):
    test = loaded["copa"].test
    assert _ids(test)[:3] == ["501", "502", "503"]
    assert test[0]["prompt"] == (
        "Question:\nThe item was packaged in bubble wrap. Based on the previous passage, choose the most reasonable "
        "cause.\nA:It was fragile.\nB:It was small.\n\nAnswer:\n"
    )
    assert test[0]["label"] == 0 and test[0]["choices"] == ["A", "B"]
    assert test[2]["prompt"] == (
        "Question:\nTermites invaded the house. Based on the previous passage, choose the most reasonable effect.\n"
        "A:The termites disappeared from the house.\nB:The termites ate through the wood in the house.\n\nAnswer:\n"
    )
    assert test[2]["label"] == 1
    for split in ("fit", "validation", "test"):
        prompts = loaded["copa"].split(split)["prompt"]
        assert all(p.startswith("Question:\n") and p.endswith("\n\nAnswer:\n") for p in prompts)


def test_boolq_template_exact(loaded, data_dir):
    with open(data_dir / "BoolQ" / "val.jsonl") as handle:
        first = json.loads(handle.readline())
    task = loaded["boolq"]
    rows = {r["id"]: r for split in ("fit", "validation", "test") for r in task.split(split)}
    row = rows[str(first["idx"])]
    assert row["prompt"] == (
        "Is the answer to the question encapsulated in the passage? Please confirm with 'yes' or 'no'.\n\n"
        f"Passage: {first['passage']}\n\nQuestion: does ethanol take more energy make that produces\n\nAnswer:"
    )
    assert row["label"] == 1  # "false" -> " no"
    assert row["choices"] == [" yes", " no"]


def test_winogrande_template_and_splits(loaded, data_dir):
    with open(data_dir / "WinoGrande" / "dev.jsonl") as handle:
        first = json.loads(handle.readline())
    task = loaded["winogrande"]
    row = task.test[0]
    assert row["id"] == first["qID"]
    assert row["prompt"] == (
        "Please fill in the blanks. Write A or B as the answer.\n\n"
        "Sentence: Sarah was a much better surgeon than Maria so _ always got the easier cases.\n"
        "A. Sarah\nB. Maria\nAnswer:"
    )
    assert row["label"] == 1 and row["choices"] == [" A", " B"] == task.choices  # answer "2" -> " B"
    assert all(i.startswith("train_xl_first2000-") for i in _ids(task.fit) + _ids(task.validation))
    assert "1267" in task.split_note and "train_xl_first2000.jsonl" in task.split_note


def _write_winogrande(folder, n_train=12, n_dev=5):
    """A tiny WinoGrande folder in the real files' format (train without qID, dev with it)."""
    folder.mkdir(parents=True)
    with open(folder / "train_xl_first2000.jsonl", "w") as handle:
        for i in range(n_train):
            handle.write(json.dumps({"sentence": f"Ann lent Bo {i} pens because _ had many.", "option1": "Ann",
                                     "option2": "Bo", "answer": "1" if i % 3 else "2"}) + "\n")
    with open(folder / "dev.jsonl", "w") as handle:
        for i in range(n_dev):
            handle.write(json.dumps({"qID": f"q{i}-1", "sentence": f"Cy beat Di {i} times, so _ won.",
                                     "option1": "Cy", "option2": "Di", "answer": "2" if i % 2 else "1"}) + "\n")


def test_winogrande_from_tiny_files(tmp_path):
    _write_winogrande(tmp_path / "WinoGrande")
    task = load_task("winogrande", data_dir=tmp_path, n_fit=6, n_validation=3)
    assert task.kind == "choice" and task.sizes == {"fit": 6, "validation": 3, "test": 5}
    _assert_disjoint(task)
    assert _ids(task.test) == [f"q{i}-1" for i in range(5)] and list(task.test["label"]) == [0, 1, 0, 1, 0]
    assert task.test[1]["prompt"].endswith("Sentence: Cy beat Di 1 times, so _ won.\nA. Cy\nB. Di\nAnswer:")
    number = {row["id"]: int(row["id"].rsplit("-", 1)[1]) for row in task.fit}
    assert all(row["label"] == (0 if number[row["id"]] % 3 else 1) for row in task.fit)
    assert [tuple(p) for p in task.pairs("test")][:2] == [(task.test[0]["prompt"], " A", " B"),
                                                          (task.test[1]["prompt"], " B", " A")]
    again = load_task("winogrande", data_dir=tmp_path, n_fit=6, n_validation=3)
    assert _ids(again.fit) == _ids(task.fit) and _ids(again.validation) == _ids(task.validation)
    assert _ids(load_task("winogrande", data_dir=tmp_path, n_fit=2, n_validation=3).validation) == \
        _ids(task.validation)  # n_fit does not move the validation split
    with pytest.raises(ValueError, match="exceeds the 12 examples of train_xl_first2000.jsonl"):
        load_task("winogrande", data_dir=tmp_path, n_fit=10, n_validation=3)


def test_winogrande_bad_files(tmp_path):
    _write_winogrande(tmp_path / "WinoGrande")
    with open(tmp_path / "WinoGrande" / "dev.jsonl", "a") as handle:
        handle.write(json.dumps({"sentence": "x _", "option1": "a", "option2": "b", "answer": "3"}) + "\n")
    with pytest.raises(ValueError, match="line 6: answer must be '1' or '2', got '3'"):
        load_task("winogrande", data_dir=tmp_path, n_fit=2, n_validation=1)
    (tmp_path / "WinoGrande" / "dev.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="dev.jsonl"):
        load_task("winogrande", data_dir=tmp_path, n_fit=2, n_validation=1)


def test_boolq_split_note(loaded):
    note = loaded["boolq"].split_note
    assert "no train split" in note and "2270" in note and "1000" in note


def test_sst2_template_and_labels(loaded):
    first = loaded["sst2"].test[0]
    assert first["prompt"] == "Review: it 's a charming and often affecting journey .\nSentiment:"
    assert first["label"] == 1 and first["choices"] == [" negative", " positive"]
    assert all(i.startswith("train-") for i in _ids(loaded["sst2"].fit) + _ids(loaded["sst2"].validation))
    assert all(i.startswith("dev-") for i in _ids(loaded["sst2"].test))


def test_svamp_prompt_and_answers(loaded):
    task = loaded["svamp"]
    rows = {r["id"]: r for split in ("fit", "validation", "test") for r in task.split(split)}
    assert len(rows) == 1000
    row = rows["chal-1"]
    assert row["answer"] == 51.0 and row["answer_text"] == "51"
    assert row["problem"] == ("Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
                              "How much do you have to pay to buy each pack?")
    assert row["prompt"] == T.MATH_TEMPLATE.format(problem=row["problem"])
    assert row["prompt"].endswith("\n\nAnswer:")


def test_mawps_numbers_unmasked(loaded):
    task = loaded["mawps"]
    for split in ("fit", "validation", "test"):
        assert not any(re.search(r"number\d", p) for p in task.split(split)["prompt"])
    first = task.test[0]
    assert first["problem"] == ("Bryan took a look at his books as well . If Bryan has 56 books in each of his 9 "
                                "bookshelves , how many books does he have in total ?")
    assert first["answer"] == 504.0


def test_unmask_and_format_number():
    assert T.unmask_numbers("a number0 b number1 c number10", " ".join(f"{i}.0" for i in range(11))) == "a 0 b 1 c 10"
    assert T.unmask_numbers("weighs number0 g", "28.3") == "weighs 28.3 g"
    with pytest.raises(ValueError):
        T.unmask_numbers("number2", "1.0 2.0")
    assert T.format_number(51.0) == "51"
    assert T.format_number(141.5) == "141.5"
    assert T.format_number(-3.0) == "-3"
    assert T.format_number(2 / 3) == "0.666667"


# ------------------------------------------------------------------------------------------------- determinism


def test_splits_deterministic_and_seeded(data_dir, loaded):
    again = load_task("copa", data_dir=data_dir)
    assert _ids(again.fit) == _ids(loaded["copa"].fit) and _ids(again.validation) == _ids(loaded["copa"].validation)
    other = load_task("copa", data_dir=data_dir, seed=1)
    assert _ids(other.fit) != _ids(loaded["copa"].fit)
    assert _ids(other.test) == _ids(loaded["copa"].test)  # the test file does not depend on the seed
    # fit + validation cover copa-dev exactly
    assert sorted(_ids(again.fit) + _ids(again.validation), key=int) == [str(i) for i in range(1, 501)]


def test_n_fit_does_not_move_validation_or_test(data_dir, loaded):
    small = load_task("boolq", data_dir=data_dir, n_fit=50)
    assert len(small.fit) == 50
    assert _ids(small.fit) == _ids(loaded["boolq"].fit)[:50]
    assert _ids(small.validation) == _ids(loaded["boolq"].validation)
    assert _ids(small.test) == _ids(loaded["boolq"].test)
    with pytest.raises(ValueError, match="exceeds"):
        load_task("boolq", data_dir=data_dir, n_fit=1000)
    with pytest.raises(ValueError, match="exceeds"):
        load_task("svamp", data_dir=data_dir, n_fit=650)


def test_load_task_names(data_dir):
    assert load_task("SST-2", data_dir=data_dir, n_fit=10, n_validation=5).sizes == {"fit": 10, "validation": 5,
                                                                                    "test": 872}
    assert load_task("WinoGrande", data_dir=data_dir, n_fit=10, n_validation=5).sizes["test"] == 1267
    with pytest.raises(ValueError, match="Unknown task 'hellaswag'; expected one of copa, .*winogrande"):
        load_task("hellaswag", data_dir=data_dir)


def test_data_dir_resolution(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("AUSTEER_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="AUSTEER_DATA"):
        T.resolve_data_dir()
    assert T.resolve_data_dir(data_dir) == data_dir  # the argument wins over the environment
    monkeypatch.setenv("AUSTEER_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="copa-dev.xml"):
        load_task("copa")


def test_default_data_dir_is_next_to_the_repository(tmp_path, monkeypatch):
    """The package-relative default survives the move into evaluate/tasks/: PACKAGE_PARENT is the folder holding
    austeer_peft/, and ../shared/data next to it is found from any working directory."""
    assert (base.PACKAGE_PARENT / "austeer_peft" / "evaluate" / "tasks" / "base.py").resolve() == \
        Path(base.__file__).resolve()
    monkeypatch.delenv("AUSTEER_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    expected = base.PACKAGE_PARENT.parent / "shared" / "data"
    if expected.is_dir():  # a checkout next to shared/ (this project's layout)
        assert T.resolve_data_dir() == expected
    else:  # an installed or moved package: the error names the folder it tried
        with pytest.raises(FileNotFoundError, match=re.escape(str(expected))):
            T.resolve_data_dir()


# ------------------------------------------------------------------------------------------------- pairs


def test_choice_pairs(loaded):
    task = loaded["copa"]
    pairs = task.pairs("fit")
    assert len(pairs) == 300
    for pair, row in zip(pairs, task.fit):
        prompt, chosen, rejected = pair
        assert prompt == row["prompt"]
        assert chosen == row["choices"][row["label"]] and rejected == row["choices"][1 - row["label"]]
        assert pair.positive == prompt + chosen and pair.negative == prompt + rejected
    boolq = loaded["boolq"].pairs("validation")
    assert all(c in (" yes", " no") and r in (" yes", " no") and c != r for _, c, r in boolq)


def test_generation_pairs(loaded):
    for name in ("svamp", "mawps"):
        task = loaded[name]
        for (prompt, chosen, rejected), row in zip(task.pairs("fit"), task.fit):
            assert prompt == row["prompt"]
            assert chosen == " " + row["answer_text"]
            assert abs(parse_last_number(chosen) - row["answer"]) < 1e-4
            assert abs(parse_last_number(rejected) - row["answer"]) > 1e-4


def test_task_pairs_draw_per_row_among_more_than_two_choices():
    colours = [" red", " green", " blue", " cyan"]
    rows = [{"q": f"Colour {i}?", "y": i % 4} for i in range(30)]
    task = load_user_task(rows, "{q}", choices=colours, label_column="y", n_test=0, n_validation=0, seed=5)
    pairs = task.pairs("fit")
    for index, ((_, chosen, rejected), row) in enumerate(zip(pairs, task.fit)):
        wrong = [c for i, c in enumerate(colours) if i != row["label"]]
        assert chosen == colours[row["label"]]
        assert rejected == wrong[int(np.random.default_rng([5, index]).integers(3))]  # seeded by (seed, row)
    assert load_user_task(rows, "{q}", choices=colours, label_column="y", n_test=0, n_validation=0,
                          seed=5, n_fit=0).pairs("fit") == []


def test_wrong_answers_pick_most_similar_problem():
    problems = ["Tom has 3 apples and eats 1 apple.", "Tom has 5 apples and eats 2 apples.", "A car drives 60 miles."]
    assert T.wrong_answers(problems, [2.0, 3.0, 60.0]) == [3.0, 2.0, 2.0]
    assert T.wrong_answers(["x", "y"], [1.0, 1.0]) == [2.0, 2.0]  # no different answer: answer + 1
    assert T.wrong_answers([], []) == []


# ------------------------------------------------------------------------------------------------- user data


def test_user_choice_task_from_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    colours = ["red", "green", "blue"]
    with open(path, "w") as handle:
        for i in range(40):
            handle.write(json.dumps({"id": f"q{i}", "q": f"Colour {i}?", "answer": colours[i % 3]}) + "\n")
    task = load_user_task(path, "Q: {q}\nA:", choices=colours, label_column="answer", n_validation=4, n_fit=10,
                          name="colours")
    assert task.kind == "choice" and task.sizes == {"fit": 10, "validation": 4, "test": 20}
    _assert_disjoint(task)
    row = task.test[0]
    assert row["prompt"] == f"Q: Colour {row['id'][1:]}?\nA:"
    assert row["choices"][row["label"]] == colours[int(row["id"][1:]) % 3]
    pairs = task.pairs("fit")
    assert pairs == task.pairs("fit")  # the wrong choice is drawn deterministically
    for (_, chosen, rejected), row in zip(pairs, task.fit):
        assert chosen == colours[int(row["id"][1:]) % 3] and rejected in colours and rejected != chosen


def test_user_generation_task_from_csv_and_mapping(tmp_path):
    path = tmp_path / "math.csv"
    path.write_text("question,result\n" + "".join(f"What is {i} plus {i}?,{2 * i}\n" for i in range(10)))
    task = load_user_task(path, "{question} Answer:", answer_column="result", n_test=4, n_validation=2)
    assert task.kind == "generation" and task.sizes == {"fit": 4, "validation": 2, "test": 4}
    for prompt, chosen, rejected in task.pairs("fit"):
        assert chosen == " " + T.format_number(2 * int(re.search(r"\d+", prompt).group()))
        assert rejected != chosen

    data = Dataset.from_list([{"text": f"t{i}", "y": i % 2} for i in range(6)])
    given = load_user_task({"train": data, "validation": data.select([0]), "test": data.select([1, 2])},
                           "{text}:", choices=[" a", " b"], label_column="y")
    assert given.sizes == {"fit": 6, "validation": 1, "test": 2}
    assert given.choices == [" a", " b"]


def test_user_task_errors():
    data = [{"text": "x", "y": "maybe"}]
    with pytest.raises(ValueError, match="label_map"):
        load_user_task(data, "{text}", choices=["yes", "no"], label_column="y", n_test=0)
    with pytest.raises(ValueError, match=r"template field \{missing\} is not a column"):
        load_user_task(data, "{missing}", choices=["yes", "no"], label_column="y")
    with pytest.raises(ValueError, match="choices"):
        load_user_task(data, "{text}")
    mapped = load_user_task(data, "{text}", choices=["yes", "no"], label_column="y", label_map={"maybe": 1},
                            n_test=1)
    assert mapped.test[0]["label"] == 1


def test_chat_template_wraps_every_prompt_once():
    from conftest import char_tokenizer
    from tokenizers import processors

    rows = [{"q": f"Colour {i}?", "y": i % 2} for i in range(10)]
    task = load_user_task(rows, "{q}", choices=[" red", " blue"], label_column="y", n_test=4, n_validation=2)
    tokenizer = char_tokenizer()
    wrapped = T.apply_chat_template(task, tokenizer)
    for split in ("fit", "validation", "test"):
        assert wrapped.split(split)["prompt"] == [f"<user>{p}\n<assistant>" for p in task.split(split)["prompt"]]
        assert wrapped.split(split)["label"] == task.split(split)["label"]
    assert [pair.prompt for pair in wrapped.pairs("fit")] == wrapped.fit["prompt"]
    assert wrapped.split_note == f"{task.split_note} {base.CHAT_TEMPLATE_NOTE}" and wrapped.metadata["chat_template"]
    # A template that writes the BOS token loses it when the tokenizer adds one itself (no doubled BOS).
    tokenizer.chat_template = "<s>" + tokenizer.chat_template
    assert T.apply_chat_template(task, tokenizer).test["prompt"][0].startswith("<s><user>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", tokenizer.bos_token_id)])
    assert T.apply_chat_template(task, tokenizer).test["prompt"][0].startswith("<user>")
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        T.apply_chat_template(task, tokenizer)
