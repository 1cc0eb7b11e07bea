"""Seconds per explained image: relax-xai 0.0.5 vs sslens RELAX, same masks count, encoder, device.

ResNet-18 (CIFAR stem) at 32 px and ResNet-50 at 224 px, random weights (speed does not depend on
them). Also sslens with adaptive stopping: masks used and the Pearson correlation of its map with
sslens's full-mask map. Timing: a warm-up run first, CUDA synchronised around every run, the
median of ``--repeats`` runs. relax-xai runs in fp32 under ``torch.no_grad`` (it does not disable
autograd itself); sslens uses its defaults (bf16 autocast + channels_last on CUDA).

    python benchmarks/relax_speed.py --num-masks 500 --images 2 --sizes 32 --json relax_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import relax_xai.relax
import torch
import torchvision
from torch import nn

from sslens.explain.relax import RELAX


def resnet18_cifar() -> nn.Module:
    try:
        from sslens.models import create_backbone
    except ImportError:
        create_backbone = None
    if create_backbone is not None:
        return create_backbone("resnet18-cifar")
    # Fallback: torchvision ResNet-18 with the CIFAR stem (3 × 3 conv1, no max-pool), pooled features.
    model = torchvision.models.resnet18(weights=None)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


def resnet50() -> nn.Module:
    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Identity()
    return model


MODELS: dict[int, tuple[str, Callable[[], nn.Module]]] = {
    32: ("resnet18-cifar", resnet18_cifar),
    224: ("resnet50", resnet50),
}


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    """Median wall seconds of ``repeats`` runs after one warm-up, and the last result."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels are asynchronous: wait before reading the clock
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run_relax_xai(encoder: nn.Module, images: torch.Tensor, num_masks: int, batch_size: int) -> torch.Tensor:
    maps = []
    with torch.no_grad():
        for image in images:
            explainer = relax_xai.relax.RELAX(
                image[None], encoder, batch_size=batch_size, num_batches=max(1, num_masks // batch_size)
            )
            explainer.forward()
            maps.append(explainer.importance)
    return torch.stack(maps)


def pearson(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per-image Pearson correlation of (B, H, W) maps."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).tolist()


def bench_size(size: int, args: argparse.Namespace, device: torch.device) -> dict:
    name, factory = MODELS[size]
    torch.manual_seed(0)
    encoder = factory().to(device).eval()
    images = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    n = args.images
    bs = args.batch_size

    ours_bs = args.ours_batch_size or bs
    t_ref, _ = timed(lambda: run_relax_xai(encoder, images, args.num_masks, bs), device, args.repeats)
    full = RELAX(encoder, num_masks=args.num_masks, batch_size=ours_bs, round_size=args.round_size)
    t_ours, ours = timed(lambda: full(images), device, args.repeats)
    adaptive = RELAX(
        encoder, num_masks=args.num_masks, batch_size=ours_bs, adaptive=True, tolerance=args.tolerance,
        round_size=args.round_size, min_masks=args.min_masks,
    )
    t_adaptive, fast = timed(lambda: adaptive(images), device, args.repeats)
    # bf16 on every device (on CUDA that is the default above): its speed, and how far rounding
    # moves the map from the fp32 one.
    fp32 = RELAX(encoder, num_masks=args.num_masks, batch_size=ours_bs, round_size=args.round_size, amp=False)
    t_fp32, exact = timed(lambda: fp32(images), device, 1)
    bf16 = RELAX(encoder, num_masks=args.num_masks, batch_size=ours_bs, round_size=args.round_size, amp=True)
    t_bf16, rounded = timed(lambda: bf16(images), device, args.repeats)
    return {
        "size": size,
        "model": name,
        "images": n,
        "num_masks": args.num_masks,
        "relax_xai_s_per_image": t_ref / n,
        "sslens_s_per_image": t_ours / n,
        "speedup": t_ref / t_ours,
        "adaptive_s_per_image": t_adaptive / n,
        "adaptive_masks_used": fast.info["num_masks_used"],
        "adaptive_pearson_vs_full": pearson(fast.importance, ours.importance),
        "sslens_fp32_s_per_image": t_fp32 / n,
        "sslens_bf16_s_per_image": t_bf16 / n,
        "bf16_speedup_vs_relax_xai": t_ref / t_bf16,
        "bf16_pearson_vs_fp32": pearson(rounded.importance, exact.importance),
        "sslens_batch_size": ours_bs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-masks", type=int, default=3000)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--sizes", default="32,224", help="comma-separated: 32 (ResNet-18 CIFAR), 224 (ResNet-50)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100, help="forward batch for both (relax-xai default 100)")
    parser.add_argument("--ours-batch-size", type=int, default=None,
                        help="sslens forward batch (default: --batch-size; sslens packs several images per batch)")
    parser.add_argument("--tolerance", type=float, default=0.5, help="adaptive stopping tolerance (stderr rule)")
    parser.add_argument("--round-size", type=int, default=250)
    parser.add_argument("--min-masks", type=int, default=500)
    parser.add_argument("--json", default=None, help="write the results to this path")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    unknown = [s for s in sizes if s not in MODELS]
    if unknown:
        parser.error(f"--sizes must be among {sorted(MODELS)}; got {unknown}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    rows = [bench_size(size, args, device) for size in sizes]

    print(f"device: {device} ({device_name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    header = f"{'model':<16}{'px':>5}{'masks':>7}{'relax-xai s/img':>17}{'sslens s/img':>14}{'speedup':>9}" \
             f"{'adaptive s/img':>16}{'masks used':>14}{'pearson':>9}"
    print(header)
    for r in rows:
        print(
            f"{r['model']:<16}{r['size']:>5}{r['num_masks']:>7}{r['relax_xai_s_per_image']:>17.3f}"
            f"{r['sslens_s_per_image']:>14.3f}{r['speedup']:>8.2f}x{r['adaptive_s_per_image']:>16.3f}"
            f"{'/'.join(map(str, r['adaptive_masks_used'])):>14}{min(r['adaptive_pearson_vs_full']):>9.4f}"
        )
    for r in rows:
        print(
            f"{r['model']:<16} bf16 autocast: {r['sslens_bf16_s_per_image']:.3f} s/img "
            f"({r['bf16_speedup_vs_relax_xai']:.2f}x relax-xai), fp32 {r['sslens_fp32_s_per_image']:.3f} s/img, "
            f"Pearson bf16 vs fp32 map {min(r['bf16_pearson_vs_fp32']):.4f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "device_name": device_name, "args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
