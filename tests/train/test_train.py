"""Optimisers, the learning-rate schedule, and the training loop (resume, run directories, learning)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from sslens.data.synthetic import CLASS_NAMES
from sslens.errors import UserError
from sslens.store import RunDir, load_model
from sslens.train import (
    LARS,
    create_optimizer,
    load_config,
    lr_at,
    parameter_groups,
    train,
)

# ---------------------------------------------------------------- schedule and optimisers


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.1),  # warm-up: (step + 1) / warmup_steps of the peak
        (4, 0.5),
        (9, 1.0),
        (10, 1.0),  # cosine starts at the peak
        (55, 0.5),  # half-way through the cosine: cos(pi/2) = 0
        (100, 0.0),  # and ends at min_lr
    ],
)
def test_lr_at_warmup_then_cosine(step, expected):
    assert lr_at(step, 100, 10, 1.0, 0.0) == pytest.approx(expected, abs=1e-12)


def test_lr_at_min_lr_and_no_warmup():
    assert lr_at(0, 50, 0, 0.4, 0.1) == pytest.approx(0.4)
    assert lr_at(25, 50, 0, 0.4, 0.1) == pytest.approx(0.25)
    assert lr_at(50, 50, 0, 0.4, 0.1) == pytest.approx(0.1)
    quarter = 0.1 + 0.5 * 0.3 * (1 + math.cos(math.pi / 4))
    assert lr_at(12, 48, 0, 0.4, 0.1) == pytest.approx(quarter)


@pytest.mark.parametrize(
    "args",
    [(-1, 10, 0, 1.0, 0.0), (11, 10, 0, 1.0, 0.0), (0, 0, 0, 1.0, 0.0), (0, 10, 11, 1.0, 0.0), (0, 10, 0, 1.0, 2.0)],
)
def test_lr_at_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        lr_at(*args)


def test_parameter_groups_exclude_biases_and_norm_parameters_from_decay():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3, 3, 3])]
    assert decay["weight_decay"] == 0.1 and decay["lars_adapt"]
    assert len(no_decay["params"]) == 4  # conv bias, BN weight and bias, linear bias
    assert no_decay["weight_decay"] == 0.0 and not no_decay["lars_adapt"]


def test_lars_step_matches_the_hand_computed_update():
    weight = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    bias = nn.Parameter(torch.tensor([1.0]))
    optimizer = LARS(
        [{"params": [weight], "weight_decay": 0.1, "lars_adapt": True},
         {"params": [bias], "weight_decay": 0.0, "lars_adapt": False}],
        lr=2.0, momentum=0.9,
    )
    weight.grad = torch.tensor([[0.6, 0.8]])
    bias.grad = torch.tensor([0.5])
    optimizer.step()
    # u = g + 0.1 w = (0.9, 1.2), ||u|| = 1.5; trust ratio 0.001 * 5 / 1.5; u * ratio = (0.003, 0.004)
    assert torch.allclose(weight, torch.tensor([[3.0 - 2 * 0.003, 4.0 - 2 * 0.004]]), atol=1e-7)
    assert torch.allclose(bias, torch.tensor([1.0 - 2 * 0.5]))  # plain SGD for the bias
    # Second step: the momentum buffer carries 0.9 of the first update.
    weight.grad = torch.zeros(1, 2)
    bias.grad = torch.zeros(1)
    before = weight.detach().clone()
    optimizer.step()
    u = 0.1 * before
    u = u * 0.001 * before.norm() / u.norm()
    expected = before - 2 * (0.9 * torch.tensor([[0.003, 0.004]]) + u)
    assert torch.allclose(weight, expected, atol=1e-7)


# LARS scales each step by 0.001 * ||w|| / ||g||, so it needs a far larger global rate.
@pytest.mark.parametrize(("name", "lr"), [("sgd", 0.05), ("lars", 20.0), ("adam", 0.05), ("adamw", 0.05)])
def test_every_optimizer_reduces_a_quadratic(name, lr):
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)  # a bias would take plain SGD steps at LARS's rate
    optimizer = create_optimizer(name, model, lr=lr, weight_decay=0.0)
    x = torch.randn(32, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    first = None
    for _ in range(30):
        loss = (model(x) - y).pow(2).mean()
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.8 * first


# ---------------------------------------------------------------- the training loop

TINY = {
    "backbone": "resnet-tiny",
    "data": "synthetic",
    "image_size": 32,
    "data_options": {"num_images": 200},
    "batch_size": 32,
    "lr": 0.05,
    "warmup_epochs": 1,
    "knn_every": 0,
    "log_every": 2,
    "checkpoint_every": 1,
    "device": "cpu",
    "progress": False,
}


def tiny_config(out, **overrides):
    return load_config(None, {**TINY, "out": str(out), **overrides})


def state_of(run) -> dict[str, torch.Tensor]:
    method, _ = load_model(run)
    return method.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "options"),
    [("moco", {"queue_size": 64, "key_bn_splits": 2}), ("swav", {"num_prototypes": 12, "freeze_prototypes_steps": 3}),
     # A constant momentum: the cosine one depends on the run's length, which this test extends.
     ("byol", {"hidden_dim": 32, "out_dim": 16, "momentum_schedule": "constant"})],
)
def test_resume_is_bitwise_identical(tmp_path, method, options):
    common = {"method": method, "method_options": options, "deterministic": True, "max_steps": None}
    straight = train(tiny_config(tmp_path / "straight", epochs=2, **common))
    train(tiny_config(tmp_path / "split", epochs=1, **common))
    resumed = train(tiny_config(tmp_path / "split", epochs=2, **common), resume=True)
    a, b = state_of(straight), state_of(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    records = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    straight_records = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [r["step"] for r in straight_records]
    assert [r["loss"] for r in records] == [r["loss"] for r in straight_records]


@pytest.mark.slow
def test_run_directory_layout_and_log(tmp_path):
    run = train(tiny_config(tmp_path / "run", method="simclr", epochs=2, keep_checkpoints=1, knn_every=2))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "log.jsonl", "model"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0002", "latest"]
    assert load_config(run / "config.yaml", {}) == tiny_config(tmp_path / "run", method="simclr", epochs=2,
                                                                keep_checkpoints=1, knn_every=2)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]  # 6 steps per epoch, log every 2
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 6), (2, 12)]
    for record in records:
        assert {"epoch", "step", "loss", "lr", "positive_pair_top1", "images_per_s"} <= set(record)
        assert "accuracy" not in record
    assert "knn_top1" not in epochs[0] and 0.0 <= epochs[1]["knn_top1"] <= 1.0
    assert epochs[1]["epoch_time_s"] > 0
    # Warm-up over the first epoch: step 1 trains at lr/6, step 6 at the peak.
    assert steps[0]["lr"] == pytest.approx(0.05 * 2 / 6)
    method, meta = load_model(run)
    assert (meta["method"], meta["backbone"], meta["epoch"], meta["step"]) == ("simclr", "resnet-tiny", 2, 12)
    assert meta["image_size"] == [32, 32] and meta["class_names"] == list(CLASS_NAMES)
    assert meta["config"]["epochs"] == 2


@pytest.mark.slow
def test_max_steps_ends_mid_epoch_without_a_checkpoint(tmp_path):
    run = train(tiny_config(tmp_path / "run", method="simclr", epochs=3, max_steps=8))
    _, meta = load_model(run / "model")
    assert meta["step"] == 8 and meta["epoch"] == 2
    # Epoch 1 (6 steps) completed and was checkpointed; the 2 steps of epoch 2 were not.
    assert RunDir(run).latest_checkpoint().name == "epoch-0001"


@pytest.mark.slow
def test_existing_runs_are_protected(tmp_path):
    config = tiny_config(tmp_path / "run", method="simclr", epochs=1)
    run = train(config)
    before = (run / "model" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds another run.*--resume.*--overwrite"):
        train(config)
    assert (run / "model" / "model.safetensors").read_bytes() == before
    with pytest.raises(UserError, match="pass only one"):
        train(config, resume=True, overwrite=True)
    with pytest.raises(UserError, match="Nothing to resume"):
        train(tiny_config(tmp_path / "empty", method="simclr"), resume=True)
    with pytest.raises(UserError, match=r"another architecture \(method: checkpoint 'simclr', config 'moco'"):
        train(tiny_config(tmp_path / "run", method="moco", epochs=2, max_steps=None), resume=True)
    train(tiny_config(tmp_path / "run", method="simclr", epochs=1, seed=5), overwrite=True)
    assert not (run / ".replaced-run").exists()
    assert load_config(run / "config.yaml", {}).seed == 5


def test_overwrite_keeps_the_old_run_until_the_new_one_checkpoints(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (run / "config.yaml").write_text("method: simclr\n")
    # Options are checked before the run folder is touched: the old run is not even parked.
    with pytest.raises(UserError, match="Invalid method_options"):
        train(tiny_config(run, method="simclr", method_options={"temperature": -1.0}), overwrite=True)
    assert (run / "checkpoints" / "epoch-0001").is_dir() and not (run / ".replaced-run").exists()
    with pytest.raises(UserError, match="Invalid data options"):
        train(tiny_config(run, method="simclr", data_options={"num_images": 0}), overwrite=True)
    # The new run failed before its first checkpoint: the old one is parked, not deleted,
    # and a further run refuses to start until someone looks at it.
    assert (run / ".replaced-run" / "checkpoints" / "epoch-0001").is_dir()
    with pytest.raises(UserError, match="parked by an earlier --overwrite"):
        train(tiny_config(run, method="simclr"), overwrite=True)


def test_compiled_training_never_recompiles(tmp_path, monkeypatch):
    """A learning rate that changes every step, a dropped last partial batch and the kNN monitor
    (evaluation mode, no gradients, other batch sizes) must not recompile the training graphs:
    exactly one graph per compiled child (backbone, projector) for the whole run. The "eager"
    dynamo backend keeps this fast; guards and recompilation work exactly as with inductor."""
    from torch._dynamo.utils import counters

    compile_module = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **options: compile_module(self, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    config = load_config("simclr-synthetic", {
        "data_options.num_images": 100, "batch_size": 32, "epochs": 2, "knn_every": 1, "knn_k": 5,
        "compile": True, "progress": False, "out": str(tmp_path / "run"),
    })
    train(config)
    torch._dynamo.reset()
    assert dict(counters["frames"]) == {"total": 2, "ok": 2}
    assert counters["stats"]["unique_graphs"] == 2


def test_knn_monitor_runs_the_knn_on_the_training_device(tmp_path, monkeypatch):
    """extract_features hands back CPU rows; on a GPU run the kNN must not run on the host while
    the GPU waits. The meta device stands in for a GPU: only where the kNN runs is checked."""
    import sslens.train.loop as loop
    from sslens.data.base import ImageData
    from sslens.methods import create_method
    from sslens.models import create_backbone
    from sslens.train.loop import _knn_monitor

    seen = []

    def knn_top1(train_features, train_labels, test_features, test_labels, **options):
        seen.append((train_features.device, test_features.device))
        return 0.5

    monkeypatch.setattr(loop, "extract_features", lambda encoder, data, **options: torch.randn(len(data), 4))
    monkeypatch.setattr(loop, "knn_top1", knn_top1)
    data = ImageData(torch.zeros(6, 8, 8, 3, dtype=torch.uint8), torch.tensor([0, 1] * 3), ["a", "b"])
    method = create_method("simclr", create_backbone("resnet-tiny"))
    assert _knn_monitor(method, data, data, tiny_config(tmp_path / "run"), torch.device("meta")) == 0.5
    assert seen == [(torch.device("meta"), torch.device("meta"))]


def test_resume_rewrites_the_log_atomically(tmp_path, monkeypatch):
    """Resuming drops the records after the checkpoint by rewriting log.jsonl; when that write
    fails (disk full, a kill), the old history must survive whole."""
    import os

    from sslens.store import RunDir
    from sslens.train.loop import _RunLog

    path = tmp_path / "log.jsonl"
    history = "".join(json.dumps({"kind": "step", "step": step}) + "\n" for step in (2, 4, 6))
    path.write_text(history)

    def disk_full(fd):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    log = _RunLog(RunDir(tmp_path), resume_step=4)
    log.write({"kind": "step", "step": 6, "loss": 1.0})
    # Nothing is rewritten before the resumed run has a checkpoint.
    assert path.read_text() == history
    with pytest.raises(OSError, match="No space"):
        log.commit()
    assert path.read_text() == history
    monkeypatch.undo()
    log.commit()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"kind": "step", "step": 2}, {"kind": "step", "step": 4}, {"kind": "step", "step": 6, "loss": 1.0},
    ]


def test_resume_drops_a_record_torn_by_a_kill(tmp_path):
    from sslens.store import RunDir
    from sslens.train.loop import _RunLog

    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"kind": "step", "step": s}) + "\n" for s in (2, 4)) + '{"kind": "st')
    _RunLog(RunDir(tmp_path), resume_step=4).commit()
    assert path.read_text() == "".join(json.dumps({"kind": "step", "step": s}) + "\n" for s in (2, 4))
