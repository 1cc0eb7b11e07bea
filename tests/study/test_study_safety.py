"""A study replaces its outputs as one unit, checks explainer options before training, and holds
its folder (field-test cases of docs/RELIABILITY.md)."""

from __future__ import annotations

import copy
import json

import pytest

from sslens.atomic import directory_lock
from sslens.errors import UserError
from sslens.study import load_study_config, run_study

COMMON = {"backbone": "resnet-tiny", "epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 2e-3,
          "warmup_epochs": 0, "max_steps": 2}
TINY = {
    "device": "cpu",
    "dataset": {"image_size": 16, "train_options": {"num_images": 48}, "test_options": {"num_images": 24}},
    "models": [{"name": "simclr", "method": "simclr", **COMMON}],
    "experiments": ["quality", "tsne", "tradeoff"],
    "samples": {"tsne": 16},
    "settings": {"quality": {"linear_epochs": 2, "k": 5}, "tsne": {"n_iter": 250}},
}


def study(out, **changes):
    config = copy.deepcopy(TINY) | changes
    return run_study(load_study_config(None, config), out, progress=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    study(out)
    return out


def snapshot(out):
    files = [out / "results.json", out / "report.html", *(out / "figures").iterdir()]
    return {path.relative_to(out): path.read_bytes() for path in files}


def test_a_full_disk_while_writing_leaves_every_old_output(finished, monkeypatch):
    """Before, results.json and figures were replaced one by one, so a full disk left new
    results beside the old report."""
    import sslens.study.run as study_run

    before = snapshot(finished)
    written = []
    real = study_run.atomic_write_bytes

    def disk_fills_up(path, data):
        if len(written) == 2:
            raise OSError(28, "No space left on device", str(path))
        written.append(path)
        return real(path, data)

    monkeypatch.setattr(study_run, "atomic_write_bytes", disk_fills_up)
    with pytest.raises(OSError, match="No space left"):
        study(finished, title="Another title")  # every stage cached: only the outputs change
    assert snapshot(finished) == before
    assert not (finished / ".outputs-new").exists() and not (finished / ".outputs-old").exists()
    monkeypatch.undo()
    study(finished, title="Another title")
    assert json.loads((finished / "results.json").read_text())["title"] == "Another title"
    assert "Another title" in (finished / "report.html").read_text()


def test_results_name_model_files_relative_to_the_study(finished):
    models = json.loads((finished / "results.json").read_text())["models"]
    assert models["simclr"]["model_file"] == "models/simclr/model/model.safetensors"


def test_a_bad_explainer_option_fails_before_any_model_trains(tmp_path):
    with pytest.raises(UserError, match="Model 'simclr': .*no layer 'layer9'"):
        study(tmp_path, explainers={"gradcam": {"layer": "layer9"}}, experiments=["faithfulness", "tradeoff"])
    assert not (tmp_path / "models").exists()


def test_a_study_folder_in_use_is_refused(tmp_path):
    with directory_lock(tmp_path, "running a study"), pytest.raises(UserError, match="in use by another sslens"):
        study(tmp_path)
