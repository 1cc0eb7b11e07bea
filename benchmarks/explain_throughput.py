"""Explanation throughput: masked images per second of RELAX and of each perceptual component,
against images per second of a plain forward pass of the same encoder at the same batch size.

The plain forward runs exactly as the explainers run the encoder on that device: inference mode,
the same module (on the CPU a private copy with BatchNorms folded into convolutions, see
``sslens.explain.relax.inference_encoder``), bf16 autocast + channels_last on CUDA, fp32 on the
CPU, batches of ``--batch-size`` random images. An explainer's throughput is images × masks
(× components) divided by the wall time of one call, so mask drawing, masking, similarities and
the estimator count against it; the ratio to the plain forward says how much they cost next to
the encoder (the issue's target: at least 0.5). Several images are explained per call so that
packing (several images' masks per forward pass) is exercised; the perceptual components get a
random depth map so that ``depth`` runs too. Every repeat runs every variant once, in turn, and
the table shows medians of the per-repeat ratios.

    python benchmarks/explain_throughput.py --device cpu --sizes 32 --num-masks 256 --images 2
    python benchmarks/explain_throughput.py --device cuda --sizes 32,224 --json throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from encoders import MODELS

from sslens.explain.engine import default_batch_size, embed, inference_encoder
from sslens.explain.perceptual import ALL_COMPONENTS, PerceptualComponents
from sslens.explain.relax import RELAX


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are asynchronous: wait before reading the clock


def bench_size(size: int, args: argparse.Namespace, device: torch.device) -> dict:
    name, factory = MODELS[size]
    torch.manual_seed(0)
    encoder = factory().to(device).eval()
    batch_size = args.batch_size or default_batch_size(device, (size, size))
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(args.images, 3, size, size, generator=generator).to(device)
    depth = torch.rand(args.images, size, size, generator=generator).to(device)
    batches = torch.randn(args.plain_batches, batch_size, 3, size, size, generator=generator).to(device)
    with torch.inference_mode():
        module, fast = inference_encoder(encoder, "auto", images)

    def plain() -> None:
        with torch.inference_mode():
            for batch in batches:
                embed(module, batch)

    relax = RELAX(encoder, num_masks=args.num_masks, batch_size=batch_size)
    # (function, images it processes per call)
    variants: dict[str, tuple[Callable[[], object], int]] = {
        "plain forward": (plain, args.plain_batches * batch_size),
        "relax": (lambda: relax(images), args.images * args.num_masks),
    }
    components = [c for c in args.components.split(",") if c]
    for component in components:
        explainer = PerceptualComponents(
            encoder, components=(component,), num_masks=args.num_masks, batch_size=batch_size
        )
        variants[f"perceptual: {component}"] = (
            lambda e=explainer: e(images, depth=depth), args.images * args.num_masks
        )
    if len(components) > 1:
        explainer = PerceptualComponents(encoder, components=components, num_masks=args.num_masks, batch_size=batch_size)
        variants["perceptual: all together"] = (
            lambda e=explainer: e(images, depth=depth), args.images * args.num_masks * len(components)
        )

    for fn, _ in variants.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {key: [] for key in variants}
    for _ in range(args.repeats):
        for key, (fn, _) in variants.items():
            synchronise(device)
            start = time.perf_counter()
            fn()
            synchronise(device)
            times[key].append(time.perf_counter() - start)
    rates = {key: [count / t for t in times[key]] for key, (_, count) in variants.items()}
    plain_rates = rates["plain forward"]
    rows = []
    for key in variants:
        ratios = [r / p for r, p in zip(rates[key], plain_rates, strict=True)]
        rows.append({
            "variant": key,
            "images_per_s": statistics.median(rates[key]),
            "images_per_s_all": rates[key],
            "ratio_to_plain": statistics.median(ratios),
            "ratio_to_plain_all": ratios,
        })
    return {
        "size": size, "model": name, "batch_size": batch_size, "images": args.images,
        "num_masks": args.num_masks, "fast_inference": fast, "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--sizes", default="32,224", help="comma-separated: 32 (ResNet-18 CIFAR), 224 (ResNet-50)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: sslens's)")
    parser.add_argument("--num-masks", type=int, default=1024, help="masks per image")
    parser.add_argument("--images", type=int, default=4, help="images per explainer call")
    parser.add_argument("--plain-batches", type=int, default=8, help="batches per plain-forward measurement")
    parser.add_argument("--components", default=",".join(ALL_COMPONENTS),
                        help="comma-separated perceptual components ('' for none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results to this path")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    unknown = [s for s in sizes if s not in MODELS]
    if unknown:
        parser.error(f"--sizes must be among {sorted(MODELS)}; got {unknown}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({device_name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    results = []
    for size in sizes:
        result = bench_size(size, args, device)
        results.append(result)
        print(f"{result['model']} at {size} px, batch {result['batch_size']}, {args.images} images × "
              f"{args.num_masks} masks; encoder: {result['fast_inference']}")
        print(f"  {'variant':<28}{'images/s':>12}{'ratio to plain':>16}")
        for row in result["rows"]:
            print(f"  {row['variant']:<28}{row['images_per_s']:>12.0f}{row['ratio_to_plain']:>15.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "device_name": device_name, "threads": torch.get_num_threads(),
                       "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
