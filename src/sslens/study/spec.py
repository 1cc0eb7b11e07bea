"""The study's configuration as data: the dataclasses and key checks every other ``study``
module builds on (the bottom of :mod:`sslens.study`; it imports no other study module).

:func:`sslens.study.config.load_study_config` reads and validates a study file into these.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from sslens.checks import suggestion
from sslens.errors import UserError
from sslens.train.config import TrainConfig

#: Dataset keys and the type each must have.
DATASET_KEYS: dict[str, Any] = {
    "name": str,
    "data_dir": str | None,
    "image_size": int,
    "options": dict,
    "train_options": dict,
    "test_options": dict,
}

#: Training keys a model entry may not set: the study's dataset section owns them, and the
#: study decides where models are written.
STUDY_OWNED_TRAIN_KEYS = ("data", "data_dir", "data_options", "image_size", "out", "progress")

#: The name of the floor model the study adds (``random_init: true``): the first trained
#: model's architecture with random initial weights, put through every experiment like the others.
RANDOM_INIT = "random-init"
#: The floor's learning principle in the study's tables (it learned nothing).
RANDOM_WEIGHTS = "none (random weights)"

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def unknown_key_error(key: str, where: str, valid: list[str]) -> UserError:
    return UserError(f"Unknown key {key!r} {where}.{suggestion(key, valid)} Valid keys: {', '.join(valid)}.")


def check_keys(mapping: dict, valid: list[str], where: str) -> None:
    """Raise a UserError naming the first key of ``mapping`` that is not in ``valid``."""
    for key in mapping:
        if key not in valid:
            raise unknown_key_error(str(key), where, valid)


@dataclass
class ModelSpec:
    """One model of the study: trained from ``train`` or loaded from ``checkpoint``."""

    name: str
    train: TrainConfig | None = None
    checkpoint: str | None = None
    #: layout of a published checkpoint file (a name in ``sslens.published.CHECKPOINT_FORMATS``: moco,
    #: swav, simclr, byol, barlowtwins, vicreg, dino, torchvision, timm), imported on first use; None for
    #: an sslens model directory or run.
    format: str | None = None
    #: the ResNet of the checkpoint; None: read from its keys.
    arch: str | None = None
    timm_name: str | None = None
    #: the configured name when the study trains this model once per seed (``seeds``): the
    #: spec is then named ``<group>-seed<k>``; None for a model trained (or loaded) once.
    group: str | None = None


# Keys a checkpoint model may add to import a published file directly (see `sslens import`).
CHECKPOINT_IMPORT_KEYS = ("format", "arch", "timm_name")


@dataclass
class StudyConfig:
    """A validated study; see the module docstring for the meaning of each key."""

    models: list[ModelSpec]
    title: str = "sslens study"
    seed: int = 0
    #: the training seeds of every trained model; more than one trains each model once per seed.
    seeds: list[int] = field(default_factory=lambda: [0])
    #: whether to add the floor model (the first trained model's architecture, random weights).
    random_init: bool = True
    device: str = "auto"
    dataset: dict = field(default_factory=dict)
    explainers: dict = field(default_factory=dict)
    experiments: list = field(default_factory=list)
    samples: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    #: the mapping this config was built from (after overrides), recorded in the report.
    source: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration: defaults filled in, as plain YAML/JSON values."""
        return {
            "title": self.title,
            "seed": self.seed,
            "seeds": list(self.seeds),
            "random_init": self.random_init,
            "device": self.device,
            "dataset": self.dataset,
            "models": [_model_entry(m) for m in self.models if m.group is None or m.train.seed == self.seeds[0]],
            "explainers": self.explainers,
            "experiments": list(self.experiments),
            "samples": self.samples,
            "settings": self.settings,
        }


def _model_entry(spec: ModelSpec) -> dict[str, Any]:
    """The model as a study file lists it: one entry per configured model, not per seed."""
    if spec.checkpoint is not None:
        imports = {key: getattr(spec, key) for key in CHECKPOINT_IMPORT_KEYS if getattr(spec, key) is not None}
        return {"name": spec.name, "checkpoint": spec.checkpoint, **imports}
    # A model trained once per seed takes its seeds from the study's ``seeds``.
    owned = (*STUDY_OWNED_TRAIN_KEYS, "seed") if spec.group is not None else STUDY_OWNED_TRAIN_KEYS
    return {"name": spec.group or spec.name, **{k: v for k, v in spec.train.to_dict().items() if k not in owned}}


TOP_LEVEL_KEYS = [f.name for f in dataclasses.fields(StudyConfig) if f.name != "source"]
