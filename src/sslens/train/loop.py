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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sslens.atomic import atomic_write_bytes
from sslens.distributed import (
    barrier,
    broadcast_object,
    convert_sync_batchnorm,
    gather_sharded_rows,
    init_distributed,
    mean_over_ranks,
    world,
)
from sslens.errors import UserError
from sslens.train.checkpoint import (
    latest_checkpoint,
    load_training_state,
    provenance,
    save_checkpoint,
    save_model,
)
from sslens.train.config import TrainConfig, save_config
from sslens.train.optim import create_optimizer, lr_at, set_lr
from sslens.train.progress import Progress

#: Where ``overwrite=True`` parks the previous run until the new one has a checkpoint.
REPLACED_DIR = ".replaced-run"

#: Files and folders that mark a directory as holding a run.
RUN_MARKERS = ("config.yaml", "log.jsonl", "checkpoints", "model")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else the CPU; a missing device is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(
            f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)."
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} was asked for but MPS is not available here; use --device cpu.")
    return device


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


def _prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs; with ``overwrite``, park the old run in ``RUN/.replaced-run``.

    The parked run is deleted only once the new run has written its first checkpoint (see
    :func:`_drop_replaced`), so an interrupted ``--overwrite`` never loses the old checkpoints.
    """
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; pass only one.")
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise UserError(
                f"Nothing to resume: {run_dir} holds no checkpoint. Drop --resume to start a new run there."
            )
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file; pass a directory for the run.")
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
    markers = [e.name for e in entries if e.name in RUN_MARKERS]
    what = f"another run ({', '.join(sorted(markers))})" if markers else f"{len(entries)} other file(s)"
    if not overwrite:
        raise UserError(
            f"{run_dir} already holds {what}. Continue it with --resume, choose another --out, or "
            f"pass --overwrite to replace it (the old run is deleted only after the new one has "
            f"written its first checkpoint)."
        )
    parked.mkdir()
    for entry in entries:
        os.replace(entry, parked / entry.name)


def _drop_replaced(run_dir: Path) -> None:
    shutil.rmtree(run_dir / REPLACED_DIR, ignore_errors=True)


def _with_default_seed(factory: Any, options: dict, seed: int) -> dict:
    """``options`` plus ``seed=seed`` when the factory takes a seed the user did not set."""
    if "seed" not in options and "seed" in inspect.signature(factory).parameters:
        return {**options, "seed": seed}
    return dict(options)


def _data_options(config: TrainConfig) -> dict:
    """Options for ``load_dataset``: ``data_options`` plus ``data_dir``/``image_size`` where the
    source takes them and they were not set explicitly."""
    from sslens.data import DATASETS

    accepted = inspect.signature(DATASETS.get(config.data)).parameters
    options = dict(config.data_options)
    if config.data_dir is not None:
        if "data_dir" not in accepted:
            raise UserError(f"The {config.data!r} dataset reads no files, so it takes no --data-dir.")
        options.setdefault("data_dir", config.data_dir)
    if "image_size" in accepted:
        options.setdefault("image_size", config.image_size)
    return options


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


def load_split(config: TrainConfig, split: str, device: torch.device) -> Any:
    """The ``split`` ("train"/"test") of the config's dataset; in-memory data moved to ``device``."""
    from sslens.data import ImageData, load_dataset

    with _user_input(f"data options for {config.data!r}"):
        data = load_dataset(config.data, split, **_data_options(config))
    # Small datasets live on the device: no loader workers, no host-to-device copies per step.
    return data.to(device) if isinstance(data, ImageData) else data


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
    """``RUN/log.jsonl``: one JSON object per line, flushed as it is written."""

    def __init__(self, path: Path, *, keep_until_step: int | None):
        self.path = path
        if keep_until_step is not None and path.exists():
            # A resumed run repeats the steps after its checkpoint; drop their old records.
            # Atomically: a kill during a plain rewrite would lose the run's whole history.
            # Every record ends with a newline, so text after the last one is a record torn by a
            # kill mid-write; it cannot be read back, and dropping it beats refusing to resume.
            complete = path.read_text().rpartition("\n")[0].splitlines()
            kept = [line for line in complete if line.strip() and json.loads(line)["step"] <= keep_until_step]
            atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())
        elif keep_until_step is None:
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


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


def _knn_monitor(method: Any, train_data: Any, test_data: Any, config: TrainConfig, device: torch.device) -> float:
    """Held-out kNN top-1 of the pooled representation, un-augmented train split as memory bank.

    Under torchrun each rank embeds its share of the images and the features are gathered, so
    the monitor stalls training for 1/ranks of the single-device time.
    """
    from sslens.evaluate.features import extract_features, labels_of
    from sslens.evaluate.knn import knn_top1

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


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train ``config.method`` and return the run directory (``config.out``).

    Writes ``RUN/config.yaml``, ``RUN/log.jsonl``, checkpoints under ``RUN/checkpoints/`` and
    the final model under ``RUN/model/`` (load it with :func:`sslens.train.load_model`).

    Args:
        config: the resolved training config.
        resume: continue from the latest checkpoint in ``config.out``; the config must describe
            the same method and backbone (``epochs`` may grow: the cosine schedule then
            stretches over the new length from the resumed step).
        overwrite: replace a run already in ``config.out``. Its files are parked in
            ``RUN/.replaced-run`` and deleted once the new run has written a checkpoint.

    A new run refuses a non-empty ``config.out`` unless one of the two flags is given.
    ``max_steps`` may end the run mid-epoch: the final model is then saved, but no checkpoint
    is written for the unfinished epoch.
    """
    from sslens.data.augment import VIEW_RECIPES, create_views
    from sslens.methods import METHODS, create_method
    from sslens.models import create_backbone

    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() needs a TrainConfig (see sslens.train.load_config); got {type(config).__name__}")
    run_dir = Path(config.out)
    device = init_distributed(resolve_device(config.device))
    current = world()
    if config.batch_size % current.size:
        raise UserError(
            f"batch_size {config.batch_size} is the global batch and must divide evenly over the "
            f"{current.size} processes; use a multiple of {current.size}."
        )
    _on_main(lambda: _prepare_run_dir(run_dir, resume=resume, overwrite=overwrite))
    on_cuda = device.type == "cuda"

    with _kernel_settings(config.deterministic, device):
        torch.manual_seed(config.seed)
        train_data = load_split(config, "train", device)
        test_data = load_split(config, "test", device) if config.knn_every > 0 else None
        # Recorded with the weights: a study reuses a finished run only on the same data.
        from sslens.data.base import data_fingerprint

        train_fingerprint = data_fingerprint(train_data)

        method_options = _with_default_seed(METHODS.get(config.method), config.method_options, config.seed)
        with _user_input("backbone_options"):
            backbone = create_backbone(config.backbone, **config.backbone_options)
        with _user_input("method_options"):
            method = create_method(config.method, backbone, **method_options)
        method = method.to(device, memory_format=torch.channels_last) if on_cuda else method.to(device)
        if current.distributed and config.sync_batchnorm:
            synchronise_batchnorm(method, device)
        views_name = config.views or method.default_views
        views_options = _with_default_seed(VIEW_RECIPES.get(views_name), config.views_options, config.seed)
        with _user_input(f"views_options for the {views_name!r} recipe"):
            recipe = create_views(
                views_name, image_size=config.image_size, mean=train_data.mean, std=train_data.std,
                **views_options,
            )
        optimizer = create_optimizer(
            config.optimizer, method, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum,
            fused=on_cuda,
        )

        steps_per_epoch = train_data.num_batches(config.batch_size, drop_last=True)
        if steps_per_epoch == 0:
            raise UserError(
                f"batch_size {config.batch_size} exceeds the {len(train_data)} training images; "
                f"lower --batch-size."
            )
        total_steps = config.epochs * steps_per_epoch
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        warmup_steps = min(config.warmup_epochs * steps_per_epoch, total_steps)

        start_epoch, step = 0, 0
        if resume:
            checkpoint = latest_checkpoint(run_dir)
            weights, meta, state = load_training_state(checkpoint)
            _check_same_architecture(config, meta, method_options, checkpoint)
            method.load_state_dict(weights)
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, step = int(state["epoch"]), int(state["step"])
            _set_rng_state(state["rng"])
        log = None
        if current.is_main:
            save_config(config, run_dir / "config.yaml")
            log = _RunLog(run_dir / "log.jsonl", keep_until_step=step if resume else None)

        def meta_now(epoch: int) -> dict[str, Any]:
            return {
                "method": config.method,
                "method_options": method_options,
                "backbone": config.backbone,
                "backbone_options": config.backbone_options,
                "image_size": [config.image_size, config.image_size],
                "mean": list(train_data.mean),
                "std": list(train_data.std),
                "class_names": list(train_data.class_names),
                "data": train_data.source or config.data,
                "data_fingerprint": train_fingerprint,
                "views": recipe.describe(),
                "epoch": epoch,
                "step": step,
                "config": config.to_dict(),
                **provenance(),
            }

        if config.compile:
            for module in method.children():
                module.compile()
        model = data_parallel(method, device) if current.distributed else method

        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
        )
        epoch = start_epoch
        with Progress(total_steps, initial_step=step, bar=config.progress, silent=not current.is_main) as progress:
            if start_epoch > 0:
                progress.message(f"resumed {run_dir} at epoch {start_epoch}, step {step}")
            while epoch < config.epochs and step < total_steps:
                method.train()
                # Each rank draws its own views: rank r's seed is offset by r · 2^32.
                generator = torch.Generator(device=device).manual_seed(
                    _epoch_seed(config.seed, epoch) + current.rank * 2**32
                )
                epoch_meter, window = _Meter(device), _Meter(device)
                batches = train_data.iter_batches(
                    config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                    drop_last=True, device=device, rank=current.rank, world_size=current.size,
                )
                lr = config.lr
                for images, _ in batches:
                    lr = lr_at(step, total_steps, warmup_steps, config.lr, config.min_lr)
                    set_lr(optimizer, lr)
                    views = recipe(images, generator)
                    output = train_step(method, optimizer, views, step, total_steps, autocast=autocast, model=model)
                    step += 1
                    epoch_meter.add(output.loss, output.metrics, len(images) * current.size)
                    window.add(output.loss, output.metrics, len(images) * current.size)
                    progress.advance()
                    if step % config.log_every == 0:
                        record = {"kind": "step", "epoch": epoch + 1, "step": step, "lr": lr, **window.read()}
                        _check_finite(record)
                        if log is not None:
                            log.write(record)
                        progress.report(record)
                        window.reset()
                    if step >= total_steps:
                        break
                finished_epoch = epoch_meter.steps == steps_per_epoch
                epoch += 1
                record = {"kind": "epoch", "epoch": epoch, "step": step, "lr": lr, **epoch_meter.read()}
                record["epoch_time_s"] = time.perf_counter() - epoch_meter.started
                _check_finite(record)
                if test_data is not None and (epoch % config.knn_every == 0 or epoch == config.epochs):
                    record["knn_top1"] = _knn_monitor(method, train_data, test_data, config, device)
                if log is not None:
                    log.write(record)
                progress.report(record)
                if finished_epoch and (epoch % config.checkpoint_every == 0 or epoch == config.epochs) and current.is_main:
                    state = {
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch,
                        "step": step,
                        "rng": _rng_state(),
                        "schedule": {"total_steps": total_steps, "warmup_steps": warmup_steps},
                    }
                    save_checkpoint(run_dir, method, meta_now(epoch), state, keep=config.keep_checkpoints)
                    _drop_replaced(run_dir)
        if current.is_main:
            save_model(run_dir / "model", method, meta_now(epoch))
            _drop_replaced(run_dir)
        # No rank returns before the model is on disk: callers (the study) read it next.
        barrier()
    return run_dir


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
