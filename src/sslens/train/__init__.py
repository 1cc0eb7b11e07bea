"""Training: the typed config, optimisers and schedule, the one training loop, checkpoints.

>>> from sslens.train import load_config, train, load_model  # doctest: +SKIP
>>> run = train(load_config("simclr-synthetic", {"epochs": 2}))  # doctest: +SKIP
>>> method, meta = load_model(run)  # doctest: +SKIP
"""

from sslens.train.checkpoint import (
    latest_checkpoint,
    load_model,
    provenance,
    save_checkpoint,
    save_model,
)
from sslens.train.config import TrainConfig, load_config, save_config
from sslens.train.loop import train
from sslens.train.optim import LARS, OPTIMIZERS, create_optimizer, lr_at, parameter_groups

__all__ = [
    "LARS",
    "OPTIMIZERS",
    "TrainConfig",
    "create_optimizer",
    "latest_checkpoint",
    "load_config",
    "load_model",
    "lr_at",
    "parameter_groups",
    "provenance",
    "save_checkpoint",
    "save_config",
    "save_model",
    "train",
]
