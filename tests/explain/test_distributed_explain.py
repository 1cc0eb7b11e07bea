"""Explanation split across torchrun processes gives what one process gives.

The end-to-end tests share one launch of two CPU processes (gloo) by ``python -m
torch.distributed.run`` (starting them costs most of the time) and compare what they wrote with
a run in this process. Run as a script under torchrun, this file is that launch's worker: it
runs ``sslens explain`` through the command line, then a small study.
"""

from __future__ import annotations

import functools
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslens.data.base import IMAGENET_MEAN, IMAGENET_STD
from sslens.distributed import World, shard, unshard
from sslens.explain import RELAX, PerceptualComponents, SimilarityCAM
from sslens.explain.base import Explanation
from sslens.study.cache import StageCache

# One thread, as each torchrun process here (OMP_NUM_THREADS=1): the reference runs then differ
# from the two processes' only by the batch sizes of the split.
torch.set_num_threads(1)

EXPLANATION_EXPERIMENTS = ["invariance", "faithfulness", "localization", "sanity", "perceptual", "gradcam_pairs"]


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Two gloo processes running ``args``; every console line starts with ``rank<r>|``."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        "--tee=3", "--log-line-prefix-template=rank${rank}|", *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout}\n{done.stderr}"
    return done


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def assert_same(actual, expected, where: str = "") -> None:
    """Nested JSON values equal, floats to 5e-3. A shard is a smaller batch, whose kernels round
    differently (about 1e-7 on the maps, which are compared tightly), and a thresholded metric
    (the IoU of mean-binarised maps) flips a pixel lying at its threshold (about 1e-3)."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=5e-3), where
    else:
        assert actual == expected, where


def write_model(directory: Path) -> Path:
    """A random resnet-tiny model taking 40-px ImageNet-normalised inputs (the study adapts its
    32-px images to it)."""
    from sslens.methods import create_method
    from sslens.models import create_backbone
    from sslens.store import provenance, save_model

    torch.manual_seed(0)
    save_model(directory, create_method("simclr", create_backbone("resnet-tiny")), {
        "method": "simclr", "method_options": {}, "backbone": "resnet-tiny", "backbone_options": {},
        "image_size": [40, 40], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "class_names": [], "data": "test", "epoch": 0, "step": 0, **provenance(),
    })
    return directory


def write_images(folder: Path) -> list[Path]:
    """Four small images, two of them named x.png (in two folders)."""
    rng = np.random.default_rng(0)
    files = [folder / "a" / "x.png", folder / "a" / "y.png", folder / "b" / "x.png", folder / "b" / "z.png"]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
    return files


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("model") / "model")


# ----------------------------------------------------------------------------- splitting work


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("count", [0, 1, 3, 8, 9])
def test_shard_then_unshard_gives_the_list_back(size, count):
    items = [f"image{i}" for i in range(count)]
    shards = [shard(items, World(rank, size)) for rank in range(size)]
    assert sorted(item for part in shards for item in part) == sorted(items)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert unshard(shards, count) == items


def test_without_torchrun_the_explainer_sees_the_whole_batch():
    from sslens.study.sharding import explain_rows

    images = torch.randn(3, 3, 8, 8)
    explanation = Explanation(importance=torch.zeros(3, 8, 8))
    assert explain_rows(lambda x: explanation, images) is explanation
    seen = explain_rows(lambda x, depth: Explanation(importance=x.mean(1) + depth), images, depth=torch.ones(3, 8, 8))
    assert seen.importance.equal(images.mean(1) + 1)


def test_study_gradcam_views_are_those_of_reference_augmented(model_dir):
    """The study draws the CAM's augmented views itself (before splitting the batch): they must
    stay the views SimilarityCAM draws for ``reference="augmented"``."""
    from sslens.store import load_model
    from sslens.study.explainers import explain_fn

    encoder = load_model(model_dir)[0].encoder("pooled")
    images = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    maps = explain_fn("gradcam", encoder, {}, seed=5, mean=IMAGENET_MEAN, std=IMAGENET_STD)(images)
    expected = SimilarityCAM(encoder, seed=5)(images, reference="augmented").importance
    torch.testing.assert_close(maps, expected, rtol=0, atol=0)


def test_each_rank_explains_its_share_under_the_names_of_the_whole_list(tmp_path, model_dir, monkeypatch, capsys):
    """Rank 1 of 2 explains images 1 and 3, and the duplicate stem keeps its whole-list suffix."""
    import sslens.explain.run as run

    files = write_images(tmp_path / "images")
    out = tmp_path / "out"
    rank0 = [([out / "x_relax.npz", out / "x_relax.png"], "a/x.png: wrote ..."),
             ([out / "x-2_relax.npz", out / "x-2_relax.png"], "b/x.png: wrote ...")]
    monkeypatch.setattr(run, "world", lambda: World(1, 2))
    monkeypatch.setattr(run, "gather_objects", lambda mine: [rank0, mine])
    paths = run.explain_images(str(model_dir), [str(f) for f in files], out_dir=out, num_masks=4)
    assert sorted(p.name for p in out.iterdir()) == [
        "y_relax.npz", "y_relax.png", "z_relax.npz", "z_relax.png"]
    assert [p.name for p in paths[::2]] == ["x_relax.npz", "y_relax.npz", "x-2_relax.npz", "z_relax.npz"]
    assert capsys.readouterr().out == ""  # only rank 0 reports


# ----------------------------------------------------------------------------- two processes


def _study_config(model_dir: Path) -> dict:
    return {
        "title": "distributed", "device": "cpu", "random_init": False,
        "dataset": {"train_options": {"num_images": 8}, "test_options": {"num_images": 24}},
        "models": [{"name": "tiny", "checkpoint": str(model_dir)}],
        "explainers": {"relax": {"num_masks": 8}, "perceptual": {"num_masks": 4}},
        "experiments": [*EXPLANATION_EXPERIMENTS, "tradeoff"],
        # Odd counts, so the two ranks get unequal shares.
        "samples": {name: 3 for name in EXPLANATION_EXPERIMENTS} | {"gradcam_pairs": 1},
        "settings": {
            "invariance": {"augmentations": ["hflip", "rot15"]},
            "faithfulness": {"steps": 4},
            "sanity": {"steps": 2},
            "perceptual": {"components": ["color", "shape", "depth"]},
        },
    }


EXPLAIN_OPTIONS = ["--method", "relax", "--num-masks", "8", "--seed", "3", "--device", "cpu"]


def _instrument(patch) -> dict[str, int]:
    """Count, through ``patch(owner, name, value)``, the images handed to explainers and the cache
    entries and reports written."""
    import sslens.study.run as study_run

    counts = {"images": 0, "cache_entries": 0, "reports": 0}

    def counting(function, key: str, images_argument: int | None = None):
        @functools.wraps(function)  # keeps the signature the study reads (does it take a reference?)
        def wrapper(*args, **kwargs):
            counts[key] += 1 if images_argument is None else len(args[images_argument])
            return function(*args, **kwargs)

        return wrapper

    for explainer in (RELAX, PerceptualComponents, SimilarityCAM):
        patch(explainer, "explain", counting(explainer.explain, "images", 1))
    patch(StageCache, "put", counting(StageCache.put, "cache_entries"))
    patch(study_run, "write_report", counting(study_run.write_report, "reports"))
    return counts


def _explain_fn_maps(model_dir: Path) -> dict[str, np.ndarray]:
    """The study's relax and gradcam maps of 5 random images (augmented views drawn in batch order)."""
    from sslens.store import load_model
    from sslens.study.explainers import explain_fn

    encoder = load_model(model_dir)[0].encoder("pooled")
    images = torch.randn(5, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    return {
        name: explain_fn(name, encoder, options, seed=0, mean=IMAGENET_MEAN, std=IMAGENET_STD)(images).numpy()
        for name, options in (("relax", {"num_masks": 8}), ("gradcam", {}))
    }


def _worker(job: dict) -> None:
    """One of the two processes: the study, recording what this rank explained, wrote and
    printed, then ``sslens explain`` as the command line runs it (last: the command leaves the
    process group when it ends, as a real ``torchrun -m sslens`` process does)."""
    from sslens.cli import main
    from sslens.distributed import world
    from sslens.study import load_study_config, run_study

    counts = _instrument(setattr)
    stream = io.StringIO()
    out = Path(job["study_out"])
    run_study(load_study_config(None, job["study"]), out, progress=False, stream=stream)
    rank = world().rank
    (out / f"rank{rank}.json").write_text(json.dumps({**counts, "printed": stream.getvalue()}))
    np.savez(out / f"maps-rank{rank}.npz", **_explain_fn_maps(Path(job["model"])))
    try:
        main(["explain", job["model"], *sum((["-i", f] for f in job["images"]), []), "--out", job["explain_out"],
              *EXPLAIN_OPTIONS])
    except SystemExit as exit:  # click ends every command with one
        if exit.code:
            raise


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, model_dir):
    """(folder, job, console output) of the two-process launch; it writes folder/two (explain)
    and folder/study."""
    folder = tmp_path_factory.mktemp("two-processes")
    job = {
        "model": str(model_dir),
        "images": [str(f) for f in write_images(folder / "images")],
        "explain_out": str(folder / "two"),
        "study": _study_config(model_dir),
        "study_out": str(folder / "study"),
    }
    (folder / "job.json").write_text(json.dumps(job))
    return folder, job, torchrun(__file__, str(folder / "job.json")).stdout


def test_explain_on_two_processes_writes_the_files_of_one(two_processes, model_dir, tmp_path):
    from sslens.explain.run import explain_images

    folder, job, stdout = two_processes
    explain_images(job["model"], job["images"], method="relax", out_dir=tmp_path, num_masks=8, seed=3, device="cpu")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 8 and sorted(p.name for p in (folder / "two").iterdir()) == names
    for name in names[::2]:  # the .npz files
        one, two = read_npz(tmp_path / name), read_npz(folder / "two" / name)
        assert set(one) == set(two) == {"importance", "uncertainty", "component_u_relax", "image", "input", "info"}
        assert json.loads(str(two["info"])) == json.loads(str(one["info"]))
        np.testing.assert_array_equal(two["input"], one["input"])
        for key in ("importance", "uncertainty", "component_u_relax"):
            np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-7, err_msg=f"{name} {key}")
    # Rank 0 reports every image once, after all are written; rank 1 prints nothing.
    lines = stdout.splitlines()
    assert lines and all(line.startswith("rank0|") for line in lines), stdout
    for path in job["images"]:
        assert sum(line.startswith(f"rank0|{path}: wrote") for line in lines) == 1
    assert lines[-1] == f"rank0|2 processes explained 4 images into {folder / 'two'}"


def test_study_on_two_processes_matches_one(two_processes, model_dir, tmp_path, monkeypatch):
    from sslens.study import load_study_config, run_study

    folder, job, _ = two_processes
    counts = _instrument(monkeypatch.setattr)
    run_study(load_study_config(None, job["study"]), tmp_path, progress=False, stream=io.StringIO())

    one, two = (json.loads((out / "results.json").read_text()) for out in (tmp_path, folder / "study"))
    assert set(two["experiments"]) == set(EXPLANATION_EXPERIMENTS)
    assert_same(two["experiments"], one["experiments"])
    assert two["environment"]["processes"] == 2 and "processes" not in one["environment"]
    for name in EXPLANATION_EXPERIMENTS:
        arrays_one, arrays_two = (read_npz(out / "cache" / "tiny" / f"{name}.npz") for out in (tmp_path, folder / "study"))
        assert set(arrays_two) == set(arrays_one)
        for key in arrays_one:
            # Maps tightly; per-image metrics to assert_same's 5e-3 (a thresholded metric flips a pixel).
            atol = 5e-3 if key.startswith("items__") else 1e-6
            np.testing.assert_allclose(arrays_two[key], arrays_one[key], rtol=1e-5, atol=atol, err_msg=f"{name} {key}")

    ranks = [json.loads((folder / "study" / f"rank{r}.json").read_text()) for r in (0, 1)]
    # The images were split, not explained twice: the two shares add up to one process's work.
    assert ranks[0]["images"] + ranks[1]["images"] == counts["images"]
    assert 0 < ranks[1]["images"] < ranks[0]["images"]
    # Rank 0 alone writes the cache and the report, and shows the progress.
    assert ranks[0]["cache_entries"] == len(EXPLANATION_EXPERIMENTS) == counts["cache_entries"]
    assert ranks[0]["reports"] == 1 and ranks[0]["printed"]
    assert ranks[1] | {"images": 0} == {"images": 0, "cache_entries": 0, "reports": 0, "printed": ""}
    # Both ranks hold every map of the study's explain functions, equal to one process's.
    expected = _explain_fn_maps(model_dir)
    for rank in (0, 1):
        maps = read_npz(folder / "study" / f"maps-rank{rank}.npz")
        for name, value in expected.items():
            np.testing.assert_allclose(maps[name], value, rtol=1e-5, atol=1e-7, err_msg=f"rank {rank} {name}")


if __name__ == "__main__":
    _worker(json.loads(Path(sys.argv[1]).read_text()))
