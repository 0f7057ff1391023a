"""AUSteer (fine-grained activation steering) as a PEFT method. Importing this package registers it with PEFT."""

from .config import AUSteerConfig
from .fit import FitResult, compute_momentum, fit_austeer
from .layer import AUSteerLayer
from .model import AU, AUSteerModel
from .momentum import MomentumScores
from .pairs import as_text_pairs, pairs_from_answer_pool, pairs_from_choices
from .registry import register_austeer
from .sites import SITES

register_austeer()

__all__ = [
    "AU", "AUSteerConfig", "AUSteerLayer", "AUSteerModel", "FitResult", "MomentumScores", "SITES", "as_text_pairs",
    "compute_momentum", "fit_austeer", "pairs_from_answer_pool", "pairs_from_choices",
]
__version__ = "0.1.0"
