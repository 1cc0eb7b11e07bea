"""Several processes through PyTorch's own engine: ``torchrun``, ``torch.distributed`` and DDP.

sslens never launches processes itself. ``torchrun --nproc_per_node=N -m sslens train ...`` (or
``study``, ``explain``; multi-node with torchrun's usual ``--nnodes``/``--rdzv-*`` flags) starts N
copies, each with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment;
:func:`init_distributed` joins them into one process group (NCCL on CUDA, gloo on the CPU). Without
those variables everything here is the identity, so one code path serves one device and many.

What lives here, beside thin wrappers of the collectives:

* :func:`gather_with_grad` — ``all_gather`` whose backward is correct. Gathering negatives with
  ``torch.distributed.all_gather`` alone returns tensors without a graph, so the other ranks'
  loss terms never reach this rank's embeddings (the well-known bug of several contrastive
  libraries). Here the backward sums every rank's gradient for this rank's rows, which with
  DDP's gradient averaging gives exactly the gradient of the global-batch loss.
* :func:`convert_sync_batchnorm` — BatchNorm over the global batch: PyTorch's
  ``nn.SyncBatchNorm`` on CUDA, and on the CPU (where ``nn.SyncBatchNorm`` refuses to run) a
  BatchNorm whose batch sums go through a differentiable ``all_reduce``.
* :func:`shard` / :func:`gather_objects` — split a list of work items across ranks and put
  the results back in order, for the explanation stages.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
from torch import nn

from sslens.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among all processes: ``rank`` of ``size``, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    """True when the environment describes a group of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    """The current world: the initialised process group's, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (once) and return this process's device.

    Without torchrun this returns ``device`` unchanged. Under torchrun, a CUDA device becomes
    ``cuda:LOCAL_RANK`` (one GPU per process, NCCL); a CPU device stays the CPU (gloo). Asking
    for a specific ``cuda:N`` under torchrun is refused: the launcher assigns the GPUs.
    """
    if not launched_by_torchrun():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None and int(os.environ["WORLD_SIZE"]) > 1 and device.index != local_rank:
            raise UserError(
                f"--device {device} under torchrun: each process uses cuda:LOCAL_RANK. Pass --device cuda."
            )
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"torchrun started a process with LOCAL_RANK={local_rank} but this node has "
                f"{torch.cuda.device_count()} GPU(s); lower --nproc_per_node."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"Distributed runs support CUDA (NCCL) and the CPU (gloo); got --device {device}.")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
            timeout=datetime.timedelta(seconds=collective_timeout()),
        )
    return device


#: Environment variable: seconds a collective waits for the other processes before giving up.
TIMEOUT_ENV = "SSLENS_DIST_TIMEOUT"
#: Its default. PyTorch's own is 30 minutes (10 for NCCL), long enough to look like a hang when
#: one process has stopped; checkpoints, kNN and probes run on every rank, so no healthy rank
#: waits this long for another.
DEFAULT_TIMEOUT_S = 600


def collective_timeout() -> float:
    """Seconds before a collective gives up (:data:`TIMEOUT_ENV`, default :data:`DEFAULT_TIMEOUT_S`)."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"{TIMEOUT_ENV} must be a positive number of seconds; got {raw!r}.")
    return seconds


def missing_ranks(wait_s: float = 3.0) -> list[int]:
    """The ranks that do not answer within ``wait_s`` seconds, asked through torchrun's key-value
    store (which works when the collectives have timed out): each rank that can still run
    writes its key, then every rank without one is missing."""
    current = world()
    store = dist.distributed_c10d._get_default_store()
    prefix = f"sslens-alive-{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    store.set(f"{prefix}/{current.rank}", "1")
    deadline = time.monotonic() + wait_s
    missing = list(range(current.size))
    while missing and time.monotonic() < deadline:
        missing = [rank for rank in range(current.size) if not store.check([f"{prefix}/{rank}"])]
        time.sleep(0.1)
    return missing


def explain_timeout(error: BaseException) -> str | None:
    """A one-line message for a collective that timed out under torchrun (naming the processes
    that stopped answering), or None when ``error`` is something else."""
    text = str(error)
    if not world().distributed or not any(word in text.lower() for word in ("timed out", "timeout")):
        return None
    try:
        missing = missing_ranks()
    except (RuntimeError, ValueError):
        missing = []
    who = f"rank(s) {', '.join(map(str, missing))} did not answer" if missing else "another process did not answer"
    return (
        f"Rank {world().rank} waited {collective_timeout():.0f} s ({TIMEOUT_ENV}) for the other processes "
        f"and gave up: {who} (stopped, killed or hung). Check those processes' output, then resume the "
        f"run with --resume."
    )


def barrier() -> None:
    if world().distributed:
        dist.barrier()


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all processes (a new tensor; ``tensor`` itself on one process)."""
    if not world().distributed:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


@torch.no_grad()
def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``tensor`` over all processes."""
    if not world().distributed:
        return tensor
    result = tensor.clone()
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return result


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(n, ...) on every rank → (size · n, ...) in rank order, without a graph. Every rank must
    pass the same shape."""
    current = world()
    if not current.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(current.size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward: the sum over ranks of the gradient of this rank's rows."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        return gather_no_grad(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        # Each rank's loss depends on every rank's rows; summing the gradients of all ranks
        # (all_reduce, which gloo supports, unlike reduce_scatter) and keeping this rank's slice
        # gives this rank's rows the gradient of the sum of all ranks' losses. On a copy: autograd
        # may hand the same gradient tensor to other nodes too (an addition does), and an
        # in-place sum would give them every rank's gradient instead of this rank's own.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        rank = world().rank
        return grad[rank * ctx.rows : (rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(n, ...) on every rank → (size · n, ...) in rank order, differentiable.

    With DDP (which averages gradients over the ranks) and each rank's loss the mean over its own
    anchors, the update equals one process's on the global batch: the test
    ``tests/test_distributed.py`` checks it with two gloo processes.
    """
    if not world().distributed:
        return tensor
    return _GatherWithGrad.apply(tensor)


class _GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch, for backends where PyTorch's
    ``nn.SyncBatchNorm`` does not run (the CPU with gloo).

    The per-channel count, sum and sum of squares are summed over ranks with a differentiable
    ``all_reduce``, so gradients flow through the statistics as in one process's BatchNorm on the
    concatenated batch. Running statistics use the unbiased variance, as ``nn.BatchNorm``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"BatchNorm expects (N, C, ...) input; got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and world().distributed):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        flat = input.float()
        count = torch.full((1,), flat.numel() / flat.shape[1], device=input.device, dtype=torch.float32)
        stats = torch.cat([count, flat.sum(dims), (flat * flat).sum(dims)])
        stats = dist_functional.all_reduce(stats, op=dist.ReduceOp.SUM)
        channels = flat.shape[1]
        total, sums, squares = stats[0], stats[1 : 1 + channels], stats[1 + channels :]
        mean = sums / total
        var = (squares / total - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.num_batches_tracked.add_(1)
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = [1, channels] + [1] * (input.dim() - 2)
        normalised = (flat - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            normalised = normalised * self.weight.view(shape) + self.bias.view(shape)
        return normalised.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm computing its statistics over all ranks' batches.

    CUDA: PyTorch's ``nn.SyncBatchNorm.convert_sync_batchnorm``. CPU: the same conversion to
    :class:`_GlobalBatchNorm` (parameters and buffers kept, so checkpoints load either way).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_to_global(module)


def _convert_to_global(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _GlobalBatchNorm):
        converted = _GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        # The same Parameter and buffer objects: an optimiser built before still updates them.
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _convert_to_global(child))
    return module


def shard(items: Sequence[T], current: World | None = None) -> list[T]:
    """This rank's share of ``items``: every ``size``-th item from ``rank`` (balanced to one)."""
    current = current or world()
    return list(items[current.rank :: current.size])


def unshard(per_rank: Sequence[Sequence[T]], total: int) -> list[T]:
    """Inverse of :func:`shard`: rank r's i-th result is item ``r + i · size``."""
    size = len(per_rank)
    ordered: list[Any] = [None] * total
    for rank, results in enumerate(per_rank):
        for index, result in enumerate(results):
            ordered[rank + index * size] = result
    return ordered


def gather_objects(value: T) -> list[T]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    current = world()
    if not current.distributed:
        return [value]
    values: list[Any] = [None] * current.size
    dist.all_gather_object(values, value)
    return values


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    if not world().distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Per-key mean of ``values`` (the same keys on every rank) over all ranks."""
    if not world().distributed or not values:
        return values
    keys = sorted(values)
    stacked = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return dict(zip(keys, (stacked / world().size).tolist(), strict=True))


def gather_sharded_rows(rows: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """Rows computed for :func:`shard` of ``range(total)`` → all ``total`` rows in order, on every
    rank (on ``rows``' device). ``device`` is where the collective runs (CUDA for NCCL)."""
    current = world()
    if not current.distributed:
        return rows
    per_rank = -(-total // current.size)
    padded = rows.new_zeros((per_rank, *rows.shape[1:]))
    padded[: len(rows)] = rows
    gathered = gather_no_grad(padded.to(device)).to(rows.device)
    # Row i of rank r is item r + i·size: interleave the ranks' blocks back into item order.
    interleaved = gathered.view(current.size, per_rank, *rows.shape[1:]).transpose(0, 1)
    return interleaved.reshape(current.size * per_rank, *rows.shape[1:])[:total]
