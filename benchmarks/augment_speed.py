"""Throughput of the "simclr" view recipe against kornia and torchvision's PIL transforms.

Every pipeline makes two SimCLR views (crop, flip, colour jitter, grayscale, 3x3 blur,
normalisation) of each image of a uint8 (B, 32, 32, 3) batch. Blur is switched on (p = 0.5)
although the 32 px default leaves it off, so that all three pipelines do every step.

- sslens: :func:`sslens.data.augment.create_views` on the device.
- kornia: the equivalent ``kornia.augmentation`` pipeline on the same device.
- torchvision-pil: per-image PIL transforms in one process (what a DataLoader worker does).

Numbers are input images per second: median over repeats after warm-up, with
``torch.cuda.synchronize`` around each timed call on CUDA.

    python benchmarks/augment_speed.py --repeats 5 --json augment_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import kornia.augmentation as K
import torch
import torchvision.transforms as T
from PIL import Image

from sslens.data import normalize, to_float
from sslens.data.augment import create_views

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
SIZE = 32
BLUR_P = 0.5


def sslens_pipeline(device: torch.device) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    recipe = create_views("simclr", image_size=SIZE, mean=MEAN, std=STD, blur_p=BLUR_P)
    generator = torch.Generator(device=device).manual_seed(0)
    return lambda batch: recipe(batch, generator)


def kornia_pipeline(device: torch.device) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    augment = torch.nn.Sequential(
        K.RandomResizedCrop((SIZE, SIZE), scale=(0.08, 1.0)),
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((3, 3), (0.1, 2.0), p=BLUR_P),
    ).to(device)

    def run(batch: torch.Tensor) -> list[torch.Tensor]:
        x = to_float(batch)
        return [normalize(augment(x), MEAN, STD) for _ in range(2)]

    return run


def pil_pipeline(_: torch.device) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    view = T.Compose(
        [
            T.RandomResizedCrop(SIZE, scale=(0.08, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(3, (0.1, 2.0))], p=BLUR_P),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )

    def run(batch: torch.Tensor) -> list[torch.Tensor]:
        pictures = [Image.fromarray(image) for image in batch.cpu().numpy()]
        return [torch.stack([view(p) for p in pictures]) for _ in range(2)]

    return run


PIPELINES = {"sslens": sslens_pipeline, "kornia": kornia_pipeline, "torchvision-pil": pil_pipeline}


def time_pipeline(
    run: Callable[[torch.Tensor], list[torch.Tensor]],
    batch: torch.Tensor,
    warmup: int,
    repeats: int,
) -> list[float]:
    """Seconds per call of ``run(batch)``, one entry per repeat, after ``warmup`` calls."""
    sync = torch.cuda.synchronize if batch.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        run(batch)
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        sync()  # the views are ready only when the device has finished
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pil-repeats", type=int, default=3, help="PIL is slow; fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(PIPELINES))
    parser.add_argument("--json", dest="json_path", default=None, help="write the numbers here")
    args = parser.parse_args()

    device = torch.device(args.device)
    batch = torch.randint(
        0,
        256,
        (args.batch_size, SIZE, SIZE, 3),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    ).to(device)
    results = {}
    for name, build in PIPELINES.items():
        if name in args.skip:
            continue
        pil = name == "torchvision-pil"
        seconds = time_pipeline(
            build(device),
            batch,
            1 if pil else args.warmup,
            args.pil_repeats if pil else args.repeats,
        )
        median = statistics.median(seconds)
        results[name] = {
            "device": "cpu" if pil else str(device),
            "median_s": median,
            "images_per_s": args.batch_size / median,
            "repeats": len(seconds),
        }

    name_of_device = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    print(f"device: {device} ({name_of_device}), torch threads: {torch.get_num_threads()}")
    print(f"batch {args.batch_size} x {SIZE} px, 2 SimCLR views per image")
    print(f"{'pipeline':<16} {'runs on':<8} {'median ms':>10} {'images/s':>12}")
    for name, r in results.items():
        print(
            f"{name:<16} {r['device']:<8} {1000 * r['median_s']:>10.1f} {r['images_per_s']:>12.0f}"
        )
    if args.json_path:
        meta = {
            "device": str(device),
            "device_name": name_of_device,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "batch_size": args.batch_size,
            "image_size": SIZE,
            "blur_p": BLUR_P,
        }
        with open(args.json_path, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
