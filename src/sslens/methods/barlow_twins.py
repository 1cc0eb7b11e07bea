"""Barlow Twins (Zbontar et al. 2021, https://arxiv.org/abs/2103.03230).

"The objective function measures the cross-correlation matrix between the embeddings of two
identical networks fed with distorted versions of a batch of samples, and tries to make this
matrix close to the identity": :func:`sslens.methods.losses.barlow_twins_loss` on the projector
outputs of two views, no negatives, no momentum encoder, no predictor.

>>> from sslens.models import create_backbone
>>> method = BarlowTwins(create_backbone("resnet-tiny"), hidden_dim=64, out_dim=64)
>>> views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
>>> sorted(method.training_step(views).metrics)
['positive_pair_top1']
"""

from __future__ import annotations

import torch

from sslens.checks import positive_int, positive_number
from sslens.distributed import gather_with_grad, world
from sslens.methods.base import METHODS, SSLMethod, StepOutput, check_views
from sslens.methods.losses import barlow_twins_loss, view_agreement_top1
from sslens.models.base import Backbone
from sslens.models.heads import ProjectionHead


@METHODS.register("barlow_twins")
class BarlowTwins(SSLMethod):
    """Barlow Twins: two views, a 3-layer projector with BatchNorm, the cross-correlation loss.

    Args:
        backbone: the encoder (its pooled output is the representation).
        hidden_dim, out_dim: the projector's widths. The paper's ImageNet projector is
            8192-8192-8192; the default 2048 is sized for the CIFAR-scale backbones here
            (solo-learn's CIFAR config also uses 2048).
        num_layers: Linear layers in the projector, 3 as in the paper.
        lambd: λ, the off-diagonal weight, 5e-3 as in the paper.

    Departures from the paper: the views are sslens's ``simclr`` recipe rather than BYOL's
    asymmetric one. Under torchrun the cross-correlation covers the global batch: every rank
    gathers all projections with their gradients (:func:`sslens.distributed.gather_with_grad`)
    and standardises them together, which is the official code's synchronised BatchNorm
    followed by an all-reduce of C.
    """

    default_views = "simclr"
    principle = "redundancy reduction"

    def __init__(self, backbone: Backbone, hidden_dim: int = 2048, out_dim: int = 2048, num_layers: int = 3,
                 lambd: float = 5e-3):
        super().__init__(backbone)
        positive_int("num_layers", num_layers, "3 is the paper's")
        positive_number("lambd", lambd, "5e-3 is the paper's")
        self.projector = ProjectionHead(backbone.feature_dim, hidden_dim, out_dim, num_layers=num_layers)
        self.lambd = float(lambd)

    def training_step(self, views: list[torch.Tensor]) -> StepOutput:
        """views: two (B, 3, H, W) augmentations of the same B images, in the same order."""
        check_views(views, 2, "Barlow Twins", self.default_views)
        z1, z2 = self.project(torch.cat(views)).chunk(2)
        if world().distributed:
            z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        loss = barlow_twins_loss(z1, z2, self.lambd)
        return StepOutput(loss, {"positive_pair_top1": view_agreement_top1(z1, z2)})
