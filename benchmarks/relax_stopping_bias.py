"""How far RELAX's ``stop="blocks"`` score is from the map's true noise, for orthogonal masks.

The score estimates the map's standard error from the spread between blocks of 128 masks (batch
means), relative to the map's spread. Orthogonal blocks take stratified shifts: every cycle of 7
blocks uses each shift offset once per axis, so the offsets' main effects cancel from a whole
cycle's map, while batch means count them as noise. This script measures the true noise directly:
the same number of masks under ``--seeds`` independent seeds, the variance of the map between
seeds at every pixel (mean over pixels, relative to the map's spread), against the mean score. A
ratio above 1 means the score is conservative (stops later than it needs to).

    python benchmarks/relax_stopping_bias.py --trained /tmp/simclr-synthetic
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from encoders import resnet18_cifar
from relax_speed import synthetic_test_images, trained_model
from torch import nn

from sslens.explain.engine import RelaxEstimator
from sslens.explain.masks import RelaxMasks
from sslens.explain.relax import block_standard_error


def similarities(encoder: nn.Module, images: torch.Tensor, masks: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(B, N) cosine similarity of each image's embedding with that of the image times each mask
    (RELAX's zero baseline in normalised space)."""
    rows = []
    for x in images:
        reference = encoder(x[None])
        rows.append(torch.cat([F.cosine_similarity(reference, encoder(x[None] * m)) for m in masks.split(batch)]))
    return torch.stack(rows)


def measure(encoder: nn.Module, images: torch.Tensor, num_masks: int, seeds: int) -> dict:
    sampler = RelaxMasks(sampler="orthogonal")
    size = tuple(images.shape[2:])
    maps, scores = [], []
    for seed in range(seeds):
        masks = sampler(num_masks, size, torch.Generator().manual_seed(seed), torch.float64)
        estimator = RelaxEstimator(images.shape[0], size, torch.float64, images.device, sampler.block_size)
        estimator.update(similarities(encoder, images, masks.float()).double(), masks)
        index = torch.arange(images.shape[0])
        scores.append(block_standard_error(estimator, estimator.importance, index))
        maps.append(estimator.importance.flatten(1))
    maps_, scores_ = torch.stack(maps), torch.stack(scores)  # (seeds, B, HW), (seeds, B)
    between_seeds = maps_.var(dim=0).mean(dim=1).sqrt()  # (B,): the map's true standard error
    true = (between_seeds / maps_.std(dim=2).mean(dim=0)).tolist()
    score = scores_.mean(dim=0).tolist()
    return {
        "num_masks": num_masks, "seeds": seeds,
        "true_noise_to_spread": true, "blocks_score": score,
        "score_over_true": [s / t for s, t in zip(score, true, strict=True)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-masks", default="896", help="comma-separated mask counts (896: one cycle of 7 blocks)")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--images", type=int, default=2, help="noise images for the random-weight ResNet-18")
    parser.add_argument("--trained", default=None, help="sslens model directory (trained there first if missing)")
    parser.add_argument("--trained-images", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    targets = [(
        "resnet18-cifar (random weights, noise images)", resnet18_cifar().eval(),
        torch.randn(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
    )]
    if args.trained:
        encoder, label = trained_model(Path(args.trained), torch.device("cpu"))
        targets.append((label, encoder, synthetic_test_images(16, args.trained_images, torch.device("cpu"))))
    rows = []
    for label, encoder, images in targets:
        for n in (int(v) for v in args.num_masks.split(",")):
            row = {"model": label, **measure(encoder, images, n, args.seeds)}
            rows.append(row)
            print(
                f"{label:<52} {n:>5} masks: true noise/spread {statistics.mean(row['true_noise_to_spread']):.3f}, "
                f"blocks score {statistics.mean(row['blocks_score']):.3f}, score/true per image "
                f"{'/'.join(f'{v:.2f}' for v in row['score_over_true'])} "
                f"(median {statistics.median(row['score_over_true']):.2f})",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": torch.get_num_threads(), "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
