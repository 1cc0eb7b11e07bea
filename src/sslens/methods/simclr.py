"""SimCLR (Chen et al. 2020, https://arxiv.org/abs/2002.05709).

"SimCLR learns representations by maximizing agreement between differently augmented views of
the same data example via a contrastive loss in the latent space": backbone f, MLP head g and
the NT-Xent loss over the 2N views of a batch (:func:`sslens.methods.losses.nt_xent`).

>>> from sslens.models import create_backbone
>>> method = SimCLR(create_backbone("resnet-tiny"))
>>> views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
>>> sorted(method.training_step(views).metrics)
['positive_pair_top1']
"""

from __future__ import annotations

import torch

from sslens.checks import positive_number
from sslens.distributed import gather_with_grad, world
from sslens.methods.base import METHODS, SSLMethod, StepOutput, check_views
from sslens.methods.losses import nt_xent_logits, positive_pair_top1
from sslens.models.base import Backbone
from sslens.models.heads import ProjectionHead


@METHODS.register("simclr")
class SimCLR(SSLMethod):
    """SimCLR: two views, a 2-layer MLP head with BatchNorm, and NT-Xent.

    Args:
        backbone: the encoder f (its pooled output h is the representation).
        hidden_dim: width of the head's hidden layer; None = ``backbone.feature_dim`` (as in the
            paper, where the hidden layer has the representation's width).
        out_dim: projection dimension, 128 as in the paper.
        temperature: τ = 0.5, the paper's CIFAR-10 setting (appendix B.9, which reports 0.5 as
            best among {0.1, 0.5, 1.0} for CIFAR-10 at the batch sizes used there); the
            ImageNet runs use 0.1 with batch 4096.

    Departures from the paper: the head uses BatchNorm on its hidden layer as the official
    implementation does; BatchNorm statistics are computed over both views together (one
    forward of 2N images). Under torchrun the negatives are every rank's views
    (:func:`sslens.distributed.gather_with_grad`, gradients included) and, with the loop's
    ``sync_batchnorm``, BatchNorm covers the global batch, as the paper's "global BN".
    """

    default_views = "simclr"
    principle = "contrastive"

    def __init__(
        self,
        backbone: Backbone,
        hidden_dim: int | None = None,
        out_dim: int = 128,
        temperature: float = 0.5,
    ):
        super().__init__(backbone)
        positive_number("temperature", temperature)
        self.projector = ProjectionHead(
            backbone.feature_dim, hidden_dim or backbone.feature_dim, out_dim
        )
        self.temperature = float(temperature)

    def training_step(self, views: list[torch.Tensor]) -> StepOutput:
        """views: two (B, 3, H, W) augmentations of the same B images, in the same order."""
        check_views(views, 2, "SimCLR", self.default_views)
        z1, z2 = self.project(torch.cat(views)).chunk(2)
        # Under torchrun every rank's views are negatives for every other's, with gradients.
        current = world()
        gather = gather_with_grad if current.distributed else None
        logits, targets = nt_xent_logits(z1, z2, self.temperature, rank=current.rank, gather=gather)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        return StepOutput(loss, {"positive_pair_top1": positive_pair_top1(logits, targets)})
