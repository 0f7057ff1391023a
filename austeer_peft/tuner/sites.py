"""Where atomic units live in a model: site names -> modules, their width, and the weight a scale folds into.

All architecture knowledge of the package sits here. A site is found by looking for known module paths inside each
decoder layer (as the authors' code does with hooks); model code is never patched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .experts import fused_experts_axis, num_expert_units


@dataclass(frozen=True)
class Site:
    """A kind of place for AUs: which module inside a decoder layer, and which side of it carries the AUs."""

    name: str
    position: str  # "input" or "output"
    paths: tuple[str, ...]  # module paths relative to one decoder layer, tried in order ("" is the layer itself)
    description: str


SITES: dict[str, Site] = {
    site.name: site
    for site in (
        Site("attention", "input", ("self_attn.o_proj", "attn.c_proj", "self_attn.out_proj", "self_attn.dense"),
             "input of the attention output projection (concatenated head outputs), one AU per head dimension"),
        Site("ffn", "output", ("mlp", "feed_forward", "block_sparse_moe"),
             "output of the MLP block, before the residual add"),
        Site("ffn_inner", "input", ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "feed_forward.w2", "mlp.experts",
                                    "block_sparse_moe.experts"),
             "input of the MLP's down projection, one weight column per AU (on fused MoE experts: one column of one "
             "expert, AU = expert * inner width + column)"),
        Site("residual", "output", ("",), "output hidden state of the decoder layer"),
    )
}

# Last projection of an MLP block: the `ffn` site's scale folds into its output rows.
MLP_OUTPUT_PROJECTIONS = ("down_proj", "c_proj", "fc2", "w2", "dense_4h_to_h")
DECODER_LAYER_LIST_NAMES = ("layers", "h", "blocks", "layer")


@dataclass(frozen=True)
class SiteModule:
    """One module that carries candidate AUs."""

    name: str  # full module name in the base model (no PEFT wrappers in it)
    site: Optional[str]  # site name, or None when chosen by `target_modules`
    layer: Optional[int]  # decoder layer index, when the module sits inside one
    position: str  # "input" or "output"
    width: int  # number of AUs (dimensions) it carries


def unwrap(module: nn.Module) -> nn.Module:
    """The innermost wrapped module (PEFT layers keep the original in `base_layer`)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def base_named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> outermost module, with PEFT wrapper hops (`.base_layer`) removed from names."""
    modules: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if ".austeer_" in f".{name}":
            continue
        modules.setdefault(name.replace(".base_layer", ""), module)
    return modules


def text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers, found by name and, when the config says so, by length."""
    config = text_config(model)
    n_layers = getattr(config, "num_hidden_layers", None)
    found = [
        (name, module)
        for name, module in base_named_modules(model).items()
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in DECODER_LAYER_LIST_NAMES
    ]
    if n_layers is not None:
        found = [(name, module) for name, module in found if len(module) == n_layers] or found
    if not found:
        raise ValueError(
            f"Could not find the decoder layers of {type(model).__name__} (looked for a ModuleList named one of "
            f"{DECODER_LAYER_LIST_NAMES}). Pass `target_modules=[...]` with `position='input'|'output'` instead of "
            "`sites`."
        )
    return max(found, key=lambda item: len(item[1]))


def hidden_size(model: nn.Module) -> int:
    config = text_config(model)
    size = getattr(config, "hidden_size", None)
    if size is None:
        raise ValueError(f"{type(model).__name__} has no `config.hidden_size`; cannot size a block-output site.")
    return int(size)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, bitsandbytes Linear or GPT-2 Conv1D (weight stored [in, out])."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def au_width(model: nn.Module, module: nn.Module, position: str) -> int:
    """Number of AUs on one side of a module."""
    module = unwrap(module)
    if is_linear_like(module):
        in_features, out_features = linear_features(module)
        return in_features if position == "input" else out_features
    if position == "input" and fused_experts_axis(module) is not None:
        return num_expert_units(module)  # the input of every expert's down projection (see experts.py)
    return hidden_size(model)


def _layer_index(name: str, layers_prefix: str) -> Optional[int]:
    if not name.startswith(layers_prefix + "."):
        return None
    head = name[len(layers_prefix) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def candidate_modules(model: nn.Module, config) -> list[SiteModule]:
    """All modules that carry candidate AUs for `config` (an AUSteerConfig), in model order."""
    modules = base_named_modules(model)
    if config.target_modules is not None:
        return _target_module_candidates(model, config, modules)

    layers_prefix, layers = find_decoder_layers(model)
    candidates = []
    for site_name in config.sites:
        site = SITES[site_name]
        for layer in range(len(layers)):
            layer_name = f"{layers_prefix}.{layer}"
            paths = [f"{layer_name}.{path}" if path else layer_name for path in site.paths]
            name = next((path for path in paths if path in modules), None)
            if name is None:
                raise ValueError(
                    f"Site {site_name!r} ({site.description}) was not found in layer {layer} of "
                    f"{type(model).__name__}: looked for modules {', '.join(repr(p) for p in site.paths)} under "
                    f"{layer_name!r}. For this architecture pass `target_modules=['<module name>']` with "
                    f"`position='{site.position}'` instead of `sites`."
                )
            if site_name == "ffn_inner" and not is_linear_like(unwrap(modules[name])) \
                    and fused_experts_axis(unwrap(modules[name])) is None:
                raise ValueError(
                    f"Site 'ffn_inner' found {name!r} ({type(unwrap(modules[name])).__name__}), which is neither a "
                    "down projection nor transformers fused experts. For experts stored as separate modules pass "
                    "`target_modules=[r'.*experts\\.\\d+\\.down_proj']` with `position='input'` instead of `sites`."
                )
            width = au_width(model, modules[name], site.position)
            candidates.append(SiteModule(name, site_name, layer, site.position, width))
    order = {name: i for i, name in enumerate(modules)}
    return sorted(candidates, key=lambda c: order[c.name])


def _target_module_candidates(model, config, modules) -> list[SiteModule]:
    from peft.tuners.tuners_utils import check_target_module_exists

    try:
        layers_prefix = find_decoder_layers(model)[0]
    except ValueError:
        layers_prefix = None
    candidates = [
        SiteModule(name, None, _layer_index(name, layers_prefix) if layers_prefix else None, config.position,
                   au_width(model, module, config.position))
        for name, module in modules.items()
        if name and check_target_module_exists(config, name)
    ]
    if not candidates:
        raise ValueError(
            f"No module of {type(model).__name__} matches target_modules={config.target_modules!r}. Use full module "
            "names, name suffixes (e.g. 'o_proj') or a regex; `[n for n, _ in model.named_modules()]` lists them."
        )
    return candidates


@dataclass(frozen=True)
class WeightSlice:
    """A weight that absorbs a scale: ``getattr(owner, name)`` scaled along ``axis`` (and the bias, for outputs)."""

    owner: nn.Module
    name: str
    axis: int
    bias_name: Optional[str] = None
    experts: bool = False  # a fused [experts, ...] weight: AU d is slice d % size(axis) of expert d // size(axis)


def _linear_slice(module: nn.Module, side: str) -> WeightSlice:
    # Linear (and bitsandbytes Linear) store [out, in]; GPT-2's Conv1D stores [in, out].
    in_axis, out_axis = (0, 1) if isinstance(module, Conv1D) else (1, 0)
    if side == "input":
        return WeightSlice(module, "weight", in_axis)
    return WeightSlice(module, "weight", out_axis, "bias" if getattr(module, "bias", None) is not None else None)


def _block_output_slices(block: nn.Module, width: int) -> list[WeightSlice]:
    """Weights whose output rows produce a block's output: an MLP's last projection, or every expert's (and the
    shared expert's) down projection of a sparse MoE block."""
    for child_name in MLP_OUTPUT_PROJECTIONS:
        child = getattr(block, child_name, None)
        if child is not None and is_linear_like(unwrap(child)):
            return [_linear_slice(unwrap(child), "output")]
    experts = getattr(block, "experts", None)
    if experts is None:
        return []
    experts = unwrap(experts)  # wrapped when it also carries expert-level AUs: the weight's owner is the module
    slices = []
    if isinstance(experts, nn.ModuleList):  # one MLP module per expert
        for expert in experts:
            slices += _block_output_slices(expert, width) or [None]
    else:  # fused experts (transformers 5): a 3D down projection [experts, hidden, intermediate]
        down = getattr(experts, "down_proj", None)
        if not isinstance(down, torch.Tensor) or down.ndim != 3 or width not in down.shape[1:]:
            return []
        axis = 1 if down.shape[1] == width else 2
        bias = getattr(experts, "down_proj_bias", None)
        slices.append(WeightSlice(experts, "down_proj", axis, "down_proj_bias" if bias is not None else None))
    for shared_name in ("shared_expert", "shared_experts"):
        shared = getattr(block, shared_name, None)
        if shared is not None:
            slices += _block_output_slices(shared, width) or [None]
    return [] if None in slices else slices


def merge_slices(module: nn.Module, candidate: SiteModule) -> list[WeightSlice]:
    """The weights that absorb the AUs of `module` exactly; raises with the reason when there are none."""
    if candidate.site == "residual":
        raise ValueError(
            "AUs on the `residual` site cannot be merged into weights: a decoder layer's output is the residual "
            "stream, which also carries every earlier layer's contribution through the skip connections, so no single "
            "weight produces it. Keep the adapter unmerged, or use the `attention`, `ffn` or `ffn_inner` sites."
        )
    base = unwrap(module)
    if is_linear_like(base):
        return [_linear_slice(base, candidate.position)]
    if candidate.position == "input" and fused_experts_axis(base) is not None:
        return [WeightSlice(base, "down_proj", fused_experts_axis(base), experts=True)]
    slices = _block_output_slices(base, candidate.width) if candidate.position == "output" else []
    if not slices:
        raise ValueError(
            f"Cannot merge AUs on the {candidate.position} of {candidate.name} ({type(base).__name__}): it is not a "
            f"linear layer, and no projection named one of {MLP_OUTPUT_PROJECTIONS} (or MoE expert down projection) "
            "produces its output. Keep the adapter unmerged."
        )
    return slices
