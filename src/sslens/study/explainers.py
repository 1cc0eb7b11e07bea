"""How the study runs an explainer: ``images -> raw maps`` for the metric functions.

Any registered explainer can run in a study; it is built through the explainers' one front door
(:func:`sslens.explain.base.create_explainer`) with the study's options for it, and the study
sets ``seed`` itself (and ``mean``/``std`` where the constructor takes them), so every map is
seeded from the study's seed.

An explainer whose call takes a ``reference`` (the similarity CAM family) explains
``cos(f(x), f(view))`` against a seeded augmented view of x: the similarity of an embedding to
itself has zero gradient (it is at its maximum), so the image's own embedding is no usable
reference.

Under ``torchrun`` every explain function splits its batch across the ranks and gathers the maps
(:func:`sslens.study.sharding.explain_rows`), so a map must depend only on its own image. The CAM's
augmented views, drawn per image in batch order, are therefore drawn for the whole batch first
and split with the images.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sslens.explain.base import Explainer, Explanation, create_explainer
from sslens.study.sharding import explain_rows

ExplainFn = Callable[[torch.Tensor], torch.Tensor]

#: Options the study sets itself, so a study file may not: the seed and normalisation of every
#: explainer, and the CAMs' reference mode (an augmented view) and symmetry.
STUDY_OPTIONS = ("seed", "mean", "std", "symmetric", "augment")


def build_explainer(
    name: str, encoder: nn.Module, options: Mapping[str, Any], *, seed: int, mean: Sequence[float],
    std: Sequence[float], fixed: Mapping[str, Any] | None = None,
) -> Explainer:
    """Explainer ``name`` for ``encoder`` with the study's ``options`` and seed; ``fixed``
    options are an experiment's own (e.g. the pairs experiment's ``symmetric=True``)."""
    return create_explainer(
        name, encoder, {**options, **(fixed or {})}, context={"seed": seed, "mean": tuple(mean), "std": tuple(std)},
        where=f" under explainers.{name}",
    )


def takes_reference(explainer: Explainer) -> bool:
    """Whether the explainer's call compares each image with a reference (the CAM family)."""
    return "reference" in inspect.signature(explainer.explain).parameters


def explanation_fn(
    name: str, encoder: nn.Module, options: Mapping[str, Any], *, seed: int, mean: Sequence[float],
    std: Sequence[float],
) -> Callable[..., Explanation]:
    """``images (B, 3, H, W), **per_image -> Explanation`` of explainer ``name`` (every map it
    makes), split across ranks under torchrun (see the module docstring)."""
    explainer = build_explainer(name, encoder, options, seed=seed, mean=mean, std=std)
    if not takes_reference(explainer):
        return lambda images, **per_image: explain_rows(explainer, images, **per_image)

    def explain(images: torch.Tensor, **per_image: torch.Tensor | None) -> Explanation:
        # Drawn before the batch is split, so every image is paired with the view one process gives it.
        return explain_rows(explainer, images, reference=explainer.augmented_views(images), **per_image)

    return explain


def explain_fn(
    name: str, encoder: nn.Module, options: Mapping[str, Any], *, seed: int, mean: Sequence[float],
    std: Sequence[float],
) -> ExplainFn:
    """``images (B, 3, H, W) -> maps (B, H, W)``: the importance of :func:`explanation_fn`."""
    explanation = explanation_fn(name, encoder, options, seed=seed, mean=mean, std=std)
    return lambda images: explanation(images).importance.to(images.device)
