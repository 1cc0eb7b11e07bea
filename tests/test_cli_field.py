"""Field-test cases of the command line: one ``sslens: error:`` line and exit status 2 where a
user can fix the problem, never a traceback (docs/RELIABILITY.md)."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sslens.cli import main


def call(*args: str) -> int:
    with pytest.raises(SystemExit) as caught:
        main(list(args))
    return caught.value.code


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("sslens: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_version(capsys):
    assert call("--version") == 0
    assert capsys.readouterr().out.strip().startswith("sslens 0.")


def test_help_is_wrapped_not_cut_at_80_columns():
    env = {**os.environ, "COLUMNS": "80"}
    for command in ("explain", "train", "study"):
        help_text = subprocess.run([sys.executable, "-m", "sslens", command, "--help"], capture_output=True,
                                   text=True, env=env, timeout=120).stdout
        assert "…" not in help_text and max(len(line) for line in help_text.splitlines()) <= 80
    listing = subprocess.run([sys.executable, "-m", "sslens", "--help"], capture_output=True, text=True,
                             env=env, timeout=120).stdout
    commands = listing.split("Commands:")[1].splitlines()
    assert commands and not any(line.rstrip().endswith("...") for line in commands)


def test_a_config_that_is_not_utf8(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_bytes("method: simclr\nnote: caf\xe9\n".encode("latin-1"))
    assert call("train", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "run")) == 2
    assert "is not UTF-8 text" in error_line(capsys)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--k", "0"], "--k must be a positive integer"),
        (["--temperature", "0"], "--temperature must be a positive number"),
        (["--json", "FOLDER"], "is a folder; pass the path of a file"),
    ],
)
def test_evaluate_values_are_checked_before_any_work(tmp_path, capsys, imagenet_style_model, args, words):
    imagenet_style_model(tmp_path / "model")
    args = [str(tmp_path) if a == "FOLDER" else a for a in args]
    assert call("evaluate", str(tmp_path / "model"), "--device", "cpu", "--data", "synthetic", *args) == 2
    assert words in error_line(capsys)


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    import sslens.atomic as atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "config.yaml"))

    monkeypatch.setattr(atomic.os, "fsync", full)
    status = call("train", "--method", "simclr", "--backbone", "resnet-tiny", "--epochs", "1", "--device", "cpu",
                  "--batch-size", "16",
                  "--out", str(tmp_path / "run"), "--set", "data_options.num_images=32", "--set", "knn_every=0")
    assert status == 2
    line = error_line(capsys)
    assert "config.yaml: No space left on device" in line and "Free disk space" in line


def test_evaluate_prints_its_results_when_the_disk_is_full(tmp_path, capsys, imagenet_style_model, monkeypatch):
    import sslens.evaluate.run as evaluate_run

    imagenet_style_model(tmp_path / "model")

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(evaluate_run, "atomic_write_bytes", full)
    status = call("evaluate", str(tmp_path / "model"), "--device", "cpu", "--data", "synthetic", "--no-linear",
                  "--k", "5")
    captured = capsys.readouterr()
    assert status == 2 and "kNN top-1" in captured.out
    assert "Could not write" in captured.err and "evaluation.json (No space left on device)" in captured.err


def test_import_overwrite_never_deletes_a_training_run(tmp_path, capsys):
    import torchvision

    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    run = tmp_path / "run"
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (run / "config.yaml").write_text("method: simclr\n")
    assert call("import", str(weights), "--format", "torchvision", "--out", str(run), "--overwrite") == 2
    assert "holds more than an sslens model" in error_line(capsys)
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "epoch-0001").is_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_stopped_rank_ends_the_others_with_a_message_naming_it(tmp_path):
    worker = Path(__file__).parent / "workers" / "stopped_rank.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "SSLENS_DIST_TIMEOUT": "6", "TORCHELASTIC_RUN_ID": "test"}
    processes = [
        subprocess.Popen([sys.executable, str(worker), str(tmp_path / "run")], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    try:
        started = time.monotonic()
        _, err = processes[0].communicate(timeout=120)
        elapsed = time.monotonic() - started
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert processes[0].returncode == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("sslens: error: Rank 0 waited 6 s (SSLENS_DIST_TIMEOUT)") and "rank(s) 1 did not answer" in line
    assert elapsed < 60


def test_evaluate_warns_of_a_model_that_ignores_its_input(tmp_path, capsys):
    from sslens.methods import create_method
    from sslens.models import create_backbone
    from sslens.store import provenance, save_model

    method = create_method("simclr", create_backbone("resnet-tiny"))
    with torch.no_grad():
        for parameter in method.parameters():
            parameter.zero_()
    save_model(tmp_path / "zeroed", method, {
        "method": "simclr", "method_options": {}, "backbone": "resnet-tiny", "backbone_options": {},
        "image_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "class_names": [], "data": "test",
        "epoch": 0, "step": 0, **provenance(),
    })
    status = call("evaluate", str(tmp_path / "zeroed"), "--device", "cpu", "--data", "synthetic", "--no-linear",
                  "--k", "5")
    captured = capsys.readouterr()
    assert status in (0, None) and "kNN top-1" in captured.out
    warning = [line for line in captured.err.splitlines() if line.startswith("sslens: warning:")]
    assert len(warning) == 1 and "every input embeds as the zero vector (all its weights are zero)" in warning[0]
