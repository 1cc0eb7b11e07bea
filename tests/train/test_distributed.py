"""Training under torchrun: two gloo processes on the CPU against one process.

The step test is the issue's acceptance check: one step of each method on R = 2 processes, each
holding half of a global batch, gives the loss and the updated weights of one process on the
whole batch. It can only pass if the SimCLR negatives are gathered *with* their gradients, SwAV's
Sinkhorn runs over the global batch, Barlow Twins' cross-correlation and VICReg's variance and
covariance cover the global batch, MoCo's shuffled BN spans the ranks and BatchNorm is
synchronised (each of these, done per process, changes the weights by far more than the
tolerance).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslens.distributed import shard, unshard
from sslens.train.loop import train_step

WORKERS = Path(__file__).parents[1] / "workers"
RANKS = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*args: str, cwd: Path, nproc: int = RANKS, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=nproc ARGS`` on the CPU, checked."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args,
    ]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def _worker_module():
    spec = importlib.util.spec_from_file_location("distributed_step", WORKERS / "distributed_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_process_step(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp-step")
    torchrun(str(WORKERS / "distributed_step.py"), str(out), cwd=out)
    return out


@pytest.mark.parametrize("name", ["simclr", "moco", "swav", "barlow_twins", "vicreg", "byol"])
def test_one_step_on_two_processes_equals_one_process_on_the_global_batch(two_process_step, name):
    worker = _worker_module()
    # One process: the whole global batch; MoCo's shuffled BN needs one group per rank.
    overrides = {"key_bn_splits": RANKS} if name == "moco" else {}
    method = worker.build(name, **overrides)
    initial = {key: value.clone() for key, value in method.state_dict().items()}
    optimizer = worker.optimizer_for(method)
    output = train_step(method, optimizer, worker.global_views(name), 0, 10, autocast=contextlib.nullcontext())

    distributed = torch.load(two_process_step / f"{name}.pt", weights_only=True)
    assert distributed["loss"] == pytest.approx(output.loss.item(), abs=1e-5)
    state = method.state_dict()
    assert distributed["state"].keys() == state.keys()
    moved = 0
    for key, value in state.items():
        # Float rounding grows with the step: Barlow Twins' loss (~85) moves the stem by ~45 at
        # lr 0.5, where rounding reaches 1.5e-4; a per-process loss would differ by O(the step).
        step = (value - initial[key]).abs().max().item() if value.dtype.is_floating_point and value.numel() else 0.0
        torch.testing.assert_close(distributed["state"][key], value, rtol=1e-4, atol=1e-5 * (1 + step), msg=key)
        moved += int(value.dtype.is_floating_point and not torch.allclose(value, initial[key]))
    assert moved > 10  # the step changed the weights: the comparison is not between two no-ops


def test_shard_and_unshard_round_trip():
    items = list(range(11))
    parts = [shard(items, world) for world in _worlds(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert unshard(parts, len(items)) == items


def test_gather_with_grad_leaves_the_gradients_of_other_branches_alone(monkeypatch):
    """Two ranks holding the same rows, simulated in one process: all_gather copies, all_reduce
    doubles. An addition hands one gradient tensor to both of its inputs; the gather's backward
    must sum over ranks for its own input only, not for the other branch (``w``)."""
    import torch.distributed as dist

    import sslens.distributed as distributed

    monkeypatch.setattr(distributed, "world", lambda: distributed.World(0, RANKS))
    monkeypatch.setattr(dist, "all_gather", lambda parts, tensor: [part.copy_(tensor) for part in parts])
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: tensor.mul_(RANKS))
    z = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(RANKS * 3, 4, requires_grad=True)
    weights = torch.randn(RANKS * 3, 4)
    scaled = w * 3.0  # created before the gather, so the engine runs the gather's backward first
    ((distributed.gather_with_grad(z) + scaled) * weights).sum().backward()
    torch.testing.assert_close(w.grad, 3.0 * weights)
    torch.testing.assert_close(z.grad, RANKS * weights[:3])


def _worlds(size: int):
    from sslens.distributed import World

    return [World(rank, size) for rank in range(size)]


def test_torchrun_train_writes_once_and_resumes_on_one_process(tmp_path):
    run = tmp_path / "run"
    settings = [
        "--set", "data_options.num_images=96", "--set", "batch_size=16", "--set", "epochs=2",
        "--set", "knn_every=1", "--set", "checkpoint_every=1", "--set", "log_every=2",
        "--set", "knn_k=5", "--set", "progress=false",
    ]
    torchrun("-m", "sslens", "train", "--config", "simclr-synthetic", "--device", "cpu", "--out", str(run),
             *settings, cwd=tmp_path)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    # Rank 0 alone writes: every record once; 96 images / global batch 16 = 6 steps per epoch.
    assert [r["step"] for r in epochs] == [6, 12]
    assert [r["step"] for r in records if r["kind"] == "step"] == [2, 4, 6, 8, 10, 12]
    assert all(0.0 <= r["knn_top1"] <= 1.0 for r in epochs)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())[-1].endswith("2")
    assert (run / "model").is_dir()

    # Resume the two-process run on one process for a third epoch.
    subprocess.run(
        [sys.executable, "-m", "sslens", "train", "--resume", "--out", str(run), "--set", "epochs=3"],
        cwd=tmp_path, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240,
    )
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "epoch"] == [6, 12, 18]
