"""Deletion and insertion curves: does removing the "important" pixels change the representation?

Petsiuk et al. 2018, RISE (https://arxiv.org/abs/1806.07421), Section 4.1: "The deletion metric
removes the salient information from an image [...] we remove pixels one by one, in the order of
decreasing importance, and measure the decrease in the probability of the predicted class. [...]
The insertion metric, on the other hand, takes a complementary approach [...] it captures the
importance of the pixels in terms of their ability to synthesize an image."

Where we differ from the paper, to fit representations rather than classifiers:

* The score tracked along the curve is the cosine similarity between the embedding of the
  perturbed image and the embedding of the original image (1 at the start of deletion).
* Pixels are removed in ``steps`` equal chunks (``floor(k * H * W / steps)`` pixels after step
  k), all colour channels of a pixel together.
* "Removed" means replaced by a baseline image (:mod:`sslens.explain.baselines`, the same table
  RELAX masks with): ``"zero"`` (0 in normalised space, i.e. the dataset's mean colour),
  ``"blur"`` (a Gaussian blur of the image, as RISE uses for insertion) or ``"mean"`` (the
  image's mean colour). Insertion starts from the same baseline and reveals the original pixels.
* Pixels with equal importance are taken in raster order (a stable sort), so a result never
  depends on the sort implementation.
* The same curves with a seeded random pixel order, averaged over ``random_repeats`` orders, are
  reported as the chance baseline: a faithful map has a lower deletion AUC and a higher insertion
  AUC than random.

The AUC is the trapezoid rule on x = fraction of pixels removed (or inserted), x ∈ [0, 1].

>>> import torch
>>> encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
>>> images, maps = torch.randn(2, 3, 4, 4), torch.rand(2, 4, 4)
>>> result = deletion_insertion(encoder, images, maps, steps=4)
>>> len(result["x"]), len(result["per_image"]["deletion_auc"])
(5, 2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslens.checks import positive_int
from sslens.explain.base import preserved_state
from sslens.explain.baselines import check_baseline, make_baseline

CURVES = ("deletion", "insertion", "random_deletion", "random_insertion")


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) importance → (B, H*W) rank of each pixel in decreasing importance (0 = most).

    Ties keep raster order (stable sort): of two equally important pixels, the one nearer the top
    left is removed first.
    """
    order = torch.sort(maps.flatten(1), dim=1, descending=True, stable=True).indices
    return _inverse_permutation(order)


def _inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def trapezoid_auc(curves: torch.Tensor) -> torch.Tensor:
    """(..., steps + 1) values on an even grid of [0, 1] → (...,) area by the trapezoid rule."""
    steps = curves.shape[-1] - 1
    return (curves[..., 1:] + curves[..., :-1]).sum(-1) / (2 * steps)


@torch.no_grad()
def _similarity_curves(
    encoder: nn.Module,
    images: torch.Tensor,
    baseline: torch.Tensor,
    reference: torch.Tensor,
    ranks: torch.Tensor,
    counts: torch.Tensor,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion curves (B, steps + 1) for one pixel order.

    All (step, image) pairs are enumerated together and encoded ``batch_size`` at a time, so the
    work is batched over images and steps alike without holding every perturbed image in memory.
    """
    num_images, steps_plus_one = images.shape[0], counts.shape[0]
    curves = {}
    for kind in ("deletion", "insertion"):
        similarities = torch.empty(steps_plus_one * num_images, device=images.device)
        for start in range(0, steps_plus_one * num_images, batch_size):
            index = torch.arange(start, min(start + batch_size, steps_plus_one * num_images), device=images.device)
            step, image = index // num_images, index % num_images
            # A pixel is "changed" at step k when its rank is below the number changed by then.
            changed = (ranks[image] < counts[step].unsqueeze(1)).view(-1, 1, *images.shape[-2:])
            source, fill = (baseline, images) if kind == "deletion" else (images, baseline)
            perturbed = torch.where(changed, source[image], fill[image])
            similarities[index] = F.cosine_similarity(encoder(perturbed).flatten(1), reference[image], dim=1)
        curves[kind] = similarities.view(steps_plus_one, num_images).T
    return curves["deletion"], curves["insertion"]


def deletion_insertion(
    encoder: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    *,
    steps: int = 20,
    baseline: str = "zero",
    blur_sigma: float = 5.0,
    blur_padding: str = "replicate",
    seed: int = 0,
    random_repeats: int = 1,
    batch_size: int = 256,
) -> dict:
    """Deletion/insertion curves and AUCs of ``maps`` for ``encoder``, with a random-order baseline.

    Args:
        encoder: (B, 3, H, W) normalised images → (B, D) embeddings. It is run in eval mode and
            its train/eval state restored afterwards.
        images: (B, 3, H, W) normalised images.
        maps: (B, H, W) importance at input resolution (higher = more important).
        steps: number of equal chunks in which pixels are removed/inserted.
        baseline: a name in :data:`~sslens.explain.baselines.BASELINES` ("zero", "blur", "mean").
        blur_sigma: standard deviation in pixels of the "blur" baseline.
        blur_padding: its padding, "replicate" (any σ on any image size) or "reflect".
        seed: seeds the random pixel orders (a CPU ``torch.Generator``, so every device draws
            the same orders).
        random_repeats: how many random orders to average for the chance curves.
        batch_size: perturbed images per encoder call.

    Returns:
        A JSON-serialisable dict: ``x`` (steps + 1 fractions), the mean AUCs
        ``deletion_auc``, ``insertion_auc``, ``random_deletion_auc``, ``random_insertion_auc``,
        ``per_image`` (the same four keys, one float per image), ``curves`` (the four mean
        curves) and ``per_image_curves`` (B lists of steps + 1), plus the settings used.
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be a torch.nn.Module; got {type(encoder).__name__}")
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a normalised (B, 3, H, W) tensor; got {shape}")
    expected = (images.shape[0], *images.shape[2:])
    if not torch.is_tensor(maps) or tuple(maps.shape) != expected:
        got = tuple(maps.shape) if torch.is_tensor(maps) else type(maps).__name__
        raise ValueError(
            f"maps must have shape (B, H, W) = {expected}; got {got}. Upsample low-resolution "
            "maps to the image size first."
        )
    for name, value in (("steps", steps), ("random_repeats", random_repeats), ("batch_size", batch_size)):
        positive_int(name, value)
    check_baseline(baseline, blur_sigma)

    num_images, num_pixels = images.shape[0], images.shape[2] * images.shape[3]
    device = images.device
    counts = torch.arange(steps + 1, device=device) * num_pixels // steps
    generator = torch.Generator().manual_seed(seed)
    curves: dict[str, torch.Tensor] = {}
    with preserved_state(encoder), torch.no_grad():
        # Eval mode: batch-norm statistics must not mix the perturbed images of one batch.
        encoder.eval()
        baseline_images = make_baseline(baseline, images, blur_sigma=blur_sigma, padding=blur_padding)
        reference = encoder(images).flatten(1)
        run = lambda ranks: _similarity_curves(  # noqa: E731
            encoder, images, baseline_images, reference, ranks, counts, batch_size
        )
        curves["deletion"], curves["insertion"] = run(pixel_ranks(maps))
        random_runs = []
        for _ in range(random_repeats):
            order = torch.rand(num_images, num_pixels, generator=generator).argsort(dim=1)
            random_runs.append(run(_inverse_permutation(order.to(device))))
        curves["random_deletion"] = torch.stack([d for d, _ in random_runs]).mean(0)
        curves["random_insertion"] = torch.stack([i for _, i in random_runs]).mean(0)

    aucs = {name: trapezoid_auc(curve) for name, curve in curves.items()}
    return {
        "x": (torch.arange(steps + 1, dtype=torch.float64) / steps).tolist(),
        **{f"{name}_auc": float(auc.mean()) for name, auc in aucs.items()},
        "per_image": {f"{name}_auc": auc.tolist() for name, auc in aucs.items()},
        "curves": {name: curve.mean(0).tolist() for name, curve in curves.items()},
        "per_image_curves": {name: curve.tolist() for name, curve in curves.items()},
        "settings": {
            "steps": steps,
            "baseline": baseline,
            "blur_sigma": blur_sigma,
            "blur_padding": blur_padding,
            "seed": seed,
            "random_repeats": random_repeats,
            "tie_break": "raster order (stable sort)",
        },
    }
