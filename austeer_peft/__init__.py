"""AUSteer (fine-grained activation steering) as a PEFT method. Importing this package registers it with PEFT."""

from .config import AUSteerConfig
from .layer import AUSteerLayer
from .model import AU, AUSteerModel
from .registry import register_austeer
from .sites import SITES

register_austeer()

__all__ = ["AU", "AUSteerConfig", "AUSteerLayer", "AUSteerModel", "SITES"]
__version__ = "0.1.0"
