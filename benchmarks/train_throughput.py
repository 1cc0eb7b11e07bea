"""Images per second of a SimCLR training step, three ways, in one run on one device.

(a) the usual pipeline: torchvision PIL transforms per image in DataLoader worker processes,
    fp32 model (what lightly / solo-learn / most SimCLR code does);
(b) sslens end to end: the uint8 dataset on the device, batched on-device augmentation,
    bf16 autocast + channels_last on CUDA, optionally torch.compile;
(c) sslens model only: the same step on fixed device tensors (no data, no augmentation).

Targets on one GPU: (b) >= 3.5x (a) and (b) >= 90% of (c).

    python benchmarks/train_throughput.py --backbone resnet18-cifar --batch-size 512 --steps 50
    python benchmarks/train_throughput.py --backbone resnet-tiny --batch-size 64 --steps 5  # CPU smoke

Timing: warm-up steps first (they include compilation), then ``--steps`` timed steps, CUDA
synchronised around the timed region; repeated ``--repeats`` times and the median reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslens.data import create_views, load_dataset
from sslens.methods import create_method
from sslens.models import create_backbone
from sslens.train.loop import train_step
from sslens.train.optim import create_optimizer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(backbone: str, device: torch.device, channels_last: bool, compile_model: bool):
    torch.manual_seed(0)
    method = create_method("simclr", create_backbone(backbone)).to(device)
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    if compile_model:
        for module in method.children():
            module.compile()
    # Fused on CUDA, as the training loop does.
    optimizer = create_optimizer(
        "sgd", method, lr=0.06, weight_decay=5e-4, momentum=0.9, fused=device.type == "cuda"
    )
    return method, optimizer


def time_steps(next_views, method, optimizer, device, *, warmup: int, steps: int, autocast) -> float:
    """Seconds per step over ``steps`` steps after ``warmup`` untimed ones."""
    for step in range(warmup):
        train_step(method, optimizer, next_views(), step, warmup + steps, autocast=autocast)
    synchronize(device)
    start = time.perf_counter()
    for step in range(steps):
        train_step(method, optimizer, next_views(), warmup + step, warmup + steps, autocast=autocast)
    synchronize(device)
    return (time.perf_counter() - start) / steps


class PILPairs(torch.utils.data.Dataset):
    """The usual SimCLR dataset: a PIL image per item, two torchvision-transformed views."""

    def __init__(self, images: np.ndarray, image_size: int, mean, std):
        import torchvision.transforms as T

        self.images = images
        self.transform = T.Compose([
            T.RandomResizedCrop(image_size),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToTensor(),
            T.Normalize(mean, std),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return self.transform(image), self.transform(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18-cifar")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-images", type=int, default=20_000, help="synthetic images to train on")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--compile", action="store_true", help="also time (b) and (c) with torch.compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    data = load_dataset("synthetic", "train", image_size=args.image_size, num_images=args.num_images)
    recipe = create_views("simclr", image_size=args.image_size, mean=data.mean, std=data.std)
    bf16 = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
    results: dict[str, list[float]] = {}

    # (a) PIL transforms in DataLoader workers, fp32, default memory format.
    loader = torch.utils.data.DataLoader(
        PILPairs(data.images.numpy(), args.image_size, data.mean, data.std),
        batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
        pin_memory=on_cuda, persistent_workers=args.workers > 0,
    )
    batches = iter(())

    def pil_views():
        nonlocal batches
        try:
            first, second = next(batches)
        except StopIteration:
            batches = iter(loader)
            first, second = next(batches)
        return [first.to(device, non_blocking=True), second.to(device, non_blocking=True)]

    method, optimizer = build(args.backbone, device, channels_last=False, compile_model=False)
    results["a_pil_dataloader_fp32"] = [
        time_steps(pil_views, method, optimizer, device, warmup=args.warmup, steps=args.steps,
                   autocast=contextlib.nullcontext())
        for _ in range(args.repeats)
    ]

    # (b) and (c), eager and (optionally) compiled.
    gpu_data = data.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    for compiled in [False, True] if args.compile else [False]:
        suffix = "_compiled" if compiled else ""
        method, optimizer = build(args.backbone, device, channels_last=on_cuda, compile_model=compiled)
        stream = iter(())

        def sslens_views():
            nonlocal stream
            try:
                images, _ = next(stream)
            except StopIteration:
                stream = gpu_data.iter_batches(args.batch_size, shuffle=True, drop_last=True, device=device)
                images, _ = next(stream)
            return recipe(images, generator)

        results[f"b_sslens_end_to_end{suffix}"] = [
            time_steps(sslens_views, method, optimizer, device, warmup=args.warmup, steps=args.steps, autocast=bf16)
            for _ in range(args.repeats)
        ]
        fixed = recipe(gpu_data.images[: args.batch_size], generator)
        results[f"c_sslens_model_only{suffix}"] = [
            time_steps(lambda fixed=fixed: fixed, method, optimizer, device, warmup=args.warmup, steps=args.steps, autocast=bf16)
            for _ in range(args.repeats)
        ]

    rates = {name: args.batch_size / statistics.median(times) for name, times in results.items()}
    device_name = torch.cuda.get_device_name(device) if on_cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {device_name}   torch {torch.__version__}   backbone {args.backbone}   "
          f"batch {args.batch_size}   {args.image_size} px   median of {args.repeats} x {args.steps} steps")
    for name, rate in rates.items():
        print(f"  {name:32s} {rate:12,.0f} images/s")
    ratios = {}
    for suffix in ["", "_compiled"] if args.compile else [""]:
        b, c = rates[f"b_sslens_end_to_end{suffix}"], rates[f"c_sslens_model_only{suffix}"]
        ratios[f"b/a{suffix}"] = b / rates["a_pil_dataloader_fp32"]
        ratios[f"b/c{suffix}"] = b / c
    for name, value in ratios.items():
        print(f"  {name:32s} {value:12.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "device": device_name, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
            "images_per_s": rates, "ratios": ratios, "seconds_per_step": results,
        }, indent=2))


if __name__ == "__main__":
    main()
