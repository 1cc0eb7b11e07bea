"""How the study runs an explainer: ``images -> raw maps`` for the metric functions.

Any registered explainer can run in a study; it is built through the explainers' one front door
(:func:`sslens.explain.base.create_explainer`) with the study's options for it, and the study
sets ``seed`` itself (and ``mean``/``std`` where the constructor takes them), so every map is
seeded from the study's seed.

An explainer whose call takes a ``reference`` (the similarity CAM family, gradient-weighted
attention) explains ``cos(f(x), f(view))`` against a seeded augmented view of x: the similarity of
an embedding to itself has zero gradient (it is at its maximum), so the image's own embedding is
no usable reference.

An explainer whose call takes a ``corpus`` and a ``foil`` (COCOA) explains each image relative to
training images of its own class (the corpus: :data:`CORPUS_SIZE` of them, drawn with a seed) and
random training images (the foil: :data:`FOIL_SIZE`, one seeded draw for the whole study), the
paper's "same class vs random" scenario (Lin et al. 2023, https://arxiv.org/abs/2210.00107). The
images are explained class by class, each class with its own corpus (:class:`CocoaSets`).

Under ``torchrun`` every explain function splits its batch across the ranks and gathers the maps
(:func:`sslens.study.sharding.explain_rows`), so a map must depend only on its own image. The CAM's
augmented views, drawn per image in batch order, are therefore drawn for the whole batch first
and split with the images.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sslens.errors import UserError
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


def takes_corpus(explainer: Explainer) -> bool:
    """Whether the explainer's call explains each image relative to a corpus and a foil (COCOA)."""
    return "corpus" in inspect.signature(explainer.explain).parameters


#: COCOA's corpus per class and its foil, in training images.
CORPUS_SIZE = 100
FOIL_SIZE = 1000


@dataclass(frozen=True)
class CocoaSets:
    """COCOA's corpus and foil for a study's test images: drawn from the training split.

    Attributes:
        train_labels: (N,) int64 class of every training image.
        train_images: ``indices -> (n, 3, H, W)`` normalised training images on the device.
        test_labels: (M,) int64 class of every test image, indexed like the explained images.
        generator: ``purpose -> torch.Generator`` seeded from the study seed and purpose.
    """

    train_labels: torch.Tensor
    train_images: Callable[[torch.Tensor], torch.Tensor]
    test_labels: torch.Tensor
    generator: Callable[[str], torch.Generator]

    def corpus(self, label: int) -> torch.Tensor:
        """(min(CORPUS_SIZE, n), 3, H, W): a seeded draw of the n training images of class ``label``."""
        same = torch.nonzero(self.train_labels.cpu() == label).flatten()
        if not len(same):
            raise UserError(
                f"COCOA's corpus is the training images of the explained image's class, and the training "
                f"split has no image of class {label}; explain with another explainer or use a training split "
                "that covers every test class."
            )
        chosen = same[torch.randperm(len(same), generator=self.generator(f"cocoa corpus {label}"))[:CORPUS_SIZE]]
        return self.train_images(chosen)

    @functools.cached_property
    def foil(self) -> torch.Tensor:
        """(min(FOIL_SIZE, N), 3, H, W): one seeded draw of random training images."""
        count = len(self.train_labels)
        return self.train_images(torch.randperm(count, generator=self.generator("cocoa foil"))[:FOIL_SIZE])


def by_class(
    explainer: Explainer, sets: CocoaSets, indices: torch.Tensor,
) -> Callable[..., Explanation]:
    """``images, **per_image -> Explanation`` of a corpus explainer, class by class: the images of
    each class in ``sets.test_labels[indices]`` against that class's corpus and the foil."""
    labels = sets.test_labels.cpu()[indices.cpu()]

    def explain(images: torch.Tensor, **per_image: torch.Tensor | None) -> Explanation:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images to explain but {len(labels)} test indices were given")
        parts = []
        for label in labels.unique().tolist():
            rows = torch.nonzero(labels == label).flatten()
            call = functools.partial(explainer, corpus=sets.corpus(label), foil=sets.foil)
            chosen = {key: None if value is None else value[rows.to(value.device)] for key, value in per_image.items()}
            parts.append((rows, explain_rows(call, images[rows.to(images.device)], **chosen)))
        explanation = _merged(parts, len(images))
        sizes = [0] * len(images)
        for rows, part in parts:
            for row in rows.tolist():
                sizes[row] = part.info["corpus_size"]
        explanation.info |= {"corpus": "training images of the explained image's class", "corpus_size": sizes,
                             "foil": "random training images"}
        return explanation

    return explain


def _merged(parts: list[tuple[torch.Tensor, Explanation]], total: int) -> Explanation:
    """One Explanation of ``total`` images from explanations of disjoint rows; per-image lists in
    ``info`` are put back in image order, the rest is the first part's."""

    def scattered(get: Callable[[Explanation], torch.Tensor]) -> torch.Tensor:
        first = get(parts[0][1])
        out = first.new_empty((total, *first.shape[1:]))
        for rows, explanation in parts:
            out[rows.to(out.device)] = get(explanation).to(out.device)
        return out

    first = parts[0][1]
    info = dict(first.info)
    for key in first.info:
        if all(isinstance(e.info.get(key), list) and len(e.info[key]) == len(rows) for rows, e in parts):
            merged = [None] * total
            for rows, explanation in parts:
                for row, item in zip(rows.tolist(), explanation.info[key], strict=True):
                    merged[row] = item
            info[key] = merged
    return Explanation(
        importance=scattered(lambda e: e.importance),
        uncertainty=None if first.uncertainty is None else scattered(lambda e: e.uncertainty),
        components={name: scattered(lambda e, name=name: e.components[name]) for name in first.components},
        info=info,
    )


def explanation_fn(
    name: str, encoder: nn.Module, options: Mapping[str, Any], *, seed: int, mean: Sequence[float],
    std: Sequence[float], cocoa: CocoaSets | None = None, indices: torch.Tensor | None = None,
) -> Callable[..., Explanation]:
    """``images (B, 3, H, W), **per_image -> Explanation`` of explainer ``name`` (every map it
    makes), split across ranks under torchrun (see the module docstring). A corpus explainer
    needs ``cocoa`` and the test ``indices`` of the images it will be called with."""
    explainer = build_explainer(name, encoder, options, seed=seed, mean=mean, std=std)
    if takes_corpus(explainer):
        if cocoa is None or indices is None:
            raise UserError(
                f"The {name} explainer explains each image against a corpus of its own class, and this "
                "experiment has no labelled training images to draw one from; list it under another experiment."
            )
        return by_class(explainer, cocoa, indices)
    if not takes_reference(explainer):
        return lambda images, **per_image: explain_rows(explainer, images, **per_image)

    def explain(images: torch.Tensor, **per_image: torch.Tensor | None) -> Explanation:
        # Drawn before the batch is split, so every image is paired with the view one process gives it.
        return explain_rows(explainer, images, reference=explainer.augmented_views(images), **per_image)

    return explain


def explain_fn(
    name: str, encoder: nn.Module, options: Mapping[str, Any], *, seed: int, mean: Sequence[float],
    std: Sequence[float], cocoa: CocoaSets | None = None, indices: torch.Tensor | None = None,
) -> ExplainFn:
    """``images (B, 3, H, W) -> maps (B, H, W)``: the importance of :func:`explanation_fn`."""
    explanation = explanation_fn(name, encoder, options, seed=seed, mean=mean, std=std, cocoa=cocoa, indices=indices)
    return lambda images: explanation(images).importance.to(images.device)
