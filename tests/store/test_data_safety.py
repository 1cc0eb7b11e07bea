"""The model store never reads another run's weights, never deletes what is not a model, and
turns every unreadable file into a message (field-test cases of docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sslens.atomic import directory_lock
from sslens.errors import UserError
from sslens.methods import create_method
from sslens.models import create_backbone
from sslens.store import RunDir, load_model, load_training_state, provenance, save_model


def make_method(seed: int = 0):
    torch.manual_seed(seed)
    return create_method("simclr", create_backbone("resnet-tiny"))


def make_meta(epoch: int = 1, **extra) -> dict:
    return {
        "method": "simclr", "method_options": {}, "backbone": "resnet-tiny", "backbone_options": {},
        "image_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "class_names": ["a"], "data": "test",
        "epoch": epoch, "step": epoch, **provenance(), **extra,
    }


def two_checkpoints(root) -> RunDir:
    run = RunDir(root)
    for epoch in (1, 2):
        run.save_checkpoint(make_method(epoch), make_meta(epoch), {"optimizer": {}, "epoch": epoch, "step": epoch, "rng": {}}, keep=2)
    return run


@pytest.mark.parametrize("pointer", ["ABSOLUTE", "../../other/checkpoints/epoch-0009", "epoch-0009", "\x00\xff", ""])
def test_latest_is_followed_only_inside_the_run(tmp_path, pointer):
    other = two_checkpoints(tmp_path / "other")
    run = two_checkpoints(tmp_path / "runs" / "mine")
    (other.checkpoints_dir / "epoch-0009").mkdir()
    for name in ("model.safetensors", "meta.json", "state.pt"):
        (other.checkpoints_dir / "epoch-0009" / name).write_bytes((other.checkpoints_dir / "epoch-0002" / name).read_bytes())
    target = str(other.checkpoints_dir / "epoch-0009") if pointer == "ABSOLUTE" else pointer
    run.latest_file.write_bytes(target.encode("utf-8", "surrogateescape") if pointer != "\x00\xff" else b"\x00\xff")
    with pytest.warns(UserWarning, match="does not name a complete checkpoint of this run"):
        assert run.latest_checkpoint() == run.checkpoints_dir / "epoch-0002"


def test_a_linked_checkpoint_folder_is_not_one_of_the_runs(tmp_path):
    other = two_checkpoints(tmp_path / "other")
    run = two_checkpoints(tmp_path / "mine")
    os.symlink(other.checkpoints_dir / "epoch-0002", run.checkpoints_dir / "epoch-0007")
    assert [p.name for p in run.checkpoints()] == ["epoch-0001", "epoch-0002"]


def test_a_folder_holding_more_than_a_model_is_never_replaced(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("method: simclr\n")
    with pytest.raises(UserError, match=r"holds more than an sslens model \(checkpoints, config.yaml\)"):
        save_model(run, make_method(), make_meta())
    assert (run / "config.yaml").read_text() == "method: simclr\n"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="thesis.tex"):
        save_model(notes, make_method(), make_meta())
    assert (notes / "thesis.tex").read_text() == "years of work"
    save_model(tmp_path / "model", make_method(), make_meta())
    save_model(tmp_path / "model", make_method(1), make_meta())  # a model folder is replaced


def test_a_linked_model_folder_is_refused_and_left_alone(tmp_path):
    real = save_model(tmp_path / "real", make_method(), make_meta())
    os.symlink(real, tmp_path / "link")
    with pytest.raises(UserError, match="is a symbolic link"):
        save_model(tmp_path / "link", make_method(1), make_meta())
    assert load_model(tmp_path / "link")[1]["epoch"] == 1  # reading through a link is fine


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("model.safetensors", b"", "not a readable safetensors file"),
        ("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{", "not a readable safetensors file"),
        ("meta.json", b"", "not a readable sslens model description"),
        ("meta.json", b"\xff\xfe\x00", "not a readable sslens model description"),
        ("meta.json", b"[1, 2]", "holds a JSON list"),
        ("meta.json", b'{"method": "simclr"}', "lacks method_options, backbone, backbone_options"),
        ("meta.json", b'{"method": "nope", "method_options": {}, "backbone": "resnet-tiny", "backbone_options": {}}',
         "Unknown method 'nope'"),
    ],
)
def test_unreadable_model_files_are_user_errors(tmp_path, name, content, words):
    save_model(tmp_path / "model", make_method(), make_meta())
    (tmp_path / "model" / name).write_bytes(content)
    with pytest.raises(UserError, match=words):
        load_model(tmp_path / "model")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"not a torch file"])
def test_an_unreadable_training_state_is_a_user_error_without_torchs_unsafe_advice(tmp_path, content):
    run = two_checkpoints(tmp_path / "run")
    (run.checkpoints_dir / "epoch-0002" / "state.pt").write_bytes(content)
    with pytest.raises(UserError, match="not a readable training state") as raised:
        load_training_state(run.checkpoints_dir / "epoch-0002")
    assert "weights_only=False" not in str(raised.value) and raised.value.__cause__ is None


def test_a_foreign_meta_asking_for_terabytes_is_refused_before_allocating(tmp_path, monkeypatch):
    save_model(tmp_path / "model", make_method(), make_meta())
    meta = json.loads((tmp_path / "model" / "meta.json").read_text())
    meta["method"], meta["method_options"] = "moco", {"queue_size": 10**12}
    (tmp_path / "model" / "meta.json").write_text(json.dumps(meta))
    built = []
    import sslens.store as store

    real_build = store.build_method

    def recording_build(meta):
        built.append(torch.empty(0).device)  # the default device the build ran under
        return real_build(meta)

    monkeypatch.setattr(store, "build_method", recording_build)
    with pytest.raises(UserError, match="do not fit a moco method"):
        load_model(tmp_path / "model")
    assert built == [torch.device("meta")]  # only the allocation-free build ran


def test_leftovers_of_killed_writers_are_removed(tmp_path):
    run = two_checkpoints(tmp_path / "run")
    leftovers = [
        run.checkpoints_dir / ".epoch-0003.tmp-4242", run.path / ".model.tmp-4242", run.path / ".model.old-17",
    ]
    for folder in leftovers:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    (run.path / ".log.jsonl.abc.tmp").write_text("{")
    assert sorted(p.name for p in run.clean_leftovers()) == sorted([p.name for p in leftovers] + [".log.jsonl.abc.tmp"])
    assert [p.name for p in run.checkpoints()] == ["epoch-0001", "epoch-0002"]
    assert not any(p.exists() for p in leftovers)


def test_a_locked_folder_refuses_a_second_holder_and_frees_itself(tmp_path):
    with directory_lock(tmp_path / "run", "training a run"):
        with pytest.raises(UserError, match="in use by another sslens process, which is training a run"):
            with directory_lock(tmp_path / "run", "training a run"):
                pass
    with directory_lock(tmp_path / "run", "training a run"):
        pass
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no lock file left behind
