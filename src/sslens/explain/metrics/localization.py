"""Localisation against ground-truth object masks: pointing game, relevance mass and rank accuracy.

Each metric is a function ``(maps (N, H, W), masks (N, H, W) bool, **options) -> (N,) float``
registered in :data:`LOCALIZATION_METRICS`; :func:`localization_scores` runs several by name and
summarises them.

* Pointing game — Zhang et al. 2016, "Top-down Neural Attention by Excitation Backprop"
  (https://arxiv.org/abs/1608.00507): "we extract the maximum point on the top-down attention
  map. A hit is counted if the maximum point lies on one of the annotated instances of the cued
  object category, otherwise a miss is counted." They allow "a 15-pixel tolerance"; here
  ``tolerance`` is in pixels (Euclidean) and defaults to 0, since our images are small.
* Relevance mass accuracy and relevance rank accuracy — Arras et al. 2022, "CLEVR-XAI"
  (https://arxiv.org/abs/2003.07258): "the ratio of positive relevance falling within the ground
  truth mask" and, with K the mask size, "the ratio of the K highest relevance pixels lying
  within the ground truth".

Where we differ / what we decide:

* Ties (for the maximum, and in the ranking) are broken uniformly at random with a seeded
  generator, so a constant map points at a random pixel and scores the chance level (the
  object's area) instead of whatever lies in the top-left corner.
* Relevance mass is measured on the *offset-free* map ``r = max(m − mean(m), 0)``, not on the
  raw positive part as Arras et al. do: RELAX's maps are mask-weighted mean similarities,
  ≈ 0.9 everywhere, so their raw positive part is nearly constant and its "mass" equals the
  object's area whatever the map says (a constant map scored like RELAX). On ``r`` a constant
  map scores 0 (nothing stands out), a map that is 1 on the object and 0 elsewhere scores 1,
  and a random map scores about the object's area.
* An image whose mask is empty cannot be scored, so it is rejected with a ValueError.
* :func:`localization_scores` gives each mean a 95% interval (Wilson's for the pointing game's
  hits, a bootstrap over images for the others; :mod:`sslens.stats`).

>>> import torch
>>> maps = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
>>> masks = torch.tensor([[[False, True], [False, False]]])
>>> localization_scores(maps, masks)["pointing_game"]["mean"]
1.0
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch

from sslens.registry import lookup
from sslens.stats import bootstrap_mean, wilson


def _check(maps: torch.Tensor, masks: torch.Tensor) -> None:
    if not torch.is_tensor(maps) or maps.ndim != 3:
        shape = tuple(maps.shape) if torch.is_tensor(maps) else type(maps).__name__
        raise ValueError(f"maps must be a (N, H, W) tensor; got {shape}")
    if not torch.is_tensor(masks) or masks.dtype != torch.bool:
        kind = masks.dtype if torch.is_tensor(masks) else type(masks).__name__
        raise TypeError(f"masks must be a bool tensor (N, H, W); got {kind}. Use masks.bool().")
    if masks.shape != maps.shape:
        raise ValueError(
            f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must have the same shape; "
            "upsample the maps to the image size first."
        )
    empty = (~masks.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"The ground-truth masks of images {empty} are empty, so localisation is undefined "
            "for them. Keep only images with an object, e.g. data.subset(masks.flatten(1).any(1).nonzero().flatten())."
        )


def descending_order(maps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(N, H, W) → (N, H·W) pixel indices in decreasing value, ties in a seeded random order.

    The pixels are shuffled before a stable sort, so equal values keep the shuffled order.
    """
    flat = maps.flatten(1)
    generator = torch.Generator().manual_seed(seed)
    shuffle = torch.stack([torch.randperm(flat.shape[1], generator=generator) for _ in range(len(flat))]).to(flat.device)
    order = torch.sort(flat.gather(1, shuffle), dim=1, descending=True, stable=True).indices
    return shuffle.gather(1, order)


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, *, tolerance: float = 0.0, seed: int = 0) -> torch.Tensor:
    """(N,) 1.0 where the map's maximum lies within ``tolerance`` pixels of the mask, else 0.0."""
    _check(maps, masks)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels; got {tolerance!r}")
    width = maps.shape[2]
    peak = descending_order(maps, seed)[:, 0]
    row, col = (peak // width).view(-1, 1, 1), (peak % width).view(-1, 1, 1)
    rows = torch.arange(maps.shape[1], device=maps.device).view(1, -1, 1)
    cols = torch.arange(width, device=maps.device).view(1, 1, -1)
    near = (rows - row).square() + (cols - col).square() <= tolerance**2
    return (near & masks).flatten(1).any(1).float()


def offset_free(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) → ``max(m − mean(m), 0)`` per map: what stands out of the map's own level."""
    return (maps - maps.flatten(1).mean(1).view(-1, 1, 1)).clamp_min(0)


def relevance_mass(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N,) share of the offset-free relevance (:func:`offset_free`) inside the mask; 0 for a
    map where nothing stands out (a constant map)."""
    _check(maps, masks)
    relevance = offset_free(maps.double()).flatten(1)
    total = relevance.sum(1)
    inside = (relevance * masks.flatten(1)).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total)).float()


def relevance_rank(maps: torch.Tensor, masks: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """(N,) fraction of the K most relevant pixels inside the mask, K = the mask's pixel count."""
    _check(maps, masks)
    order = descending_order(maps, seed)
    inside_sorted = masks.flatten(1).gather(1, order)
    sizes = masks.flatten(1).sum(1)
    within_top_k = torch.arange(order.shape[1], device=maps.device) < sizes.unsqueeze(1)
    return (inside_sorted & within_top_k).sum(1).float() / sizes.float()


#: Metric name → ``metric(maps, masks, **options) -> (N,) scores``.
LOCALIZATION_METRICS = {
    "pointing_game": pointing_game,
    "relevance_mass": relevance_mass,
    "relevance_rank": relevance_rank,
}


def localization_scores(
    maps: torch.Tensor,
    masks: torch.Tensor,
    metrics: Sequence[str] = ("pointing_game", "relevance_mass", "relevance_rank"),
    *,
    options: Mapping[str, dict] | None = None,
    seed: int = 0,
) -> dict[str, dict]:
    """Run the named metrics; ``{name: {"mean", "std", "interval", "per_image", "undefined"}}``.

    ``options`` maps a metric name to its keyword arguments, e.g.
    ``{"pointing_game": {"tolerance": 3}}``. ``std`` is the population std (ddof=0); NaN scores
    are left out of mean, std and interval and counted in ``undefined``. ``seed`` breaks ties
    and draws the bootstrap.
    """
    if isinstance(metrics, str):
        raise TypeError(f"metrics must be a sequence of names, e.g. ({metrics!r},)")
    options = dict(options or {})
    unused = sorted(set(options) - set(metrics))
    if unused:
        raise ValueError(f"options given for metrics that are not run: {unused}; add them to metrics.")
    functions = {name: lookup("localization metric", LOCALIZATION_METRICS, name) for name in metrics}
    results = {}
    with torch.no_grad():
        for name, function in functions.items():
            accepted = inspect.signature(function).parameters
            scores = function(maps, masks, **({"seed": seed} if "seed" in accepted else {}), **options.get(name, {}))
            defined = scores[~scores.isnan()]
            if name == "pointing_game":
                interval = wilson(int(defined.sum()), defined.numel(), unit="images")
            else:
                interval = bootstrap_mean(defined.numpy(), unit="images", seed=seed)
            results[name] = {
                "mean": float(defined.mean()) if defined.numel() else float("nan"),
                "std": float(defined.std(correction=0)) if defined.numel() else float("nan"),
                "interval": interval.to_dict(),
                "per_image": scores.tolist(),
                "undefined": int(scores.isnan().sum()),
            }
    return results
