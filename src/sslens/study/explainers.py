"""The explainers a study can run, each as ``images -> raw maps`` for the metric functions.

Every entry of :data:`EXPLAINER_SPECS` names a constructor (whose keyword options the study's
``explainers`` section may set) and how to turn one call into (B, H, W) maps. The study sets
``seed`` itself (and ``mean``/``std`` where the constructor takes them), so every map is seeded
from the study's seed. Register a new entry to make an explainer available to the faithfulness,
localisation and sanity experiments by name.

Similarity Grad-CAM explains ``cos(f(x), f(view))`` against a seeded augmented view of x: the
similarity of an embedding to itself has zero gradient (it is at its maximum), so the image's
own embedding is no usable reference.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sslens.errors import UserError
from sslens.explain import RELAX, PerceptualComponents, SimilarityCAM
from sslens.registry import Registry

EXPLAINER_SPECS = Registry("study explainer")

ExplainFn = Callable[[torch.Tensor], torch.Tensor]

#: Constructor arguments the study passes itself.
STUDY_ARGUMENTS = ("self", "encoder", "seed", "mean", "std")


@dataclass(frozen=True)
class ExplainerSpec:
    """How the study builds and calls one explainer.

    Attributes:
        factory: ``factory(encoder, seed=..., [mean=..., std=...,] **options)`` → explainer.
        maps: ``maps(explainer, images)`` → (B, H, W) raw maps.
        label: the name shown in the report.
        fixed: constructor options the study fixes (not settable in the config).
    """

    factory: Callable[..., Any]
    maps: Callable[[Any, torch.Tensor], torch.Tensor]
    label: str
    fixed: tuple[str, ...] = ()

    def valid_options(self) -> list[str]:
        parameters = inspect.signature(self.factory).parameters
        return [p for p in parameters if p not in STUDY_ARGUMENTS + self.fixed]

    def check(self, name: str, options: dict) -> None:
        from sslens.study.config import check_keys

        check_keys(options, self.valid_options(), f"under explainers.{name}")

    def build(self, encoder: nn.Module, options: dict, *, seed: int, mean, std) -> ExplainFn:
        """``images -> maps`` for ``encoder``; constructor errors become UserErrors."""
        parameters = inspect.signature(self.factory).parameters
        given = {"seed": seed, "mean": tuple(mean), "std": tuple(std)}
        study = {k: v for k, v in given.items() if k in parameters}
        try:
            explainer = self.factory(encoder, **study, **options)
        except (TypeError, ValueError) as error:
            raise UserError(f"Invalid options for the {self.label} explainer: {error}") from error
        return lambda images: self.maps(explainer, images)


def register_explainer(name: str, spec: ExplainerSpec) -> ExplainerSpec:
    EXPLAINER_SPECS.register(name)(spec)
    return spec


register_explainer("relax", ExplainerSpec(RELAX, lambda e, x: e(x).importance, "RELAX"))
register_explainer(
    "gradcam",
    ExplainerSpec(
        SimilarityCAM,
        lambda e, x: e(x, reference="augmented").importance.to(x.device),
        "Grad-CAM",
        fixed=("symmetric", "augment"),
    ),
)
register_explainer(
    "perceptual", ExplainerSpec(PerceptualComponents, lambda e, x: e(x).importance, "perceptual components"),
)


def label(name: str) -> str:
    return EXPLAINER_SPECS.get(name).label


def build_explainer(name: str, encoder: nn.Module, options: dict, *, seed: int, mean, std) -> ExplainFn:
    return EXPLAINER_SPECS.get(name).build(encoder, options, seed=seed, mean=mean, std=std)
