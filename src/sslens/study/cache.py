"""Per-stage, per-model results on disk, so a study run again recomputes only what changed.

A stage's output is stored in ``OUT/cache/<model>/<experiment>.json`` (the numbers) and
``<experiment>.npz`` (arrays drawn in figures: maps, coordinates), under a key hashing
everything the stage depends on: the experiment's settings and sample count, the options of the
explainers it runs, the dataset section and a fingerprint of the loaded images and labels, the
seed and the SHA-256 of the model's weights file. A different key means the stage is recomputed
and the entry replaced: the old ``.json`` is removed first, then both files are written
atomically, the ``.npz`` first, so a readable ``.json`` always has its own arrays beside it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sslens.atomic import atomic_write_bytes, write_json_atomic

#: Bump when a stage's computation changes meaning, so old entries are not reused.
CACHE_VERSION = 6  # 2: orthogonal RELAX masks, retest; 3: strength-3 blocks; 4: intervals, chance levels, per-item arrays; 5: faithfulness gaps to the random order; 6: one nested sample order, t-SNE neighbours, ground-truth images


@dataclass
class StageResult:
    """What one experiment computed for one model: JSON ``results`` and figure ``arrays``."""

    results: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class StageCache:
    """Stage outputs under ``root/<model>/<experiment>.{json,npz}``, looked up by key."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _paths(self, model: str, experiment: str) -> tuple[Path, Path]:
        folder = self.root / model
        return folder / f"{experiment}.json", folder / f"{experiment}.npz"

    def get(self, model: str, experiment: str, key: str) -> StageResult | None:
        json_path, npz_path = self._paths(model, experiment)
        if not json_path.is_file():
            return None
        entry = json.loads(json_path.read_text())
        if entry.get("key") != key or not npz_path.is_file():
            return None
        with np.load(npz_path, allow_pickle=False) as arrays:
            return StageResult(entry["results"], {name: arrays[name] for name in arrays.files})

    def put(self, model: str, experiment: str, key: str, result: StageResult) -> None:
        json_path, npz_path = self._paths(model, experiment)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        # Without this, a crash between the two writes would pair the old entry's results with
        # the new arrays, and a later run under the old key would read them as a hit.
        json_path.unlink(missing_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{name: np.asarray(value) for name, value in result.arrays.items()})
        atomic_write_bytes(npz_path, buffer.getvalue())
        write_json_atomic(json_path, {"key": key, "experiment": experiment, "model": model, "results": result.results})
