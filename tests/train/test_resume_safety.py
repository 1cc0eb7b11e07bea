"""Training never loses a run: checked options, a locked folder, safe resumes (field-test cases
of docs/RELIABILITY.md)."""

from __future__ import annotations

import json

import pytest
import torch

from sslens.atomic import directory_lock
from sslens.errors import UserError
from sslens.store import RunDir
from sslens.train import load_config, train

TINY = {
    "backbone": "resnet-tiny", "data": "synthetic", "image_size": 16, "data_options": {"num_images": 64},
    "batch_size": 16, "epochs": 2, "lr": 0.05, "warmup_epochs": 0, "knn_every": 0, "log_every": 2,
    "checkpoint_every": 1, "keep_checkpoints": 2, "optimizer": "sgd", "progress": False, "device": "cpu",
}


def tiny(out, **overrides):
    return load_config(None, {**TINY, "out": str(out), **overrides})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch run with both checkpoints kept."""
    return train(tiny(tmp_path_factory.mktemp("finished") / "run"))


def copy_run(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"method_options": {"temprature": 0.1}}, "Unknown option 'temprature' in method_options. Did you mean 'temperature'"),
        ({"data_options": {"num_image": 8}}, "Unknown option 'num_image' in data_options. Did you mean 'num_images'"),
        ({"views_options": {"hue2": 0.1}}, "Unknown option 'hue2' in views_options. Did you mean 'hue'"),
        ({"backbone_options": {"zero_init": True}}, "Unknown option 'zero_init' in backbone_options"),
        ({"seed": 10**23}, "'seed' must be an integer in"),
        ({"image_size": 20000}, "'image_size' must be between 8 and 2048 pixels"),
    ],
)
def test_bad_options_are_refused_when_the_config_is_read(tmp_path, overrides, words):
    with pytest.raises(UserError, match=words):
        tiny(tmp_path / "run", **overrides)


def test_a_moco_queue_smaller_than_the_batch_is_refused_before_the_run_folder_exists(tmp_path):
    config = tiny(tmp_path / "run", method="moco", method_options={"queue_size": 8, "key_bn_splits": 1})
    with pytest.raises(UserError, match="MoCo enqueues 16 keys per step .* queue_size is 8"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_a_second_process_on_the_same_folder_is_refused(tmp_path):
    with directory_lock(tmp_path / "run", "training a run"):
        with pytest.raises(UserError, match="in use by another sslens process"):
            train(tiny(tmp_path / "run"))
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.slow
def test_a_resume_with_another_training_config_is_refused_and_leaves_the_run_as_it_was(tmp_path, finished):
    run = RunDir(copy_run(finished, tmp_path / "run"))
    before = {name: (run.path / name).read_bytes() for name in ("config.yaml", "log.jsonl")}
    checkpoints = [p.name for p in run.checkpoints()]
    with pytest.raises(UserError, match=r"another config \(batch_size: checkpoint 16, now 32; optimizer: checkpoint 'sgd', now 'adam'\).*--allow-changes"):
        train(tiny(run.path, epochs=3, batch_size=32, optimizer="adam"), resume=True)
    assert {name: (run.path / name).read_bytes() for name in before} == before
    assert [p.name for p in run.checkpoints()] == checkpoints


@pytest.mark.slow
def test_a_resume_that_fails_before_its_first_checkpoint_keeps_the_config_and_log(tmp_path, finished, monkeypatch):
    """Before, config.yaml and log.jsonl were rewritten before the first resumed step, so a
    resume that then failed could never resume again."""
    import sslens.train.loop as loop

    run = RunDir(copy_run(finished, tmp_path / "run"))
    before = {name: (run.path / name).read_bytes() for name in ("config.yaml", "log.jsonl")}

    def failing_step(*args, **kwargs):
        raise RuntimeError("the first resumed step failed")

    monkeypatch.setattr(loop, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="first resumed step"):
        train(tiny(run.path, epochs=3, log_every=1), resume=True)
    assert {name: (run.path / name).read_bytes() for name in before} == before
    monkeypatch.undo()
    train(tiny(run.path, epochs=3), resume=True)
    epochs = [r["epoch"] for r in run.read_log() if r["kind"] == "epoch"]
    assert epochs == [1, 2, 3] and load_config(run.config_file, {}).epochs == 3


@pytest.mark.slow
def test_allow_changes_resumes_with_the_new_values(tmp_path, finished):
    run = RunDir(copy_run(finished, tmp_path / "run"))
    train(tiny(run.path, epochs=3, lr=0.01), resume=True, allow_changes=True)
    assert load_config(run.config_file, {}).lr == 0.01
    assert json.loads((run.model_dir / "meta.json").read_text())["epoch"] == 3


@pytest.mark.slow
def test_an_unreadable_newest_checkpoint_falls_back_to_the_older_one(tmp_path, finished):
    run = RunDir(copy_run(finished, tmp_path / "run"))
    (run.checkpoints_dir / "epoch-0002" / "state.pt").write_bytes(b"torn by a full disk")
    with pytest.warns(UserWarning, match="Skipping the unreadable checkpoint epoch-0002"):
        train(tiny(run.path, epochs=2), resume=True)
    # Resumed from epoch 1, so epoch 2 was trained again and its checkpoint rewritten whole.
    assert [r["epoch"] for r in run.read_log() if r["kind"] == "epoch"] == [1, 2]
    assert torch.load(run.checkpoints_dir / "epoch-0002" / "state.pt", weights_only=True)["epoch"] == 2


def test_resume_before_the_first_checkpoint_gives_one_piece_of_advice(tmp_path):
    from sslens.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("method: simclr\n")
    with pytest.raises(UserError) as from_train:
        train(tiny(tmp_path / "run"), resume=True)
    assert "stopped before its first checkpoint" in str(from_train.value)
    assert f"--overwrite --out {tmp_path / 'run'}" in str(from_train.value)
    with pytest.raises(SystemExit):
        main(["train", "--resume", "--out", str(tmp_path / "empty")])
    with pytest.raises(UserError, match="it holds no run. To train, drop --resume"):
        train(tiny(tmp_path / "empty"), resume=True)
