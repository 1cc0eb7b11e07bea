"""The typed training configuration: a YAML file plus command-line overrides, checked up front.

>>> config = load_config(None, {"method": "moco", "epochs": 5, "method_options.temperature": 0.2})
>>> config.method, config.epochs, config.method_options
('moco', 5, {'temperature': 0.2})

Unknown keys, wrong types and out-of-range values raise :class:`sslens.errors.UserError` whose
message lists the valid choices, before any data is loaded.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sslens.atomic import atomic_write_bytes
from sslens.checks import suggestion
from sslens.data.augment import VIEW_RECIPES
from sslens.data.base import DATASETS, load_split
from sslens.errors import UserError
from sslens.methods.base import METHODS
from sslens.models.base import BACKBONES
from sslens.train.optim import OPTIMIZERS

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

#: The largest training image side: views are whole batches on the device, and a 2048² batch of
#: 256 already needs 12 GB of pixels before any activation.
MAX_IMAGE_SIZE = 2048


@dataclass
class TrainConfig:
    """Everything a training run needs; recorded in ``RUN/config.yaml`` and in every checkpoint.

    Attributes:
        method: self-supervised method ("simclr", "moco", "swav").
        backbone: encoder name (e.g. "resnet18-cifar", "resnet-tiny").
        backbone_options: keyword options of the backbone factory.
        data: dataset source ("synthetic", "cifar10", "imagefolder").
        data_dir: where the dataset lives on disk (CIFAR-10, image folders).
        data_options: keyword options passed to ``load_dataset`` (e.g. ``num_images``).
        image_size: side of the square training views, in pixels.
        views: view-recipe name; None uses the method's ``default_views``.
        views_options: overrides of the recipe's parameters.
        method_options: keyword options of the method (temperature, queue size, ...).
        epochs: passes over the training split.
        batch_size: images per step (each yields one view per recipe crop).
        optimizer: "sgd", "lars", "adam" or "adamw".
        lr: peak learning rate, reached at the end of warm-up.
        weight_decay: decay of weights (not of biases and norm parameters).
        momentum: momentum of SGD and LARS.
        warmup_epochs: epochs of linear warm-up (capped at the whole run).
        min_lr: learning rate at the end of the cosine decay.
        seed: seeds data order, augmentations and initialisation.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N" or "mps".
        compile: torch.compile the backbones (never the optimiser step).
        sync_batchnorm: under torchrun, BatchNorm statistics over the global batch (as one
            process on the whole batch; SimCLR's "global BN"); False keeps per-process
            statistics. MoCo's key encoder keeps its shuffled BN either way.
        knn_every: run the held-out kNN monitor every this many epochs (0 = off).
        knn_k, knn_temperature: neighbours and temperature of the kNN monitor.
        health_every: log the label-free health of the embedding every this many epochs (0 =
            off): RankMe, alignment, uniformity and normalised std on a fixed probe of
            training images (:mod:`sslens.evaluate.health`), with a warning when positive-pair
            top-1 keeps falling or the std collapses. It never changes the learned weights.
        log_every: write a log record every this many steps.
        checkpoint_every: write a checkpoint every this many epochs (and after the last).
        keep_checkpoints: how many of the newest checkpoints to keep.
        deterministic: use deterministic kernels (bitwise-reproducible runs, slower).
        max_steps: stop after this many optimiser steps (tests, benchmarks); None = no limit.
        progress: show a progress bar: True, False or "auto" (only when stdout is a terminal).
        out: the run directory; None resolves to ``runs/<method>-<data>``.
    """

    method: str = "simclr"
    backbone: str = "resnet18-cifar"
    backbone_options: dict = field(default_factory=dict)
    data: str = "synthetic"
    data_dir: str | None = None
    data_options: dict = field(default_factory=dict)
    image_size: int = 32
    views: str | None = None
    views_options: dict = field(default_factory=dict)
    method_options: dict = field(default_factory=dict)
    epochs: int = 100
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.06
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: int = 10
    min_lr: float = 0.0
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    sync_batchnorm: bool = True
    knn_every: int = 10
    knn_k: int = 200
    knn_temperature: float = 0.1
    health_every: int = 1
    log_every: int = 50
    checkpoint_every: int = 5
    keep_checkpoints: int = 2
    deterministic: bool = False
    max_steps: int | None = None
    progress: bool | str = "auto"
    out: str | None = None

    def __post_init__(self) -> None:
        for key, hint in typing.get_type_hints(type(self)).items():
            setattr(self, key, check_type(key, getattr(self, key), hint))
        for key, check, requirement in _RANGES:
            value = getattr(self, key)
            if value is not None and not check(value):
                raise UserError(f"Config key {key!r} must be {requirement}; got {value!r}.")
        if self.min_lr > self.lr:
            raise UserError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr}).")
        if self.progress not in (True, False, "auto"):
            raise UserError(f"Config key 'progress' must be true, false or \"auto\"; got {self.progress!r}.")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise UserError(
                f"Config key 'device' must be auto, cpu, mps, cuda or cuda:N (e.g. cuda:1); got {self.device!r}."
            )
        if self.out is None:
            self.out = f"runs/{self.method}-{self.data}"
        _check_names(self)
        _check_option_names(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def data_split(self, split: str, device: Any = None) -> Any:
        """The ``split`` ("train"/"test") of the data this config trains on
        (:func:`sslens.data.base.load_split`)."""
        return load_split(
            self.data, split, data_dir=self.data_dir, image_size=self.image_size,
            options=self.data_options, device=device,
        )


def _positive(value: float) -> bool:
    return value > 0


def _non_negative(value: float) -> bool:
    return value >= 0


_RANGES: tuple[tuple[str, Any, str], ...] = (
    ("image_size", lambda v: 8 <= v <= MAX_IMAGE_SIZE, f"between 8 and {MAX_IMAGE_SIZE} pixels"),
    ("epochs", _positive, "a positive number of epochs"),
    ("batch_size", lambda v: v >= 2, "at least 2 (contrastive losses need other images as negatives)"),
    ("lr", _positive, "positive"),
    ("weight_decay", _non_negative, "zero or positive"),
    ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("warmup_epochs", _non_negative, "zero or positive"),
    ("min_lr", _non_negative, "zero or positive"),
    ("seed", lambda v: 0 <= v < 2**32, "an integer in [0, 2³²)"),
    ("knn_every", _non_negative, "zero (off) or a positive number of epochs"),
    ("knn_k", _positive, "a positive number of neighbours"),
    ("knn_temperature", _positive, "positive"),
    ("health_every", _non_negative, "zero (off) or a positive number of epochs"),
    ("log_every", _positive, "a positive number of steps"),
    ("checkpoint_every", _positive, "a positive number of epochs"),
    ("keep_checkpoints", _positive, "at least 1"),
    ("max_steps", _positive, "a positive number of steps, or null for no limit"),
)

#: Config keys whose value must be a registered name → the names it may take.
_NAMED: dict[str, Callable[[], list[str]]] = {
    "method": METHODS.names,
    "backbone": BACKBONES.names,
    "data": DATASETS.names,
    "views": VIEW_RECIPES.names,
    "optimizer": lambda: sorted(OPTIMIZERS),
}


def _check_names(config: TrainConfig) -> None:
    for key, choices in _NAMED.items():
        value = getattr(config, key)
        if value is None:
            continue
        valid = choices()
        if value not in valid:
            raise UserError(
                f"Unknown {key} {value!r} in the config.{suggestion(value, valid)} Valid choices: {', '.join(valid)}."
            )


def _option_names(factory: Callable[..., Any], given_elsewhere: tuple[str, ...]) -> list[str] | None:
    """The keyword options ``factory`` takes, less those the loop passes itself; None when it
    takes any keyword (``**options``), so every name is valid."""
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return [name for name in parameters if name not in given_elsewhere]


def _check_option_names(config: TrainConfig) -> None:
    """Every key of the four option mappings must be an option of what it configures, checked
    before anything is built, with the valid names and the closest one in the message."""
    method = METHODS.get(config.method)
    sections = {
        "method_options": (method, ("backbone",)),
        "backbone_options": (BACKBONES.get(config.backbone), ()),
        "views_options": (VIEW_RECIPES.get(config.views or method.default_views), ("image_size", "mean", "std")),
        "data_options": (DATASETS.get(config.data), ("split",)),
    }
    for key, (factory, given_elsewhere) in sections.items():
        valid = _option_names(factory, given_elsewhere)
        for option in getattr(config, key):
            if valid is not None and option not in valid:
                raise UserError(
                    f"Unknown option {option!r} in {key}.{suggestion(option, valid)} "
                    f"Valid {key}: {', '.join(valid) or 'none'}."
                )


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def check_type(key: str, value: Any, hint: Any) -> Any:
    """``value`` converted to ``hint`` where that loses nothing, else a UserError."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return check_type(key, value, option)
            except UserError as error:
                errors.append(error)
        names = " or ".join("null" if o is type(None) else _type_name(o) for o in options)
        raise UserError(f"Config key {key!r} must be {names}; got {value!r} ({type(value).__name__}).")
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept any number written as text.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is dict and isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise UserError(f"Config key {key!r} must map option names (strings) to values; got keys {bad!r}.")
        return dict(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise UserError(
        f"Config key {key!r} must be {_type_name(hint)}; got {value!r} ({type(value).__name__})."
    )


def config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _dict_keys() -> list[str]:
    hints = typing.get_type_hints(TrainConfig)
    return [key for key in config_keys() if hints[key] is dict]


def _unknown_key_error(key: str, where: str) -> UserError:
    return UserError(
        f"Unknown config key {key!r} {where}.{suggestion(key, config_keys())} Valid keys: {', '.join(config_keys())}. "
        f"Nested options go under {', '.join(_dict_keys())} (e.g. method_options.temperature=0.2)."
    )


def packaged_configs() -> list[str]:
    """Names of the example training configs shipped with sslens (``sslens/configs/*.yaml``).

    ``study-*.yaml`` files are study configs (:mod:`sslens.study`), not training configs.
    """
    folder = resources.files("sslens") / "configs"
    if not folder.is_dir():
        return []
    return sorted(
        entry.name[: -len(".yaml")]
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml") and not entry.name.startswith("study-")
    )


def resolve_config_path(path_or_name: str | Path) -> Path:
    """A config file path; a bare name such as "simclr-synthetic" finds a packaged example."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    packaged = resources.files("sslens") / "configs" / f"{path_or_name}.yaml"
    if "/" not in str(path_or_name) and packaged.is_file():
        return Path(str(packaged))
    raise UserError(
        f"Config file {str(path_or_name)!r} does not exist. Pass a YAML file path or one of the "
        f"packaged configs: {', '.join(packaged_configs()) or '(none)'}."
    )


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = resolve_config_path(path)
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text ({error}); save the config as UTF-8.") from error
    except OSError as error:
        raise UserError(f"Cannot read {path}: {error.strerror or error}.") from error
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {error}") from error
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise UserError(f"{path} must hold a mapping of config keys to values; got {type(content).__name__}.")
    return content


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"key=value"`` → (key, value parsed as YAML), e.g. ``"lr=0.1"`` → ("lr", 0.1)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set expects key=value (e.g. --set method_options.temperature=0.2); got {text!r}.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise UserError(f"Cannot parse the value of --set {text!r}: {error}") from error
    return key, value


def _apply(merged: dict[str, Any], key: str, value: Any, where: str) -> None:
    head, _, rest = key.partition(".")
    if head not in config_keys():
        raise _unknown_key_error(head, where)
    if not rest:
        merged[head] = value
        return
    if head not in _dict_keys():
        raise UserError(
            f"Config key {head!r} takes a single value, so {key!r} is not a valid key; nested "
            f"options exist only under {', '.join(_dict_keys())}."
        )
    node = merged.setdefault(head, {})
    parts = rest.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"Cannot set {key!r}: {part!r} already holds a value, not a mapping.")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from a YAML file (or packaged config name) and overrides.

    Overrides win over the file. Their keys may be dotted to reach into the option mappings
    (``"method_options.temperature"``); a plain key replaces the whole value.
    """
    merged: dict[str, Any] = {}
    if path is not None:
        for key, value in read_yaml_mapping(path).items():
            _apply(merged, str(key), value, f"in {path}")
    for key, value in (overrides or {}).items():
        _apply(merged, key, value, "in the overrides")
    return TrainConfig(**merged)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (``load_config(path)`` reads it back)."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)
    atomic_write_bytes(path, text.encode())
