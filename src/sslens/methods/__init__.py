"""Self-supervised methods. Importing this package registers every method in ``METHODS``."""

from sslens.methods import losses
from sslens.methods.base import METHODS, SSLMethod, StepOutput, create_method
from sslens.methods.moco import MoCo
from sslens.methods.simclr import SimCLR
from sslens.methods.swav import SwAV
from sslens.models import imports  # noqa: F401  (registers the "imported" method for load_model)

__all__ = [
    "METHODS",
    "MoCo",
    "SSLMethod",
    "SimCLR",
    "StepOutput",
    "SwAV",
    "create_method",
    "losses",
]
