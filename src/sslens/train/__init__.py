"""Training: the typed config, optimisers and schedule, and the one training loop.

>>> from sslens.train import load_config, train  # doctest: +SKIP
>>> run = train(load_config("simclr-synthetic", {"epochs": 2}))  # doctest: +SKIP
>>> method, meta = sslens.load_model(run)  # doctest: +SKIP
"""

from sslens.lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "sslens.train.config",
    "load_config": "sslens.train.config",
    "save_config": "sslens.train.config",
    "packaged_configs": "sslens.train.config",
    "train": "sslens.train.loop",
    "train_step": "sslens.train.loop",
    "LARS": "sslens.train.optim",
    "OPTIMIZERS": "sslens.train.optim",
    "create_optimizer": "sslens.train.optim",
    "lr_at": "sslens.train.optim",
    "parameter_groups": "sslens.train.optim",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
