"""Data-parallel fit for real: torchrun starts two processes (gloo on CPU); they split the pairs, sum their counts and
both end with the scores and adapter of a single-process fit, byte for byte. Only the main process writes.

This file is also the script the two processes run (``python tests/test_distributed.py OUT`` under torchrun).
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
from conftest import ALL_SITES, char_tokenizer, random_pairs, tiny_model

from austeer_peft import fit_austeer
from austeer_peft.fitting.inputs import make_batches, shard_batches, tokenize_pairs

ROOT = Path(__file__).resolve().parents[2]
# 13 pairs in batches of 2: 7 batches for the two ranks to share; 3 pairs in one batch leave rank 1 idle.
CASES = {"split": (13, 2), "one_batch": (3, 4)}


def fit_and_save(folder: Path, num_pairs: int, batch_size: int, seed: int = 7, crash_at: Optional[int] = None,
                 **kwargs) -> int:
    """Fit on the tiny model, write this process's scores and adapter to `folder`; return the number of batches
    (forwards of the continuations: each batch first runs its shared prompts). ``crash_at``: raise at that
    forward, as a crash would."""
    model = tiny_model("llama")
    forwards = []

    def count(module, args, kwargs):
        forwards.append(kwargs.get("cache") is None or kwargs["cache"].get_seq_length() > 0)
        if len(forwards) == crash_at:
            raise KeyboardInterrupt("crash")

    model.register_forward_pre_hook(count, with_kwargs=True)
    result = fit_austeer(model, char_tokenizer(), random_pairs(num_pairs, seed=seed), sites=ALL_SITES, k=12,
                         alpha=4.0, batch_size=batch_size, progress=False, **kwargs)
    folder.mkdir(parents=True)
    result.scores.save(folder / "scores.safetensors", is_main_process=True)  # every process: to compare them all
    result.peft_model.save_pretrained(folder / "adapter")
    return sum(forwards)


def worker(out: Path) -> None:
    """What each torchrun process runs. Nobody initializes torch.distributed here: the fit sets it up itself."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    report = {}
    for name, (num_pairs, batch_size) in CASES.items():
        report[name] = fit_and_save(out / f"{name}-rank{rank}", num_pairs, batch_size)
    report["world_size"], report["backend"] = dist.get_world_size(), dist.get_backend()

    # Default save: only the main process writes.
    fit = fit_austeer(tiny_model("llama"), char_tokenizer(), random_pairs(4), sites=["ffn"], k=3, progress=False)
    fit.scores.save(out / f"default-save-rank{rank}.safetensors")

    # Different pairs on the two processes: refused on both, before any forward.
    try:
        fit_austeer(tiny_model("llama"), char_tokenizer(), random_pairs(5 + rank), sites=["ffn"], k=3, progress=False)
    except ValueError as error:
        report["mismatch"] = str(error)

    # A crash midway on both processes, then a resumed fit (each process from its own checkpoint file).
    checkpoint = out / "counts.safetensors"
    try:
        fit_and_save(out / f"crashed-rank{rank}", 13, 2, crash_at=3, checkpoint=checkpoint, checkpoint_every=1)
    except KeyboardInterrupt:
        report["checkpoint_files"] = sorted(p.name for p in out.glob("counts*"))
    report["resumed"] = fit_and_save(out / f"resumed-rank{rank}", 13, 2, checkpoint=checkpoint)

    # distributed=False: each process fits its own pairs, with no collective.
    report["local"] = fit_and_save(out / f"local-rank{rank}", 5, 2, seed=rank, distributed=False)
    (out / f"report-rank{rank}.json").write_text(json.dumps(report))


def same_files(folder: Path, other: Path) -> bool:
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(folder, other, names, shallow=False)
    return bool(names) and sorted(match) == names and not mismatch and not errors


def test_two_processes_split_the_pairs_and_match_a_single_process_fit_byte_for_byte(tmp_path):
    out = tmp_path / "torchrun"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = [json.loads((out / f"report-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2] and reports[0]["backend"] == "gloo"
    assert sum(r["split"] for r in reports) == 7 and min(r["split"] for r in reports) >= 2
    assert [r["one_batch"] for r in reports] == [1, 0]

    for name, (num_pairs, batch_size) in CASES.items():
        single = tmp_path / f"single-{name}"
        assert fit_and_save(single, num_pairs, batch_size) == -(-num_pairs // batch_size)
        for rank in (0, 1):
            assert same_files(out / f"{name}-rank{rank}", single), (name, rank)

    assert (out / "default-save-rank0.safetensors").exists()
    assert not (out / "default-save-rank1.safetensors").exists()
    for report in reports:
        assert "different pairs" in report["mismatch"] and "[5, 6]" in report["mismatch"]

    # Resumed after the crash: one batch per process was done (3 forwards: prompts, continuations, prompts), so
    # the others ran, and both processes end with the uninterrupted fit's bytes.
    assert sum(r["resumed"] for r in reports) == 7 - 2
    for rank in (0, 1):  # each process wrote its own file before the crash
        assert f"counts.rank{rank}-of-2.safetensors" in reports[rank]["checkpoint_files"]
    for rank in (0, 1):
        assert same_files(out / f"resumed-rank{rank}", tmp_path / "single-split"), rank

    for rank in (0, 1):
        assert reports[rank]["local"] == 3  # all 5 pairs in 3 batches: nothing split
        single = tmp_path / f"single-local-{rank}"
        fit_and_save(single, 5, 2, seed=rank)
        assert same_files(out / f"local-rank{rank}", single)
    assert not same_files(out / "local-rank0", out / "local-rank1")


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_shards_cover_every_batch_once_with_even_work(world_size):
    token_pairs = tokenize_pairs(char_tokenizer(), random_pairs(40, seed=2), max_length=None)
    batches = list(make_batches(token_pairs, 3, pad_id=0))
    shards = [shard_batches(batches, rank, world_size) for rank in range(world_size)]
    assert sorted(j for shard in shards for batch in shard for j in batch.pair_indices) == list(range(40))
    work = [sum(batch.input_ids.numel() for batch in shard) for shard in shards]
    assert max(work) - min(work) <= max(batch.input_ids.numel() for batch in batches)


def test_distributed_true_without_a_process_group_says_how_to_launch():
    with pytest.raises(ValueError, match="torchrun --nproc_per_node"):
        fit_austeer(tiny_model("llama"), char_tokenizer(), random_pairs(3), sites=["ffn"], k=3, progress=False,
                    distributed=True)
    with pytest.raises(ValueError, match="`distributed` must be"):
        fit_austeer(tiny_model("llama"), char_tokenizer(), random_pairs(3), sites=["ffn"], k=3, progress=False,
                    distributed="yes")


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
