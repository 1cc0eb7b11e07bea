"""The study configuration: which dataset, which models, which explainers and experiments.

A study file is YAML with these top-level keys (all optional except ``models``)::

    title: "My study"             # report heading
    seed: 0                       # seeds sample choice, masks, t-SNE, probes and bootstraps
    seeds: [0]                    # training seeds: [0, 1, 2] trains each model three times
                                  # (named <name>-seed<k>) and reports their spread
    random_init: true             # add "random-init": the first trained model's architecture
                                  # with random weights, the floor every metric is read against
    device: auto                  # auto, cpu, cuda, cuda:N, mps
    dataset:                      # one dataset for every model (trained and evaluated on it)
      name: synthetic             # synthetic, cifar10, imagefolder
      data_dir: null              # folder of cifar10 / imagefolder
      image_size: 32
      options: {}                 # load_dataset options for both splits
      train_options: {}           # ... only for the training split (e.g. num_images)
      test_options: {}            # ... only for the held-out split
    models:                       # each: a name plus TrainConfig keys, or a checkpoint
      - {name: simclr, method: simclr, backbone: resnet-tiny, epochs: 8}
      - {name: imported, checkpoint: path/to/model-dir}
      - {name: moco-r50, checkpoint: moco_v2_800ep_pretrain.pth.tar, format: moco, arch: resnet50}
    explainers:                   # constructor options per explainer (see sslens.study.explainers)
      relax: {num_masks: 500}
    experiments: [quality, tsne]  # default: every experiment
    samples: {invariance: 8}      # images per experiment
    settings: {faithfulness: {steps: 16}}   # per-experiment options

Every key is checked before any data is loaded; an unknown key raises a
:class:`~sslens.errors.UserError` that lists the valid ones.

>>> config = load_study_config(None, {"models": [{"name": "a", "method": "simclr"}]})
>>> config.models[0].name, config.experiments[0]
('a', 'quality')
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from sslens.data.base import DATASETS
from sslens.errors import UserError
from sslens.explain.base import EXPLAINERS, check_explainer_options
from sslens.study.experiments import DEFAULT_EXPERIMENTS, EXPERIMENTS
from sslens.study.explainers import STUDY_OPTIONS
from sslens.study.spec import (
    CHECKPOINT_IMPORT_KEYS,
    DATASET_KEYS,
    MODEL_NAME,
    RANDOM_INIT,
    STUDY_OWNED_TRAIN_KEYS,
    TOP_LEVEL_KEYS,
    ModelSpec,
    StudyConfig,
    check_keys,
    unknown_key_error,
)
from sslens.train.config import (
    DEVICE_PATTERN,
    check_type,
    load_config,
    parse_assignment,
    read_yaml_mapping,
)


def _dataset(raw: Any) -> dict[str, Any]:
    raw = check_type("dataset", {} if raw is None else raw, dict)
    check_keys(raw, list(DATASET_KEYS), "in the dataset section")
    dataset = {"name": "synthetic", "data_dir": None, "image_size": 32, "options": {},
               "train_options": {}, "test_options": {}}
    for key, value in raw.items():
        dataset[key] = check_type(f"dataset.{key}", value, DATASET_KEYS[key])
    if dataset["name"] not in DATASETS:
        raise UserError(f"Unknown dataset {dataset['name']!r}. Valid choices: {', '.join(DATASETS.names())}.")
    return dataset


def _model(raw: Any, index: int, dataset: dict, seed: int, device: str) -> ModelSpec:
    where = f"models[{index}]"
    if not isinstance(raw, dict) or "name" not in raw:
        raise UserError(
            f"{where} must be a mapping with a name, e.g. {{name: simclr, method: simclr}} or "
            f"{{name: mine, checkpoint: path/to/model}}; got {raw!r}."
        )
    name = check_type(f"{where}.name", raw["name"], str)
    if not MODEL_NAME.fullmatch(name):
        raise UserError(
            f"Model name {name!r} must start with a letter or digit and hold only letters, digits, "
            f"'_', '.' and '-' (it names the folder out/models/<name>)."
        )
    if "checkpoint" in raw:
        extra = sorted(set(raw) - {"name", "checkpoint", *CHECKPOINT_IMPORT_KEYS})
        if extra:
            raise UserError(
                f"Model {name!r} loads a checkpoint, so it takes no training keys ({', '.join(extra)}); "
                f"remove them or drop 'checkpoint' to train it."
            )
        imports = {key: check_type(f"{where}.{key}", raw[key], str) for key in CHECKPOINT_IMPORT_KEYS if key in raw}
        return ModelSpec(name, checkpoint=check_type(f"{where}.checkpoint", raw["checkpoint"], str), **imports)
    options = {k: v for k, v in raw.items() if k != "name"}
    owned = [k for k in options if k in STUDY_OWNED_TRAIN_KEYS]
    if owned:
        raise UserError(
            f"Model {name!r} sets {', '.join(owned)}, which the study decides: the dataset section "
            f"({', '.join(DATASET_KEYS)}) applies to every model, and models go to OUT/models/<name>."
        )
    overrides = {
        "data": dataset["name"], "data_dir": dataset["data_dir"], "image_size": dataset["image_size"],
        "data_options": {**dataset["options"], **dataset["train_options"]}, "device": device, "seed": seed,
        "knn_every": 0,  # the study evaluates every model itself, after training
        **options,
    }
    try:
        train = load_config(None, overrides)
    except UserError as error:
        raise UserError(f"Model {name!r}: {error}") from error
    return ModelSpec(name, train=train)


def _seeds(raw: Any) -> list[int]:
    seeds = check_type("seeds", raw, list)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds):
        raise UserError(f"seeds must be a non-empty list of integers in [0, 2^32), e.g. [0, 1, 2]; got {raw!r}.")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"seeds lists a seed twice: {seeds}.")
    return seeds


def _model_seeds(raw: Any, index: int, dataset: dict, seeds: list[int], device: str) -> list[ModelSpec]:
    """The model entry ``raw`` trained once per seed (named ``<name>-seed<k>`` when there are
    several), or loaded once."""
    if len(seeds) == 1 or not isinstance(raw, dict) or "checkpoint" in raw or "name" not in raw:
        return [_model(raw, index, dataset, seeds[0], device)]
    name = check_type(f"models[{index}].name", raw["name"], str)
    if "seed" in raw:
        raise UserError(
            f"models[{index}] sets seed {raw['seed']!r}, but the study trains every model once per seed "
            f"of seeds {seeds}; remove one of them."
        )
    specs = []
    for seed in seeds:
        spec = _model({**raw, "name": f"{name}-seed{seed}"}, index, dataset, seed, device)
        specs.append(dataclasses.replace(spec, group=name))
    return specs


def _named_mapping(raw: Any, key: str, valid: list[str]) -> dict:
    raw = check_type(key, {} if raw is None else raw, dict)
    check_keys(raw, valid, f"under {key}")
    return raw


def _explainers(raw: Any) -> dict[str, dict]:
    """Each explainer's options, checked by the explainers' own front door: any registered
    explainer may be configured, with any option of its constructor the study does not set."""
    raw = _named_mapping(raw, "explainers", EXPLAINERS.names())
    resolved = {}
    for name, options in raw.items():
        options = check_type(f"explainers.{name}", options or {}, dict)
        check_explainer_options(name, options, where=f" under explainers.{name}", reserved=STUDY_OPTIONS)
        resolved[name] = dict(options)
    return resolved


def _experiments(raw: Any, samples: Any, settings: Any) -> tuple[list[str], dict, dict]:
    names = list(DEFAULT_EXPERIMENTS) if raw is None else check_type("experiments", raw, list)
    for name in names:
        if name not in EXPERIMENTS:
            raise unknown_key_error(str(name), "in experiments", EXPERIMENTS.names())
    if len(set(names)) != len(names):
        raise UserError(f"experiments lists an experiment twice: {names}.")
    known = EXPERIMENTS.names()
    sampled = [n for n in known if EXPERIMENTS.get(n).samples is not None]
    samples = _named_mapping(samples, "samples", sampled)
    settings = _named_mapping(settings, "settings", [n for n in known if EXPERIMENTS.get(n).defaults])
    resolved_samples, resolved_settings = {}, {}
    for name in known:
        experiment = EXPERIMENTS.get(name)
        if experiment.samples is not None:
            count = check_type(f"samples.{name}", samples.get(name, experiment.samples), int)
            if count < experiment.min_samples:
                raise UserError(f"samples.{name} must be at least {experiment.min_samples}; got {count}.")
            resolved_samples[name] = count
        if experiment.defaults:
            given = check_type(f"settings.{name}", settings.get(name) or {}, dict)
            check_keys(given, list(experiment.defaults), f"under settings.{name}")
            merged = copy.deepcopy(experiment.defaults)
            for key, value in given.items():
                merged[key] = check_type(f"settings.{name}.{key}", value, type(experiment.defaults[key]))
            _check_explainer_names(merged.get("explainers", []), f"settings.{name}.explainers")
            if experiment.check is not None:
                experiment.check(merged)
            resolved_settings[name] = merged
    return names, resolved_samples, resolved_settings


def _check_explainer_names(names: list, where: str) -> None:
    for name in names:
        if name not in EXPLAINERS:
            raise unknown_key_error(str(name), f"in {where}", EXPLAINERS.names())


def _apply_override(merged: dict, key: str, value: Any) -> None:
    """``key`` may be dotted to reach into a section, e.g. ``dataset.data_dir``."""
    head, _, rest = key.partition(".")
    if head not in TOP_LEVEL_KEYS:
        raise unknown_key_error(head, "in the overrides", TOP_LEVEL_KEYS)
    if not rest:
        merged[head] = value
        return
    node = merged.setdefault(head, {})
    parts = rest.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if not isinstance(node, dict):
        raise UserError(f"Cannot set {key!r}: {head!r} does not hold a mapping.")
    node[parts[-1]] = value


def load_study_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Read and validate a study from a YAML file (or packaged name, e.g. "study-demo").

    ``overrides`` win over the file; dotted keys reach into sections
    (``{"dataset.data_dir": "~/data/cifar10", "device": "cuda"}``).
    """
    merged: dict[str, Any] = copy.deepcopy(read_yaml_mapping(path)) if path is not None else {}
    check_keys(merged, TOP_LEVEL_KEYS, f"in {path}")
    for key, value in (overrides or {}).items():
        _apply_override(merged, key, value)
    seed = check_type("seed", merged.get("seed", 0), int)
    if seed < 0:
        raise UserError(f"seed must be zero or positive; got {seed}.")
    device = check_type("device", merged.get("device", "auto"), str)
    if not DEVICE_PATTERN.fullmatch(device):
        raise UserError(f"device must be auto, cpu, mps, cuda or cuda:N; got {device!r}.")
    dataset = _dataset(merged.get("dataset"))
    raw_models = check_type("models", merged.get("models"), list) if merged.get("models") else []
    if not raw_models:
        raise UserError("The study needs at least one model under 'models' (a name plus training keys, or a checkpoint).")
    seeds = _seeds(merged.get("seeds", [seed]))
    models = [spec for i, raw in enumerate(raw_models) for spec in _model_seeds(raw, i, dataset, seeds, device)]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise UserError(f"Model names must be unique; got {names}.")
    random_init = check_type("random_init", merged.get("random_init", True), bool)
    if random_init and RANDOM_INIT in names:
        raise UserError(
            f"The model name {RANDOM_INIT!r} is the study's floor model (random weights); rename your "
            f"model or set random_init: false."
        )
    experiments, samples, settings = _experiments(
        merged.get("experiments"), merged.get("samples"), merged.get("settings")
    )
    title = check_type("title", merged.get("title", "sslens study"), str)
    if not title:
        # Checked here, not only by the report at the very end, after every model has trained.
        raise UserError("title must be a non-empty string: it is the report's heading.")
    return StudyConfig(
        models=models,
        title=title,
        seed=seed,
        seeds=seeds,
        random_init=random_init,
        device=device,
        dataset=dataset,
        explainers=_explainers(merged.get("explainers")),
        experiments=experiments,
        samples=samples,
        settings=settings,
        source=merged,
    )


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """``["seed=1", "dataset.data_dir=/data"]`` → ``{"seed": 1, "dataset.data_dir": "/data"}``."""
    return dict(parse_assignment(text) for text in assignments)
