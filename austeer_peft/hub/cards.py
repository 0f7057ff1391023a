"""Model cards for AUSteer adapters: what an adapter steers, how it scored, and how to load and merge it.

Cards are made with ``huggingface_hub.ModelCard`` from the template in ``model_cards/adapter_card.md``.

Neither library on the save path knows what an AUSteer adapter is: ``PeftModel.save_pretrained`` writes a generic
card (``create_or_update_model_card``), and transformers' ``push_to_hub`` then replaces ``README.md`` with the Hub's
current copy or with a template full of "[More Information Needed]". PEFT has no per-method hook for either. So when
PEFT attaches an AUSteer tuner to a ``PeftModel`` (``peft_model.base_model = AUSteerModel(...)``), that one instance
gets :class:`AUSteerHubMixin`, which overrides exactly those two methods; PEFT's classes and every other PeftModel
stay as they are. The attachment is seen through torch's public module-registration hook
(:func:`register_card_hooks`, called on ``import austeer_peft``).

Evaluation results and data sets are not configuration, so they do not live in ``AUSteerConfig``: a fit or an
evaluation attaches them with :func:`attach_card_info`, which keeps them on the tuner
(``peft_model.base_model.austeer_card_info``), and every card written afterwards shows them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from peft import PeftModel

from ..tuner.config import AUSteerConfig
from ..tuner.aus import AU
from ..tuner.model import AUSteerModel, table_to_aus
from ..tuner.sites import SITES

CARD_TAGS = ["austeer", "activation-steering", "peft"]
CARD_INFO_ATTRIBUTE = "austeer_card_info"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
# A source checkout has the template at the repository root; an installed package carries it as
# `austeer_peft/model_cards/` (pyproject maps the root folder there).
TEMPLATE_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "model_cards" / "adapter_card.md",
    Path(__file__).resolve().parents[1] / "model_cards" / "adapter_card.md",
)
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------------- card info


def attach_card_info(peft_model, *, datasets: Optional[list[str]] = None,
                     eval_results: Optional[list[Union[dict, EvalResult]]] = None,
                     adapter_name: Optional[str] = None) -> dict:
    """Record what a fit or an evaluation knows about an adapter, for the cards written from now on.

    Args:
        peft_model: the PeftModel that holds the adapter.
        datasets: Hub ids of the data sets the AUs were chosen on or evaluated on (card metadata ``datasets``).
        eval_results: one entry per score: ``{"task", "metric", "value"}`` plus optionally ``"baseline"`` (the
            unsteered model's score), ``"split"`` and ``"dataset"`` (Hub id of the task's data set); or
            ``huggingface_hub.EvalResult`` objects.
        adapter_name: the adapter they describe (default: the active one).

    Returns the adapter's card info (a dict with ``datasets`` and ``eval_results``); later calls add to it.
    """
    tuner = _austeer_tuner(peft_model)
    adapter_name = adapter_name or peft_model.active_adapters[0]
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r}; adapters: {sorted(peft_model.peft_config)}.")
    store = tuner.__dict__.setdefault(CARD_INFO_ATTRIBUTE, {})
    info = store.setdefault(adapter_name, {"datasets": [], "eval_results": []})
    if datasets is not None:
        if isinstance(datasets, str):
            datasets = [datasets]
        info["datasets"] = list(dict.fromkeys([*info["datasets"], *datasets]))
    for result in eval_results or []:
        info["eval_results"].append(_eval_row(result))
    return info


def get_card_info(peft_model, adapter_name: str) -> dict:
    """The card info attached to an adapter (empty lists when nothing was attached)."""
    store = _austeer_tuner(peft_model).__dict__.get(CARD_INFO_ATTRIBUTE) or {}
    info = store.get(adapter_name) or {}
    return {"datasets": list(info.get("datasets", [])),
            "eval_results": [_eval_row(r) for r in info.get("eval_results", [])]}


def _eval_row(result: Union[dict, EvalResult]) -> dict:
    if isinstance(result, EvalResult):
        return {"task": result.dataset_name, "metric": result.metric_name or result.metric_type,
                "value": result.metric_value, "split": result.dataset_split, "dataset": result.dataset_type,
                "baseline": None}
    if not isinstance(result, dict):
        raise TypeError(f"An evaluation result is a dict or a huggingface_hub.EvalResult, got {type(result).__name__}.")
    missing = [key for key in ("task", "metric", "value") if result.get(key) is None]
    if missing:
        raise ValueError(f"Evaluation result {result!r} lacks {missing}; give at least 'task', 'metric' and 'value'.")
    return {"task": str(result["task"]), "metric": str(result["metric"]), "value": result["value"],
            "split": result.get("split"), "dataset": result.get("dataset"), "baseline": result.get("baseline")}


def _austeer_tuner(peft_model) -> AUSteerModel:
    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(tuner, AUSteerModel):
        raise TypeError(f"Expected a PeftModel holding AUSteer adapters, got {type(peft_model).__name__}.")
    return tuner


# ---------------------------------------------------------------------------------------------------- facts


@dataclass
class AdapterFacts:
    """Everything a card says about one adapter, from a live model or from its saved files."""

    name: str
    config: AUSteerConfig
    aus: list[AU]
    file_size: int
    base_model: Optional[str]  # Hub id, local path or alias of the base model, when known
    causal_lm: bool
    datasets: list[str] = field(default_factory=list)
    eval_results: list[dict] = field(default_factory=list)


def facts_from_model(peft_model, adapter_name: str) -> AdapterFacts:
    """What a live PeftModel knows about one of its adapters."""
    from peft import PeftModelForCausalLM
    from safetensors.torch import save

    tuner = _austeer_tuner(peft_model)
    config = peft_model.peft_config[adapter_name]
    table = AUSteerModel._get_adapter_state_dict(peft_model, config, adapter_name, {}, [])
    base = config.base_model_name_or_path or getattr(tuner.model, "name_or_path", None) or None
    causal_lm = isinstance(peft_model, PeftModelForCausalLM) or is_causal_lm_class(type(tuner.model).__name__)
    info = get_card_info(peft_model, adapter_name)
    return AdapterFacts(adapter_name, config, peft_model.get_aus(adapter_name),
                        len(save(table, metadata={"format": "pt"})), base, causal_lm, info["datasets"],
                        info["eval_results"])


def facts_from_folder(folder: Union[str, os.PathLike], adapter_name: str = "default") -> AdapterFacts:
    """What the saved files of an adapter say about it (used for folders pushed or inspected without a model)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}; it is not a saved adapter (save one with "
                                    "`peft_model.save_pretrained(folder)`).")
    raw = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    if raw.get("peft_type") != "AUSTEER":
        raise ValueError(f"{folder} holds a {raw.get('peft_type')!r} adapter, not an AUSteer adapter.")
    config = AUSteerConfig.from_pretrained(str(folder))
    aus = table_to_aus(load_file(str(folder / ADAPTER_WEIGHTS_NAME)), config)
    base_class = (raw.get("auto_mapping") or {}).get("base_model_class") or ""
    causal_lm = config.task_type == "CAUSAL_LM" or is_causal_lm_class(base_class)
    datasets, eval_results = _card_info_from_readme(folder / CARD_NAME)
    return AdapterFacts(adapter_name, config, aus, (folder / ADAPTER_WEIGHTS_NAME).stat().st_size,
                        config.base_model_name_or_path, causal_lm, datasets, eval_results)


def is_causal_lm_class(class_name: str) -> bool:
    """Whether a transformers model class generates text (AutoModelForCausalLM maps to it: LlamaForCausalLM,
    GPT2LMHeadModel, ...); the card then carries the `text-generation` pipeline tag."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        if class_name in ((names,) if isinstance(names, str) else names):
            return True
    return False


def _card_info_from_readme(path: Path) -> tuple[list[str], list[dict]]:
    """Data sets and scores from an AUSteer card already in the folder (it was written with these files)."""
    card = load_austeer_card(path)
    if card is None:
        return [], []
    datasets = card.data.datasets or []
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    return datasets, [_eval_row(result) for result in card.data.eval_results or []]


def load_austeer_card(path: Union[str, os.PathLike]) -> Optional[ModelCard]:
    """The AUSteer card at ``path``, or None if there is no card there or it is not an AUSteer card."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        card = ModelCard.load(path)
    except Exception:  # a hand-written README with broken metadata is simply not ours
        return None
    return card if "austeer" in (card.data.tags or []) else None


# ---------------------------------------------------------------------------------------------------- rendering


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
    """Write the adapter card as ``save_directory/README.md`` (what ``save_pretrained`` does for AUSteer models)."""
    path = Path(save_directory) / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    adapter_card(peft_model, tags=tags).save(path)
    return path


def render_card(facts: AdapterFacts, *, other_adapters: Optional[list[str]] = None,
                tags: Optional[list[str]] = None) -> ModelCard:
    """Fill the template with one adapter's facts."""
    config, aus = facts.config, facts.aus
    base = _describe_base(facts.base_model, config.base_model_type)
    rows = [_eval_table_row(r) for r in facts.eval_results]
    card_data = ModelCardData(
        base_model=base.hub_id,
        library_name="peft",
        tags=[*CARD_TAGS, *[t for t in (tags or []) if t not in CARD_TAGS]],
        datasets=facts.datasets or None,
        pipeline_tag="text-generation" if facts.causal_lm else None,
        model_name=f"austeer-{base.short}" if rows else None,
        eval_results=[_to_eval_result(r) for r in facts.eval_results] or None,
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


def _describe_base(name_or_path: Optional[str], model_type: Optional[str]) -> _Base:
    from .models import MODEL_ALIASES, cache_dir

    if name_or_path:
        for alias, spec in MODEL_ALIASES.items():
            if Path(name_or_path).expanduser() == cache_dir() / alias:
                return _Base(None, alias, f"`{alias}` ({spec.gguf_file}, loaded with "
                             "`austeer_peft.models.load_model`)",
                             ["from austeer_peft.models import load_model", "",
                              f"base, tokenizer = load_model({alias!r})"], alias)
        load = ["from transformers import AutoModelForCausalLM", "",
                f"base = AutoModelForCausalLM.from_pretrained({name_or_path!r})"]
        if HUB_REPO_ID.match(name_or_path) and not os.path.exists(name_or_path):
            return _Base(name_or_path, name_or_path, f"[{name_or_path}](https://huggingface.co/{name_or_path})",
                         load, name_or_path)
        return _Base(None, Path(name_or_path).name or name_or_path, f"`{name_or_path}`", load, name_or_path)
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

    from .. import __version__

    return [("austeer-peft", __version__), ("PEFT", peft.__version__), ("Transformers", transformers.__version__),
            ("PyTorch", torch.__version__)]


# ---------------------------------------------------------------------------------------------------- hooks


class AUSteerHubMixin:
    """What a PeftModel holding AUSteer adapters does differently: it writes and uploads the AUSteer card."""

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write the AUSteer card as ``README.md`` (PEFT calls this first thing in ``save_pretrained``)."""
        save_adapter_card(self, output_dir)

    def push_to_hub(self, repo_id: str, *, commit_message: Optional[str] = None,
                    commit_description: Optional[str] = None, private: Optional[bool] = None,
                    token: Union[bool, str, None] = None, revision: Optional[str] = None, create_pr: bool = False,
                    max_shard_size: Union[int, str, None] = None, tags: Optional[list[str]] = None):
        """Upload ``adapter_config.json``, ``adapter_model.safetensors`` and the card to a Hub repository.

        The files are exactly what ``save_pretrained`` writes (transformers' own ``push_to_hub`` would replace the
        card with a generic one). See :func:`austeer_peft.export.push_to_hub`.
        """
        from .export import push_to_hub

        return push_to_hub(self, repo_id, commit_message=commit_message, commit_description=commit_description,
                           private=private, token=token, revision=revision, create_pr=create_pr, tags=tags)


def with_card_methods(cls: type) -> type:
    """``cls`` (a PeftModel class) with :class:`AUSteerHubMixin` in front; one subclass per class, importable from
    this module (so the models still pickle), with the original class name (so reprs do not change)."""
    if issubclass(cls, AUSteerHubMixin):
        return cls
    qualname = f"AUSteer{cls.__name__}"
    mixed = globals().get(qualname)
    if mixed is None or mixed.__bases__ != (AUSteerHubMixin, cls):
        mixed = type(cls.__name__, (AUSteerHubMixin, cls), {"__module__": __name__, "__qualname__": qualname,
                                                             "__doc__": cls.__doc__})
        globals()[qualname] = mixed
    return mixed


def __getattr__(name: str) -> type:
    # Unpickling a model in a fresh process looks its class up here before anything created it.
    if name.startswith("AUSteerPeftModel"):
        import peft

        base = getattr(peft, name[len("AUSteer"):], None)
        if isinstance(base, type):
            return with_card_methods(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _on_module_registration(module, name, submodule):
    # Runs for every submodule assignment in the process, so the cheapest test comes first.
    if name == "base_model" and isinstance(submodule, AUSteerModel) and isinstance(module, PeftModel):
        module.__class__ = with_card_methods(type(module))
    return None


_registration_handle = None


def register_card_hooks() -> None:
    """Give every PeftModel that gets an AUSteer tuner the AUSteer card methods (idempotent)."""
    global _registration_handle
    if _registration_handle is None:
        _registration_handle = torch.nn.modules.module.register_module_module_registration_hook(
            _on_module_registration)

