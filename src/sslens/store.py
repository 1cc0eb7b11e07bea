"""The model store: model directories, training checkpoints and the layout of a run directory.

A *model directory* holds ``model.safetensors`` (``method.state_dict()``: backbone, heads and
buffers such as MoCo's queue) and ``meta.json`` (everything needed to rebuild the method:
names, options, image size, normalisation, class names, provenance). A *checkpoint* is a model
directory plus ``state.pt``: optimizer state, step, epoch and RNG states, saved with plain
tensors/dicts/lists/numbers/strings only, so it loads with ``torch.load(..., weights_only=True)``.

A run directory is a :class:`RunDir`, the one place that knows its layout::

    RUN/config.yaml              resolved training config
    RUN/log.jsonl                one JSON record per log interval and per epoch
    RUN/checkpoints/epoch-0003/  model.safetensors, meta.json, state.pt
    RUN/checkpoints/latest       text file naming the newest complete checkpoint
    RUN/model/                   the final model (model.safetensors, meta.json)
    RUN/evaluation.json          the latest ``sslens evaluate`` result
    RUN/features/                features cached by ``sslens evaluate``

Atomicity: every directory is written completely under a temporary name beside its target
(each file flushed and fsynced) and then renamed into place; the ``latest`` pointer is replaced
atomically only after that; old checkpoints are pruned only after the pointer moved. A process
killed at any moment therefore leaves the previous checkpoint loadable.

Loading a model needs the methods and backbones only, never the trainer:

>>> method, meta = load_model("runs/simclr-synthetic")  # doctest: +SKIP
>>> method.embed(images).shape  # (B, feature_dim)  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import io
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from sslens.atomic import atomic_write_bytes, fsync_directory
from sslens.errors import SslensWarning, UserError
from sslens.version import __version__

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
STATE_FILE = "state.pt"

#: Test hook: seconds to sleep after each file a directory writer writes, so a test can kill
#: the process in the middle of writing a checkpoint. Read only by :func:`_write_directory`.
SLEEP_ENV = "SSLENS_TEST_CHECKPOINT_SLEEP_S"

REQUIRED_META_KEYS = (
    "method",
    "method_options",
    "backbone",
    "backbone_options",
    "image_size",
    "mean",
    "std",
    "class_names",
    "data",
    "epoch",
    "step",
    "sslens_version",
    "torch_version",
    "created",
)


def provenance() -> dict[str, str]:
    """The ``sslens_version``, ``torch_version`` and ``created`` (UTC ISO 8601) meta entries."""
    return {
        "sslens_version": __version__,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class RunDir:
    """A training run's folder: where each of its files lives, and what they say.

    >>> run = RunDir("runs/simclr")
    >>> run.checkpoint_dir(3).as_posix()
    'runs/simclr/checkpoints/epoch-0003'
    """

    CONFIG = "config.yaml"
    LOG = "log.jsonl"
    CHECKPOINTS = "checkpoints"
    LATEST = "latest"
    MODEL = "model"
    EVALUATION = "evaluation.json"
    FEATURES = "features"
    CHECKPOINT_PREFIX = "epoch-"
    #: Entries that mark a folder as holding a run.
    MARKERS = (CONFIG, LOG, CHECKPOINTS, MODEL)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def log_file(self) -> Path:
        return self.path / self.LOG

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def latest_file(self) -> Path:
        return self.checkpoints_dir / self.LATEST

    @property
    def model_dir(self) -> Path:
        return self.path / self.MODEL

    @property
    def evaluation_file(self) -> Path:
        return self.path / self.EVALUATION

    @property
    def features_dir(self) -> Path:
        return self.path / self.FEATURES

    def checkpoint_dir(self, epoch: int) -> Path:
        """Where the checkpoint written at the end of ``epoch`` lives."""
        return self.checkpoints_dir / f"{self.CHECKPOINT_PREFIX}{int(epoch):04d}"

    def markers(self) -> list[str]:
        """The run files present (config, log, checkpoints, model), sorted."""
        return sorted(name for name in self.MARKERS if (self.path / name).exists())

    def is_finished(self) -> bool:
        """Whether training wrote its final model."""
        return (self.model_dir / MODEL_FILE).is_file()

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first (by epoch number, not by name:
        epoch-10000 sorts before epoch-9999 as text). A checkpoint folder that is a link is
        not one of this run's (it may lead to another run), so it is left out."""
        root = self.checkpoints_dir
        if not root.is_dir():
            return []
        prefix = self.CHECKPOINT_PREFIX
        found = [
            p for p in root.iterdir()
            if p.name.startswith(prefix) and p.name[len(prefix):].isdigit() and not p.is_symlink()
        ]
        return sorted((p for p in found if _is_complete(p)), key=lambda p: int(p.name[len(prefix):]))

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None.

        The ``latest`` pointer is trusted only when it names a checkpoint of this run: a bare
        ``epoch-NNNN`` inside its own ``checkpoints/`` (no path, no ``..``, no link leading out).
        Anything else (a pointer edited to another run's checkpoint, garbage bytes, a dangling
        name) is ignored with a warning, and the newest complete checkpoint is used, so no
        command ever reads, or resumes over, another run's weights.
        """
        complete = self.checkpoints()
        if self.latest_file.is_file():
            try:
                name = self.latest_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                name = None
            candidate = self.checkpoints_dir / name if name else None
            if candidate is not None and candidate in complete:
                return candidate
            fallback = complete[-1].name if complete else "none"
            warnings.warn(
                f"{self.latest_file} does not name a complete checkpoint of this run "
                f"({name!r}); using the newest complete one instead ({fallback}).", SslensWarning, stacklevel=2,
            )
        return complete[-1] if complete else None

    def clean_leftovers(self) -> list[Path]:
        """Remove what writers killed mid-write left behind (temporary checkpoint and model
        folders, temporary files): never renamed into place, so never loadable. Call only while
        holding the run's lock. Returns what was removed."""
        removed = []
        for folder in (self.path, self.checkpoints_dir):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.name.startswith(".") and (".tmp-" in entry.name or ".old-" in entry.name or entry.name.endswith(".tmp")):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                    removed.append(entry)
        return removed

    def weights_meta(self) -> dict | None:
        """The ``meta.json`` of the final model, else of the latest checkpoint; None without weights."""
        for directory in (self.model_dir, self.latest_checkpoint()):
            if directory is not None and (directory / META_FILE).is_file():
                return json.loads((directory / META_FILE).read_text())
        return None

    def read_config(self) -> dict | None:
        """The run's ``config.yaml`` as a mapping, or None when there is none."""
        import yaml

        if not self.config_file.is_file():
            return None
        return yaml.safe_load(self.config_file.read_text()) or {}

    def read_log(self) -> list[dict]:
        """The records of ``log.jsonl``, in order.

        Every record ends with a newline, so text after the last one is a record torn by a kill
        mid-write; it cannot be read back and is left out.
        """
        if not self.log_file.is_file():
            return []
        complete = self.log_file.read_text().rpartition("\n")[0]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def training_seconds(self) -> float | None:
        """Sum of the epoch times in the log (a resumed run's epochs counted once each)."""
        epochs = {r["epoch"]: r["epoch_time_s"] for r in self.read_log() if r.get("kind") == "epoch" and "epoch_time_s" in r}
        return float(sum(epochs.values())) if epochs else None

    def save_checkpoint(self, method: torch.nn.Module, meta: dict, state: dict[str, Any], *, keep: int) -> Path:
        """Write ``checkpoints/epoch-NNNN`` (NNNN = ``meta["epoch"]``), move ``latest``, prune.

        ``state`` is the training state (optimizer state dict, counters, RNG states); it must
        hold only tensors, dicts, lists, tuples, numbers, strings, bools and None. The newest
        ``keep`` checkpoints are kept.
        """
        if keep < 1:
            raise ValueError(f"keep must be at least 1 so the newest checkpoint survives; got {keep}")
        target = self.checkpoint_dir(meta["epoch"])
        buffer = io.BytesIO()
        torch.save(state, buffer)
        _write_directory(
            target, {MODEL_FILE: _weights_bytes(method), META_FILE: _meta_bytes(meta), STATE_FILE: buffer.getvalue()}
        )
        atomic_write_bytes(self.latest_file, f"{target.name}\n".encode())
        self._prune(keep=keep, protect=target.name)
        return target

    def save_model(self, method: torch.nn.Module, meta: dict) -> Path:
        """Write the final model into ``model/`` (see :func:`save_model`)."""
        return save_model(self.model_dir, method, meta)

    def _prune(self, *, keep: int, protect: str) -> None:
        for path in self.checkpoints()[:-keep]:
            if path.name != protect:
                shutil.rmtree(path)
        # Leftovers of writers that were killed mid-write: never renamed, so never loadable.
        for path in self.checkpoints_dir.iterdir():
            if path.name.startswith(f".{self.CHECKPOINT_PREFIX}") and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def _write_directory(target: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a temporary sibling of ``target``, then swap it into place.

    An existing ``target`` is replaced only when it is a model or checkpoint folder (nothing
    but :data:`MODEL_FILE`, :data:`META_FILE` and :data:`STATE_FILE`): replacing deletes it, and
    a folder with other files (a training run, someone's data) or a link is never deleted.
    """
    if target.is_symlink():
        raise UserError(
            f"{target} is a symbolic link. sslens replaces model folders atomically and will not "
            f"write through or delete a link; point it elsewhere or replace it with a folder."
        )
    if target.exists():
        others = sorted(p.name for p in target.iterdir()) if target.is_dir() else [target.name]
        others = [name for name in others if name not in (MODEL_FILE, META_FILE, STATE_FILE)]
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise UserError(
                f"{target} holds more than an sslens model ({shown}); replacing it would delete "
                f"them. Choose another folder, or move those files first."
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    sleep_s = float(os.environ.get(SLEEP_ENV, "0"))
    try:
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
            if sleep_s > 0:
                time.sleep(sleep_s)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(target.parent)


def _weights_bytes(module: torch.nn.Module) -> bytes:
    from safetensors.torch import save

    # Copies on the CPU: safetensors needs contiguous tensors that share no storage.
    tensors = {
        name: value.detach().to("cpu", copy=True).contiguous()
        for name, value in module.state_dict().items()
    }
    return save(tensors)


def _meta_bytes(meta: dict) -> bytes:
    missing = [key for key in REQUIRED_META_KEYS if key not in meta]
    if missing:
        raise ValueError(
            f"Model meta is missing {', '.join(missing)}; a model directory must record "
            f"{', '.join(REQUIRED_META_KEYS)} (see sslens.store.provenance for the last three)."
        )
    return json.dumps(meta, indent=2, sort_keys=True).encode()


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in (MODEL_FILE, META_FILE, STATE_FILE))


def save_model(directory: str | os.PathLike, method: torch.nn.Module, meta: dict) -> Path:
    """Write ``method``'s weights and ``meta`` as a model directory, atomically.

    ``meta`` must hold every key in :data:`REQUIRED_META_KEYS`. Returns the directory.
    """
    directory = Path(directory)
    _write_directory(directory, {MODEL_FILE: _weights_bytes(method), META_FILE: _meta_bytes(meta)})
    return directory


def read_meta(directory: str | os.PathLike) -> dict:
    """The ``meta.json`` of a model or checkpoint folder; a UserError if it is not readable JSON
    describing a model (empty, truncated, binary, or another program's file)."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(
            f"{path} is not a readable sslens model description ({error}). It may be truncated or "
            f"belong to another program; restore it from the run, or train the model again."
        ) from error
    if not isinstance(meta, dict):
        raise UserError(f"{path} holds a JSON {type(meta).__name__}, not the mapping sslens writes.")
    return meta


def _read_state(path: Path) -> dict:
    """``state.pt``: plain tensors and numbers only, loaded with ``weights_only=True``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's weights-only unpickler raises any type on corrupt bytes
        # The error's own advice (weights_only=False) would run arbitrary code: never relayed.
        raise UserError(
            f"{path} is not a readable training state ({type(error).__name__}); it may be truncated "
            f"or not written by sslens. Resume from an older checkpoint, or start the run again."
        ) from None
    if not isinstance(state, dict) or not {"optimizer", "epoch", "step", "rng"} <= set(state):
        raise UserError(f"{path} is not an sslens training state (it lacks optimizer, epoch, step or rng).")
    return state


def _read_weights(model_file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(model_file, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(
            f"{model_file} is not a readable safetensors file ({error}); it may be truncated. "
            f"Restore it, or use another checkpoint of the run."
        ) from error


def load_training_state(checkpoint_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights on the CPU, meta, training state) of one checkpoint directory; a UserError when
    any of its files is unreadable."""
    checkpoint_dir = Path(checkpoint_dir)
    if not _is_complete(checkpoint_dir):
        raise UserError(
            f"{checkpoint_dir} is not a complete checkpoint: it needs {MODEL_FILE}, {META_FILE} "
            f"and {STATE_FILE}."
        )
    weights = _read_weights(checkpoint_dir / MODEL_FILE)
    meta = read_meta(checkpoint_dir)
    state = _read_state(checkpoint_dir / STATE_FILE)
    return weights, meta, state


def resolve_model_file(path: str | os.PathLike) -> Path:
    """The ``model.safetensors`` that ``path`` names.

    ``path`` may be a run directory (its final ``model/``, else its latest checkpoint), a model
    or checkpoint directory, or a ``.safetensors`` file with a ``meta.json`` beside it.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist. Pass a run directory, a model directory or a .safetensors file.")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(
                f"{path} is not a .safetensors file. Pass a run directory, a model directory "
                f"or a model.safetensors file with its meta.json beside it."
            )
        candidate = path
    elif (path / MODEL_FILE).is_file():
        candidate = path / MODEL_FILE
    elif (RunDir(path).model_dir / MODEL_FILE).is_file():
        candidate = RunDir(path).model_dir / MODEL_FILE
    else:
        checkpoint = RunDir(path).latest_checkpoint()
        if checkpoint is None:
            raise UserError(
                f"{path} holds no sslens model: expected {MODEL_FILE}, {RunDir.MODEL}/{MODEL_FILE} or a "
                f"checkpoint under {RunDir.CHECKPOINTS}/. Train one with `sslens train --out {path}`."
            )
        candidate = checkpoint / MODEL_FILE
    if not (candidate.parent / META_FILE).is_file():
        raise UserError(
            f"{candidate} has no {META_FILE} beside it, so sslens cannot tell which method and "
            f"backbone to rebuild. Keep the two files together."
        )
    return candidate


def build_method(meta: dict) -> torch.nn.Module:
    """An untrained method with the architecture ``meta`` describes (names and options)."""
    from sslens.methods import create_method
    from sslens.models import create_backbone

    missing = [key for key in ("method", "method_options", "backbone", "backbone_options") if key not in meta]
    if missing:
        raise UserError(f"The model meta lacks {', '.join(missing)}; it was not written by sslens.")
    try:
        backbone = create_backbone(meta["backbone"], **meta["backbone_options"])
        return create_method(meta["method"], backbone, **meta["method_options"])
    except UserError:
        raise
    except (ValueError, TypeError) as error:
        raise UserError(f"The model meta describes no model sslens can build: {error}") from error


def _check_shapes(meta: dict, model_file: Path) -> None:
    """Compare the architecture ``meta`` describes with the tensors in ``model_file`` before
    anything is allocated: the method is built on the meta device (no memory) and the file's
    header read without its data, so a foreign or edited ``meta.json`` asking for a queue of
    10¹² keys is refused instead of allocating terabytes."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(model_file), framework="pt") as handle:
            stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(
            f"{model_file} is not a readable safetensors file ({error}); it may be truncated. "
            f"Restore it, or use another checkpoint of the run."
        ) from error
    try:
        with torch.device("meta"):
            skeleton = build_method(meta)
    except (RuntimeError, NotImplementedError):
        return  # a module that cannot be built without memory: the full load below checks it
    expected = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    if expected != stored:
        differ = sorted(k for k in expected.keys() | stored.keys() if expected.get(k) != stored.get(k))
        shown = "; ".join(f"{k}: meta {expected.get(k)} vs file {stored.get(k)}" for k in differ[:3])
        raise UserError(
            f"The weights in {model_file} do not fit a {meta['method']} method on a "
            f"{meta['backbone']} backbone, which its {META_FILE} describes ({len(differ)} tensors differ: "
            f"{shown}). The {META_FILE} may belong to another model."
        )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained method from disk: ``(method in eval mode on device, meta)``.

    ``path`` is a run directory (its final model, or its latest checkpoint while training has
    not finished), a model or checkpoint directory, or a ``.safetensors`` file beside its
    ``meta.json``. Unreadable or mismatched files are UserErrors, found before any large
    allocation (see :func:`_check_shapes`).
    """
    model_file = resolve_model_file(path)
    meta = read_meta(model_file.parent)
    _check_shapes(meta, model_file)
    method = build_method(meta)
    weights = _read_weights(model_file)
    try:
        method.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise UserError(
            f"The weights in {model_file} do not fit a {meta['method']} method on a "
            f"{meta['backbone']} backbone ({error}). The file may come from another sslens version "
            f"or its meta.json may belong to another model."
        ) from error
    return method.to(device).eval(), meta
