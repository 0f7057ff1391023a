"""The AUSteer PEFT method: config, tuner, layer, and their registration with PEFT.

Importing this package registers AUSteer with PEFT (``registry.register_austeer``), once the config and tuner
classes exist; nothing else outside the package changes. It imports nothing from austeer_peft's other layers.
"""

from .config import AUSteerConfig
from .model import AUSteerModel
from .registry import register_austeer

register_austeer(AUSteerConfig, AUSteerModel)
