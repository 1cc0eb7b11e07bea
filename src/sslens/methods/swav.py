"""SwAV (Caron et al. 2020, https://arxiv.org/abs/2006.09882).

"We compute a code from an augmented version of the image and predict this code from other
augmented versions of the same image": projections z are scored against learnable prototypes
C, codes q come from the Sinkhorn-Knopp algorithm on the global crops
(:func:`sslens.methods.losses.sinkhorn`), and every other view predicts them
(:func:`sslens.methods.losses.swav_loss`). Multi-crop: the views are ``num_global`` global crops
followed by any number of smaller local crops.

SwAV has no positive pairs among candidates, so it reports no ``positive_pair_top1``; its metric
``prototype_usage`` is the entropy of the hard prototype assignments of the global crops divided
by log K (1 = every prototype used equally often, 0 = collapse onto one prototype).

>>> from sslens.models import create_backbone
>>> method = SwAV(create_backbone("resnet-tiny"), num_prototypes=16)
>>> views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16), torch.randn(8, 3, 8, 8)]
>>> sorted(method.training_step(views).metrics)
['prototype_usage']
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sslens.checks import non_negative_int, positive_int, positive_number
from sslens.distributed import all_reduce_max, all_reduce_sum
from sslens.methods.base import METHODS, SSLMethod, StepOutput, per_resolution
from sslens.methods.losses import sinkhorn, swav_loss
from sslens.models.base import Backbone
from sslens.models.heads import ProjectionHead


@METHODS.register("swav")
class SwAV(SSLMethod):
    """SwAV with multi-crop, Sinkhorn codes, prototype freezing and an optional feature queue.

    Args:
        backbone: the encoder.
        hidden_dim: head hidden width; None = ``backbone.feature_dim`` (the paper: 2048).
        out_dim: projection dimension, 128 as in the paper.
        num_prototypes: K. 512 for CIFAR-scale data (lightly's CIFAR-10 benchmark); the paper
            uses 3000 for ImageNet ("the number of prototypes ... order of magnitude more than
            the number of classes").
        temperature: τ = 0.1, as in the paper.
        sinkhorn_iterations: 3, as in the paper.
        epsilon: ε = 0.05, the official default.
        freeze_prototypes_steps: the prototypes get no update during this many first optimiser
            steps. The paper freezes them "during the first epoch of training"; the official
            default is 313 iterations (one ImageNet epoch at batch 4096). Default 313 too, which
            is about 1.6 CIFAR-10 epochs at batch 256.
        queue_length: 0 = no queue. Otherwise the global crops' projections of earlier batches
            (``queue_length`` per global crop) are scored together with the batch when
            computing codes, so Sinkhorn's equipartition holds over more samples than a small
            batch ("we store features from the previous batches"); they get no loss.
        queue_start_step: the queue is used from this step on, and only once it is full; it is
            filled from the start. (The official code creates the queue at
            ``epoch_queue_starts`` and uses it once full; the queue contents are equally recent
            either way.)
        num_global: number of global crops at the front of ``views``; codes are computed for them.

    Buffers: ``queue`` (num_global, queue_length, out_dim), newest first; ``queue_count``
    entries filled; ``num_steps`` training steps seen.

    Under torchrun, Sinkhorn normalises over the global batch (its sums and its stabilising
    maximum are all-reduced, as the official ``distributed_sinkhorn``), and each rank keeps its
    own queue of its own batches, as the official code does.
    """

    default_views = "swav"
    principle = "clustering"

    def __init__(
        self,
        backbone: Backbone,
        hidden_dim: int | None = None,
        out_dim: int = 128,
        num_prototypes: int = 512,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        epsilon: float = 0.05,
        freeze_prototypes_steps: int = 313,
        queue_length: int = 0,
        queue_start_step: int = 0,
        num_global: int = 2,
    ):
        super().__init__(backbone)
        positive_int("out_dim", out_dim)
        positive_int("num_prototypes", num_prototypes)
        positive_number("temperature", temperature)
        positive_int("sinkhorn_iterations", sinkhorn_iterations)
        positive_number("epsilon", epsilon)
        positive_int("num_global", num_global)
        for name, value in (
            ("freeze_prototypes_steps", freeze_prototypes_steps),
            ("queue_length", queue_length),
            ("queue_start_step", queue_start_step),
        ):
            non_negative_int(name, value)
        self.projector = ProjectionHead(
            backbone.feature_dim, hidden_dim or backbone.feature_dim, out_dim
        )
        self.prototypes = nn.Linear(out_dim, num_prototypes, bias=False)
        self.register_buffer("queue", torch.zeros(num_global, queue_length, out_dim))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.temperature = float(temperature)
        self.sinkhorn_iterations = sinkhorn_iterations
        self.epsilon = float(epsilon)
        self.freeze_prototypes_steps = freeze_prototypes_steps
        self.queue_start_step = queue_start_step
        self.num_global = num_global

    def _check_views(self, views: list[torch.Tensor]) -> None:
        if len(views) < max(2, self.num_global):
            raise ValueError(
                f"SwAV needs {self.num_global} global crops (and optionally local crops) with at "
                f"least 2 views in all; got {len(views)}. Use the {self.default_views!r} view recipe."
            )
        for view in views:
            if not torch.is_tensor(view) or view.ndim != 4 or view.shape[1] != 3:
                shape = tuple(view.shape) if torch.is_tensor(view) else type(view).__name__
                raise ValueError(f"SwAV views must be (B, 3, H, W) tensors; got {shape}")
        if len({len(v) for v in views}) != 1:
            raise ValueError(f"SwAV views must share one batch size; got {[len(v) for v in views]}")
        if len({v.shape for v in views[: self.num_global]}) != 1:
            raise ValueError(
                f"SwAV's {self.num_global} global crops must share one shape; got "
                f"{[tuple(v.shape) for v in views[: self.num_global]]}"
            )

    def _project_views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Unit-norm projections (B, out_dim) per view; consecutive same-size crops share a forward
        pass, as the official multi-crop code does (one BatchNorm batch per resolution)."""
        return [F.normalize(z, dim=1) for z in per_resolution(views, self.project)]

    @torch.no_grad()
    def _codes(
        self, projections: list[torch.Tensor], scores: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """(B, K) codes for each global crop, with the queued projections as extra samples."""
        batch = len(scores[0])
        use_queue = (
            self.queue.shape[1] > 0
            and int(self.num_steps) >= self.queue_start_step
            and int(self.queue_count) >= self.queue.shape[1]
        )
        codes = []
        for i in range(self.num_global):
            crop_scores = scores[i].detach()
            if use_queue:
                crop_scores = torch.cat([self.prototypes(self.queue[i]), crop_scores])
            # Equipartition over the global batch: every batch sum is summed over the ranks.
            q = sinkhorn(
                crop_scores, self.epsilon, self.sinkhorn_iterations,
                all_reduce=all_reduce_sum, all_reduce_max=all_reduce_max,
            )
            codes.append(q[-batch:])
        if self.training and self.queue.shape[1] > 0:
            self.push_queue(torch.stack(projections[: self.num_global]).detach())
        return codes

    @torch.no_grad()
    def push_queue(self, projections: torch.Tensor) -> None:
        """Add (num_global, B, out_dim) projections at the front of the queue, dropping the oldest."""
        length = self.queue.shape[1]
        batch = projections.shape[1]
        if batch > length:
            raise ValueError(
                f"SwAV queue_length={length} is smaller than the batch ({batch}); use a "
                "queue_length that is a multiple of the batch size, e.g. 15 batches."
            )
        self.queue[:, batch:] = self.queue[:, :-batch].clone()
        self.queue[:, :batch] = projections.to(self.queue.dtype)
        self.queue_count.fill_(min(int(self.queue_count) + batch, length))

    def training_step(self, views: list[torch.Tensor]) -> StepOutput:
        """views: ``num_global`` (B, 3, H, W) global crops, then any (B, 3, h, w) local crops."""
        self._check_views(views)
        with torch.no_grad():
            # The official code keeps the prototypes on the unit sphere by normalising them
            # before every step, so scores are cosine similarities.
            weight = self.prototypes.weight
            weight.copy_(F.normalize(weight, dim=1))
        projections = self._project_views(views)
        scores = [self.prototypes(z) for z in projections]
        codes = self._codes(projections, scores)
        loss = swav_loss(scores, codes, self.temperature)
        if self.training:
            self.num_steps += 1
        return StepOutput(loss, {"prototype_usage": self._prototype_usage(scores)})

    @torch.no_grad()
    def _prototype_usage(self, scores: list[torch.Tensor]) -> torch.Tensor:
        """Entropy of the global crops' argmax prototypes, divided by log K (in [0, 1])."""
        assigned = torch.cat([s.argmax(dim=1) for s in scores[: self.num_global]])
        num_prototypes = self.prototypes.out_features
        counts = torch.bincount(assigned, minlength=num_prototypes).float()
        p = counts / counts.sum()
        # xlogy (0·log 0 = 0) rather than boolean indexing, which would read the count back to
        # the host: two CPU-GPU syncs per step.
        entropy = -torch.xlogy(p, p).sum()
        return entropy / math.log(num_prototypes) if num_prototypes > 1 else entropy

    def on_before_optimizer_step(self, step: int) -> None:
        """Drop the prototypes' gradient during the first ``freeze_prototypes_steps`` steps."""
        if step < self.freeze_prototypes_steps:
            self.prototypes.weight.grad = None
