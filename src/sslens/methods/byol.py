"""BYOL (Grill et al. 2020, https://arxiv.org/abs/2006.07733).

"From an augmented view of an image, we train the online network to predict the target network
representation of the same image under a different augmented view. At the same time, we update
the target network with a slow-moving average of the online network." The online network is
backbone → projector → predictor; the target network is backbone → projector, updated by
:func:`~sslens.methods.losses.momentum_update` with BYOL's cosine schedule
(:func:`~sslens.methods.losses.cosine_momentum`); the loss is
:func:`~sslens.methods.losses.byol_loss`, symmetrised over the two views.

>>> from sslens.models import create_backbone
>>> method = BYOL(create_backbone("resnet-tiny"), hidden_dim=64, out_dim=32)
>>> views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
>>> sorted(method.training_step(views).metrics)
['positive_pair_top1']
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sslens.checks import boolean, positive_int
from sslens.methods.base import METHODS, SSLMethod, StepOutput, check_views
from sslens.methods.losses import (
    MOMENTUM_SCHEDULES,
    byol_loss,
    check_momentum,
    momentum_update,
    view_agreement_top1,
)
from sslens.models.base import Backbone
from sslens.models.heads import ProjectionHead


@METHODS.register("byol")
class BYOL(SSLMethod):
    """BYOL: an online network with a predictor, a target network by EMA, normalised MSE.

    Args:
        backbone: the online backbone; the target's is a deep copy.
        hidden_dim, out_dim: widths of the projector and of the predictor, which share them as in
            the paper ("a multi-layer perceptron ... to a hidden layer of size 4096 followed by
            batch normalization, ReLU, and a final linear layer with output dimension 256";
            "the predictor q_θ uses the same architecture as g_θ"). Defaults 4096 and 256.
        momentum: τ_base, 0.99 (the paper: 0.996 for ImageNet's far longer runs; solo-learn's
            CIFAR config uses 0.99).
        momentum_schedule: "cosine" (BYOL: τ rises from τ_base to 1 over training) or "constant".
        use_predictor: False removes the predictor, the paper's ablation (section 5, Table 5a):
            with a constant momentum of 0 the representation then collapses. For experiments and
            for testing that the training health check catches a collapse.

    Departures from the paper: the views are the packaged ``byol`` recipe, whose blur is off
    below 64 px (as for SimCLR at CIFAR sizes); the optimiser is the run's (the paper uses LARS).
    Under torchrun each rank computes the loss on its own images, which is the paper's loss (it
    is a mean over images with no batch statistics besides BatchNorm, which covers the global
    batch in the online and the target network).
    """

    default_views = "byol"
    principle = "self-distillation"

    def __init__(self, backbone: Backbone, hidden_dim: int = 4096, out_dim: int = 256, momentum: float = 0.99,
                 momentum_schedule: str = "cosine", use_predictor: bool = True):
        super().__init__(backbone)
        check_momentum(momentum, momentum_schedule, "BYOL uses 0.99-0.996")
        positive_int("out_dim", out_dim)
        boolean("use_predictor", use_predictor)
        self.projector = ProjectionHead(backbone.feature_dim, hidden_dim, out_dim)
        self.predictor = ProjectionHead(out_dim, hidden_dim, out_dim) if use_predictor else nn.Identity()
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.momentum = float(momentum)
        self.momentum_schedule = momentum_schedule

    def training_step(self, views: list[torch.Tensor]) -> StepOutput:
        """views: two (B, 3, H, W) augmentations of the same B images, in the same order."""
        check_views(views, 2, "BYOL", self.default_views)
        both = torch.cat(views)
        # One forward pass for both views: BatchNorm sees the 2B images, as the official
        # implementation's batched views.
        predictions = self.predictor(self.project(both)).chunk(2)
        with torch.no_grad():
            targets = self.target_projector(self.target_backbone(both)).chunk(2)
        # Symmetric: each view's prediction regresses the other view's target (the paper's L + L̃).
        loss = byol_loss(predictions[0], targets[1]) + byol_loss(predictions[1], targets[0])
        top1 = (view_agreement_top1(predictions[0], targets[1]) + view_agreement_top1(predictions[1], targets[0])) / 2
        return StepOutput(loss, {"positive_pair_top1": top1})

    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        """The target's EMA update with this step's τ (BYOL section 3.1, ξ ← τξ + (1 − τ)θ)."""
        tau = MOMENTUM_SCHEDULES[self.momentum_schedule](step, total_steps, self.momentum)
        momentum_update(self.backbone, self.target_backbone, tau)
        momentum_update(self.projector, self.target_projector, tau)
