"""A long fit survives: checkpoints (a SIGKILLed fit resumes to the same bytes; other pairs or arguments are refused;
a crash while writing keeps the previous checkpoint) and memory back-off (batches that run out of memory are
halved, nothing lost or counted twice, one log line, the counts of a fit run at the smaller size).

This file is also the script of the killed subprocess (``python test_resilience.py CHECKPOINT OUT KILL_AT``).
"""

from __future__ import annotations

import filecmp
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, random_pairs, tiny_model
from safetensors import safe_open
from test_fit import assert_same_counts

from austeer_peft import compute_momentum, fit_austeer
from austeer_peft.fitting import checkpoint as checkpoint_module

ROOT = Path(__file__).resolve().parents[2]
SITES = ["attention", "ffn", "ffn_inner"]


def counting_forwards(model, kill_at=None):
    """Count the model's forwards; with ``kill_at``, SIGKILL this process when that forward starts."""
    calls = []

    def hook(module, args, kwargs):
        calls.append(1)
        if kill_at is not None and len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def fit_to(out: Path, checkpoint=None, kill_at=None, pairs=13, every=1, **kwargs) -> int:
    """Count 13 pairs (7 batches of 2) on the tiny Llama, save the scores; return the number of forwards."""
    model = tiny_model("llama")
    calls = counting_forwards(model, kill_at)
    scores = compute_momentum(model, char_tokenizer(), random_pairs(pairs, seed=4), sites=SITES, batch_size=2,
                              progress=False, checkpoint=checkpoint, checkpoint_every=every, **kwargs)
    scores.save(out)
    return len(calls)


def done_batches(path: Path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return int(handle.get_tensor("done").sum())


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_a_fit_killed_midway_resumes_to_the_same_bytes(tmp_path):
    checkpoint = tmp_path / "counts.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                                                str(ROOT / "tests" / "fitting")])}
    # Shared prompts: two forwards per batch; the 7th is the prompt of batch 4, so batches 1-3 are checkpointed.
    killed = subprocess.run([sys.executable, __file__, str(checkpoint), str(tmp_path / "never.safetensors"), "7"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "never.safetensors").exists() and done_batches(checkpoint) == 3
    assert not list(tmp_path.glob(".*.tmp"))

    resumed_forwards = fit_to(tmp_path / "resumed.safetensors", checkpoint)
    assert resumed_forwards == 2 * (7 - 3)  # only the 4 batches left
    assert fit_to(tmp_path / "straight.safetensors") == 2 * 7
    assert filecmp.cmp(tmp_path / "resumed.safetensors", tmp_path / "straight.safetensors", shallow=False)
    assert done_batches(checkpoint) == 7
    # A finished checkpoint answers a rerun without any forward.
    assert fit_to(tmp_path / "again.safetensors", checkpoint) == 0
    assert filecmp.cmp(tmp_path / "again.safetensors", tmp_path / "straight.safetensors", shallow=False)


def test_a_checkpoint_of_other_pairs_or_arguments_is_refused(tmp_path):
    checkpoint = tmp_path / "counts.safetensors"
    fit_to(tmp_path / "a.safetensors", checkpoint)
    for change in [dict(pairs=12), dict(share_prompts=False), dict(max_length=20)]:
        with pytest.raises(ValueError, match="other pairs or arguments.*delete the file"):
            fit_to(tmp_path / "b.safetensors", checkpoint, **change)
    (tmp_path / "other.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        fit_to(tmp_path / "c.safetensors", tmp_path / "other.safetensors")


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint = tmp_path / "counts.safetensors"
    replace, writes = os.replace, []

    def crash_on_third(source, target):
        writes.append(source)
        if len(writes) == 3:
            raise OSError("disk gone")
        replace(source, target)

    monkeypatch.setattr(checkpoint_module.os, "replace", crash_on_third)
    with pytest.raises(OSError, match="disk gone"):
        fit_to(tmp_path / "x.safetensors", checkpoint)
    assert done_batches(checkpoint) == 2  # the last complete write
    monkeypatch.setattr(checkpoint_module.os, "replace", replace)
    fit_to(tmp_path / "resumed.safetensors", checkpoint)
    fit_to(tmp_path / "straight.safetensors")
    assert filecmp.cmp(tmp_path / "resumed.safetensors", tmp_path / "straight.safetensors", shallow=False)


def test_checkpoint_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every"):
        fit_to(tmp_path / "x.safetensors", tmp_path / "c.safetensors", every=0)


def test_checkpoint_with_automatic_k_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`checkpoint` is not supported with k='auto'"):
        fit_austeer(tiny_model("llama"), char_tokenizer(), random_pairs(6), sites=["ffn"], k="auto",
                    checkpoint=tmp_path / "c.safetensors", progress=False)


def test_austeer_fit_checkpoint_resumes_from_the_command_line(tmp_path, capsys):
    from austeer_peft.cli import main

    model = tmp_path / "model"
    tiny_model("llama").save_pretrained(model)
    char_tokenizer().save_pretrained(model)
    common = ["fit", "--model", str(model), "--task", "sst2", "--n-fit", "12", "--n-validation", "8", "--n-test",
              "8", "--batch-size", "4", "--sites", "ffn", "--k", "2", "--selection", "most-accurate", "--scoring",
              "loglik", "--checkpoint", str(tmp_path / "counts.safetensors"), "--checkpoint-every", "1"]
    assert main([*common, "--output", str(tmp_path / "first")]) == 0
    assert done_batches(tmp_path / "counts.safetensors") == 3
    assert main([*common, "--output", str(tmp_path / "again")]) == 0  # nothing left to count: read from the file
    assert filecmp.cmp(tmp_path / "first" / "scores.safetensors", tmp_path / "again" / "scores.safetensors",
                       shallow=False)
    capsys.readouterr()
    assert main([*common[:-4], "--k", "auto", *common[-4:], "--output", str(tmp_path / "auto")]) == 1
    assert "`checkpoint` is not supported with k='auto'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- memory


def out_of_memory_above(model, max_rows: int) -> list[int]:
    """Make every forward with more than ``max_rows`` sequences fail as CUDA does; return the rows of each try."""
    tries = []

    def hook(module, args, kwargs):
        rows = kwargs["input_ids"].shape[0]
        tries.append(rows)
        if rows > max_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({rows} rows)")

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return tries


@pytest.mark.parametrize("share_prompts", [True, False])
def test_out_of_memory_halves_the_batch_and_counts_every_pair_once(share_prompts, caplog):
    pairs, tokenizer = random_pairs(8, seed=9), char_tokenizer()
    model = tiny_model("llama")
    reference = compute_momentum(model, tokenizer, pairs, sites=SITES, batch_size=2, share_prompts=share_prompts,
                                 progress=False)
    tries = out_of_memory_above(model, max_rows=4)  # 2 pairs per forward fit, 4 or 8 do not
    with caplog.at_level(logging.WARNING, logger="austeer_peft.fitting.activations"):
        scores = compute_momentum(model, tokenizer, pairs, sites=SITES, batch_size=8, share_prompts=share_prompts,
                                  progress=False)
    assert_same_counts(scores, reference)
    assert scores.num_pairs == 8
    messages = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert messages == ["A batch of 8 pairs ran out of memory; continuing with 2 pairs per forward."]
    # Only the first batch failed (at 8 pairs, then at 4); every later forward started at the size that worked.
    assert sum(rows > 4 for rows in tries) == 2 and all(rows <= 4 for rows in tries[4:])


def test_one_pair_that_does_not_fit_and_other_errors_are_raised():
    model = tiny_model("llama")
    out_of_memory_above(model, max_rows=1)
    with pytest.raises(RuntimeError, match="One pair alone does not fit in memory"):
        compute_momentum(model, char_tokenizer(), random_pairs(4), sites=["ffn"], batch_size=2, progress=False)
    other = tiny_model("llama")
    other.register_forward_pre_hook(lambda *args: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        compute_momentum(other, char_tokenizer(), random_pairs(4), sites=["ffn"], batch_size=2, progress=False)


if __name__ == "__main__":
    torch.set_num_threads(1)
    fit_to(Path(sys.argv[2]), Path(sys.argv[1]), kill_at=int(sys.argv[3]))
