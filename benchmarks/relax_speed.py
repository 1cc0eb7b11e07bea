"""RELAX speed and mask efficiency: relax-xai 0.0.5 vs sslens at equal masks, and adaptive stopping.

Speed (``--sizes``): seconds per explained image for the same encoder (random weights; speed
does not depend on them), device and number of masks — ResNet-18 (CIFAR stem) at 32 px,
ResNet-50 at 224 px. relax-xai runs in fp32 under ``torch.no_grad`` (it does not disable autograd
itself) with its default 100 masks per forward pass; sslens with its defaults (fp32 on the CPU
with BatchNorms folded into a private copy of the encoder and cache-sized batches; bf16 autocast
+ channels_last on CUDA), and two ablation rows: ``fast_inference=False`` and
``fast_inference=False, batch_size=256`` (the previous default). Every repeat runs every variant
once, in turn, so that the ratios compare runs made under the same machine load; the table
shows median seconds and the median of the per-repeat ratios to relax-xai.

Adaptive stopping (``--adaptive``): for each mask sampler (``iid``: relax-xai's masks;
``orthogonal``: balanced blocks), the adaptive run's masks used and the Pearson correlation of
its map with (a) the same sampler's full ``--num-masks`` map, (b) the i.i.d. full map of the same
seed and (c) an independent i.i.d. full map (seed + 1). ``--curve`` adds the same correlations
for fixed mask counts. Models: the random-weight ResNet-18 of ``--sizes 32`` and, with
``--trained DIR``, an sslens model directory (trained first with the packaged
``simclr-synthetic`` config if DIR does not exist: resnet-tiny, about a minute on 2 CPU cores)
explained on ``--trained-images`` synthetic test images from ``--trained-first`` (default 16..31:
the default tolerance of the ``"blocks"`` rule was calibrated on images 0..15).

    python benchmarks/relax_speed.py --num-masks 3000 --images 1 --sizes 32 --repeats 3
    python benchmarks/relax_speed.py --sizes 32 --images 2 --speed-off --adaptive --curve \\
        --trained /tmp/simclr-synthetic --json relax_adaptive.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import relax_xai.relax
import torch
from encoders import MODELS, resnet18_cifar
from torch import nn

from sslens.explain.relax import RELAX

CURVE = (256, 512, 768, 1024, 1536, 2048)


def timed_together(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> tuple[dict, dict]:
    """Seconds of ``repeats`` runs of every function, interleaved (one warm-up each first), and
    each function's last result. CUDA is synchronised around every run."""
    results = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            results[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # kernels are asynchronous: wait before reading the clock
            times[name].append(time.perf_counter() - start)
    return times, results


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
    a, b = a.flatten(1).double().cpu(), b.flatten(1).double().cpu()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).tolist()


def bench_speed(size: int, args: argparse.Namespace, device: torch.device) -> dict:
    name, factory = MODELS[size]
    torch.manual_seed(0)
    encoder = factory().to(device).eval()
    images = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    n, masks = args.images, args.num_masks
    variants = {
        "relax_xai": lambda: run_relax_xai(encoder, images, masks, args.batch_size),
        "sslens": RELAX(encoder, num_masks=masks, batch_size=args.ours_batch_size),
        "sslens_no_fold": RELAX(encoder, num_masks=masks, batch_size=args.ours_batch_size, fast_inference=False),
        "sslens_no_fold_batch_256": RELAX(encoder, num_masks=masks, batch_size=256, fast_inference=False),
        # bf16 on every device (on CUDA the default already is): its speed, and how far rounding
        # moves the map from the fp32 one.
        "sslens_bf16": RELAX(encoder, num_masks=masks, batch_size=args.ours_batch_size, amp=True),
    }
    if device.type == "cuda":
        # Folding BatchNorms is on by default on the CPU only, where it was measured: this row
        # measures it on the GPU (one elementwise pass over the activations fewer per BatchNorm).
        variants["sslens_fold"] = RELAX(encoder, num_masks=masks, batch_size=args.ours_batch_size, fast_inference=True)
    fns = {key: (fn if key == "relax_xai" else (lambda explainer=fn: explainer(images))) for key, fn in variants.items()}
    times, results = timed_together(fns, device, args.repeats)
    fp32 = RELAX(encoder, num_masks=masks, batch_size=args.ours_batch_size, amp=False)(images)
    row = {"size": size, "model": name, "images": n, "num_masks": masks}
    for key, values in times.items():
        row[f"{key}_s_per_image"] = statistics.median(values) / n
        row[f"{key}_s_per_image_all"] = [t / n for t in values]
        if key != "relax_xai":
            ratios = [ref / t for ref, t in zip(times["relax_xai"], values, strict=True)]
            row[f"{key}_speedup"] = statistics.median(ratios)
            row[f"{key}_speedup_all"] = ratios
    row["sslens_info"] = {k: results["sslens"].info[k] for k in ("batch_size", "fast_inference")}
    row["pearson_sslens_vs_relax_xai"] = pearson(results["sslens"].importance, results["relax_xai"])
    row["pearson_bf16_vs_fp32"] = pearson(results["sslens_bf16"].importance, fp32.importance)
    return row


def trained_model(path: Path, device: torch.device) -> tuple[nn.Module, str]:
    """The pooled encoder of the sslens model in ``path``, trained there first if missing."""
    from sslens.store import load_model
    from sslens.train import load_config, train

    if not path.exists():
        print(f"training simclr-synthetic into {path} (resnet-tiny, about a minute on 2 CPU cores)", flush=True)
        train(load_config("simclr-synthetic", {"out": str(path), "knn_every": 0, "progress": False}))
    model, _ = load_model(path, device=device)
    return model.encoder("pooled").eval(), f"trained simclr-synthetic resnet-tiny ({path})"


def synthetic_test_images(first: int, count: int, device: torch.device) -> torch.Tensor:
    from sslens.data import load_dataset, normalize, to_float

    data = load_dataset("synthetic", "test", image_size=32, num_images=first + count)
    data = data.subset(torch.arange(first, first + count))
    return normalize(to_float(data.images), data.mean, data.std).to(device)


def bench_adaptive(label: str, encoder: nn.Module, images: torch.Tensor, args: argparse.Namespace) -> dict:
    """Adaptive stopping per sampler, against full maps (see the module docstring)."""
    options = {"num_masks": args.num_masks, "batch_size": args.ours_batch_size, "seed": args.seed}
    iid_full = RELAX(encoder, sampler="iid", **options)(images).importance
    independent = RELAX(encoder, sampler="iid", **{**options, "seed": args.seed + 1})(images).importance
    row: dict = {"model": label, "images": images.shape[0], "num_masks": args.num_masks, "samplers": {}}
    for sampler in ("iid", "orthogonal"):
        full = iid_full if sampler == "iid" else RELAX(encoder, sampler=sampler, **options)(images).importance
        adaptive = RELAX(
            encoder, sampler=sampler, adaptive=True, stop=args.stop, tolerance=args.tolerance,
            min_masks=args.min_masks, **options,
        )
        start = time.perf_counter()
        out = adaptive(images)
        seconds = time.perf_counter() - start
        used = out.info["num_masks_used"]
        result = {
            "stop": out.info["stop"], "tolerance": out.info["tolerance"], "round_size": out.info["round_size"],
            "masks_used": used, "mean_masks_used": statistics.mean(used),
            "fewer_masks": args.num_masks / statistics.mean(used),
            "s_per_image": seconds / images.shape[0],
            "pearson_vs_own_full": pearson(out.importance, full),
            "pearson_vs_iid_full": pearson(out.importance, iid_full),
            "pearson_vs_independent_iid_full": pearson(out.importance, independent),
            "full_pearson_vs_independent_iid_full": pearson(full, independent),
        }
        if args.curve:
            result["curve"] = {}
            for n in CURVE:
                fixed = RELAX(encoder, sampler=sampler, **{**options, "num_masks": n})(images).importance
                result["curve"][n] = {
                    "pearson_vs_own_full": pearson(fixed, full),
                    "pearson_vs_independent_iid_full": pearson(fixed, independent),
                }
        row["samplers"][sampler] = result
    return row


def summary(values: list[float]) -> str:
    return f"{min(values):.3f}/{statistics.mean(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-masks", type=int, default=3000)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--sizes", default="32,224", help="comma-separated: 32 (ResNet-18 CIFAR), 224 (ResNet-50)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100, help="relax-xai's masks per forward pass (its default 100)")
    parser.add_argument("--ours-batch-size", type=int, default=None,
                        help="sslens images per forward pass (default: sslens's, by device)")
    parser.add_argument("--speed-off", action="store_true", help="skip the speed comparison")
    parser.add_argument("--adaptive", action="store_true", help="adaptive stopping per sampler")
    parser.add_argument("--curve", action="store_true", help="with --adaptive: Pearson of fixed mask counts too")
    parser.add_argument("--stop", default="blocks", help="adaptive stopping rule (blocks, stderr, change)")
    parser.add_argument("--tolerance", type=float, default=None, help="its tolerance (default: the rule's)")
    parser.add_argument("--min-masks", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trained", default=None, help="sslens model directory for a trained-model adaptive row")
    parser.add_argument("--trained-images", type=int, default=16)
    parser.add_argument("--trained-first", type=int, default=16,
                        help="first synthetic test image (images 0-15 calibrated the 'blocks' tolerance)")
    parser.add_argument("--json", default=None, help="write the results to this path")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in MODELS]
    if unknown:
        parser.error(f"--sizes must be among {sorted(MODELS)}; got {unknown}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({device_name}), torch {torch.__version__}, threads {torch.get_num_threads()}")

    speed = [] if args.speed_off else [bench_speed(size, args, device) for size in sizes]
    if speed:
        print(f"{'model':<16}{'px':>5}{'masks':>7}{'relax-xai s/img':>17}{'sslens s/img':>14}{'speed-up':>10}"
              f"{'no fold':>10}{'no fold, batch 256':>20}{'bf16':>8}")
        for r in speed:
            print(
                f"{r['model']:<16}{r['size']:>5}{r['num_masks']:>7}{r['relax_xai_s_per_image']:>17.3f}"
                f"{r['sslens_s_per_image']:>14.3f}{r['sslens_speedup']:>9.2f}x{r['sslens_no_fold_speedup']:>9.2f}x"
                f"{r['sslens_no_fold_batch_256_speedup']:>19.2f}x{r['sslens_bf16_speedup']:>7.2f}x"
            )
        for r in speed:
            print(
                f"{r['model']:<16} per-repeat speed-ups of sslens: "
                f"{', '.join(f'{v:.2f}' for v in r['sslens_speedup_all'])}; sslens: {r['sslens_info']}; "
                f"Pearson sslens vs relax-xai map (different masks) {summary(r['pearson_sslens_vs_relax_xai'])}, "
                f"bf16 vs fp32 map {summary(r['pearson_bf16_vs_fp32'])}"
                + (f"; with BatchNorms folded (fast_inference=True) {r['sslens_fold_speedup']:.2f}x"
                   if "sslens_fold_speedup" in r else "")
            )

    adaptive = []
    if args.adaptive:
        targets = []
        for size in sizes:
            if size == 32:
                torch.manual_seed(0)
                encoder = resnet18_cifar().to(device).eval()
                x = torch.randn(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
                targets.append(("resnet18-cifar (random weights, noise images)", encoder, x))
        if args.trained:
            encoder, label = trained_model(Path(args.trained), device)
            targets.append((label, encoder, synthetic_test_images(args.trained_first, args.trained_images, device)))
        adaptive = [bench_adaptive(label, encoder, x, args) for label, encoder, x in targets]
        print("adaptive stopping; Pearson min/mean over images")
        for r in adaptive:
            for sampler, s in r["samplers"].items():
                print(
                    f"{r['model']:<52} {sampler:<11} {s['stop']} tol {s['tolerance']}: masks used "
                    f"{s['mean_masks_used']:.0f} ({args.num_masks / s['mean_masks_used']:.2f}x fewer; "
                    f"{'/'.join(map(str, s['masks_used']))}), Pearson vs own full {summary(s['pearson_vs_own_full'])}, "
                    f"vs iid full {summary(s['pearson_vs_iid_full'])}, vs independent iid full "
                    f"{summary(s['pearson_vs_independent_iid_full'])} (full map: {summary(s['full_pearson_vs_independent_iid_full'])})"
                )
                for n, c in s.get("curve", {}).items():
                    print(f"{'':<52} {sampler:<11} {n:>5} masks: vs own full {summary(c['pearson_vs_own_full'])}, "
                          f"vs independent iid full {summary(c['pearson_vs_independent_iid_full'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "device_name": device_name, "threads": torch.get_num_threads(),
                       "args": vars(args), "speed": speed, "adaptive": adaptive}, f, indent=2)


if __name__ == "__main__":
    main()
