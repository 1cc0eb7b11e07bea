"""The command line: fast help, user errors as exit status 2, train + evaluate end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sslens.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sslens", *args], capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": ":".join(sys.path)},
    )


def call(*args: str) -> int:
    """Run ``main`` in this process and return its exit status."""
    with pytest.raises(SystemExit) as caught:
        main(list(args))
    return caught.value.code


def test_importing_the_cli_does_not_import_heavy_libraries():
    code = (
        "import sys, sslens.cli; "
        "print(sorted(m for m in ('torch', 'torchvision', 'matplotlib', 'sklearn') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "train" in result.stdout and "evaluate" in result.stdout


def test_unknown_set_key_exits_2_with_the_valid_keys(capsys):
    assert call("train", "--set", "nonsense=1") == 2
    err = capsys.readouterr().err
    assert err.startswith("sslens: error: Unknown config key 'nonsense'")
    assert "Valid keys: method, backbone" in err and "Traceback" not in err
    assert err.count("\n") == 1  # one paragraph


def test_evaluate_of_a_missing_run_exits_2(tmp_path, capsys):
    assert call("evaluate", str(tmp_path / "nowhere"), "--device", "cpu") == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_train_then_evaluate_writes_evaluation_json(tmp_path, capsys):
    run = tmp_path / "run"
    status = call(
        "train", "--method", "simclr", "--backbone", "resnet-tiny", "--data", "synthetic",
        "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--out", str(run),
        "--set", "data_options.num_images=128", "--set", "knn_every=0", "--set", "progress=false",
        "--set", "method_options.temperature=0.2",
    )
    assert status == 0
    assert json.loads((run / "model" / "meta.json").read_text())["method_options"]["temperature"] == 0.2
    assert call("evaluate", str(run), "--k", "20", "--device", "cpu", "--json", str(tmp_path / "copy.json")) == 0
    out = capsys.readouterr().out
    assert "kNN top-1" in out and "linear top-1" in out and "k=20" in out
    result = json.loads((run / "evaluation.json").read_text())
    assert 0.0 <= result["knn_top1"] <= 1.0 and 0.0 <= result["linear_top1"] <= 1.0
    assert result["details"]["k"] == 20 and result["details"]["num_train"] == 128
    assert json.loads((tmp_path / "copy.json").read_text()) == result
    # A second `train` into the same directory is refused, with the fix, as exit status 2.
    assert call("train", "--method", "simclr", "--out", str(run), "--device", "cpu") == 2
    assert "--resume" in capsys.readouterr().err


def test_evaluate_an_imported_model_needs_and_uses_data_flags(tmp_path, capsys, imagenet_style_model):
    model = tmp_path / "imported"
    imagenet_style_model(model)
    assert call("evaluate", str(model), "--device", "cpu") == 2
    assert "--data" in capsys.readouterr().err
    status = call(
        "evaluate", str(model), "--device", "cpu", "--data", "synthetic", "--image-size", "32",
        "--no-linear", "--k", "20",
    )
    assert status == 0
    result = json.loads((model / "evaluation.json").read_text())
    assert 0.0 <= result["knn_top1"] <= 1.0 and result["linear_top1"] is None
    assert result["details"]["num_train"] == 4000 and result["details"]["feature_dim"] == 128


def test_train_preset_picks_the_methods_packaged_config(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "synthetic", "--method", "moco", "--out", str(out),
            "--set", "epochs=1", "--set", "max_steps=1", "--set", "knn_every=0", "--set", "progress=false"]
    assert call(*args) == 0
    saved = (out / "config.yaml").read_text()
    assert "method: moco" in saved and "queue_size: 1024" in saved  # moco-synthetic's own options
    assert call("train", "--preset", "cifar10-slow") == 2
    assert "Presets for simclr: cifar10, cifar10-fast, synthetic" in capsys.readouterr().err
    assert call("train", "--preset", "synthetic", "--config", "simclr-synthetic") == 2


def test_explain_perceptual_components_tolerate_spaces_and_depth_model_is_checked(tmp_path, capsys, imagenet_style_model):
    import numpy as np
    from PIL import Image

    imagenet_style_model(tmp_path / "model")
    Image.fromarray(np.full((24, 30, 3), 120, dtype=np.uint8)).save(tmp_path / "flat.png")
    common = ("explain", str(tmp_path / "model"), "--image", str(tmp_path / "flat.png"), "--out", str(tmp_path / "out"),
              "--device", "cpu", "--num-masks", "8")
    assert call(*common, "--method", "perceptual", "--components", "color, brightness") == 0
    with np.load(tmp_path / "out" / "flat_perceptual.npz") as data:
        assert {"component_color", "component_brightness"} <= set(data.files)
    capsys.readouterr()
    assert call(*common, "--method", "relax", "--depth-model", "MiDaS_small") == 2
    assert "--depth-model does not apply to the relax explainer" in capsys.readouterr().err


def test_groundtruth_trains_only_its_own_models_per_method_and_prints_a_verdict_per_test(tmp_path, capsys):
    out = tmp_path / "gt"
    status = call(
        "groundtruth", "--out", str(out), "--no-progress", "--set", "settings.groundtruth.epochs=1",
        "--set", "settings.groundtruth.num_images=64", "--set", "samples.groundtruth=8",
        "--set", "settings.groundtruth.tests=[planted_cue, grayscale_floor]",
        # Contrastive, self-distillation, contrastive: the two contrastive methods' rows come first.
        "--set", "settings.groundtruth.methods={simclr: {}, byol: {hidden_dim: 64, out_dim: 32}, moco: {queue_size: 64}}",
    )
    assert status in (0, None)
    lines = [line.split() for line in capsys.readouterr().out.splitlines()
             if line.startswith(("simclr", "byol", "moco"))]
    per_method = [["planted_cue", "relax"], ["planted_cue", "gradcam"], ["grayscale_floor", "color"]]
    assert [line[:3] for line in lines] == [[method, *row] for method in ("simclr", "moco", "byol") for row in per_method]
    assert all(line[3] in ("passes", "fails", "inconclusive") for line in lines)
    assert [line[3] for line in lines if line[1] == "grayscale_floor"] == ["passes"] * 3  # whatever the training
    for method in ("simclr", "byol", "moco"):
        assert sorted(p.name for p in (out / "groundtruth" / method).iterdir()) == ["cue", "cue-control", "no-augmentation"]
        meta = json.loads((out / "groundtruth" / method / "cue" / "model" / "meta.json").read_text())
        assert (meta["method"], meta["views"]["name"]) == (method, "simclr")  # only the loss differs
    assert not (out / "models").exists()
    results = json.loads((out / "results.json").read_text())["experiments"]["groundtruth"]["study"]
    assert [row["principle"] for row in results["tests"]] == ["contrastive"] * 6 + ["self-distillation"] * 3
    assert call("groundtruth", "--out", str(out), "--set", "settings.groundtruth.tests=[cue]") == 2
    assert "unknown test 'cue'" in capsys.readouterr().err
