"""DINO (Caron et al. 2021, https://arxiv.org/abs/2104.14294).

"We train a student network g_θs to match the output of a given teacher network g_θt": both map
a view to K logits, turned into distributions by a softmax with temperatures τs and τt (eq. 1),
and the student minimises the cross-entropy "Σ_{x ∈ {x1g, x2g}} Σ_{x' ∈ V, x' ≠ x}
H(P_t(x), P_s(x'))" (eq. 3): "all crops are passed through the student while only the global
views are passed through the teacher". The teacher is an exponential moving average of the
student, "θt ← λθt + (1 − λ)θs, with λ following a cosine schedule from 0.996 to 1". Collapse is
avoided by "centering and sharpening of the momentum teacher outputs": a running mean c of the
teacher's logits is subtracted before its softmax (eq. 4), and τt is low.

The pure functions here are the loss (:func:`dino_loss`), the teacher's centred and sharpened
targets (:func:`teacher_probabilities`), the centre's update (:func:`updated_center`) and the
teacher-temperature warm-up (:func:`teacher_temperature`); :class:`DINO` is the method.

Metrics, label-free (the paper's section 5.3 decomposes the loss "into an entropy h and the KL
divergence D_KL: H(P_t, P_s) = h(P_t) + D_KL(P_t | P_s)"): ``teacher_entropy`` is h(P_t) / log K
(1 = uniform teacher outputs, 0 = one-hot), ``teacher_student_kl`` the KL in nats ("a KL equal
to zero indicates a constant output, and hence a collapse"). ``teacher_mutual_information`` is
the mutual information between an image and the teacher's output dimension over the batch,
h(mean P_t) − mean h(P_t), over log K: 0 when the teacher's output does not depend on the image,
whether it collapsed to uniform outputs or onto one dimension, which the training health check
reports (a teacher-student KL near 0 can also mean crops that agree perfectly on distinct
one-hot outputs). ``positive_pair_top1`` is how often a global crop's student bottleneck is
closest to its own other global crop's (as for Barlow Twins).

>>> from sslens.models import create_backbone
>>> method = DINO(create_backbone("resnet-tiny"), hidden_dim=64, bottleneck_dim=32, out_dim=128)
>>> views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16), torch.randn(8, 3, 8, 8)]
>>> sorted(method.training_step(views).metrics)
['positive_pair_top1', 'teacher_entropy', 'teacher_mutual_information', 'teacher_student_kl']
>>> bottleneck = method.encoder("projection")(views[0])  # (B, bottleneck_dim), unit norm
>>> tuple(bottleneck.shape), torch.allclose(bottleneck.norm(dim=1), torch.ones(8))
((8, 32), True)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sslens.checks import boolean, fraction, non_negative_int, positive_int, positive_number
from sslens.distributed import all_reduce_sum
from sslens.methods.base import METHODS, SSLMethod, StepOutput, per_resolution
from sslens.methods.losses import (
    MOMENTUM_SCHEDULES,
    check_momentum,
    momentum_update,
    view_agreement_top1,
)
from sslens.models.base import Backbone
from sslens.models.heads import ProjectionHead

#: The teacher sees the first this many views: DINO's two global crops.
NUM_GLOBAL = 2


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def teacher_probabilities(
    teacher_logits: Sequence[torch.Tensor], center: torch.Tensor, temperature: float | torch.Tensor
) -> list[torch.Tensor]:
    """The teacher's targets ``P_t = softmax((g_t − c) / τt)``: centred (eq. 4) and sharpened.

    Args:
        teacher_logits: G tensors (B, K), the teacher's logits of the global crops.
        center: (K,) or (1, K), the running mean c of the teacher's logits (zeros = no centring).
        temperature: τt, a float or a 0-d tensor (e.g. :func:`teacher_temperature`).

    Returns:
        G tensors (B, K) in float32 (or float64 for float64 logits), each row summing to 1, with no
        gradient: the teacher is a target.
    """
    probs = []
    for logits in teacher_logits:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        probs.append(F.softmax((logits.detach().to(dtype) - center.to(dtype)) / temperature, dim=-1))
    return probs


def dino_loss(
    student_logits_per_view: Sequence[torch.Tensor],
    teacher_probs_per_global_view: Sequence[torch.Tensor],
    student_temperature: float = 0.1,
) -> torch.Tensor:
    """DINO's multi-crop cross-entropy (eq. 3), a scalar.

    ``H(P_t(x_i), P_s(x_j)) = −Σ_k P_t(x_i)^(k) log P_s(x_j)^(k)`` with
    ``P_s = softmax(g_s / τs)``, averaged over the batch and then over every pair (teacher view i,
    student view j) with i ≠ j, as the official ``DINOLoss`` (and lightly's) does.

    Args:
        student_logits_per_view: V tensors (B, K), the student's logits of every view, the global
            crops first (student view i and teacher view i are the same crop).
        teacher_probs_per_global_view: G ≤ V tensors (B, K), the teacher's targets of the global
            crops (:func:`teacher_probabilities`); no gradient flows into them.
        student_temperature: τs, 0.1 in the paper.
    """
    positive_number("student_temperature", student_temperature, "the paper's is 0.1")
    views, targets = len(student_logits_per_view), len(teacher_probs_per_global_view)
    if not 1 <= targets <= views or views < 2:
        raise ValueError(
            f"dino_loss needs >= 2 student views and 1..{views} teacher views (the global crops, "
            f"first among the student's); got {views} student and {targets} teacher views"
        )
    shapes = {tuple(t.shape) for t in (*student_logits_per_view, *teacher_probs_per_global_view)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"dino_loss needs (B, K) tensors of one shape for every view; got shapes {sorted(shapes)}")
    log_probs = [
        F.log_softmax(s.to(torch.promote_types(s.dtype, torch.float32)) / student_temperature, dim=-1)
        for s in student_logits_per_view
    ]
    total, terms = log_probs[0].new_zeros(()), 0
    for i, target in enumerate(teacher_probs_per_global_view):
        for j, log_p in enumerate(log_probs):
            if j != i:
                total = total - (target.detach() * log_p).sum(dim=-1).mean()
                terms += 1
    return total / terms


@torch.no_grad()
def updated_center(
    center: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    momentum: float = 0.9,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> torch.Tensor:
    """The centre after one step (eq. 4): ``c ← m c + (1 − m) (1/B) Σ_i g_θt(x_i)``.

    The batch mean is over every global crop of every image (the official code's
    ``torch.sum(teacher_output, dim=0) / len(teacher_output)`` over the two crops' logits). A new
    tensor of ``center``'s shape and dtype is returned; ``center`` is left alone.

    Args:
        center: (K,) or (1, K), the current centre.
        teacher_logits: G tensors (B, K), the teacher's logits of the global crops (uncentred).
        momentum: m, 0.9 in the paper.
        all_reduce: sums a tensor over all processes (e.g.
            :func:`sslens.distributed.all_reduce_sum`), so B is the global batch under torchrun.
    """
    fraction("center momentum", momentum, "the paper's is 0.9")
    logits = torch.cat([t.detach() for t in teacher_logits]).to(torch.promote_types(center.dtype, torch.float32))
    # One collective for the sum and the count: the row count rides in the last entry.
    total = all_reduce(torch.cat([logits.sum(dim=0), logits.new_tensor([len(logits)])]))
    batch_center = total[:-1] / total[-1]
    return (center * momentum + batch_center.view_as(center) * (1 - momentum)).to(center.dtype)


def teacher_temperature(
    step: int | torch.Tensor, warmup_steps: int, start: float = 0.04, end: float = 0.07
) -> torch.Tensor:
    """τt at training step ``step`` (0-based): linear from ``start`` at step 0 to ``end`` at
    ``warmup_steps``, then constant (the paper: "a linear warm-up for τt from 0.04 to 0.07 during
    the first 30 epochs"). A 0-d float32 tensor on ``step``'s device, computed without reading a
    device tensor back to the host.

    >>> [round(float(teacher_temperature(s, 10)), 4) for s in (0, 5, 10, 20)]
    [0.04, 0.055, 0.07, 0.07]
    """
    step = torch.as_tensor(step, dtype=torch.float32)
    if warmup_steps == 0:
        return torch.full_like(step, end)
    progress = (step / warmup_steps).clamp(0.0, 1.0)
    return start + (end - start) * progress


class DINOHead(nn.Module):
    """DINO's projector up to its bottleneck: (B, in_dim) → (B, bottleneck_dim), unit norm.

    "The projection head consists of a 3-layer multi-layer perceptron (MLP) with hidden
    dimension 2048 followed by ℓ2 normalization": Linear-GELU-Linear-GELU-Linear, with
    BatchNorm after the hidden Linear layers if ``batch_norm`` (the official code's
    ``use_bn_in_head``, off by default; a Linear before BatchNorm has no bias). Weights start
    from a truncated normal of std 0.02 and biases from 0, as the official code. The paper's
    "weight normalized fully connected layer with K dimensions" that follows is
    :class:`WeightNormalizedLinear`.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, num_layers: int = 3,
                 batch_norm: bool = False):
        super().__init__()
        positive_int("num_layers", num_layers, "3 is the paper's")
        self.mlp = ProjectionHead(in_dim, hidden_dim, bottleneck_dim, num_layers, batch_norm, activation="gelu")
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) → (B, bottleneck_dim), each row of unit length."""
        return F.normalize(self.mlp(x), dim=-1)


class WeightNormalizedLinear(nn.Module):
    """A weight-normalised linear map without bias (Salimans & Kingma 2016,
    https://arxiv.org/abs/1602.07868): (B, in_dim) → (B, out_dim), ``y = g ⊙ (V / ‖V‖) x``.

    Each row of ``weight`` (V, (out_dim, in_dim)) is normalised to unit length. With
    ``norm_last_layer`` (the official default) the norm g is fixed at 1, so the outputs of a unit
    input are cosines in [−1, 1]; otherwise g ((out_dim, 1), starting at 1) is learnt. The
    official code uses ``nn.utils.weight_norm``; writing it out keeps the module deep-copyable
    and its state in two plain tensors.
    """

    def __init__(self, in_dim: int, out_dim: int, norm_last_layer: bool = True):
        super().__init__()
        positive_int("out_dim", out_dim)
        # nn.Linear's own initialisation, as the official last layer's.
        self.weight = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach())
        self.norm = None if boolean("norm_last_layer", norm_last_layer) else nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.normalize(self.weight, dim=1)
        return F.linear(x, weight if self.norm is None else self.norm * weight)


@METHODS.register("dino")
class DINO(SSLMethod):
    """DINO: a student and its EMA teacher, multi-crop, the teacher's outputs centred and sharpened.

    Args:
        backbone: the student's backbone (a ResNet, or a timm ViT); the teacher's is a deep copy.
        hidden_dim, bottleneck_dim, num_layers: the head's MLP, 2048 → 256 in 3 layers as in the
            paper.
        out_dim: K, the last layer's width. 4096, solo-learn's CIFAR value (the paper: 65536 on
            ImageNet).
        batch_norm: BatchNorm in the head's MLP (the official ``use_bn_in_head``, False).
        norm_last_layer: fix the last layer's weight norm at 1 (the official default); False learns
            it (the official help: "Not normalizing leads to better performance but can make the
            training unstable").
        student_temperature: τs, 0.1 as in the paper.
        teacher_temperature, warmup_teacher_temperature, warmup_teacher_temperature_steps: τt rises
            linearly from ``warmup_teacher_temperature`` (0.04) to ``teacher_temperature`` (0.07)
            over this many steps (:func:`teacher_temperature`). The paper warms up over 30 epochs;
            the default 5850 steps is 30 CIFAR-10 epochs at batch 256.
        momentum: λ's starting value, 0.996 as in the paper.
        momentum_schedule: "cosine" (the paper: λ rises from ``momentum`` to 1 over training) or
            "constant".
        centering: subtract the running centre from the teacher's logits (True, the paper). False
            is the paper's ablation (Fig. 7: sharpening alone collapses onto one dimension), for
            experiments and for testing that the training health check sees the collapse.
        center_momentum: m of eq. (4), 0.9 as in the paper.
        freeze_last_layer_steps: the last layer gets no update during this many first optimiser
            steps. The official code freezes it for the first epoch (``freeze_last_layer=1``); the
            default 195 is one CIFAR-10 epoch at batch 256.
        clip_grad: the official per-parameter gradient clipping: each student parameter's gradient
            is scaled down to at most this norm before the optimiser steps (3.0, the official
            default); 0 turns it off.

    Views (the ``swav`` recipe's multi-crop): the first two are the global crops, which both the
    student and the teacher see; any further (smaller) views are local crops, seen by the student
    only. Consecutive crops of one size share one forward pass, as the official ``MultiCropWrapper``
    (BatchNorm statistics per resolution). A timm ViT takes local crops of another size only when
    built with ``dynamic_img_size=True`` (timm then interpolates the position embedding, as the
    official code does) and a crop side that is a multiple of its patch size, e.g.
    ``backbone_options: {..., img_size: 32, patch_size: 8, dynamic_img_size: true}`` with
    ``views_options: {local_size: 16}``; otherwise a ValueError says so.

    ``encoder("projection")`` is the student's unit-norm bottleneck (B, bottleneck_dim), the head
    before its last layer: the space where SwAV's projections live too (DINO's last layer plays
    the role of SwAV's prototypes), so the health monitor and the explainers compare like with
    like; the K logits are ``method.last_layer(method.project(x))``.

    Buffers (all in ``state_dict()``, so a resumed run continues exactly): ``center`` (1, K),
    ``num_steps`` training steps seen (it sets the teacher temperature).

    Departures from the paper: the EMA is :func:`sslens.methods.losses.momentum_update`, which
    also copies the student's BatchNorm running statistics into the teacher (the official code
    averages parameters only; running statistics are never used in training, where both networks
    normalise with batch statistics). The teacher temperature warms up per step, not per epoch.
    The views are the packaged ``swav`` recipe (the paper's DINO crops add solarisation and an
    asymmetric blur). The optimiser and its schedules are the run's (the official code uses
    AdamW with a weight decay rising from 0.04 to 0.4). Under torchrun the centre is the mean over the global batch (its sum is
    all-reduced, as the official ``update_center``); the loss is per image, so the mean of the
    ranks' losses is the global batch's.
    """

    default_views = "swav"
    principle = "self-distillation"

    def __init__(
        self,
        backbone: Backbone,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        out_dim: int = 4096,
        num_layers: int = 3,
        batch_norm: bool = False,
        norm_last_layer: bool = True,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        warmup_teacher_temperature: float = 0.04,
        warmup_teacher_temperature_steps: int = 5850,
        momentum: float = 0.996,
        momentum_schedule: str = "cosine",
        centering: bool = True,
        center_momentum: float = 0.9,
        freeze_last_layer_steps: int = 195,
        clip_grad: float = 3.0,
    ):
        super().__init__(backbone)
        positive_int("out_dim", out_dim, "solo-learn's CIFAR value is 4096, the paper's 65536")
        for name, value in (("student_temperature", student_temperature),
                            ("teacher_temperature", teacher_temperature),
                            ("warmup_teacher_temperature", warmup_teacher_temperature)):
            positive_number(name, value, "the paper's are 0.1 for the student, 0.04 → 0.07 for the teacher")
        non_negative_int("warmup_teacher_temperature_steps", warmup_teacher_temperature_steps, "0 = no warm-up")
        non_negative_int("freeze_last_layer_steps", freeze_last_layer_steps, "0 = never frozen")
        check_momentum(momentum, momentum_schedule, "the paper's is 0.996")
        fraction("center_momentum", center_momentum, "the paper's is 0.9")
        boolean("centering", centering)
        boolean("batch_norm", batch_norm)
        if not (isinstance(clip_grad, int | float) and not isinstance(clip_grad, bool) and clip_grad >= 0):
            raise ValueError(f"clip_grad must be a number >= 0 (the official default is 3.0, 0 = off); got {clip_grad!r}")
        self.projector = DINOHead(backbone.feature_dim, hidden_dim, bottleneck_dim, num_layers, batch_norm)
        self.last_layer = WeightNormalizedLinear(bottleneck_dim, out_dim, norm_last_layer)
        self.teacher_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.teacher_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.teacher_last_layer = copy.deepcopy(self.last_layer).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.student_temperature = float(student_temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.warmup_teacher_temperature = float(warmup_teacher_temperature)
        self.warmup_teacher_temperature_steps = warmup_teacher_temperature_steps
        self.momentum = float(momentum)
        self.momentum_schedule = momentum_schedule
        self.centering = centering
        self.center_momentum = float(center_momentum)
        self.freeze_last_layer_steps = freeze_last_layer_steps
        self.clip_grad = float(clip_grad)
        self._checked_sizes: set[tuple[int, int]] = set()

    def _check_views(self, views: list[torch.Tensor]) -> None:
        if len(views) < NUM_GLOBAL:
            raise ValueError(
                f"DINO needs {NUM_GLOBAL} global crops (and optionally local crops); got {len(views)} "
                f"view(s). Use the {self.default_views!r} view recipe."
            )
        for view in views:
            if not torch.is_tensor(view) or view.ndim != 4 or view.shape[1] != 3:
                shape = tuple(view.shape) if torch.is_tensor(view) else type(view).__name__
                raise ValueError(f"DINO views must be (B, 3, H, W) tensors; got {shape}")
        if len({len(v) for v in views}) != 1:
            raise ValueError(f"DINO views must share one batch size; got {[len(v) for v in views]}")
        if len({v.shape for v in views[:NUM_GLOBAL]}) != 1:
            raise ValueError(
                f"DINO's {NUM_GLOBAL} global crops must share one shape; got "
                f"{[tuple(v.shape) for v in views[:NUM_GLOBAL]]}"
            )
        for size in {tuple(v.shape[-2:]) for v in views} - self._checked_sizes:
            _check_input_size(self.backbone, size)
            self._checked_sizes.add(size)

    @staticmethod
    def _logits(views: Sequence[torch.Tensor], backbone: nn.Module, projector: nn.Module,
                last_layer: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(bottlenecks, logits) per view, (B, bottleneck_dim) and (B, K); consecutive same-size
        crops share a forward pass."""
        bottlenecks = per_resolution(views, lambda x: projector(backbone(x)))
        # One pass through the (wide) last layer for every view.
        logits = last_layer(torch.cat(bottlenecks)).chunk(len(bottlenecks))
        return bottlenecks, list(logits)

    def current_teacher_temperature(self) -> torch.Tensor:
        """τt at the current step (``num_steps``), a 0-d tensor on the buffers' device."""
        return teacher_temperature(
            self.num_steps, self.warmup_teacher_temperature_steps, self.warmup_teacher_temperature,
            self.teacher_temperature,
        ).to(self.center.device)

    def training_step(self, views: list[torch.Tensor]) -> StepOutput:
        """views: two (B, 3, H, W) global crops, then any (B, 3, h, w) local crops."""
        self._check_views(views)
        bottlenecks, student = self._logits(views, self.backbone, self.projector, self.last_layer)
        with torch.no_grad():
            _, teacher = self._logits(
                views[:NUM_GLOBAL], self.teacher_backbone, self.teacher_projector, self.teacher_last_layer
            )
        targets = teacher_probabilities(teacher, self.center, self.current_teacher_temperature())
        loss = dino_loss(student, targets, self.student_temperature)
        metrics = self._metrics(loss, targets, bottlenecks)
        if self.training:
            # After the loss: this step's targets were centred with the previous centre.
            if self.centering:
                self.center.copy_(updated_center(self.center, teacher, self.center_momentum, all_reduce_sum))
            self.num_steps += 1
        return StepOutput(loss, metrics)

    @torch.no_grad()
    def _metrics(self, loss: torch.Tensor, targets: list[torch.Tensor],
                 bottlenecks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        # Every teacher view is the target of as many pairs (all student views but its own), so
        # the loss's mean entropy is the plain mean over the teacher views.
        entropy = torch.stack([-torch.xlogy(p, p).sum(dim=-1).mean() for p in targets]).mean()
        mean = torch.cat(targets).mean(dim=0)
        information = -torch.xlogy(mean, mean).sum() - entropy
        scale = math.log(max(targets[0].shape[-1], 2))
        return {
            "teacher_entropy": entropy / scale,
            "teacher_mutual_information": information / scale,
            "teacher_student_kl": loss.detach().float() - entropy,
            "positive_pair_top1": view_agreement_top1(bottlenecks[0], bottlenecks[1]),
        }

    def on_before_optimizer_step(self, step: int) -> None:
        """The official order: clip each student gradient, then drop the last layer's during
        the first ``freeze_last_layer_steps`` steps."""
        if self.clip_grad > 0:
            for parameter in self.parameters():
                if parameter.grad is not None:
                    # A device-side factor min(1, clip / (‖g‖ + 1e-6)): no host sync per parameter.
                    scale = (self.clip_grad / (parameter.grad.norm() + 1e-6)).clamp(max=1.0)
                    parameter.grad.mul_(scale)
        if step < self.freeze_last_layer_steps:
            for parameter in self.last_layer.parameters():
                parameter.grad = None

    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        """The teacher's EMA update with this step's λ from ``momentum_schedule``."""
        m = MOMENTUM_SCHEDULES[self.momentum_schedule](step, total_steps, self.momentum)
        momentum_update(self.backbone, self.teacher_backbone, m)
        momentum_update(self.projector, self.teacher_projector, m)
        momentum_update(self.last_layer, self.teacher_last_layer, m)


def _check_input_size(backbone: nn.Module, size: tuple[int, int]) -> None:
    """Raise a ValueError when a timm ViT backbone cannot take (h, w) = ``size`` inputs.

    A ViT built for one image size rejects others with a bare assertion deep inside timm; DINO's
    local crops are smaller than its global crops, so say here what to change.
    """
    patch_embed = getattr(getattr(backbone, "model", None), "patch_embed", None)
    if patch_embed is None or not hasattr(patch_embed, "patch_size"):
        return
    patch = tuple(patch_embed.patch_size)
    fixed = tuple(patch_embed.img_size) if patch_embed.img_size is not None else None
    if getattr(patch_embed, "strict_img_size", False) and not getattr(patch_embed, "dynamic_img_size", False):
        if fixed is not None and size != fixed:
            raise ValueError(
                f"This ViT takes only {fixed[0]}x{fixed[1]} px inputs, but DINO got {size[0]}x{size[1]} px crops "
                f"(local crops). Build the backbone with backbone_options dynamic_img_size: true and use a "
                f"local_size that is a multiple of the patch size {patch[0]} (e.g. views_options "
                f"local_size: {2 * patch[0]}), or set views_options num_local: 0."
            )
    elif not getattr(patch_embed, "dynamic_img_pad", False) and (size[0] % patch[0] or size[1] % patch[1]):
        raise ValueError(
            f"DINO got {size[0]}x{size[1]} px crops, which this ViT's {patch[0]}x{patch[1]} px patches do not "
            f"tile; use a views_options local_size that is a multiple of {patch[0]} (e.g. {2 * patch[0]})."
        )
