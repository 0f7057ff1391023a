"""Resumable fits: the partial counts of a pass and which of its batches are done, in one safetensors file.

Counts are sums, so a fit that crashed can go on from its last checkpoint and end with the very counts (and bytes)
of a fit that never stopped, as long as it runs the same batches: the file carries a fingerprint of the pairs (as
tokens), the candidate modules, the batching and the process's share, and a fit with other ones is refused rather
than mixed in. The file is written to a temporary name and renamed over the old one, so a crash while writing
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .counter import MomentumCounter

FORMAT = "austeer-counts-checkpoint/1"


def fingerprint(token_pairs: list[tuple[list[int], list[int]]], candidates: list, **settings: Any) -> str:
    """SHA-256 of everything that decides which pairs are counted in which batches, and on which AUs."""
    setup = json.dumps({"pairs": token_pairs, "candidates": [(c.name, c.position, c.width) for c in candidates],
                        **settings}, sort_keys=True, default=str)
    return hashlib.sha256(setup.encode()).hexdigest()


def process_path(path: Union[str, os.PathLike], share: Optional[tuple[int, int]]) -> Path:
    """The checkpoint file of this process: ``path`` itself, or ``name.rank{r}-of-{n}.suffix`` in a data-parallel
    fit (each process resumes its own share)."""
    path = Path(path)
    if share is None:
        return path
    rank, world_size = share
    return path.with_name(f"{path.stem}.rank{rank}-of-{world_size}{path.suffix}")


class CountsCheckpoint:
    """Save and restore one process's counts and done batches (indices into its list of batches).

    ``every``: write after this many newly done batches (and always at the end of the pass).
    """

    def __init__(self, path: Union[str, os.PathLike], fingerprint: str, num_batches: int, every: int) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"`checkpoint_every` must be a positive number of batches, got {every!r}.")
        self.path, self.fingerprint, self.every = Path(path), fingerprint, every
        self.done = torch.zeros(num_batches, dtype=torch.bool)
        self._unsaved = 0

    def restore(self, counter: MomentumCounter) -> set[int]:
        """Load the checkpoint into ``counter`` if the file exists; return the indices of the batches it holds."""
        if not self.path.exists():
            return set()
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{self.path} is not an AUSteer counts checkpoint (format "
                                 f"{metadata.get('format')!r}); pass another --checkpoint path or delete the file.")
            if metadata.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"The checkpoint {self.path} was written by a fit with other pairs or arguments (pairs, sites or "
                    "target_modules, batch_size, max_length, share_prompts, chat_template, the model, or the number "
                    "of processes differ). Rerun with exactly the same ones to resume, or delete the file (or pass "
                    "another checkpoint path) to start over."
                )
            counts, done = handle.get_tensor("counts"), handle.get_tensor("done").bool()
        if done.shape != self.done.shape:
            raise ValueError(f"{self.path} holds {done.numel()} batches, this fit has {self.done.numel()}; delete it "
                             "to start over.")
        counter.set_counts(counts, int(metadata["num_pairs"]))
        self.done = done.clone()
        return set(torch.nonzero(done).flatten().tolist())

    def batch_done(self, index: int, counter: MomentumCounter) -> None:
        self.done[index] = True
        self._unsaved += 1
        if self._unsaved >= self.every:
            self.save(counter)

    def save(self, counter: MomentumCounter) -> None:
        """Write the counts so far: to a temporary file, synced, then renamed over the checkpoint."""
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        save_file({"counts": counter.flat_counts().contiguous(), "done": self.done.to(torch.uint8)}, str(temporary),
                  metadata={"format": FORMAT, "fingerprint": self.fingerprint, "num_pairs": str(counter.num_pairs)})
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        self._unsaved = 0
