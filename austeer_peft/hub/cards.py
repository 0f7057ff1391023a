"""Model cards for AUSteer adapters: what an adapter steers, how it scored, and how to load and merge it.

Cards are made with ``huggingface_hub.ModelCard`` from the template in ``model_cards/adapter_card.md``, filled with
the facts of ``facts.py``. PEFT's ``save_pretrained`` writes its own generic card and has no per-method hook for
another one, so AUSteer's own save and upload paths write this card: ``austeer_peft.save_adapter`` and
``austeer_peft.push_to_hub`` (``export.py``).
"""

from __future__ import annotations

import os
import re
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..tuner.aus import AU
from ..tuner.config import AUSteerConfig
from ..tuner.sites import SITES
from .facts import ADAPTER_CONFIG_NAME, CARD_NAME, AdapterFacts, facts_from_folder, facts_from_model, package_version

CARD_TAGS = ["austeer", "activation-steering", "peft"]
# A source checkout has the template at the repository root; an installed package carries it as
# `austeer_peft/model_cards/` (pyproject maps the root folder there).
TEMPLATE_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "model_cards" / "adapter_card.md",
    Path(__file__).resolve().parents[1] / "model_cards" / "adapter_card.md",
)
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def adapter_card(peft_model, adapter_name: Optional[str] = None, *, tags: Optional[list[str]] = None) -> ModelCard:
    """The model card of a PeftModel's AUSteer adapter (default: "default", or the active adapter).

    Other adapters of the model are listed; PEFT saves them in subfolders named after them.
    """
    names = list(peft_model.peft_config)
    if adapter_name is None:
        adapter_name = "default" if "default" in names else peft_model.active_adapters[0]
    others = [name for name in names if name != adapter_name]
    return render_card(facts_from_model(peft_model, adapter_name), other_adapters=others, tags=tags)


def adapter_card_from_folder(folder: Union[str, os.PathLike], *, tags: Optional[list[str]] = None) -> ModelCard:
    """The model card of an adapter saved in ``folder`` (its config and table; scores from an existing card)."""
    folder = Path(folder)
    others = sorted(p.name for p in folder.iterdir() if (p / ADAPTER_CONFIG_NAME).is_file()) if folder.is_dir() else []
    return render_card(facts_from_folder(folder), other_adapters=others, tags=tags)


def save_adapter_card(peft_model, save_directory: Union[str, os.PathLike], *, tags: Optional[list[str]] = None) -> Path:
    """Write the adapter card as ``save_directory/README.md`` (``austeer_peft.save_adapter`` calls this)."""
    path = Path(save_directory) / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    adapter_card(peft_model, tags=tags).save(path)
    return path


def render_card(facts: AdapterFacts, *, other_adapters: Optional[list[str]] = None,
                tags: Optional[list[str]] = None) -> ModelCard:
    """Fill the template with one adapter's facts."""
    config, aus = facts.config, facts.aus
    base = _describe_base(facts.base_model, config.base_model_type, facts.base_source)
    rows = [_eval_table_row(r) for r in facts.eval_results]
    # `base_model_relation: adapter` places the adapter in the base model's tree on the Hub.
    relation = {"base_model_relation": "adapter"} if base.hub_id else {}
    card_data = ModelCardData(
        base_model=base.hub_id,
        **relation,
        library_name="peft",
        tags=[*CARD_TAGS, *[t for t in (tags or []) if t not in CARD_TAGS]],
        datasets=facts.datasets or None,
        pipeline_tag="text-generation" if facts.causal_lm else None,
        model_name=f"austeer-{base.short}" if rows else None,
        eval_results=[_to_eval_result(r) for r in facts.eval_results] or None,
        **({"prompt_format": facts.prompt_format} if facts.prompt_format else {}),
    )
    sites = _site_rows(config)
    columns, layer_rows = _layer_table(config, aus)
    gammas = [au.gamma for au in aus]
    layers = sorted(row["layer"] for row in layer_rows if row["layer"] != "-")
    steered = f"{_plural(len(aus), 'activation')} in {_plural(len({au.module for au in aus}), 'module')}"
    if layers:
        steered += f" of {_plural(len(layers), 'layer')} ({_ranges(layers)})"
    gamma_text = (f"{_plural(sum(g > 0 for g in gammas), 'AU')} promoted (γ > 0), "
                  f"{sum(g < 0 for g in gammas)} suppressed (γ < 0); from {min(gammas):.4g} to {max(gammas):.4g}"
                  if gammas else "no AUs set")
    base_text = base.text + (f" (`{config.base_model_type}`)" if base.load_code and config.base_model_type else "")
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        title=f"AUSteer adapter for {base.short}",
        base_model_text=base_text,
        sites=sites,
        sites_text=", ".join(f"`{site['name']}`" for site in sites),
        k=config.k,
        alpha=f"{config.alpha:g}",
        steered_text=steered,
        gamma_text=gamma_text,
        file_size=_format_size(facts.file_size),
        layer_columns=columns,
        layer_rows=layer_rows,
        eval_rows=rows,
        datasets=", ".join(f"[{d}](https://huggingface.co/datasets/{d})" if HUB_REPO_ID.match(d) else f"`{d}`"
                           for d in facts.datasets),
        usage_code=_usage_code(base, facts.causal_lm),
        prompt_format=facts.prompt_format,
        other_adapters=", ".join(f"`{name}`" for name in other_adapters or []),
        mergeable=not any(site_and_layer(au.module, config)[0] == "residual" for au in aus),
        merge_code=_merge_code(),
        merge_command=_merge_command(base),
        versions=_versions(),
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "layers 0-2, 5, 7-8"."""
    parts, start = [], numbers[0]
    for previous, current in zip(numbers, [*numbers[1:], None]):
        if current is None or current != previous + 1:
            parts.append(f"{start}-{previous}" if previous != start else f"{start}")
            start = current
    return ("layer " if len(numbers) == 1 else "layers ") + ", ".join(parts)


def template_path() -> Path:
    for candidate in TEMPLATE_CANDIDATES:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"The AUSteer model card template is missing; looked in "
                            f"{[str(p) for p in TEMPLATE_CANDIDATES]}.")


@dataclass(frozen=True)
class _Base:
    hub_id: Optional[str]  # for the card metadata (the Hub validates `base_model`, so only real repo ids)
    short: str  # for the title
    text: str  # markdown, for the body
    load_code: Optional[list[str]]  # python lines that make `base` (None: unknown)
    cli_name: Optional[str]  # what `austeer merge --model` takes


def _describe_base(name_or_path: Optional[str], model_type: Optional[str],
                   source: Optional[dict] = None) -> _Base:
    from .models import MODEL_ALIASES, cache_dir, canonical_hub_id

    source = source or {}
    alias = source.get("alias") if source.get("alias") in MODEL_ALIASES else None
    if alias is None and name_or_path:  # adapters saved before the Hub id was recorded name the cache folder
        alias = next((a for a in MODEL_ALIASES if Path(name_or_path).expanduser() == cache_dir() / a), None)
    if alias is not None:
        spec = MODEL_ALIASES[alias]
        hub_id = canonical_hub_id(name_or_path) if name_or_path else None
        hub_id = hub_id or spec.hub_id or None
        repo = f"[{hub_id}](https://huggingface.co/{hub_id}) " if hub_id else ""
        text = (f"{repo}as `{alias}`: the GGUF file {spec.gguf_file} ({spec.quantization or 'quantized'}, "
                "dequantized on load by `austeer_peft.models.load_model`)")
        return _Base(hub_id, alias, text,
                     ["from austeer_peft.models import load_model", "",
                      f"base, tokenizer = load_model({alias!r})  # the weights the AUs were chosen on"], alias)
    gguf = f", from the GGUF file {source['gguf_file']}" if source.get("gguf_file") else ""
    gguf_argument = f", gguf_file={source['gguf_file']!r}" if source.get("gguf_file") else ""
    if name_or_path:
        hub_id = canonical_hub_id(name_or_path)
        load = ["from transformers import AutoModelForCausalLM", "",
                f"base = AutoModelForCausalLM.from_pretrained({hub_id or name_or_path!r}{gguf_argument})"]
        if hub_id is not None:
            return _Base(hub_id, hub_id, f"[{hub_id}](https://huggingface.co/{hub_id}){gguf}", load, hub_id)
        return _Base(None, Path(name_or_path).name or name_or_path, f"`{name_or_path}`{gguf}", load, name_or_path)
    kind = f"a `{model_type}` model" if model_type else "its base model"
    return _Base(None, model_type or "a transformers model", f"{kind} (not recorded)", None, None)


def _usage_code(base: _Base, causal_lm: bool) -> str:
    lines = ["import austeer_peft  # registers the AUSteer method with PEFT", "from peft import PeftModel"]
    if base.load_code is None:
        lines += ["", "# `base`: the model the adapter was made for (same architecture, width and depth)"]
    else:
        auto_class = "AutoModelForCausalLM" if causal_lm else "AutoModel"
        lines += [line.replace("AutoModelForCausalLM", auto_class) for line in base.load_code]
    lines += ["model = PeftModel.from_pretrained(base, adapter)"]
    return "\n".join(lines)


def _merge_code() -> str:
    return "\n".join(["merged = model.merge_and_unload()  # the base model's class, with the factors in its weights",
                      'merged.save_pretrained("merged")'])


def _merge_command(base: _Base) -> Optional[str]:
    if base.cli_name is None:
        return None
    return f'austeer merge --model {shlex.quote(base.cli_name)} --adapter "$ADAPTER" --output merged'


def site_and_layer(module: str, config: AUSteerConfig) -> tuple[Optional[str], Optional[int]]:
    """(site, layer) of a steered module name: its first numeric part is the layer, the rest the site's path."""
    match = re.match(r"^(?P<prefix>.+?)\.(?P<layer>\d+)(?:\.(?P<path>.+))?$", module)
    if match is None:
        return None, None
    layer, path = int(match["layer"]), match["path"] or ""
    if config.target_modules is None:
        for site in config.sites:
            if path in SITES[site].paths:
                return site, layer
    return None, layer


def _site_rows(config: AUSteerConfig) -> list[dict]:
    if config.target_modules is not None:
        return [{"name": "target_modules",
                 "description": f"the {config.position} of the modules matching {config.target_modules!r}"}]
    return [{"name": site, "description": SITES[site].description} for site in config.sites]


def _layer_table(config: AUSteerConfig, aus: list[AU]) -> tuple[list[str], list[dict]]:
    columns = list(config.sites) if config.target_modules is None else ["target_modules"]
    counts: Counter = Counter()
    for au in aus:
        site, layer = site_and_layer(au.module, config)
        counts[(layer, columns[0] if config.target_modules is not None else site or "other")] += 1
    if any(column == "other" for _, column in counts):
        columns.append("other")
    layers = sorted({layer for layer, _ in counts}, key=lambda layer: (layer is None, layer or 0))
    rows = []
    for layer in layers:
        row = [counts[(layer, column)] for column in columns]
        rows.append({"layer": "-" if layer is None else layer, "counts": row, "total": sum(row)})
    return columns, rows


def _eval_table_row(row: dict) -> dict:
    return {"task": row["task"], "split": row.get("split") or "-", "metric": row["metric"],
            "value": _format_score(row["value"]), "baseline": _format_score(row.get("baseline"))}


def _to_eval_result(row: dict) -> EvalResult:
    return EvalResult(task_type="text-generation", dataset_type=row.get("dataset") or row["task"],
                      dataset_name=row["task"], dataset_split=row.get("split"), metric_type=row["metric"],
                      metric_value=row["value"])


def _format_score(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _format_size(size: int) -> str:
    return f"{size:,} bytes" if size < 10_000 else f"{size / 1024:,.1f} KiB"


def _versions() -> list[tuple[str, str]]:
    import peft
    import transformers

    return [("austeer-peft", package_version()), ("PEFT", peft.__version__), ("Transformers", transformers.__version__),
            ("PyTorch", torch.__version__)]
