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

* Ties for the maximum are resolved to the first pixel in raster order (``torch.argmax``'s
  documented rule), so a constant map always points at the top-left pixel; ties in the rank
  metric are resolved the same way (stable sort).
* Negative relevance is clamped at 0 for the mass metric, as Arras et al. do; a map without any
  positive relevance has no defined mass and scores NaN (left out of the mean, and counted).
* An image whose mask is empty cannot be scored, so it is rejected with a ValueError.

>>> import torch
>>> maps = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
>>> masks = torch.tensor([[[False, True], [False, False]]])
>>> localization_scores(maps, masks)["pointing_game"]["mean"]
1.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from sslens.registry import lookup


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


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, *, tolerance: float = 0.0) -> torch.Tensor:
    """(N,) 1.0 where the map's maximum lies within ``tolerance`` pixels of the mask, else 0.0."""
    _check(maps, masks)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels; got {tolerance!r}")
    width = maps.shape[2]
    peak = maps.flatten(1).argmax(dim=1)  # first maximum in raster order
    row, col = (peak // width).view(-1, 1, 1), (peak % width).view(-1, 1, 1)
    rows = torch.arange(maps.shape[1], device=maps.device).view(1, -1, 1)
    cols = torch.arange(width, device=maps.device).view(1, 1, -1)
    near = (rows - row).square() + (cols - col).square() <= tolerance**2
    return (near & masks).flatten(1).any(1).float()


def relevance_mass(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N,) share of positive relevance inside the mask; NaN for a map with no positive relevance."""
    _check(maps, masks)
    positive = maps.clamp_min(0).flatten(1).double()
    total = positive.sum(1)
    inside = (positive * masks.flatten(1)).sum(1)
    return torch.where(total > 0, inside / total, torch.full_like(total, float("nan"))).float()


def relevance_rank(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N,) fraction of the K most relevant pixels inside the mask, K = the mask's pixel count."""
    _check(maps, masks)
    order = torch.sort(maps.flatten(1), dim=1, descending=True, stable=True).indices
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
) -> dict[str, dict]:
    """Run the named metrics; ``{name: {"mean", "std", "per_image", "undefined"}}``.

    ``options`` maps a metric name to its keyword arguments, e.g.
    ``{"pointing_game": {"tolerance": 3}}``. ``std`` is the population std (ddof=0); NaN scores
    are left out of mean and std and counted in ``undefined``.
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
            scores = function(maps, masks, **options.get(name, {}))
            defined = scores[~scores.isnan()]
            results[name] = {
                "mean": float(defined.mean()) if defined.numel() else float("nan"),
                "std": float(defined.std(correction=0)) if defined.numel() else float("nan"),
                "per_image": scores.tolist(),
                "undefined": int(scores.isnan().sum()),
            }
    return results
