"""Optimisers found by name, parameter groups, and the warm-up + cosine learning-rate schedule.

Biases and normalisation parameters (every parameter with fewer than two dimensions) get no
weight decay: decaying a BatchNorm scale or a bias towards zero only fights the normalisation
and was excluded in SimCLR's and MoCo v2's reference training. LARS also leaves them out of
its layer-wise adaptation, as in SimCLR.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from sslens.registry import lookup


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warm-up, then cosine decay.

    During warm-up the rate rises linearly, ``base_lr * (step + 1) / warmup_steps``, so the very
    first step already moves the weights; after it the rate follows half a cosine from
    ``base_lr`` (at ``step == warmup_steps``) to ``min_lr`` (at ``step == total_steps``;
    SGDR, Loshchilov & Hutter 2017, https://arxiv.org/abs/1608.03983, without restarts).

    >>> lr_at(0, 100, 10, 1.0, 0.0), lr_at(10, 100, 10, 1.0, 0.0), lr_at(100, 100, 10, 1.0, 0.0)
    (0.1, 1.0, 0.0)
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1; got {total_steps}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"step must lie in [0, total_steps={total_steps}]; got {step}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must lie in [0, total_steps={total_steps}]; got {warmup_steps}")
    if base_lr <= 0 or min_lr < 0 or min_lr > base_lr:
        raise ValueError(f"need 0 <= min_lr <= base_lr and base_lr > 0; got base_lr={base_lr}, min_lr={min_lr}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` into every parameter group (a Python float: nothing is recompiled)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups of ``module``'s trainable parameters: decayed weights, and biases/norm
    parameters (``ndim < 2``) with ``weight_decay=0`` and ``lars_adapt=False``.

    Frozen parameters (``requires_grad=False``, e.g. MoCo's momentum encoder) are left out.
    """
    decay, no_decay = [], []
    for parameter in module.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    if not decay and not no_decay:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to optimise")
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars_adapt": True},
        {"params": no_decay, "weight_decay": 0.0, "lars_adapt": False},
    ]
    return [group for group in groups if group["params"]]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg 2017,
    https://arxiv.org/abs/1708.03888).

    "We use a local LR λ^l for each layer l: Δw^l_t = γ · λ^l · ∇L(w^l_t), where γ is a global
    LR. Local LR λ^l is defined for each layer through a 'trust' coefficient η < 1:
    λ^l = η × ||w^l|| / ||∇L(w^l)||" (Eq. 6). For each parameter tensor ``w`` with gradient
    ``g`` this computes::

        u = g + weight_decay * w
        u = u * trust_coefficient * ||w|| / ||u||   (only if lars_adapt and both norms > 0)
        v = momentum * v + u
        w = w - lr * v

    Departure from Algorithm 1 of the paper, as in SimCLR's and Barlow Twins' code: the trust
    ratio uses the norm of the decayed update ``||g + βw||`` instead of ``||g|| + β||w||``,
    and the global rate multiplies the momentum buffer rather than entering it, so a changing
    schedule does not rescale past updates. Groups with ``lars_adapt=False`` (biases and norm
    parameters, see :func:`parameter_groups`) take plain SGD-with-momentum steps.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ):
        if lr <= 0:
            raise ValueError(f"LARS lr must be positive; got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS momentum must lie in [0, 1); got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS weight_decay must be non-negative; got {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"LARS trust_coefficient must be positive; got {trust_coefficient}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay,
            trust_coefficient=trust_coefficient, lars_adapt=True,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # One multi-tensor (foreach) kernel per operation for the whole group instead of a
            # handful of launches per parameter: on a GPU a ResNet-18 step would otherwise pay
            # ~300 tiny kernel launches here.
            updates = torch._foreach_add([p.grad for p in params], params, alpha=group["weight_decay"])
            if group["lars_adapt"]:
                weight_norms = torch.stack(torch._foreach_norm(params))
                update_norms = torch.stack(torch._foreach_norm(updates))
                # torch.where instead of an `if`: no CPU-GPU sync to read the norms.
                ratios = torch.where(
                    (weight_norms > 0) & (update_norms > 0),
                    group["trust_coefficient"] * weight_norms / update_norms,
                    torch.ones_like(weight_norms),
                )
                torch._foreach_mul_(updates, list(ratios.unbind()))
            buffers = []
            for parameter in params:
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(parameter)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss


def _sgd(groups: list[dict], *, lr: float, momentum: float, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused or None)


def _lars(groups: list[dict], *, lr: float, momentum: float, fused: bool) -> torch.optim.Optimizer:
    # Already multi-tensor (foreach) on every device; there is no fused LARS kernel.
    return LARS(groups, lr=lr, momentum=momentum)


def _adam(groups: list[dict], *, lr: float, momentum: float, fused: bool) -> torch.optim.Optimizer:
    # Adam's L2 penalty enters the adaptive moments (coupled decay), unlike AdamW.
    return torch.optim.Adam(groups, lr=lr, fused=fused or None)


def _adamw(groups: list[dict], *, lr: float, momentum: float, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


#: Optimiser name → ``factory(groups, *, lr, momentum, fused)``.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "lars": _lars,
    "adam": _adam,
    "adamw": _adamw,
}


def create_optimizer(
    name: str,
    module: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """Build optimiser ``name`` ("sgd", "lars", "adam", "adamw") over ``module``'s trainable
    parameters, grouped by :func:`parameter_groups`. ``momentum`` is used by SGD and LARS.

    ``fused``: PyTorch's fused CUDA kernels for SGD, Adam and AdamW (one launch for the whole
    update; the training loop turns it on for CUDA). The learning rate stays a Python float
    read at every step, so changing it never recompiles or re-captures anything.
    """
    factory = lookup("optimizer", OPTIMIZERS, name)
    return factory(parameter_groups(module, weight_decay), lr=lr, momentum=momentum, fused=fused)
