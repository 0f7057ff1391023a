"""``austeer inspect``: show what a saved adapter steers (config, AUs per layer and per module, file size), from a
local folder or a Hub repository.

A package module named like the standard library's ``inspect``: import it as ``from . import inspect`` (as
``cli/__init__.py`` does) or ``austeer_peft.cli.inspect``; nothing here imports the standard library's one.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional

from huggingface_hub import snapshot_download

from ..hub.cards import facts_from_folder, site_and_layer
from .command import Command, CommandError


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="a saved adapter: a local folder or a Hub id")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of the adapter")
    parser.add_argument("--all", action="store_true", help="list every AU (default: up to 8 per module)")
    parser.add_argument("--json", action="store_true", help="print the config and all AUs as JSON")


def run_inspect(args: argparse.Namespace) -> int:
    folder = _adapter_folder(args.adapter, args.revision)
    facts = facts_from_folder(folder)
    config, aus = facts.config, facts.aus
    modules: dict[str, list] = {}
    for au in aus:
        modules.setdefault(au.module, []).append(au)
    if args.json:
        print(json.dumps({"adapter": args.adapter, "file_size": facts.file_size, "config": config.to_dict(),
                          "aus": [au._asdict() for au in aus]}, indent=2, default=str))
        return 0

    sites = ", ".join(config.sites) if config.target_modules is None else \
        f"target_modules={config.target_modules} ({config.position})"
    rows = [("adapter", args.adapter),
            ("base model", f"{config.base_model_name_or_path or 'not recorded'}"
                           f"{f' ({config.base_model_type})' if config.base_model_type else ''}"),
            ("sites", sites),
            ("k, alpha", f"{config.k}, {config.alpha:g}"),
            ("file", f"adapter_model.safetensors, {facts.file_size:,} bytes"),
            ("steered", f"{len(aus)} AUs in {len(modules)} modules")]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name + ':':<{width + 2}}{value}")

    columns = list(config.sites) if config.target_modules is None else ["target_modules"]
    by_layer: dict = {}
    for au in aus:
        site, layer = site_and_layer(au.module, config)
        column = columns[0] if config.target_modules is not None else site or "other"
        by_layer.setdefault(layer, Counter())[column] += 1
    if by_layer:
        print("\nAUs per layer:")
        for layer in sorted(by_layer, key=lambda x: (x is None, x or 0)):
            counts = ", ".join(f"{column} {by_layer[layer][column]}" for column in [*columns, "other"]
                               if by_layer[layer][column])
            print(f"  layer {'-' if layer is None else layer:>3}: {counts}")

    print("\nAUs per module (dim: γ):")
    name_width = max((len(name) for name in modules), default=0)
    for name, module_aus in modules.items():
        shown = module_aus if args.all else module_aus[:8]
        listed = ", ".join(f"{au.dim}: {au.gamma:+.4g}" for au in shown)
        more = f", ... {len(module_aus) - len(shown)} more (--all)" if len(shown) < len(module_aus) else ""
        count = f"{len(module_aus)} AU" + ("" if len(module_aus) == 1 else "s")
        print(f"  {name:<{name_width}}  width {config.steered_modules[name]:>5}  {count:>8}  {listed}{more}")
    return 0


def _adapter_folder(adapter: str, revision: Optional[str] = None) -> Path:
    """A local folder holding the adapter's files: the folder itself, or the Hub snapshot in the local cache."""
    if os.path.isdir(adapter):
        return Path(adapter)
    try:
        return Path(snapshot_download(adapter, revision=revision,
                                      allow_patterns=["adapter_config.json", "adapter_model.safetensors", "README.md"]))
    except Exception as error:  # huggingface_hub raises many kinds; all mean "cannot get it"
        raise CommandError(f"{adapter!r} is neither a local folder nor a Hub repository that can be fetched "
                           f"({type(error).__name__}: {error})") from None


COMMAND = Command(
    "inspect", "show what a saved adapter steers: config, AUs per layer and module, file size",
    "Print an AUSteer adapter's configuration, its atomic units per layer and per module (dimension: γ)\n"
    "and the size of its weights file.\n\n"
    "examples:\n  austeer inspect out/adapter\n  austeer inspect your-name/my-adapter --all",
    add_inspect_arguments, run_inspect,
)
