"""The shared base of every self-supervised method: one training loop drives them all."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sslens.models.base import Backbone
from sslens.registry import Registry

METHODS = Registry(
    "method",
    modules=("sslens.methods.simclr", "sslens.methods.moco", "sslens.methods.swav", "sslens.methods.barlow_twins",
             "sslens.methods.vicreg", "sslens.methods.byol", "sslens.methods.dino",
             "sslens.methods.imported"),
)


@dataclass
class StepOutput:
    """What one training step returns: the loss to minimise and detached metrics to log.

    ``metrics`` always holds ``positive_pair_top1`` for the contrastive methods: how often the
    positive is the most similar candidate in the batch. It is a training statistic (the
    reference report's "82.8% accuracy"), never a downstream accuracy.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class SSLMethod(nn.Module):
    """A self-supervised method: a backbone, a projection head and a loss.

    Subclasses set ``default_views`` (a view-recipe name) and implement :meth:`training_step`;
    they may override the two optimiser hooks. All state that must survive a resume (momentum
    encoder, queues, prototypes) lives in parameters or registered buffers, so it travels in
    ``state_dict()``.
    """

    default_views: str = "simclr"
    #: The learning principle the study groups methods by: "contrastive", "clustering",
    #: "self-distillation" or "redundancy reduction".
    principle: str = "unknown"

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, feature_dim) pooled representation (what downstream tasks use)."""
        return self.backbone(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, out_dim) projection-head output (what the loss sees)."""
        return self.projector(self.backbone(x))

    def training_step(self, views: list[torch.Tensor]) -> StepOutput:
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        """:meth:`training_step`, so ``DistributedDataParallel(method)(views)`` runs a step with
        DDP's gradient hooks."""
        return self.training_step(views)

    def global_batchnorm_children(self) -> list[str]:
        """Names of the children whose BatchNorm should cover the global batch under torchrun
        (all, by default; MoCo leaves out its key encoder, which shuffles BN instead)."""
        return [name for name, _ in self.named_children()]

    def check_batch_size(self, batch_size: int, world_size: int) -> None:
        """Raise a ValueError when the method cannot train on global batches of ``batch_size``
        split over ``world_size`` processes (checked before a run starts; nothing by default)."""

    def on_before_optimizer_step(self, step: int) -> None:
        """Called after backward, before the optimiser steps (e.g. SwAV freezes prototypes)."""

    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after the optimiser steps (e.g. MoCo's momentum update)."""

    def encoder(self, output: str = "pooled") -> nn.Module:
        """An ``nn.Module`` mapping images (B, 3, H, W) → embeddings (B, D), for explainers.

        ``output`` is "pooled" (backbone representation) or "projection" (head output).
        """
        if output == "pooled":
            return self.backbone
        if output == "projection":
            return nn.Sequential(self.backbone, self.projector)
        raise ValueError(f"output must be 'pooled' or 'projection'; got {output!r}")


#: Checkpoint formats (``sslens.published``) spelled otherwise than the method they come from.
IMPORTED_METHOD_NAMES = {"barlowtwins": "barlow_twins"}


def learning_principle(meta: Mapping[str, Any]) -> str:
    """The learning principle of the method a model directory's ``meta`` names; for an imported
    checkpoint, of the method its ``source_format`` names ("unknown" for a plain torchvision or
    timm network, whose training is not recorded)."""
    name = meta.get("source_format") if meta.get("method") == "imported" else meta.get("method")
    name = IMPORTED_METHOD_NAMES.get(name, name)
    return METHODS.get(name).principle if name in METHODS else "unknown"


def create_method(name: str, backbone: Backbone, **options) -> SSLMethod:
    """Build a registered method by name around ``backbone``."""
    return METHODS.create(name, backbone, **options)


def check_views(views: Sequence[torch.Tensor], count: int, method: str, recipe: str) -> None:
    """Raise a ValueError unless ``views`` is ``count`` (B, 3, H, W) tensors of one shape."""
    if len(views) != count:
        raise ValueError(
            f"{method} needs exactly {count} views per batch; got {len(views)}. "
            f"Use the {recipe!r} view recipe."
        )
    first = views[0]
    for view in views:
        if not torch.is_tensor(view) or view.ndim != 4 or view.shape[1] != 3:
            shape = tuple(view.shape) if torch.is_tensor(view) else type(view).__name__
            raise ValueError(f"{method} views must be (B, 3, H, W) tensors; got {shape}")
        if view.shape != first.shape:
            raise ValueError(
                f"{method} views must share one shape; got {tuple(first.shape)} and {tuple(view.shape)}"
            )
    if first.shape[0] < 2:
        raise ValueError(
            f"{method} needs a batch of at least 2 images (it uses BatchNorm and negatives)"
        )


def per_resolution(views: Sequence[torch.Tensor], forward: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """``forward`` of each view, with consecutive same-size views sharing one pass (the official
    multi-crop code's grouping: one BatchNorm batch per resolution); one (B, ...) output per view."""
    outputs: list[torch.Tensor] = []
    for _, group in itertools.groupby(views, key=lambda view: view.shape[-2:]):
        group = list(group)
        outputs.extend(forward(torch.cat(group)).chunk(len(group)))
    return outputs
