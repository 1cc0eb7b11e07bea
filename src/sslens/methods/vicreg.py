"""VICReg (Bardes, Ponce & LeCun 2022, https://arxiv.org/abs/2105.04906).

"VICReg ... explicitly avoids the collapse problem with two regularizations terms applied to
both embeddings separately: (1) a term that maintains the variance of each embedding dimension
above a threshold, (2) a term that decorrelates each pair of variables", beside the invariance
term: :func:`sslens.methods.losses.vicreg_loss` on the expander outputs of two views.

>>> from sslens.models import create_backbone
>>> method = VICReg(create_backbone("resnet-tiny"), hidden_dim=64, out_dim=64)
>>> views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
>>> sorted(method.training_step(views).metrics)
['covariance', 'invariance', 'positive_pair_top1', 'variance']
"""

from __future__ import annotations

import torch

from sslens.checks import positive_int, positive_number
from sslens.distributed import gather_with_grad, world
from sslens.methods.base import METHODS, SSLMethod, StepOutput, check_views
from sslens.methods.losses import vicreg_terms, view_agreement_top1
from sslens.models.base import Backbone
from sslens.models.heads import ProjectionHead


@METHODS.register("vicreg")
class VICReg(SSLMethod):
    """VICReg: two views, a 3-layer expander with BatchNorm, invariance + variance + covariance.

    Args:
        backbone: the encoder (its pooled output is the representation).
        hidden_dim, out_dim: the expander's widths. The paper's is 8192-8192-8192; the default
            2048 is sized for the CIFAR-scale backbones here (solo-learn's CIFAR config too).
        num_layers: Linear layers in the expander, 3 as in the paper.
        invariance_weight, variance_weight, covariance_weight: λ = 25, μ = 25, ν = 1, the
            paper's (section 4.1).

    Departures from the paper: the views are sslens's ``simclr`` recipe. Under torchrun the
    variance and covariance cover the global batch (all expander outputs gathered with their
    gradients, as the official ``FullGatherLayer``); the invariance term is per process, whose
    mean over the ranks is the global batch's.
    """

    default_views = "simclr"
    principle = "redundancy reduction"

    def __init__(self, backbone: Backbone, hidden_dim: int = 2048, out_dim: int = 2048, num_layers: int = 3,
                 invariance_weight: float = 25.0, variance_weight: float = 25.0, covariance_weight: float = 1.0):
        super().__init__(backbone)
        positive_int("num_layers", num_layers, "3 is the paper's")
        for name, value in (("invariance_weight", invariance_weight), ("variance_weight", variance_weight),
                            ("covariance_weight", covariance_weight)):
            positive_number(name, value, "the paper's are 25, 25 and 1")
        self.projector = ProjectionHead(backbone.feature_dim, hidden_dim, out_dim, num_layers=num_layers)
        self.weights = {"invariance": float(invariance_weight), "variance": float(variance_weight),
                        "covariance": float(covariance_weight)}

    def training_step(self, views: list[torch.Tensor]) -> StepOutput:
        """views: two (B, 3, H, W) augmentations of the same B images, in the same order."""
        check_views(views, 2, "VICReg", self.default_views)
        z1, z2 = self.project(torch.cat(views)).chunk(2)
        gather = gather_with_grad if world().distributed else None
        terms = vicreg_terms(z1, z2, gather=gather)
        loss = sum(self.weights[name] * value for name, value in terms.items())
        metrics = {name: value.detach() for name, value in terms.items()}
        return StepOutput(loss, {"positive_pair_top1": view_agreement_top1(z1, z2), **metrics})
