"""The study's models: trained into ``OUT/models/<name>/`` (reused when finished) or loaded.

A trained model is reused only when its run directory holds a finished model *and* the same
training config (ignoring ``out``, ``progress``, ``device`` and ``compile``, which do not change
what is learned) *and* was trained on the same data: the fingerprint of the training split
(:func:`~sslens.data.base.data_fingerprint`) recorded with its weights must match, since a
config names a data folder, not what it holds. When ``OUT/models/<name>/`` holds a run with
another config or other data (or weights that record no fingerprint), the model is trained into
``OUT/models/<name>-<hash>/`` instead, so a finished run is never replaced silently; the next
study with the original config and data finds it again. An interrupted run with the same config
and data is resumed from its latest checkpoint.

Under ``torchrun`` rank 0 makes these decisions (and imports published checkpoints) and hands
them to the other ranks, which then train with it and load the same files: deciding on every
rank could diverge once rank 0 has started writing the run.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sslens.data.base import data_fingerprint
from sslens.distributed import barrier, broadcast_object, world
from sslens.hashing import file_sha256, json_sha256, module_sha256
from sslens.methods.base import learning_principle
from sslens.models.adapt import adapt_input
from sslens.published import import_cached
from sslens.store import MODEL_FILE, RunDir, build_method, load_model, resolve_model_file
from sslens.study.spec import RANDOM_INIT, RANDOM_WEIGHTS, ModelSpec
from sslens.train.config import TrainConfig

#: TrainConfig keys that do not change the learned weights' recipe.
IGNORED_TRAIN_KEYS = ("out", "progress", "device", "compile", "health_every")


@dataclass
class StudyModel:
    """A model ready for the experiments."""

    name: str
    method: torch.nn.Module
    meta: dict
    model_file: Path | None  # None for the random-init floor, which lives in memory only
    weights_sha256: str
    training_seconds: float | None
    source: str  # "trained", "reused", "checkpoint" or "random-init"
    #: the configured model this is one training seed of (see ``seeds``), or None.
    group: str | None = None

    def encoder(self, output: str, data: Any) -> torch.nn.Module:
        """The ``output`` embedding as a module taking ``data``'s images (its size and
        normalisation); models that expect other inputs (imported ImageNet models) are wrapped
        in an :class:`~sslens.models.adapt.InputAdapter`."""
        return adapt_input(
            self.method.encoder(output), self.meta, image_size=data.image_size, mean=data.mean, std=data.std
        )

    @property
    def principle(self) -> str:
        """The learning principle the study groups this model by (:attr:`SSLMethod.principle`)."""
        return RANDOM_WEIGHTS if self.source == "random-init" else learning_principle(self.meta)

    def training_log(self) -> list[dict]:
        """The records of the run that trained this model (none for a checkpoint or the floor)."""
        if self.model_file is None or self.source not in ("trained", "reused"):
            return []
        return RunDir(self.model_file.parent.parent).read_log()

    def describe(self, root: Path) -> dict[str, Any]:
        """What ``results.json`` records of the model; its file relative to the study folder ``root``."""
        return {
            "method": self.meta.get("method"),
            "principle": self.principle,
            "backbone": self.meta.get("backbone"),
            "model_file": None if self.model_file is None else os.path.relpath(self.model_file, root),
            "weights_sha256": self.weights_sha256,
            "training_seconds": self.training_seconds,
            "source": self.source,
            "group": self.group,
            "seed": self.meta.get("seed", (self.meta.get("config") or {}).get("seed")),
            "epoch": self.meta.get("epoch"),
            "step": self.meta.get("step"),
        }


def recipe(config: TrainConfig | dict) -> dict:
    values = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    return {k: v for k, v in values.items() if k not in IGNORED_TRAIN_KEYS}


def training_data_fingerprint(spec: ModelSpec) -> str:
    """:func:`~sslens.data.base.data_fingerprint` of the training split ``spec`` trains on."""
    return data_fingerprint(spec.train.data_split("train", torch.device("cpu")))


def run_directory(models_root: Path, spec: ModelSpec, data: Callable[[], str]) -> Path:
    """Where ``spec`` is (or will be) trained on the data whose fingerprint ``data()`` gives:
    ``<name>/`` unless that holds another recipe, or weights of other (or unrecorded) data.
    ``data`` is called only when the answer depends on it, so a first run loads no data here."""
    wanted = recipe(spec.train)
    primary = RunDir(models_root / spec.name)
    stored = primary.read_config()
    stored = None if stored is None else recipe(stored)
    if not primary.path.exists() or (stored is None and not any(primary.path.iterdir())):
        return primary.path
    weights = primary.weights_meta()
    # Without weights the folder holds at most an unfinished first epoch, which is overwritten.
    if stored == wanted and (weights is None or weights.get("data_fingerprint") == data()):
        return primary.path
    return models_root / f"{spec.name}-{json_sha256({**wanted, 'data_fingerprint': data()})[:8]}"


def _training_plan(models_root: Path, spec: ModelSpec) -> tuple[Path, tuple[bool, bool] | None]:
    """(run directory, (resume, overwrite) for train(), or None when the run is finished)."""
    run_dir = run_directory(models_root, spec, functools.cache(lambda: training_data_fingerprint(spec)))
    run = RunDir(run_dir)
    if run.is_finished():
        return run_dir, None
    resume = run.latest_checkpoint() is not None
    # Without a checkpoint the folder holds at most an unfinished first epoch of this recipe.
    overwrite = not resume and run_dir.exists() and any(run_dir.iterdir())
    return run_dir, (resume, overwrite)


def prepare_model(
    spec: ModelSpec,
    models_root: Path,
    device: torch.device,
    *,
    train_fn: Callable[[TrainConfig, bool, bool], Path],
    say: Callable[[str], None],
) -> StudyModel:
    """Train (or resume, or reuse) ``spec``, or load its checkpoint; then load it on ``device``.

    ``train_fn(config, resume, overwrite)`` runs the training (the study pauses its progress
    display around it); ``say`` reports what happened in one line.
    """
    main = world().is_main
    if spec.checkpoint is not None:
        checkpoint = spec.checkpoint
        if spec.format is not None:
            checkpoint = broadcast_object(
                import_cached(checkpoint, spec.format, arch=spec.arch, timm_name=spec.timm_name) if main else None
            )
        model_file = resolve_model_file(checkpoint)
        method, meta = load_model(model_file, device=device)
        return StudyModel(spec.name, method, meta, model_file, file_sha256(model_file), None, "checkpoint")
    run_dir, plan = broadcast_object(_training_plan(models_root, spec) if main else None)
    if run_dir.name != spec.name:
        say(f"{models_root / spec.name} holds {spec.name} with another training config or data; training into {run_dir}")
    source = "reused"
    if plan is not None:
        resume, overwrite = plan
        train_fn(dataclasses.replace(spec.train, out=str(run_dir)), resume, overwrite)
        # The other ranks load the model only once rank 0 has written it.
        barrier()
        source = "trained"
    run = RunDir(run_dir)
    model_file = run.model_dir / MODEL_FILE
    method, meta = load_model(run.model_dir, device=device)
    return StudyModel(
        spec.name, method, meta, model_file, file_sha256(model_file), run.training_seconds(), source, spec.group
    )


def random_init_model(template: StudyModel, seed: int, device: torch.device) -> StudyModel:
    """The floor model :data:`~sslens.study.spec.RANDOM_INIT`: ``template``'s architecture with
    the initial weights ``seed`` draws (the same on every rank and every run), never trained.
    Whatever it scores, a metric's trained models must beat to show they learned something."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        method = build_method(template.meta)
    method = method.to(device).eval()
    meta = {key: value for key, value in template.meta.items() if key != "data_fingerprint"}
    meta.update(epoch=0, step=0, seed=seed, config=None)
    return StudyModel(RANDOM_INIT, method, meta, None, module_sha256(method), None, "random-init")
