"""The explainers a study can run, each as ``images -> raw maps`` for the metric functions.

Every entry of :data:`EXPLAINER_SPECS` names a constructor (whose keyword options the study's
``explainers`` section may set) and how to turn one call into (B, H, W) maps. The study sets
``seed`` itself (and ``mean``/``std`` where the constructor takes them), so every map is seeded
from the study's seed. Register a new entry to make an explainer available to the faithfulness,
localisation and sanity experiments by name.

Similarity Grad-CAM explains ``cos(f(x), f(view))`` against a seeded augmented view of x: the
similarity of an embedding to itself has zero gradient (it is at its maximum), so the image's
own embedding is no usable reference.

Under ``torchrun`` every explain function splits its batch across the ranks and gathers the maps
(:func:`sslens.study.sharding.map_rows`), so a map must depend only on its own image. Anything
drawn per image in batch order, like the CAM's augmented views, is computed for the whole batch
first by the spec's ``per_image`` hook and split with the images.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sslens.errors import UserError
from sslens.explain import RELAX, PerceptualComponents, SimilarityCAM
from sslens.registry import Registry
from sslens.study.sharding import map_rows

EXPLAINER_SPECS = Registry("study explainer")

ExplainFn = Callable[[torch.Tensor], torch.Tensor]

#: Constructor arguments the study passes itself.
STUDY_ARGUMENTS = ("self", "encoder", "seed", "mean", "std")


@dataclass(frozen=True)
class ExplainerSpec:
    """How the study builds and calls one explainer.

    Attributes:
        factory: ``factory(encoder, seed=..., [mean=..., std=...,] **options)`` → explainer.
        maps: ``maps(explainer, images, **per_image)`` → (B, H, W) raw maps; each image's map
            may depend only on that image (and its ``per_image`` rows), as batches are split
            across ranks under torchrun.
        label: the name shown in the report.
        fixed: constructor options the study fixes (not settable in the config).
        per_image: ``per_image(explainer, images)`` → {keyword: (B, ...) tensor}, extra inputs
            of ``maps`` computed from the whole batch before it is split, or None.
    """

    factory: Callable[..., Any]
    maps: Callable[..., torch.Tensor]
    label: str
    fixed: tuple[str, ...] = ()
    per_image: Callable[[Any, torch.Tensor], dict[str, torch.Tensor]] | None = None

    def valid_options(self) -> list[str]:
        parameters = inspect.signature(self.factory).parameters
        return [p for p in parameters if p not in STUDY_ARGUMENTS + self.fixed]

    def check(self, name: str, options: dict) -> None:
        from sslens.study.config import check_keys

        check_keys(options, self.valid_options(), f"under explainers.{name}")

    def build(self, encoder: nn.Module, options: dict, *, seed: int, mean, std) -> ExplainFn:
        """``images -> maps`` for ``encoder``, split across ranks under torchrun; constructor
        errors become UserErrors."""
        parameters = inspect.signature(self.factory).parameters
        given = {"seed": seed, "mean": tuple(mean), "std": tuple(std)}
        study = {k: v for k, v in given.items() if k in parameters}
        try:
            explainer = self.factory(encoder, **study, **options)
        except (TypeError, ValueError) as error:
            raise UserError(f"Invalid options for the {self.label} explainer: {error}") from error

        def explain(images: torch.Tensor) -> torch.Tensor:
            inputs = self.per_image(explainer, images) if self.per_image is not None else {}
            return map_rows(functools.partial(self.maps, explainer), images, **inputs)

        return explain


def register_explainer(name: str, spec: ExplainerSpec) -> ExplainerSpec:
    EXPLAINER_SPECS.register(name)(spec)
    return spec


def augmented_views(cam: SimilarityCAM, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """``reference``: (B, 3, H, W) seeded augmented views, drawn exactly as SimilarityCAM's
    ``reference="augmented"`` draws them: one generator over the batch, image after image. Drawn
    before the batch is split, so every image is paired with the view one process gives it."""
    generator = torch.Generator().manual_seed(cam.seed)
    return {"reference": cam.augment(images.detach().cpu(), generator).to(images.device)}


register_explainer("relax", ExplainerSpec(RELAX, lambda e, x: e(x).importance, "RELAX"))
register_explainer(
    "gradcam",
    ExplainerSpec(
        SimilarityCAM,
        lambda e, x, reference: e(x, reference=reference).importance.to(x.device),
        "Grad-CAM",
        fixed=("symmetric", "augment"),
        per_image=augmented_views,
    ),
)
register_explainer(
    "perceptual", ExplainerSpec(PerceptualComponents, lambda e, x: e(x).importance, "perceptual components"),
)


def label(name: str) -> str:
    return EXPLAINER_SPECS.get(name).label


def build_explainer(name: str, encoder: nn.Module, options: dict, *, seed: int, mean, std) -> ExplainFn:
    return EXPLAINER_SPECS.get(name).build(encoder, options, seed=seed, mean=mean, std=std)
