"""Images per second of each method's training step, in one run on one device.

Each method is built with its packaged ``<method>-synthetic`` config's options (on
``--backbone``) and steps on fixed device tensors of its own view recipe's shapes (two 32 px
views; SwAV and DINO add their local crops), so the numbers compare the methods' models and losses, not
data loading. Median of ``--repeats`` × ``--steps`` timed steps after ``--warmup`` steps.

    python benchmarks/method_throughput.py --device cpu --batch-size 128
    python benchmarks/method_throughput.py --device cuda --backbone resnet18-cifar --batch-size 512 --json m.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from sslens.methods import create_method
from sslens.models import create_backbone
from sslens.train import load_config
from sslens.train.loop import train_step
from sslens.train.optim import create_optimizer

METHODS = ("simclr", "moco", "swav", "barlow_twins", "vicreg", "byol", "dino")


def views_for(method: str, batch: int, size: int, device: torch.device) -> list[torch.Tensor]:
    config = load_config(f"{method}-synthetic", {})
    local = config.views_options.get("num_local", 0) if method in ("swav", "dino") else 0
    sizes = [size, size] + [size // 2] * local
    return [torch.randn(batch, 3, s, s, device=device) for s in sizes]


def images_per_second(method: str, args, device: torch.device) -> float:
    config = load_config(f"{method}-synthetic", {})
    torch.manual_seed(0)
    model = create_method(method, create_backbone(args.backbone or config.backbone), **config.method_options).to(device)
    optimizer = create_optimizer("adam", model, lr=1e-3, weight_decay=0.0)
    views = views_for(method, args.batch_size, args.image_size, device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    step = 0
    rates = []
    for repeat in range(args.repeats + 1):
        steps = args.warmup if repeat == 0 else args.steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            train_step(model, optimizer, views, step, 1000, autocast=autocast)
            step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        if repeat:
            rates.append(steps * args.batch_size / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default=None, help="default: each config's (resnet-tiny)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results (and the device's name) to this path")
    args = parser.parse_args()
    device = torch.device(args.device)
    rates = {}
    print("| method | images/s (median) |\n|---|---|")
    for method in METHODS:
        rates[method] = images_per_second(method, args, device)
        print(f"| {method} | {rates[method]:,.0f} |", flush=True)
    if args.json:
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        with open(args.json, "w") as f:
            json.dump({"device": card, "torch": torch.__version__, "settings": vars(args), "images_per_second": rates},
                      f, indent=2)


if __name__ == "__main__":
    main()
