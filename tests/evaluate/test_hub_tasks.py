"""The built-in tasks' Hub fallback (no local data folder) and user data from the Hub, with no network: in-memory
``datasets.Dataset``s shaped like the Hub's copies stand in for ``load_dataset``, built from the real local files,
so the mapping must reproduce the local tasks row for row. The offline error is the real one from ``datasets``."""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from datasets import Dataset

from austeer_peft.evaluate import load_task
from austeer_peft.evaluate.tasks import base, hub, load_hub_task


@pytest.fixture(scope="module")
def data_dir():
    return base.resolve_data_dir()


def _sst2(path):
    with open(path, encoding="utf-8") as handle:
        next(handle)
        rows = [line.rstrip("\n").rsplit("\t", 1) for line in handle if line.strip()]
    # GLUE on the Hub: `sentence` (with a trailing space), `label` (ClassLabel 0/1), `idx`.
    return Dataset.from_dict({"sentence": [text + " " for text, _ in rows], "label": [int(y) for _, y in rows],
                              "idx": list(range(len(rows)))})


def _boolq(path):
    items = [json.loads(line) for line in open(path, encoding="utf-8")]
    # SuperGLUE on the Hub: `label` is a ClassLabel with names ["False", "True"].
    return Dataset.from_list([{"question": i["question"], "passage": i["passage"], "idx": i["idx"],
                               "label": int(i["label"] == "true" or i["label"] is True)} for i in items])


def _copa(path, first, last, labelled=True):
    items = list(ET.parse(path).getroot().iter("item"))[first:last]
    return Dataset.from_list([{"premise": i.find("p").text, "choice1": i.find("a1").text,
                               "choice2": i.find("a2").text, "question": i.get("asks-for"), "idx": n,
                               "label": int(i.get("most-plausible-alternative")) - 1 if labelled else -1}
                              for n, i in enumerate(items)])


def _winogrande(path):
    items = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    return Dataset.from_list([{k: i[k] for k in ("sentence", "option1", "option2", "answer")} for i in items])


def _svamp(path):
    """ChilleD/SVAMP: the 1000 problems as train 700 / test 300, not in SVAMP.json's order."""
    items = json.load(open(path, encoding="utf-8"))
    order = np.random.default_rng(7).permutation(len(items))
    shaped = [{**items[i], "question_concat": items[i]["Body"] + " " + items[i]["Question"]} for i in order]
    return Dataset.from_list(shaped[:700]), Dataset.from_list(shaped[700:])


def _mawps(path):
    with open(path, encoding="utf-8") as handle:
        return Dataset.from_list(list(csv.DictReader(handle)))


@pytest.fixture(scope="module")
def hub_copies(data_dir):
    """(name, config, split) -> the Dataset the Hub would give, from the local files."""
    folder = data_dir
    svamp_train, svamp_test = _svamp(folder / "SVAMP" / "SVAMP.json")
    winogrande_train = _winogrande(folder / "WinoGrande" / "train_xl_first2000.jsonl")
    return {
        ("nyu-mll/glue", "sst2", "train"): _sst2(folder / "SST-2" / "train.tsv"),
        ("nyu-mll/glue", "sst2", "validation"): _sst2(folder / "SST-2" / "dev.tsv"),
        ("aps/super_glue", "boolq", "validation"): _boolq(folder / "BoolQ" / "val.jsonl"),
        ("aps/super_glue", "copa", "train"): _copa(folder / "COPA" / "copa-dev.xml", 0, 400),
        ("aps/super_glue", "copa", "validation"): _copa(folder / "COPA" / "copa-dev.xml", 400, 500),
        ("aps/super_glue", "copa", "test"): _copa(folder / "COPA" / "copa-test.xml", 0, 500, labelled=False),
        # More train items than the 2000 taken: the loader asks for train[:2000].
        ("allenai/winogrande", "winogrande_xl", "train"): Dataset.from_list([*winogrande_train,
                                                                             *winogrande_train.select(range(5))]),
        ("allenai/winogrande", "winogrande_xl", "validation"): _winogrande(folder / "WinoGrande" / "dev.jsonl"),
        ("ChilleD/SVAMP", None, "train"): svamp_train,
        ("ChilleD/SVAMP", None, "test"): svamp_test,
        ("ChilleD/MAWPS", None, "train"): _mawps(folder / "MAWPS" / "fold0_train.csv"),
        ("ChilleD/MAWPS", None, "test"): _mawps(folder / "MAWPS" / "fold0_dev.csv"),
    }


@pytest.fixture
def no_local_data(monkeypatch, tmp_path, hub_copies):
    """No data folder anywhere; `load_dataset` answers from `hub_copies` and records what was asked."""
    monkeypatch.delenv(base.DATA_ENV_VAR, raising=False)
    monkeypatch.setattr(base, "default_data_dirs", lambda: [tmp_path / "nowhere"])
    asked = []

    def fake_load_dataset(name, config=None, split=None):
        asked.append((name, config, split))
        whole, stop = re.fullmatch(r"(\w+)(?:\[:(\d+)\])?", split).groups()
        if (name, config, whole) not in hub_copies:
            raise ValueError(f'Unknown split "{whole}".')
        dataset = hub_copies[(name, config, whole)]
        return dataset.select(range(int(stop))) if stop else dataset

    monkeypatch.setattr(hub, "load_dataset", fake_load_dataset)
    return asked


def _rows(split, *columns):
    return list(zip(*(split[c] for c in columns)))


@pytest.mark.parametrize("name", ["sst2", "boolq", "winogrande", "svamp"])
def test_hub_copies_give_the_local_splits_row_for_row(no_local_data, data_dir, name):
    local = load_task(name, data_dir=data_dir, n_fit=40, n_validation=20)
    remote = load_task(name, n_fit=40, n_validation=20)
    columns = ("prompt", "choices", "label") if local.kind == "choice" else ("prompt", "answer", "answer_text",
                                                                               "wrong_answer_text")
    for split in ("fit", "validation", "test"):
        assert _rows(remote.split(split), *columns) == _rows(local.split(split), *columns), split
    assert remote.choices == local.choices and remote.kind == local.kind
    assert "from the Hub" in remote.split_note and "from the Hub" not in local.split_note
    hub_name, hub_config, _ = no_local_data[0]
    assert remote.metadata["hub_dataset"] == (hub_name if hub_config is None else f"{hub_name}:{hub_config}")


def test_boolq_from_the_hub_uses_validation_only_and_says_so(no_local_data):
    task = load_task("boolq", n_fit=10, n_validation=10)
    assert {split for _, _, split in no_local_data} == {"validation"}
    assert "train split is not" in task.split_note and "numbers match the offline ones" in task.split_note


def test_copa_from_the_hub_tests_on_superglue_validation(no_local_data, data_dir):
    local = load_task("copa", data_dir=data_dir)
    remote = load_task("copa")
    assert remote.sizes == {"fit": 200, "validation": 200, "test": 100}
    # The test split is copa-dev.xml's items 401-500 (SuperGLUE validation), with their COPA ids.
    dev_rows = {row["id"]: (row["prompt"], row["label"]) for row in (*local.fit, *local.validation)}
    assert all(dev_rows.get(row["id"], (row["prompt"], row["label"])) == (row["prompt"], row["label"])
               for row in remote.test)
    assert sorted(int(i) for i in remote.test["id"]) == list(range(401, 501))
    assert not {int(i) for i in (*remote.fit["id"], *remote.validation["id"])} & set(range(401, 501))
    assert "test split has no labels" in remote.split_note and "not comparable" in remote.split_note
    with pytest.raises(ValueError, match="only labelled splits"):
        from austeer_peft.evaluate.tasks.copa import copa_hub_rows

        copa_hub_rows(_copa(data_dir / "COPA" / "copa-test.xml", 0, 3, labelled=False))


def test_mawps_from_the_hub_maps_the_masked_format(no_local_data, data_dir):
    local = load_task("mawps", data_dir=data_dir, n_fit=30, n_validation=10)
    remote = load_task("mawps", n_fit=30, n_validation=10)
    for split in ("fit", "validation", "test"):
        assert _rows(remote.split(split), "prompt", "answer") == _rows(local.split(split), "prompt", "answer")
    assert "not fold 0" in remote.split_note


def test_a_named_data_folder_that_is_missing_is_still_an_error(no_local_data, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_task("sst2", data_dir=tmp_path / "missing")
    monkeypatch.setenv(base.DATA_ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="AUSTEER_DATA"):
        load_task("sst2")
    assert no_local_data == []  # never fell back to the Hub


def test_offline_without_a_cached_copy_is_one_clear_error(monkeypatch, tmp_path):
    """The real `datasets.load_dataset`, offline with an empty cache (as in CI, HF_HUB_OFFLINE=1)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv(base.DATA_ENV_VAR, raising=False)
    monkeypatch.setattr(base, "default_data_dirs", lambda: [tmp_path / "nowhere"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    with pytest.raises(ConnectionError) as error:
        load_task("sst2")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("Cannot load the Hub data set nyu-mll/glue:sst2: the Hub cannot be reached "
                              "(HF_HUB_OFFLINE=1 is set) and the datasets cache")
    assert str(tmp_path / "cache") in message and "--data-dir" in message and "run once with network" in message
    with pytest.raises(ConnectionError, match="Hub data set someone/my-data"):
        load_hub_task("someone/my-data", "{q}", choices=[" a", " b"])


def test_user_data_from_the_hub_with_a_split_map(monkeypatch):
    rows = [{"question": f"q{i}", "options": [" a", " b", " c"][: 2 + i % 2], "gold": i % 2} for i in range(30)]
    served = {"train": Dataset.from_list(rows[:20]), "validation": Dataset.from_list(rows[20:])}
    asked = []

    def fake_load_dataset(name, config=None, split=None):
        asked.append((name, config, split))
        if split not in served:
            raise ValueError(f'Unknown split "{split}". Should be one of {sorted(served)}.')
        return served[split]

    monkeypatch.setattr(hub, "load_dataset", fake_load_dataset)
    task = load_hub_task("someone/mc:default", "Q: {question}\nA:", split_map={"fit": "train", "test": "validation"},
                         choices_column="options", label_column="gold", n_validation=4)
    assert set(asked) == {("someone/mc", "default", "train"), ("someone/mc", "default", "validation")}
    assert task.sizes == {"fit": 16, "validation": 4, "test": 10} and task.choices is None
    assert [len(c) for c in task.test["choices"]] == [2 + i % 2 for i in range(20, 30)]
    assert task.split_note.startswith("Hub data set someone/mc:default (fit = its train split, test = its "
                                      "validation split).")
    assert "4 of the 20 fit examples were carved out for validation" in task.split_note
    with pytest.raises(ValueError, match=r'someone/mc: Unknown split "test"'):
        load_hub_task("someone/mc", "{question}", choices_column="options", label_column="gold")
    with pytest.raises(ValueError, match="name\\[:config\\]"):
        load_hub_task("someone/mc:", "{question}", choices_column="options")
