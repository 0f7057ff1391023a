"""AUSteer (fine-grained activation steering) as a PEFT method. Importing this package registers it with PEFT."""

from .hub.cards import adapter_card, attach_card_info, register_card_hooks
from .evaluate.compare import compare_methods
from .tuner.config import AUSteerConfig
from .hub.export import merge_and_save, push_to_hub, save_merged, to_ia3
from .fitting.fit import FitResult, compute_momentum, fit_austeer
from .tuner.layer import AUSteerLayer
from .tuner.aus import AU
from .tuner.model import AUSteerModel
from .fitting.scores import MomentumScores
from .fitting.pairs import as_text_pairs, pairs_from_answer_pool, pairs_from_choices
from .tuner.registry import register_austeer
from .tuner.sites import SITES
from .evaluate.sweep import sweep_k_alpha

register_austeer()
register_card_hooks()  # AUSteer PeftModels write and push the AUSteer model card

__all__ = [
    "AU", "AUSteerConfig", "AUSteerLayer", "AUSteerModel", "FitResult", "MomentumScores", "SITES", "as_text_pairs",
    "compute_momentum", "fit_austeer", "pairs_from_answer_pool", "pairs_from_choices",
]
__all__ += ["adapter_card", "attach_card_info", "merge_and_save", "push_to_hub", "save_merged", "to_ia3"]
__all__ += ["compare_methods", "sweep_k_alpha"]
__version__ = "0.1.0"
