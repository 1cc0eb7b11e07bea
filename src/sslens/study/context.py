"""What every experiment shares: the study config, the device, both splits and seeded samples."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sslens.data.base import data_fingerprint, normalize, to_float
from sslens.explain.base import Explanation
from sslens.explain.display import to_display_image
from sslens.study.explainers import CocoaSets, ExplainFn, explain_fn, explanation_fn
from sslens.study.spec import StudyConfig


@dataclass
class StudyContext:
    """The study's shared state, handed to every experiment.

    Attributes:
        config: the validated study.
        device: where models and images live.
        train_data, test_data: the dataset's splits (test images are the ones explained).
        models: the :class:`~sslens.study.models.StudyModel` of each model, by name.
        outputs: ``outputs[experiment][model]`` — the StageResult of each finished stage, so
            summary experiments (the trade-off table) can read the others.
        out: the study folder; train_fn, say: how the study trains a model and reports one
            line (for experiments that train models of their own, like ``groundtruth``).
    """

    config: StudyConfig
    device: torch.device
    train_data: Any
    test_data: Any
    models: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    out: Path | None = None
    train_fn: Callable | None = None
    say: Callable[[str], None] | None = None

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.test_data.mean)

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.test_data.std)

    @functools.cached_property
    def data_fingerprint(self) -> dict[str, str]:
        """A digest of each split's contents, for the stage cache keys: the dataset section names
        a folder, not what it holds, and a folder whose files changed must not reuse results
        (nor show cached maps beside the new images drawn for the same sample indices)."""
        return {"train": data_fingerprint(self.train_data), "test": data_fingerprint(self.test_data)}

    def generator(self, purpose: str) -> torch.Generator:
        """A CPU generator seeded from the study seed and ``purpose`` (stable across runs)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(purpose.encode()))

    @functools.cached_property
    def _order(self) -> torch.Tensor:
        return torch.randperm(len(self.test_data), generator=self.generator("test order"))

    def sample(self, count: int, *, with_masks: bool = False) -> torch.Tensor:
        """The first ``count`` test-image indices of one seeded order of the test split.

        Every experiment and model draws from the same order, so smaller samples are nested in
        larger ones: an image's numbers from different experiments line up (the report's
        explorer shows them side by side, and per-image metrics can be paired across
        experiments). ``with_masks`` keeps, in the same order, only images whose ground-truth
        object mask is non-empty.
        """
        order = self._order
        if with_masks:
            order = order[self.test_data.masks.flatten(1).any(1).cpu()[order]]
        return order[:count]

    def images(self, indices: torch.Tensor, split: str = "test") -> torch.Tensor:
        """(B, 3, H, W) normalised float images of the test (or ``"train"``) split, on the device."""
        data = self.test_data if split == "test" else self.train_data
        pixels = data.images[indices.to(data.images.device) if torch.is_tensor(data.images) else indices]
        return normalize(to_float(pixels.to(self.device)), self.mean, self.std)

    @functools.cached_property
    def cocoa(self) -> CocoaSets:
        """COCOA's corpora (training images of each class) and foil (random training images)."""
        return CocoaSets(
            train_labels=torch.as_tensor(self.train_data.labels).cpu(),
            train_images=lambda indices: self.images(indices, split="train"),
            test_labels=torch.as_tensor(self.test_data.labels).cpu(),
            generator=self.generator,
        )

    def display(self, images: torch.Tensor) -> np.ndarray:
        """Normalised (B, 3, H, W) → uint8 (B, H, W, 3) for figures."""
        return to_display_image(images, self.mean, self.std)

    def explain_fn(
        self, name: str, encoder: nn.Module, indices: torch.Tensor, seed: int | None = None
    ) -> ExplainFn:
        """``images`` (B, 3, H, W) ``-> maps`` (B, H, W) of explainer ``name`` with the study's
        options and seed (or ``seed``), for the test images ``indices`` (B,) (COCOA draws each
        image's corpus from its class). Under torchrun each call explains this rank's share of the
        images and gathers the rest, so every rank gets all B maps
        (:func:`sslens.study.sharding.explain_rows`)."""
        return explain_fn(
            name, encoder, self.config.explainers.get(name, {}), seed=self.seed if seed is None else seed,
            mean=self.mean, std=self.std, cocoa=self.cocoa, indices=indices,
        )

    def explanation_fn(self, name: str, encoder: nn.Module, indices: torch.Tensor) -> Callable[..., Explanation]:
        """Like :meth:`explain_fn`, but ``images, **per_image -> Explanation`` with every map
        (importance, uncertainty, components)."""
        return explanation_fn(
            name, encoder, self.config.explainers.get(name, {}), seed=self.seed, mean=self.mean, std=self.std,
            cocoa=self.cocoa, indices=indices,
        )
