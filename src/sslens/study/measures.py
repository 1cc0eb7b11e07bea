"""How the study's experiments turn per-item numbers into reported ones, with intervals and
chance levels.

An experiment measures every model on the same seeded sample of test images (or the whole
test split), keeps the per-item values in its stage arrays under :func:`item_key` names, and
reports each mean as a :class:`~sslens.stats.Estimate` dict (``mean``, ``ci_low``,
``ci_high``, ``n``, ``unit``, ...). Because the items are the same for every model, the
trade-off section can later pair them (:func:`sslens.stats.paired_difference`) without
recomputing anything.

Chance levels and floors are measured on the same images: the maps of a *random map*
(independent uniform noise per pixel) and of a *constant map* go through the same metric as
the explainer's, and the study adds the same architecture with random weights as a model of
its own (:data:`sslens.study.spec.RANDOM_INIT`).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from sslens.stats import bootstrap_mean, wilson

#: The reference maps every map metric is also measured on, in report order.
CHANCE_MAPS = ("random map", "constant map")

#: Chance maps drawn per image where scoring them is cheap (localisation): one draw's pointing
#: game is a single coin flip per image, far noisier than the explainer's score.
CHANCE_DRAWS = 32


def item_key(*parts: str) -> str:
    """The stage-array name of a per-item metric, e.g. ``items__relax__deletion_auc``."""
    return "__".join(["items", *(part.replace(" ", "_") for part in parts)])


def seed_for(seed: int, purpose: str) -> int:
    """A bootstrap seed derived from the study seed and what is resampled (stable across runs)."""
    return (seed * 1_000_003 + zlib.crc32(purpose.encode())) % 2**32


def image_mean(values, seed: int, purpose: str) -> dict:
    """The mean of per-image ``values`` with its bootstrap interval, as a dict."""
    return bootstrap_mean(np.asarray(values, dtype=np.float64), unit="images", seed=seed_for(seed, purpose)).to_dict()


def hits(values, unit: str = "images") -> dict:
    """The share of 1s in ``values`` (0/1 per item) with its Wilson interval, as a dict."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return wilson(float(values.sum()), len(values), unit=unit).to_dict()


def chance_maps(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """(B, H, W) maps that know nothing, for chance levels: seeded uniform noise, and ones."""
    generator = torch.Generator().manual_seed(seed_for(seed, "chance maps"))
    return {
        "random map": torch.rand(shape, generator=generator).to(device),
        "constant map": torch.ones(shape, device=device),
    }
