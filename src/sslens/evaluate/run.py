"""``sslens evaluate``: the representation quality of a saved model, on its own data or another.

>>> evaluation = evaluate_run("runs/simclr-synthetic")  # doctest: +SKIP
>>> print(evaluation.text)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslens.atomic import atomic_write_bytes
from sslens.checks import positive_int, positive_number
from sslens.data.base import load_split, normalize, to_float
from sslens.device import resolve_device
from sslens.errors import SslensWarning, UserError
from sslens.evaluate.features import FeatureCache
from sslens.evaluate.quality import evaluate_encoder
from sslens.evaluate.table import format_results_table
from sslens.models.adapt import adapt_input
from sslens.models.health import degenerate_encoder_warning
from sslens.store import RunDir, load_model


@dataclass
class Evaluation:
    """What :func:`evaluate_run` measured: the result (as written to JSON), a text summary for
    the terminal, and the files written."""

    result: dict[str, Any]
    text: str
    written: list[Path] = field(default_factory=list)
    #: (path, why) of each result file that could not be written (a full or read-only disk).
    failed: list[tuple[Path, str]] = field(default_factory=list)


def evaluate_run(
    path: str | os.PathLike,
    *,
    k: int = 200,
    temperature: float = 0.1,
    linear: bool = True,
    device: str = "auto",
    data: str | None = None,
    data_dir: str | None = None,
    image_size: int | None = None,
    json_path: str | os.PathLike | None = None,
) -> Evaluation:
    """kNN and linear-probe top-1 of the model at ``path`` on the held-out split.

    The training split is the kNN memory bank and the probe's training set; the test split is
    held out for the scores. By default these are the run's own dataset; ``data`` (with
    ``data_dir`` and ``image_size``) picks another, which is how imported models, which record
    no training data, are evaluated. Features are cached under ``RUN/features`` by weights and
    data, so a re-evaluation (another k, say) reuses them. The result is written to
    ``RUN/evaluation.json`` when ``path`` is a directory, and to ``json_path`` if given.
    """
    try:
        positive_int("--k", k, "200 is the usual choice")
        positive_number("--temperature", temperature, "0.1 is usual")
    except ValueError as error:
        raise UserError(str(error)) from error
    if json_path is not None and Path(json_path).is_dir():
        raise UserError(f"--json {json_path} is a folder; pass the path of a file to write, e.g. {Path(json_path) / 'evaluation.json'}.")
    torch_device = resolve_device(device)
    method, meta = load_model(path, device=torch_device)
    if data is not None:
        splits = [load_split(data, split, data_dir=data_dir, image_size=image_size, device=torch_device)
                  for split in ("train", "test")]
        seed = 0
    elif "config" in meta:
        config = meta["config"]
        splits = [
            load_split(config["data"], split, data_dir=config["data_dir"], image_size=config["image_size"],
                       options=config["data_options"], device=torch_device)
            for split in ("train", "test")
        ]
        seed = config["seed"]
    else:
        raise UserError(
            f"{path} records no training config (an imported model?), so sslens cannot tell which "
            f"dataset to evaluate on. Pass --data (and --data-dir, --image-size), e.g. "
            f"--data imagefolder --data-dir ~/imagenet-subset --image-size 224."
        )
    train_data, test_data = splits
    encoder = adapt_input(
        method.encoder("pooled"), meta, image_size=train_data.image_size, mean=train_data.mean, std=train_data.std
    )
    probe, _ = next(test_data.iter_batches(8, shuffle=False, device=torch_device))
    warning = degenerate_encoder_warning(encoder, normalize(to_float(probe), test_data.mean, test_data.std))
    if warning is not None:
        warnings.warn(f"{warning} Its kNN and linear-probe scores are those of a constant.", SslensWarning, stacklevel=2)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    try:
        cache = FeatureCache(RunDir(folder).features_dir)
    except OSError as error:
        warnings.warn(f"Evaluating without a feature cache: {error.strerror or error} ({folder}).", SslensWarning, stacklevel=2)
        cache = None
    result = evaluate_encoder(
        encoder, train_data, test_data, k=k, temperature=temperature, linear=linear,
        device=torch_device, seed=seed, cache=cache,
    )
    details = result["details"]
    result["model"] = {key: meta[key] for key in ("method", "backbone", "epoch", "step")}
    text = "\n".join([
        format_results_table({f"{meta['method']} ({meta['backbone']})": result}),
        f"k={details['k']}  T={details['temperature']}  N train={details['num_train']}  "
        f"N test={details['num_test']}  classes={details['num_classes']}",
    ])
    payload = json.dumps(result, indent=2).encode()
    destinations = [RunDir(path).evaluation_file] if Path(path).is_dir() else []
    destinations += [Path(json_path)] if json_path is not None else []
    written, failed = [], []
    for destination in destinations:
        try:
            atomic_write_bytes(destination, payload)
            written.append(destination)
        except OSError as error:
            failed.append((destination, error.strerror or str(error)))
    return Evaluation(result, text, written, failed)
