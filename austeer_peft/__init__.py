"""AUSteer (fine-grained activation steering) as a PEFT method.

Importing this package registers the method with PEFT (``austeer_peft.tuner``: one added ``PeftType`` member and
PEFT's ``register_peft_method``) and changes nothing else outside it.
"""

from .tuner import AUSteerConfig, AUSteerModel
from .tuner.aus import AU
from .tuner.layer import AUSteerLayer
from .tuner.sites import SITES
from .hub.cards import adapter_card
from .hub.facts import attach_card_info, package_version
from .hub.export import merge_and_save, push_to_hub, save_adapter, save_merged, to_ia3
from .hub.lora import to_lora
from .hub.gguf import merge_to_gguf
from .fitting.fit import FitResult, compute_momentum, fit_austeer
from .fitting.scores import MomentumScores
from .fitting.pairs import as_text_pairs, pairs_from_answer_pool, pairs_from_choices
from .evaluate.compare import compare_methods
from .evaluate.sweep import sweep_k_alpha

__all__ = [
    "AU", "AUSteerConfig", "AUSteerLayer", "AUSteerModel", "FitResult", "MomentumScores", "SITES", "as_text_pairs",
    "compute_momentum", "fit_austeer", "pairs_from_answer_pool", "pairs_from_choices",
]
__all__ += ["adapter_card", "attach_card_info", "merge_and_save", "push_to_hub", "save_adapter", "save_merged",
            "to_ia3", "to_lora"]
__all__ += ["compare_methods", "sweep_k_alpha"]
__all__ += ["merge_to_gguf"]
__version__ = package_version()  # one source: pyproject.toml
