"""The five-minute CIFAR-10 presets: packaged, valid, sized for the GPU budget, and trainable.

Whether they reach their kNN targets can only be measured on a GPU
(``benchmarks/time_to_accuracy.py``; docs/BENCHMARKS.md, "Time to accuracy"). Here: each loads,
its epochs fit five minutes at the measured throughput, and a couple of steps of each run on
the CPU through the preset's own data path (an image folder of JPEGs) with a tiny backbone.
"""

import json

import pytest
from PIL import Image

from sslens.data.augment import create_views
from sslens.methods import METHODS
from sslens.train import load_config, train
from sslens.train.config import packaged_configs

PRESETS = ["simclr-cifar10-fast", "moco-cifar10-fast", "swav-cifar10-fast"]

# The budget: 300 s of wall time on one H100, compilation, data loading and kNN included.
BUDGET_S = 300.0
# docs/BENCHMARKS.md, "Training throughput": a compiled SimCLR step (resnet18-cifar, batch
# 512, two 32-px views, end to end) runs 33,367 images/s on an H100.
SIMCLR_IMAGES_PER_S = 33_367
# Allowances for what is not training: torch.compile of the model, loading CIFAR-10 from its
# decoded cache, and one kNN evaluation (60,000 forward passes, ~0.3 s of compute, plus
# feature transfers).
COMPILE_S, LOAD_S, KNN_S = 60.0, 10.0, 2.0
CIFAR10_TRAIN_IMAGES = 50_000


def encoder_passes(config) -> float:
    """Encoder work per training image, in 32-px forward-pass units (a backward costs 2).

    SimCLR and SwAV train every view; MoCo trains its query views and only encodes its keys
    (both views are queries and keys with the symmetric loss).
    """
    method = METHODS.get(config.method)
    recipe = create_views(config.views or method.default_views, image_size=config.image_size,
                          mean=(0.5,) * 3, std=(0.5,) * 3, **config.views_options)
    areas = [(size / 32) ** 2 for size in recipe.view_sizes]
    if config.method == "moco":
        queries = 2 if config.method_options.get("symmetric") else 1
        return queries * 3 * areas[0] + queries * areas[1]
    return 3 * sum(areas)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_packaged_and_loads(name):
    assert name in packaged_configs()
    config = load_config(name)
    assert config.method == name.split("-")[0]
    assert (config.backbone, config.data, config.image_size) == ("resnet18-cifar", "imagefolder", 32)
    assert config.compile and config.knn_every > 0 and config.knn_k == 200


@pytest.mark.parametrize("name", PRESETS)
def test_preset_fits_five_minutes_at_the_measured_throughput(name):
    config = load_config(name)
    images = config.epochs * (CIFAR10_TRAIN_IMAGES // config.batch_size) * config.batch_size
    simclr_passes = 3 * 2  # two 32-px views, forward and backward
    train_s = images * encoder_passes(config) / simclr_passes / SIMCLR_IMAGES_PER_S
    evaluations = -(-config.epochs // config.knn_every)  # the last epoch always evaluates
    total_s = train_s + COMPILE_S + LOAD_S + evaluations * KNN_S
    assert total_s <= BUDGET_S, f"{name}: ~{total_s:.0f} s estimated"
    # The target needs as many epochs as fit: a preset using under 80% of the budget wastes it.
    assert total_s >= 0.8 * BUDGET_S, f"{name}: only ~{total_s:.0f} s of {BUDGET_S:.0f} s used"


def write_jpeg_folder(root, per_class: int) -> None:
    for split, count in (("train", per_class), ("test", per_class // 2)):
        for label, colour in enumerate([(200, 40, 40), (40, 40, 200)]):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                shade = tuple(min(255, c + 6 * i) for c in colour)
                Image.new("RGB", (32, 32), shade).save(folder / f"{i}.jpg", quality=90)


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_two_steps_on_a_jpeg_folder(name, tmp_path):
    data_dir = tmp_path / "cifar"
    write_jpeg_folder(data_dir, per_class=8)
    config = load_config(name, {
        "data_dir": str(data_dir), "data_options.num_workers": 1, "backbone": "resnet-tiny",
        "batch_size": 8, "epochs": 1, "max_steps": 2, "knn_every": 1, "compile": False,
        "device": "cpu", "progress": False, "out": str(tmp_path / "run"),
    })
    run = train(config)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    epoch = records[-1]
    assert epoch["kind"] == "epoch" and epoch["step"] == 2
    assert 0.0 <= epoch["knn_top1"] <= 1.0
