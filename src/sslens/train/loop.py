"""The one training loop, for every method: :func:`train`.

Per step: learning rate from :func:`~sslens.train.optim.lr_at` written into the optimiser,
views from the recipe, ``method.training_step(views)``, backward, the method's two optimiser
hooks around ``optimizer.step()``. Per epoch: an optional held-out kNN monitor, a log record and,
every ``checkpoint_every`` epochs and after the last, a checkpoint.

Reproducibility: the batch order depends only on (seed, epoch) and the view generator is
re-seeded from (seed, epoch) at every epoch start; checkpoints are written at epoch ends only,
with the global torch RNG states. A resumed run therefore sees exactly the batches, views and
random numbers of an uninterrupted one, and in ``deterministic`` mode on the CPU ends with
bitwise-identical weights.

Speed: an in-memory dataset is moved to the device once; every batch has the same size
(``drop_last``), so a compiled model never sees a new shape. On CUDA the model runs in
channels_last under bf16 autocast; on the CPU it runs in fp32. ``compile`` compiles the
method's sub-modules (backbones and heads), never the optimiser step, so the learning rate
changing every step does not recompile anything.

Several processes: under ``torchrun`` (see :mod:`sslens.distributed`) ``batch_size`` is the
global batch; rank r trains on part r of every global batch with its own view generator, the
method runs inside DistributedDataParallel with BatchNorm over the global batch
(``sync_batchnorm``), the kNN monitor embeds each rank's share of the images, and rank 0 alone
writes the config, log, checkpoints and model. Checkpoints hold no per-rank state, so a run
resumes on any number of processes.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sslens.atomic import atomic_write_bytes, directory_lock
from sslens.data.augment import VIEW_RECIPES, create_views
from sslens.data.base import data_fingerprint, normalize, to_float
from sslens.device import resolve_device
from sslens.distributed import (
    barrier,
    broadcast_object,
    convert_sync_batchnorm,
    gather_sharded_rows,
    init_distributed,
    mean_over_ranks,
    world,
)
from sslens.errors import SslensWarning, UserError
from sslens.evaluate.features import extract_features, labels_of
from sslens.evaluate.health import embedding_health, health_warnings
from sslens.evaluate.knn import knn_top1
from sslens.methods.base import METHODS, create_method
from sslens.models.base import create_backbone
from sslens.store import RunDir, load_training_state, provenance
from sslens.train.config import TrainConfig, save_config
from sslens.train.optim import create_optimizer, lr_at, set_lr
from sslens.train.progress import Progress

#: Where ``overwrite=True`` parks the previous run until the new one has a checkpoint.
REPLACED_DIR = ".replaced-run"


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, allow_changes: bool = False) -> Path:
    """Train ``config.method`` and return the run directory (``config.out``).

    Writes ``RUN/config.yaml``, ``RUN/log.jsonl``, checkpoints under ``RUN/checkpoints/`` and
    the final model under ``RUN/model/`` (load it with :func:`sslens.store.load_model`).

    Args:
        config: the resolved training config.
        resume: continue from the latest readable checkpoint in ``config.out`` (an unreadable
            newest one is skipped with a warning). The config must describe the same training
            as the checkpoint's; only the run's length (``epochs`` may grow: the cosine schedule
            then stretches over the new length from the resumed step), logging, checkpointing,
            the monitor and the device may change. ``config.yaml`` and the log are rewritten
            only once the resumed run has written its first checkpoint, so a resume that fails
            early leaves the run as it was.
        overwrite: replace a run already in ``config.out``. Its files are parked in
            ``RUN/.replaced-run`` and deleted once the new run has written a checkpoint.
        allow_changes: with ``resume``, accept a config that differs from the checkpoint's in
            other keys too (optimiser, learning rate, batch size, data, views, ...).

    A new run refuses a non-empty ``config.out`` unless one of the two flags is given. The run
    folder is locked for the whole run, so a second process on the same ``--out`` is refused.
    Everything that can be checked without data (options, the batch against the method, the
    resumed config) is checked before the run folder is touched. ``max_steps`` may end the run
    mid-epoch: the final model is then saved, but no checkpoint is written for the unfinished
    epoch.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() needs a TrainConfig (see sslens.train.load_config); got {type(config).__name__}")
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; pass only one.")
    run = RunDir(config.out)
    device = init_distributed(resolve_device(config.device))
    current = world()
    if config.batch_size % current.size:
        raise UserError(
            f"batch_size {config.batch_size} is the global batch and must divide evenly over the "
            f"{current.size} processes; use a multiple of {current.size}."
        )
    if run.path.exists() and not run.path.is_dir():
        raise UserError(f"--out {run.path} is a file; pass a directory for the run.")
    torch.manual_seed(config.seed)
    method, method_options = _build_method(config)
    with contextlib.ExitStack() as held:
        # Rank 0 writes the run, so rank 0 holds its lock; a refusal reaches every rank.
        _on_main(lambda: held.enter_context(directory_lock(run.path, "training a run")))
        _on_main(lambda: _prepare_run_dir(run, resume=resume, overwrite=overwrite))
        checkpoint = _resume_from(run, config, method_options, allow_changes) if resume else None
        with _kernel_settings(config.deterministic, device):
            _train(run, config, _Setup.build(config, device, method, method_options), checkpoint)
    return run.path


def _train(run: RunDir, config: TrainConfig, setup: _Setup, checkpoint: Path | None) -> None:
    """The loop: epochs of steps, a log record every ``log_every`` steps and per epoch, a
    checkpoint every ``checkpoint_every`` epochs and after the last, then the final model."""
    current, device = world(), setup.device
    method, optimizer, recipe = setup.method, setup.optimizer, setup.recipe
    epoch, step = _restore(checkpoint, setup) if checkpoint is not None else (0, 0)
    log = _RunLog(run, resume_step=step if checkpoint is not None else None) if current.is_main else None
    if current.is_main and checkpoint is None:
        save_config(config, run.config_file)
    if config.compile:
        for module in method.children():
            module.compile()
    model = data_parallel(method, device) if current.distributed else method
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    total_steps, warmup_steps = setup.total_steps, setup.warmup_steps
    probe = _HealthProbe(setup) if config.health_every > 0 else None
    history = list(log.kept) if log is not None else []

    def written() -> None:
        """After a checkpoint or the model is on disk: what a resumed run deferred, and the
        parked old run, may go."""
        if checkpoint is not None and not log.committed:
            save_config(config, run.config_file)
        log.commit()
        _drop_replaced(run)

    with Progress(total_steps, initial_step=step, bar=config.progress, silent=not current.is_main) as progress:
        if epoch > 0:
            progress.message(f"resumed {run.path} at epoch {epoch}, step {step}")
        while epoch < config.epochs and step < total_steps:
            method.train()
            # Each rank draws its own views: rank r's seed is offset by r · 2^32.
            generator = torch.Generator(device=device).manual_seed(_epoch_seed(config.seed, epoch) + current.rank * 2**32)
            epoch_meter, window = _Meter(device), _Meter(device)
            lr = config.lr
            for images, _ in setup.batches(epoch):
                lr = lr_at(step, total_steps, warmup_steps, config.lr, config.min_lr)
                set_lr(optimizer, lr)
                output = train_step(method, optimizer, recipe(images, generator), step, total_steps, autocast=autocast, model=model)
                step += 1
                for meter in (epoch_meter, window):
                    meter.add(output.loss, output.metrics, config.batch_size)
                progress.advance()
                if step % config.log_every == 0:
                    _emit({"kind": "step", "epoch": epoch + 1, "step": step, "lr": lr, **window.read()}, log, progress)
                    window.reset()
                if step >= total_steps:
                    break
            finished_epoch = epoch_meter.steps == setup.steps_per_epoch
            epoch += 1
            record = {"kind": "epoch", "epoch": epoch, "step": step, "lr": lr, **epoch_meter.read()}
            record["epoch_time_s"] = time.perf_counter() - epoch_meter.started
            if setup.test_data is not None and (epoch % config.knn_every == 0 or epoch == config.epochs):
                record["knn_top1"] = _knn_monitor(method, setup.train_data, setup.test_data, config, device)
            if probe is not None and (epoch % config.health_every == 0 or epoch == config.epochs):
                record.update(probe.measure(method))
                _warn_health(record, history)
            history.append(record)
            _emit(record, log, progress)
            if finished_epoch and (epoch % config.checkpoint_every == 0 or epoch == config.epochs) and current.is_main:
                run.save_checkpoint(
                    method, setup.meta(epoch, step), _training_state(optimizer, epoch, step, setup),
                    keep=config.keep_checkpoints,
                )
                written()
    if current.is_main:
        run.save_model(method, setup.meta(epoch, step))
        written()
    # No rank returns before the model is on disk: callers (the study) read it next.
    barrier()


def _build_method(config: TrainConfig) -> tuple[Any, dict]:
    """The method ``config`` trains (on the CPU) and its options with the default seed filled in;
    option errors, and a batch the method cannot train on, are UserErrors raised before any file
    is written."""
    method_options = _with_default_seed(METHODS.get(config.method), config.method_options, config.seed)
    with _user_input("backbone_options"):
        backbone = create_backbone(config.backbone, **config.backbone_options)
    with _user_input("method_options"):
        method = create_method(config.method, backbone, **method_options)
        method.check_batch_size(config.batch_size, world().size)
    return method, method_options


@dataclass
class _Setup:
    """Everything a run trains with, built from its config: data, method, views, optimiser and
    the step schedule."""

    config: TrainConfig
    device: torch.device
    train_data: Any
    test_data: Any
    train_fingerprint: str
    method: Any
    method_options: dict
    recipe: Any
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def build(cls, config: TrainConfig, device: torch.device, method: Any, method_options: dict) -> _Setup:
        train_data = config.data_split("train", device)
        test_data = config.data_split("test", device) if config.knn_every > 0 else None
        on_cuda = device.type == "cuda"
        method = method.to(device, memory_format=torch.channels_last) if on_cuda else method.to(device)
        if world().distributed and config.sync_batchnorm:
            synchronise_batchnorm(method, device)
        views_name = config.views or method.default_views
        views_options = _with_default_seed(VIEW_RECIPES.get(views_name), config.views_options, config.seed)
        with _user_input(f"views_options for the {views_name!r} recipe"):
            recipe = create_views(
                views_name, image_size=config.image_size, mean=train_data.mean, std=train_data.std, **views_options
            )
        optimizer = create_optimizer(
            config.optimizer, method, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum,
            fused=on_cuda,
        )
        steps_per_epoch = train_data.num_batches(config.batch_size, drop_last=True)
        if steps_per_epoch == 0:
            raise UserError(
                f"batch_size {config.batch_size} exceeds the {len(train_data)} training images; lower --batch-size."
            )
        total_steps = config.epochs * steps_per_epoch
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        return cls(
            config, device, train_data, test_data,
            # Recorded with the weights: a study reuses a finished run only on the same data.
            data_fingerprint(train_data),
            method, method_options, recipe, optimizer, steps_per_epoch, total_steps,
            warmup_steps=min(config.warmup_epochs * steps_per_epoch, total_steps),
        )

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's part of every global batch of ``epoch``, in the (seed, epoch) order."""
        current = world()
        return self.train_data.iter_batches(
            self.config.batch_size, shuffle=True, seed=self.config.seed, epoch=epoch, drop_last=True,
            device=self.device, rank=current.rank, world_size=current.size,
        )

    def meta(self, epoch: int, step: int) -> dict[str, Any]:
        """The ``meta.json`` of a checkpoint or model written after ``epoch`` / ``step``."""
        config, data = self.config, self.train_data
        return {
            "method": config.method,
            "method_options": self.method_options,
            "backbone": config.backbone,
            "backbone_options": config.backbone_options,
            "image_size": [config.image_size, config.image_size],
            "mean": list(data.mean),
            "std": list(data.std),
            "class_names": list(data.class_names),
            "data": data.source or config.data,
            "data_fingerprint": self.train_fingerprint,
            "views": self.recipe.describe(),
            "epoch": epoch,
            "step": step,
            "config": config.to_dict(),
            **provenance(),
        }


def _restore(checkpoint: Path, setup: _Setup) -> tuple[int, int]:
    """Load ``checkpoint``'s weights, optimiser and RNG states; its (epoch, step)."""
    weights, _, state = load_training_state(checkpoint)
    setup.method.load_state_dict(weights)
    setup.optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return int(state["epoch"]), int(state["step"])


#: Config keys a resumed run may change: how long it runs and what it logs, checkpoints,
#: monitors and runs on. Any other change would train something else than the checkpoint did.
RESUMABLE_CHANGES = (
    "epochs", "max_steps", "out", "progress", "device", "compile", "knn_every", "knn_k", "knn_temperature",
    "health_every", "log_every", "checkpoint_every", "keep_checkpoints",
)


def _resume_from(run: RunDir, config: TrainConfig, method_options: dict, allow_changes: bool) -> Path:
    """The checkpoint to resume from: the newest readable one whose training ``config`` continues.

    An unreadable newest checkpoint (a torn file) is skipped with a warning for the next older
    complete one, which ``keep_checkpoints`` keeps for exactly this.
    """
    for checkpoint in reversed(run.checkpoints()):
        try:
            _, meta, state = load_training_state(checkpoint)
        except UserError as error:
            warnings.warn(f"Skipping the unreadable checkpoint {checkpoint.name}: {error}", SslensWarning, stacklevel=3)
            continue
        _check_same_architecture(config, meta, method_options, checkpoint)
        _check_same_training(config, meta.get("config"), int(state["epoch"]), checkpoint, allow_changes)
        return checkpoint
    raise UserError(
        f"Cannot resume {run.path}: none of its checkpoints is readable. Start the run again with "
        f"--overwrite (the old files are deleted only after the new run's first checkpoint)."
    )


def _check_same_training(
    config: TrainConfig, stored: dict | None, epoch: int, checkpoint: Path, allow_changes: bool
) -> None:
    if config.epochs < epoch:
        raise UserError(
            f"{checkpoint} has already trained {epoch} epochs, more than --epochs {config.epochs}. "
            f"Pass --epochs {epoch} or more to continue it."
        )
    if stored is None or allow_changes:
        return
    current = config.to_dict()
    differences = [
        f"{key}: checkpoint {stored.get(key)!r}, now {current[key]!r}"
        for key in current
        if key not in RESUMABLE_CHANGES and stored.get(key) != current[key]
    ]
    if differences:
        raise UserError(
            f"Cannot resume from {checkpoint}: its run was trained with another config "
            f"({'; '.join(differences)}). Resume with the run's own config (omit --config to reuse "
            f"RUN/config.yaml), pass --allow-changes to continue with the new values on purpose, or "
            f"start a new run in another --out."
        )


def _training_state(optimizer: torch.optim.Optimizer, epoch: int, step: int, setup: _Setup) -> dict[str, Any]:
    """What a checkpoint needs beyond the weights to resume bitwise-exactly (plain values only)."""
    return {
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "rng": _rng_state(),
        "schedule": {"total_steps": setup.total_steps, "warmup_steps": setup.warmup_steps},
    }


def _emit(record: dict[str, Any], log: _RunLog | None, progress: Progress) -> None:
    """Check a log record, append it to the run's log (rank 0) and show it."""
    _check_finite(record)
    if log is not None:
        log.write(record)
    progress.report(record)


@contextlib.contextmanager
def _kernel_settings(deterministic: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels (or cuDNN autotuning) for the run; the previous settings come back."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace; it reads this when CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        # Every batch has the same shape, so autotuning pays for itself after one step.
        torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


def _prepare_run_dir(run: RunDir, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs; with ``overwrite``, park the old run in ``RUN/.replaced-run``.

    The parked run is deleted only once the new run has written its first checkpoint (see
    :func:`_drop_replaced`), so an interrupted ``--overwrite`` never loses the old checkpoints.
    """
    run_dir = run.path
    run.clean_leftovers()
    if resume:
        if run.latest_checkpoint() is None:
            raise nothing_to_resume(run)
        return
    parked = run_dir / REPLACED_DIR
    if parked.exists():
        raise UserError(
            f"{parked} holds a run parked by an earlier --overwrite that never reached its first "
            f"checkpoint. Move or delete it yourself, then run again."
        )
    entries = list(run_dir.iterdir()) if run_dir.is_dir() else []
    if not entries:
        run_dir.mkdir(parents=True, exist_ok=True)
        return
    markers = run.markers()
    what = f"another run ({', '.join(markers)})" if markers else f"{len(entries)} other file(s)"
    if not overwrite:
        raise UserError(
            f"{run_dir} already holds {what}. Continue it with --resume, choose another --out, or "
            f"pass --overwrite to replace it (the old run is deleted only after the new one has "
            f"written its first checkpoint)."
        )
    parked.mkdir()
    for entry in entries:
        os.replace(entry, parked / entry.name)


def nothing_to_resume(run: RunDir) -> UserError:
    """The one answer to ``--resume`` where there is no checkpoint yet."""
    started = run.config_file.is_file()
    why = "it stopped before its first checkpoint" if started else "it holds no run"
    advice = (
        f"start it again with --overwrite --out {run.path} (the same config)" if started
        else f"drop --resume to start a new run in {run.path}"
    )
    return UserError(f"Nothing to resume in {run.path}: {why}. To train, {advice}.")


def _drop_replaced(run: RunDir) -> None:
    shutil.rmtree(run.path / REPLACED_DIR, ignore_errors=True)


def _with_default_seed(factory: Any, options: dict, seed: int) -> dict:
    """``options`` plus ``seed=seed`` when the factory takes a seed the user did not set."""
    if "seed" not in options and "seed" in inspect.signature(factory).parameters:
        return {**options, "seed": seed}
    return dict(options)


@contextlib.contextmanager
def _user_input(what: str) -> Iterator[None]:
    """Report a constructor's ValueError/TypeError about ``what`` as a UserError.

    Constructors validate their options and say how to fix them; for the CLI those are input
    errors, not bugs, so they are shown without a traceback.
    """
    try:
        yield
    except UserError:
        raise
    except (ValueError, TypeError) as error:
        raise UserError(f"Invalid {what}: {error}") from error


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch + 1


def _rng_state() -> dict[str, Any]:
    cuda = [state for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"torch_cpu": torch.get_rng_state(), "torch_cuda": cuda}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] and torch.cuda.is_available():
        if len(state["torch_cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["torch_cuda"])


def _check_same_architecture(config: TrainConfig, meta: dict, method_options: dict, checkpoint: Path) -> None:
    expected = {
        "method": config.method,
        "backbone": config.backbone,
        "method_options": method_options,
        "backbone_options": config.backbone_options,
    }
    differences = [
        f"{key}: checkpoint {meta.get(key)!r}, config {value!r}"
        for key, value in expected.items()
        if meta.get(key) != value
    ]
    if differences:
        raise UserError(
            f"Cannot resume from {checkpoint}: it was trained with another architecture "
            f"({'; '.join(differences)}). Resume with the run's own config (omit --config to reuse "
            f"RUN/config.yaml) or start a new run in another --out."
        )


class _RunLog:
    """``RUN/log.jsonl``: one JSON object per line, flushed as it is written.

    A new run starts an empty log. A resumed run keeps its records up to the resumed step and
    holds its new ones back until :meth:`commit` (called once it has written a checkpoint),
    which rewrites the file atomically: a resume that fails before then leaves the log whole,
    and a kill during the rewrite leaves the old file. A record torn by a kill mid-write
    cannot be read back and is dropped.
    """

    def __init__(self, run: RunDir, *, resume_step: int | None):
        self.path = run.log_file
        self.pending: list[dict] | None = None
        self.kept: list[dict] = []
        if resume_step is None:
            self.path.write_text("")
        else:
            self.kept = [record for record in run.read_log() if record["step"] <= resume_step]
            self.pending = []

    @property
    def committed(self) -> bool:
        return self.pending is None

    def write(self, record: dict[str, Any]) -> None:
        if self.pending is not None:
            self.pending.append(record)
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def commit(self) -> None:
        """Write the kept and the held-back records, atomically (once)."""
        if self.pending is None:
            return
        records = self.kept + self.pending
        atomic_write_bytes(self.path, "".join(json.dumps(record) + "\n" for record in records).encode())
        self.pending = None


class _Meter:
    """Sums of the loss and metrics kept on the device; read (one sync) only when logged."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.images = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], images: int) -> None:
        for key, value in {"loss": loss, **metrics}.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.steps += 1
        self.images += images

    def read(self) -> dict[str, float]:
        """Means since the last reset; under torchrun, also averaged over the ranks (every rank
        must call this at the same step)."""
        keys = list(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).div(self.steps).tolist()  # sync point
        elapsed = time.perf_counter() - self.started
        means = mean_over_ranks(dict(zip(keys, values, strict=True)), self.device)
        return {**means, "images_per_s": self.images / max(elapsed, 1e-9)}


class _Eager(torch.nn.Module):
    """Runs ``module``'s own ``forward``, bypassing its ``torch.compile`` wrapper.

    The monitor runs in evaluation mode, without gradients, at another batch size: through the
    compiled training graph each of those would trigger a recompilation (and a last partial
    batch another), stalling training far longer than the few eager evaluation batches take.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.forward(x)


def _eager_encoder(method: Any, output: str) -> torch.nn.Module:
    """``method.encoder(output)`` with each compiled child (backbone, head) run eagerly."""
    encoder = method.encoder(output)
    if isinstance(encoder, torch.nn.Sequential):
        return torch.nn.Sequential(*(_Eager(part) for part in encoder))
    return _Eager(encoder)


#: Training images the per-epoch health is measured on (the same ones every epoch).
HEALTH_PROBE_IMAGES = 256


class _HealthProbe:
    """The run's label-free health monitor (:mod:`sslens.evaluate.health`): the first
    :data:`HEALTH_PROBE_IMAGES` training images and two views of them drawn once from the run's
    recipe with a generator of its own, so every epoch is measured on the same inputs and
    neither the weights nor the training's random streams are touched."""

    def __init__(self, setup: _Setup):
        data, count = setup.train_data, min(HEALTH_PROBE_IMAGES, len(setup.train_data))
        pixels = data.images[:count].to(setup.device)
        self.images = normalize(to_float(pixels), data.mean, data.std)
        generator = torch.Generator(device=setup.device).manual_seed(setup.config.seed)
        views = setup.recipe(pixels, generator)
        # The first two views: SwAV's global crops (its local crops are smaller).
        self.views = (views[0], views[1])

    def measure(self, method: Any) -> dict[str, float]:
        encoders = {output: _eager_encoder(method, output) for output in ("pooled", "projection")}
        health = embedding_health(encoders, self.images, self.views, intervals=False)
        return {
            "rankme_pooled": health["pooled"]["rankme"],
            "rankme_projection": health["projection"]["rankme"],
            "std_projection": health["projection"]["std"],
            "std_reference": health["projection"]["std_reference"],
            "alignment_projection": health["projection"]["alignment"],
            "uniformity_projection": health["projection"]["uniformity"],
        }


def _warn_health(record: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Add to ``record`` (and warn once about) what :func:`health_warnings` finds new in it."""
    # Each kind of warning names the first epoch it appears at, so an old one reads the same.
    before = set(health_warnings(history))
    new = [warning for warning in health_warnings([*history, record]) if warning not in before]
    if new:
        record["health_warning"] = "; ".join(new)
        if world().is_main:
            warnings.warn(f"Training health: {record['health_warning']}", SslensWarning, stacklevel=3)


def _knn_monitor(method: Any, train_data: Any, test_data: Any, config: TrainConfig, device: torch.device) -> float:
    """Held-out kNN top-1 of the pooled representation, un-augmented train split as memory bank.

    Under torchrun each rank embeds its share of the images and the features are gathered, so
    the monitor stalls training for 1/ranks of the single-device time.
    """
    encoder = _Eager(method.encoder("pooled"))
    batch_size = max(config.batch_size // world().size, 256)

    def features(data: Any) -> torch.Tensor:
        current = world()
        mine = data if not current.distributed else data.subset(torch.arange(current.rank, len(data), current.size))
        # extract_features returns CPU rows; back on the device, the kNN (a test × train
        # similarity and its top-k) runs there too instead of on the host while the GPU waits.
        rows = extract_features(encoder, mine, batch_size=batch_size, device=device).to(device)
        return gather_sharded_rows(rows, len(data), device)

    train_features, test_features = features(train_data), features(test_data)
    return knn_top1(
        train_features, labels_of(train_data), test_features, labels_of(test_data),
        k=config.knn_k, temperature=config.knn_temperature, num_classes=len(train_data.class_names),
    )


def synchronise_batchnorm(method: Any, device: torch.device) -> None:
    """Make the BatchNorm of ``method.global_batchnorm_children()`` cover the global batch."""
    for name in method.global_batchnorm_children():
        setattr(method, name, convert_sync_batchnorm(getattr(method, name), device))


def data_parallel(method: Any, device: torch.device) -> torch.nn.Module:
    """``method`` wrapped in DistributedDataParallel, the model :func:`train_step` runs."""
    # Buffers are not broadcast each step: MoCo's queue receives the gathered keys on every
    # rank, SwAV's queue is per rank by design, and synchronised BatchNorm keeps the running
    # statistics equal.
    return torch.nn.parallel.DistributedDataParallel(
        method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
    )


def _on_main(action: Any) -> None:
    """Run ``action`` on rank 0 only; a UserError there is raised on every rank, so none waits
    forever for a rank that gave up."""
    error = None
    if world().is_main:
        try:
            action()
        except UserError as raised:
            error = str(raised)
    error = broadcast_object(error)
    if error is not None:
        raise UserError(error)


def _check_finite(record: dict[str, Any]) -> None:
    if not math.isfinite(record["loss"]):
        raise UserError(
            f"The loss became {record['loss']} by step {record['step']} (epoch {record['epoch']}): "
            f"training diverged. Lower --lr (now {record['lr']:.4g}) or lengthen warm-up "
            f"(--set warmup_epochs=...)."
        )


def train_step(
    method: Any,
    optimizer: torch.optim.Optimizer,
    views: list[torch.Tensor],
    step: int,
    total_steps: int,
    *,
    autocast: contextlib.AbstractContextManager,
    model: torch.nn.Module | None = None,
) -> Any:
    """One optimiser step of ``method`` on ``views`` (the whole loop body but data and logging).

    On CUDA the views go channels_last to match the model; ``autocast`` is bf16 there and a
    no-op on the CPU. ``model`` is what runs the forward pass: ``method`` itself, or its
    ``DistributedDataParallel`` wrapper under torchrun (whose hooks average the gradients).
    Shared with ``benchmarks/train_throughput.py`` so the benchmark times exactly what training
    runs.
    """
    if views[0].is_cuda:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    with autocast:
        output = (model if model is not None else method)(views)
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    method.on_before_optimizer_step(step)
    optimizer.step()
    method.on_after_optimizer_step(step, total_steps)
    return output
