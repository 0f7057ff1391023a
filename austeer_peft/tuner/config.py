"""AUSteerConfig: which activations may be steered, and how strongly the fit should steer them.

Separate from the tuner, as in every PEFT method: configs are read and written (``adapter_config.json``) without a
model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from .registry import add_peft_type_member
from .sites import SITES

AUSTEER = add_peft_type_member()


@dataclass
class AUSteerConfig(PeftConfig):
    """Configuration of an AUSteer adapter (Fine-Grained Activation Steering, ICLR 2026).

    An adapter multiplies a few atomic units (AUs, single activation dimensions) by a fixed factor ``1 + γ`` at every
    token position. The AUs themselves are data, not configuration: they are chosen by :func:`austeer_peft.fit_austeer`
    or set with ``peft_model.set_aus(...)`` and stored in ``adapter_model.safetensors``.

    Args:
        sites: where AUs live, one or more of ``"attention"`` (input of each layer's attention output projection),
            ``"ffn"`` (output of each layer's MLP block), ``"ffn_inner"`` (input of the MLP's down projection) and
            ``"residual"`` (output of each decoder layer). Defaults to ``"attention"`` unless ``target_modules`` is
            given.
        target_modules: instead of sites, module names (suffixes or a regex, as in other PEFT methods) whose
            ``position`` carries the AUs.
        position: ``"input"`` or ``"output"``; only used with ``target_modules``.
        k: number of AUs a fit keeps (top-k by activation momentum over all layers and sites).
        alpha: steering strength; a fitted AU gets ``γ = α·r_pos`` or ``γ = -α·r_neg``.
        scope: which token positions are steered. ``"all"`` (default, as in the paper): every position, prompt and
            generated. ``"generated"``: inside ``generate``, the generated tokens plus the last prompt position (the
            one that predicts the first new token); in a plain forward, a call that starts a sequence (no or an empty
            KV cache) steers only the last real token of each row, and a call that continues a KV cache steers all
            its tokens. ``generate`` tells the layers where the prompt ends through PEFT's per-call context
            (``PeftModel.generate`` enters ``AUSteerModel._enable_peft_forward_hooks``), so call it on the
            PeftModel. ``"from_position"``: every token whose position among its row's real tokens (left padding
            not counted, the first token is 0) is at least ``scope_position``. Only ``"all"`` can be merged.
        scope_position: the first steered position for ``scope="from_position"``.
        steered_modules: filled by the package: each module that carries AUs, mapped to its number of candidate
            AUs (its width). The adapter file indexes into this list; loading checks it against the base model.
        base_model_type: filled by the package: ``config.model_type`` of the model the AUs were chosen on.
        base_model_source: filled by ``austeer_peft.save_adapter``: where the base model's weights came from when
            not from ``base_model_name_or_path``'s own checkpoint, e.g. a GGUF file and its quantization (metadata
            for the model card; loading does not read it).
        aus: filled by the package: the AUs themselves, ``{module: [[dim, γ], ...]}``, the same as the adapter's
            weights table. Loaders that read only ``adapter_config.json`` and then load weights by parameter name
            (transformers' ``model.load_adapter``, ``from_pretrained(adapter_dir)``, ``pipeline``) set the AUs from
            here when they inject the adapter; ``PeftModel.from_pretrained`` checks that both copies agree.

    A config read with :meth:`from_pretrained` remembers where it was read from (not saved), and the adapter created
    from it reads its AUs from the weights file saved there; see ``AUSteerModel.inject_adapter``.
    """

    sites: Optional[Union[str, list[str]]] = field(default=None, metadata={"help": "attention | ffn | ffn_inner | residual"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules carrying AUs."})
    position: Literal["input", "output"] = field(default="output", metadata={"help": "Side of target_modules."})
    k: int = field(default=100, metadata={"help": "Number of AUs a fit keeps."})
    alpha: float = field(default=15.0, metadata={"help": "Steering strength α."})
    scope: Literal["all", "generated", "from_position"] = field(
        default="all", metadata={"help": "Steered positions: all | generated | from_position."})
    scope_position: Optional[int] = field(default=None, metadata={"help": "First steered position (from_position)."})
    steered_modules: dict[str, int] = field(default_factory=dict, metadata={"help": "Filled on set_aus."})
    base_model_type: Optional[str] = field(default=None, metadata={"help": "Filled on set_aus."})
    base_model_source: Optional[dict] = field(default=None, metadata={"help": "GGUF origin of the base weights."})
    aus: Optional[dict[str, list[list[float]]]] = field(default=None, metadata={"help": "Filled on set_aus."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Unused; PEFT API parity."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = AUSTEER
        if self.target_modules is not None and self.sites is not None:
            raise ValueError("Pass either `sites` or `target_modules` (with `position`) to AUSteerConfig, not both.")
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)
        if self.target_modules is None:
            sites = ["attention"] if self.sites is None else self.sites
            sites = [sites] if isinstance(sites, str) else list(sites)
            unknown = [s for s in sites if s not in SITES]
            if unknown or not sites:
                raise ValueError(
                    f"Unknown AUSteer site(s) {unknown or sites!r}. Known sites: {sorted(SITES)}; or pass "
                    "`target_modules=[...]` with `position='input'|'output'` for other modules."
                )
            self.sites = list(dict.fromkeys(sites))
        if self.aus is not None and not (isinstance(self.aus, dict) and all(
                isinstance(rows, list) and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in rows)
                for rows in self.aus.values())):
            raise ValueError("`aus` must map module names to lists of [dim, gamma] pairs (it is filled by the "
                             f"package; leave it out to set AUs with set_aus), got {str(self.aus)[:80]!r}.")
        if self.position not in ("input", "output"):
            raise ValueError(f"`position` must be 'input' or 'output', got {self.position!r}.")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0:
            raise ValueError(f"`k` must be a positive integer (the number of AUs to steer), got {self.k!r}.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise ValueError(f"`alpha` must be a finite number > 0 (typical range 1..100), got {self.alpha!r}.")
        self.alpha = float(self.alpha)
        if self.scope not in ("all", "generated", "from_position"):
            raise ValueError(f"`scope` must be 'all', 'generated' or 'from_position', got {self.scope!r}.")
        if self.scope == "from_position":
            if isinstance(self.scope_position, bool) or not isinstance(self.scope_position, int) \
                    or self.scope_position < 0:
                raise ValueError("scope='from_position' needs `scope_position`, the first steered token position (an "
                                 f"integer >= 0, counted over each row's real tokens); got {self.scope_position!r}.")
        elif self.scope_position is not None:
            raise ValueError(f"`scope_position` is only used with scope='from_position', but scope={self.scope!r}; "
                             "drop it or set scope='from_position'.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
        """Read ``adapter_config.json`` (as ``PeftConfig.from_pretrained``) and remember where from, so that the
        adapter created from this config reads its AU table from the same place while PEFT can still undo it."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        hub_kwargs, _, _ = cls._split_kwargs(kwargs)
        if subfolder is not None:
            hub_kwargs["subfolder"] = subfolder
        # A plain attribute, not a dataclass field: it is not written to adapter_config.json.
        config._table_source = (str(pretrained_model_name_or_path), hub_kwargs)
        return config
