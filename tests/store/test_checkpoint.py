"""Model files and checkpoints: round trips, path resolution, pruning, and crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from sslens.errors import UserError
from sslens.methods import create_method
from sslens.models import create_backbone
from sslens.store import (
    REQUIRED_META_KEYS,
    SLEEP_ENV,
    RunDir,
    load_model,
    load_training_state,
    provenance,
    save_model,
)


def make_method(method: str = "simclr", seed: int = 0, **options):
    torch.manual_seed(seed)
    return create_method(method, create_backbone("resnet-tiny"), **options)


def make_meta(method: str = "simclr", epoch: int = 1, **options) -> dict:
    return {
        "method": method,
        "method_options": options,
        "backbone": "resnet-tiny",
        "backbone_options": {},
        "image_size": [32, 32],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "class_names": ["a", "b"],
        "data": "test data",
        "epoch": epoch,
        "step": 10 * epoch,
        **provenance(),
    }


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


@pytest.mark.parametrize(
    ("method", "options"),
    [("simclr", {}), ("moco", {"queue_size": 64}), ("swav", {"num_prototypes": 10})],
)
def test_model_round_trip_rebuilds_the_method(tmp_path, method, options):
    original = make_method(method, **options)
    original.train()
    save_model(tmp_path / "model", original, make_meta(method, **options))
    loaded, meta = load_model(tmp_path / "model")
    assert type(loaded) is type(original)
    assert not loaded.training
    assert_same_state(original, loaded)
    assert meta["method"] == method and meta["method_options"] == options
    assert set(REQUIRED_META_KEYS) <= set(meta)


def test_load_model_accepts_file_model_dir_and_run_dir(tmp_path):
    method = make_method()
    save_model(tmp_path / "run" / "model", method, make_meta())
    for path in (tmp_path / "run", tmp_path / "run" / "model", tmp_path / "run" / "model" / "model.safetensors"):
        loaded, _ = load_model(path)
        assert_same_state(method, loaded)


def test_run_without_final_model_loads_the_latest_checkpoint(tmp_path):
    first, second = make_method(seed=1), make_method(seed=2)
    RunDir(tmp_path).save_checkpoint(first, make_meta(epoch=1), {"epoch": 1}, keep=2)
    RunDir(tmp_path).save_checkpoint(second, make_meta(epoch=2), {"epoch": 2}, keep=2)
    loaded, meta = load_model(tmp_path)
    assert meta["epoch"] == 2
    assert_same_state(second, loaded)


def test_save_model_requires_the_meta_keys(tmp_path):
    meta = make_meta()
    del meta["class_names"], meta["mean"]
    with pytest.raises(ValueError, match="missing mean, class_names"):
        save_model(tmp_path / "model", make_method(), meta)
    assert not (tmp_path / "model").exists()


def test_save_model_replaces_an_existing_model(tmp_path):
    save_model(tmp_path / "model", make_method(seed=1), make_meta(epoch=1))
    newer = make_method(seed=2)
    save_model(tmp_path / "model", newer, make_meta(epoch=2))
    loaded, meta = load_model(tmp_path / "model")
    assert meta["epoch"] == 2
    assert_same_state(newer, loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_bad_paths_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(UserError, match="holds no sslens model"):
        load_model(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="is not a .safetensors file"):
        load_model(tmp_path / "notes.txt")
    save_model(tmp_path / "model", make_method(), make_meta())
    (tmp_path / "model" / "meta.json").unlink()
    with pytest.raises(UserError, match="has no meta.json beside it"):
        load_model(tmp_path / "model" / "model.safetensors")


def test_weights_that_do_not_fit_the_meta_raise_a_user_error(tmp_path):
    save_model(tmp_path / "model", make_method("simclr"), make_meta("simclr"))
    meta = json.loads((tmp_path / "model" / "meta.json").read_text())
    meta["backbone"] = "resnet18-cifar"
    (tmp_path / "model" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not fit a simclr method on a resnet18-cifar backbone"):
        load_model(tmp_path / "model")


def test_checkpoint_state_loads_with_weights_only(tmp_path):
    method = make_method()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    loss = method.training_step([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]).loss
    loss.backward()
    optimizer.step()
    state = {
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "step": 30,
        "rng": {"torch_cpu": torch.get_rng_state(), "torch_cuda": []},
    }
    path = RunDir(tmp_path).save_checkpoint(method, make_meta(epoch=3), state, keep=2)
    assert path == tmp_path / "checkpoints" / "epoch-0003"
    raw = torch.load(path / "state.pt", weights_only=True)
    assert raw["epoch"] == 3 and raw["step"] == 30
    assert torch.equal(raw["rng"]["torch_cpu"], state["rng"]["torch_cpu"])
    weights, meta, loaded_state = load_training_state(path)
    assert meta["epoch"] == 3
    restored = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    restored.load_state_dict(loaded_state["optimizer"])
    for key, value in optimizer.state_dict()["state"].items():
        assert torch.equal(restored.state_dict()["state"][key]["momentum_buffer"], value["momentum_buffer"])
    for key, value in method.state_dict().items():
        assert torch.equal(weights[key], value)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    method = make_method()
    for epoch in range(1, 5):
        RunDir(tmp_path).save_checkpoint(method, make_meta(epoch=epoch), {"epoch": epoch}, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0003", "epoch-0004", "latest"]
    assert (root / "latest").read_text().strip() == "epoch-0004"
    assert RunDir(tmp_path).latest_checkpoint() == root / "epoch-0004"


def test_checkpoints_past_epoch_9999_are_ordered_by_number(tmp_path):
    method = make_method()
    for epoch in (9999, 10000):
        RunDir(tmp_path).save_checkpoint(method, make_meta(epoch=epoch), {"epoch": epoch}, keep=1)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["epoch-10000", "latest"]
    (root / "latest").unlink()
    assert RunDir(tmp_path).latest_checkpoint() == root / "epoch-10000"


def test_latest_falls_back_to_the_newest_complete_directory(tmp_path):
    method = make_method()
    for epoch in (1, 2):
        RunDir(tmp_path).save_checkpoint(method, make_meta(epoch=epoch), {"epoch": epoch}, keep=3)
    root = tmp_path / "checkpoints"
    (root / "latest").unlink()
    (root / "epoch-0009").mkdir()  # incomplete: no files
    assert RunDir(tmp_path).latest_checkpoint() == root / "epoch-0002"
    (root / "latest").write_text("epoch-0009\n")
    with pytest.warns(UserWarning, match="'epoch-0009'"):
        assert RunDir(tmp_path).latest_checkpoint() == root / "epoch-0002"


WRITER = textwrap.dedent(
    """
    import os, sys, torch
    from sslens.methods import create_method
    from sslens.models import create_backbone
    from sslens.store import SLEEP_ENV, RunDir
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_meta

    run = sys.argv[1]
    torch.manual_seed(1)
    method = create_method("simclr", create_backbone("resnet-tiny"))
    RunDir(run).save_checkpoint(method, make_meta(epoch=1), {{"epoch": 1}}, keep=2)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(1.0)
    os.environ[SLEEP_ENV] = "30"
    print("writing", flush=True)
    RunDir(run).save_checkpoint(method, make_meta(epoch=2), {{"epoch": 2}}, keep=2)
    """
)


def test_killed_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = WRITER.format(tests=os.path.dirname(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(SLEEP_ENV, None)
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert process.stdout.readline().strip() == "writing"
        root = tmp_path / "checkpoints"
        deadline = time.monotonic() + 60
        # Kill once the second checkpoint's temporary directory holds its first file.
        while not any(p.name.startswith(".epoch-0002") and any(p.iterdir()) for p in root.iterdir()):
            assert time.monotonic() < deadline, "the writer never started the second checkpoint"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert RunDir(tmp_path).latest_checkpoint() == root / "epoch-0001"
    loaded, meta = load_model(tmp_path)
    assert meta["epoch"] == 1
    assert_same_state(make_method(seed=1), loaded)
