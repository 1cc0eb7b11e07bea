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
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from sslens.distributed import barrier, broadcast_object, world
from sslens.study.cache import digest, file_sha256
from sslens.study.config import ModelSpec
from sslens.train.checkpoint import META_FILE, latest_checkpoint, load_model, resolve_model_file
from sslens.train.config import TrainConfig

#: TrainConfig keys that do not change the learned weights' recipe.
IGNORED_TRAIN_KEYS = ("out", "progress", "device", "compile")


@dataclass
class StudyModel:
    """A model ready for the experiments."""

    name: str
    method: torch.nn.Module
    meta: dict
    model_file: Path
    weights_sha256: str
    training_seconds: float | None
    source: str  # "trained", "reused" or "checkpoint"

    def encoder(self, output: str, data: Any) -> torch.nn.Module:
        """The ``output`` embedding as a module taking ``data``'s images (its size and
        normalisation); models that expect other inputs (imported ImageNet models) are wrapped
        in an :class:`~sslens.models.adapt.InputAdapter`."""
        from sslens.models.adapt import adapt_input

        return adapt_input(
            self.method.encoder(output), self.meta, image_size=data.image_size, mean=data.mean, std=data.std
        )

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.meta.get("method"),
            "backbone": self.meta.get("backbone"),
            "model_file": str(self.model_file),
            "weights_sha256": self.weights_sha256,
            "training_seconds": self.training_seconds,
            "source": self.source,
            "epoch": self.meta.get("epoch"),
            "step": self.meta.get("step"),
        }


def recipe(config: TrainConfig | dict) -> dict:
    values = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    return {k: v for k, v in values.items() if k not in IGNORED_TRAIN_KEYS}


def _stored_recipe(run_dir: Path) -> dict | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    return recipe(yaml.safe_load(path.read_text()) or {})


def _stored_data(run_dir: Path) -> tuple[bool, str | None]:
    """(whether the run has weights yet, the training data's fingerprint recorded with them)."""
    for weights in (run_dir / "model", latest_checkpoint(run_dir)):
        if weights is not None and (weights / META_FILE).is_file():
            return True, json.loads((weights / META_FILE).read_text()).get("data_fingerprint")
    return False, None


def training_data_fingerprint(spec: ModelSpec) -> str:
    """:func:`~sslens.data.base.data_fingerprint` of the training split ``spec`` trains on."""
    from sslens.data.base import data_fingerprint
    from sslens.train.loop import load_split

    return data_fingerprint(load_split(spec.train, "train", torch.device("cpu")))


def run_directory(models_root: Path, spec: ModelSpec, data: Callable[[], str]) -> Path:
    """Where ``spec`` is (or will be) trained on the data whose fingerprint ``data()`` gives:
    ``<name>/`` unless that holds another recipe, or weights of other (or unrecorded) data.
    ``data`` is called only when the answer depends on it, so a first run loads no data here."""
    wanted = recipe(spec.train)
    primary = models_root / spec.name
    stored = _stored_recipe(primary)
    if not primary.exists() or (stored is None and not any(primary.iterdir())):
        return primary
    has_weights, trained_on = _stored_data(primary)
    # Without weights the folder holds at most an unfinished first epoch, which is overwritten.
    if stored == wanted and (not has_weights or trained_on == data()):
        return primary
    return models_root / f"{spec.name}-{digest({**wanted, 'data_fingerprint': data()})[:8]}"


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "model" / "model.safetensors").is_file()


def training_seconds(run_dir: Path) -> float | None:
    """Sum of the epoch times in ``log.jsonl`` (a resumed run's epochs counted once each)."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return None
    epochs = {}
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("kind") == "epoch" and "epoch_time_s" in record:
            epochs[record["epoch"]] = record["epoch_time_s"]
    return float(sum(epochs.values())) if epochs else None


def _training_plan(models_root: Path, spec: ModelSpec) -> tuple[Path, tuple[bool, bool] | None]:
    """(run directory, (resume, overwrite) for train(), or None when the run is finished)."""
    run_dir = run_directory(models_root, spec, functools.cache(lambda: training_data_fingerprint(spec)))
    if is_finished(run_dir):
        return run_dir, None
    resume = latest_checkpoint(run_dir) is not None
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
            from sslens.models.imports import import_cached

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
    model_file = run_dir / "model" / "model.safetensors"
    method, meta = load_model(run_dir / "model", device=device)
    return StudyModel(
        spec.name, method, meta, model_file, file_sha256(model_file), training_seconds(run_dir), source
    )
