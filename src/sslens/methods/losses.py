"""The self-supervised losses and helpers as pure functions (no state, no modules).

* :func:`nt_xent` — SimCLR, https://arxiv.org/abs/2002.05709, eq. (1).
* :func:`info_nce` — MoCo, https://arxiv.org/abs/1911.05722, eq. (1).
* :func:`sinkhorn` and :func:`swav_loss` — SwAV, https://arxiv.org/abs/2006.09882, section 3.1.
* :func:`barlow_twins_loss` — Barlow Twins, https://arxiv.org/abs/2103.03230, eq. (1).
* :func:`vicreg_loss` — VICReg, https://arxiv.org/abs/2105.04906, eqs. (1)-(6).
* :func:`positive_pair_top1` — how often the positive is the most similar candidate (a training
  statistic, not a downstream accuracy).
* :func:`momentum_update` and :func:`cosine_momentum` — MoCo's momentum encoder and BYOL's
  schedule for its coefficient.

>>> z = torch.eye(4)
>>> round(nt_xent(z, z, temperature=1.0).item(), 4)  # log(1 + 6 / e)
1.1654
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sslens.checks import fraction, positive_int, positive_number


def _check_temperature(temperature: float) -> None:
    positive_number("temperature", temperature, "e.g. 0.1")


def nt_xent_logits(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    *,
    rank: int = 0,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine-similarity logits of SimCLR's 2N-way problem and the index of each positive.

    Args:
        z1, z2: (n, D) projections of the two views; row i of z1 and row i of z2 are a positive
            pair. They need not be normalised.
        temperature: τ.
        rank, gather: for several processes, this process's rank and a function returning the
            (N, D) rows of every rank in rank order (``N = size · n``, e.g.
            :func:`sslens.distributed.gather_with_grad`). The anchors are then this rank's 2n
            views and the candidates the global 2N; by default (one process) both are the 2n.

    Returns:
        logits: (2n, 2N) with ``logits[a, b] = sim(anchor_a, candidate_b) / τ`` over anchors
            ``cat(z1, z2)`` and candidates ``cat(gather(z1), gather(z2))``, and ``-inf`` where an
            anchor meets itself, so every anchor has 2N - 1 candidates.
        targets: (2n,) int64, the column of each anchor's positive.
    """
    _check_temperature(temperature)
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must both be (N, D) with the same shape; got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    n = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    anchors = torch.cat([z1, z2])
    candidates = anchors if gather is None else torch.cat([gather(z1), gather(z2)])
    total = candidates.shape[0] // 2
    logits = anchors @ candidates.T / temperature
    # Anchor i (view 1) is candidate rank·n + i; its positive is the same image's view 2.
    index = torch.arange(n, device=z1.device) + rank * n
    own = torch.cat([index, index + total])
    self_mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, own[:, None], True)
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([index + total, index])
    return logits, targets


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy, a scalar.

    https://arxiv.org/abs/2002.05709, eq. (1):
    ``ℓ(i, j) = −log exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ)``, "the final loss is
    computed across all positive pairs, both (i, j) and (j, i), in a mini-batch". Each of the 2N
    anchors has its positive and 2N − 2 negatives; the loss is the mean over the 2N anchors.

    Args:
        z1, z2: (N, D) projections of the two views (normalised here: sim is the cosine).
        temperature: τ.
    """
    logits, targets = nt_xent_logits(z1, z2, temperature)
    return F.cross_entropy(logits, targets)


def info_nce_logits(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's (B, 1 + K) logits ``[q·k+, q·queue] / τ``; the positive is column 0.

    Args:
        query: (B, D) query projections; key: (B, D) keys of the same images (the positives);
        queue: (K, D) keys of earlier batches (the negatives). query and key are normalised
        here; the queue is used as given (MoCo stores it normalised).

    Returns:
        logits: (B, 1 + K); targets: (B,) int64 zeros.
    """
    _check_temperature(temperature)
    if query.ndim != 2 or query.shape != key.shape:
        raise ValueError(
            f"query and key must both be (B, D) with the same shape; got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    if queue.ndim != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(
            f"queue must be (K, D) with D = {query.shape[1]} like the query; got {tuple(queue.shape)}"
        )
    q = F.normalize(query, dim=1)
    k = F.normalize(key, dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)
    negatives = q @ queue.T
    logits = torch.cat([positive, negatives], dim=1) / temperature
    targets = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return logits, targets


def info_nce(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """MoCo's InfoNCE loss, a scalar.

    https://arxiv.org/abs/1911.05722, eq. (1): ``L_q = −log exp(q·k+/τ) / Σ_{i=0}^{K} exp(q·k_i/τ)``,
    "a (K+1)-way softmax-based classifier that tries to classify q as k+". Mean over the B queries.
    Shapes as in :func:`info_nce_logits`. Gradients flow into ``key`` if it requires them; MoCo
    computes keys under ``no_grad``.
    """
    logits, targets = info_nce_logits(query, key, queue, temperature)
    return F.cross_entropy(logits, targets)


def _check_pair(z1: torch.Tensor, z2: torch.Tensor, method: str) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape or len(z1) < 2:
        raise ValueError(f"{method} needs two (N, D) embeddings of one shape with N >= 2; got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")


def _off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square (D, D) matrix, flattened."""
    return matrix[~torch.eye(len(matrix), dtype=torch.bool, device=matrix.device)]


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3) -> torch.Tensor:
    """Barlow Twins: "L_BT = Σ_i (1 − C_ii)² + λ Σ_i Σ_{j≠i} C_ij²", where C is "the
    cross-correlation matrix computed between the outputs of the two identical networks along
    the batch dimension" (Zbontar et al. 2021, eq. 1-2).

    Args:
        z1, z2: (N, D) embeddings of two views of the same N images. Each dimension is
            standardised over the batch as the official code's affine-free BatchNorm does
            (biased variance, ε = 1e-5); pass the global batch under torchrun.
        lambd: λ, 5e-3 as in the paper.

    Returns the scalar loss: 0 when the two standardised views are identical and their
    dimensions uncorrelated (C = I).
    """
    _check_pair(z1, z2, "Barlow Twins")
    positive_number("lambd", lambd, "5e-3 is the paper's")
    standard = [F.batch_norm(z, None, None, training=True) for z in (z1, z2)]
    c = standard[0].T @ standard[1] / len(z1)
    return (torch.diagonal(c) - 1).pow(2).sum() + lambd * _off_diagonal(c).pow(2).sum()


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor, *, eps: float = 1e-4,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """VICReg's three terms (Bardes et al. 2022, eqs. 1-5), as the official code computes them.

    * invariance: "the mean-squared euclidean distance between each pair of vectors", on this
      process's images;
    * variance: "a hinge function on the standard deviation of the embeddings along the batch
      dimension", mean over dimensions of max(0, 1 − sqrt(Var(z_j) + ε)), averaged over the views;
    * covariance: "the sum of the squared off-diagonal coefficients of C(Z), with a factor 1/d",
      summed over the views; C(Z) with the unbiased 1/(N − 1).

    ``gather`` (e.g. :func:`sslens.distributed.gather_with_grad`) gives variance and covariance
    the global batch under torchrun, as the official ``FullGatherLayer`` does.
    """
    _check_pair(z1, z2, "VICReg")
    invariance = F.mse_loss(z1, z2)
    if gather is not None:
        z1, z2 = gather(z1), gather(z2)
    variance, covariance = z1.new_zeros(()), z1.new_zeros(())
    for z in (z1, z2):
        centred = z - z.mean(dim=0)
        variance = variance + F.relu(1 - torch.sqrt(centred.var(dim=0) + eps)).mean() / 2
        cov = centred.T @ centred / (len(z) - 1)
        covariance = covariance + _off_diagonal(cov).pow(2).sum() / z.shape[1]
    return {"invariance": invariance, "variance": variance, "covariance": covariance}


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, *, invariance_weight: float = 25.0,
                variance_weight: float = 25.0, covariance_weight: float = 1.0, eps: float = 1e-4,
                gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """λ·invariance + μ·variance + ν·covariance of :func:`vicreg_terms`, with the paper's
    λ = μ = 25, ν = 1 (section 4.1)."""
    terms = vicreg_terms(z1, z2, eps=eps, gather=gather)
    return (invariance_weight * terms["invariance"] + variance_weight * terms["variance"]
            + covariance_weight * terms["covariance"])


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised mean squared error, averaged over the batch.

    https://arxiv.org/abs/2006.07733, eq. (2): ``‖q̄ − z̄′‖² = 2 − 2 ⟨q, z′⟩ / (‖q‖ ‖z′‖)``, with
    ``q`` the online prediction (B, D) and ``z′`` the target projection (B, D) of the other view.
    The target gets no gradient (stop-gradient). 0 for parallel rows, 4 for opposite ones.
    """
    _check_pair(prediction, target, "BYOL")
    return (2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=1)).mean()


@torch.no_grad()
def view_agreement_top1(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """How often each image's first view is most cosine-similar to its own second view among
    the batch's second views: the positive-pair top-1 of a method without negatives, for the
    training log's health check (a collapsing projection makes it fall)."""
    logits = F.normalize(z1.detach(), dim=1) @ F.normalize(z2.detach(), dim=1).T
    return positive_pair_top1(logits, torch.arange(len(z1), device=z1.device))


@torch.no_grad()
def positive_pair_top1(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The fraction of anchors whose positive is strictly the most similar candidate.

    This is the "contrastive batch accuracy" the reference report presented as an accuracy: it
    says how easy the pretext task is within a batch (2N − 1 candidates for
    :func:`nt_xent_logits`, 1 + K for :func:`info_nce_logits`), nothing about classes. A tie
    between the positive and a negative counts as a miss, so collapsed embeddings score 0.

    Args:
        logits: (A, C) candidate scores per anchor (``-inf`` for excluded candidates).
        targets: (A,) int64 column of each anchor's positive.

    Returns:
        A 0-dim float tensor in [0, 1].
    """
    positive = logits.gather(1, targets[:, None])
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return (positive[:, 0] > others.max(dim=1).values).float().mean()


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
    all_reduce_max: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp codes: (B, K) prototype scores → (B, K) soft assignments.

    https://arxiv.org/abs/2006.09882, section 3.1: the codes solve
    ``max_Q Tr(Qᵀ Cᵀ Z) + ε H(Q)`` over the transportation polytope where each of the K
    prototypes receives B/K of the mass ("enforces that on average each prototype is selected at
    least B/K times in the batch"), and the solution is
    ``Q* = Diag(u) exp(Cᵀ Z / ε) Diag(v)`` found by "a small number of matrix multiplications
    using the iterative Sinkhorn-Knopp algorithm" (appendix A.1, 3 iterations). Follows the
    official ``distributed_sinkhorn``: normalise the total mass, then alternate prototype (row of
    Qᵀ) and sample normalisation, ending with a sample normalisation, so every returned row
    sums to exactly 1 and each prototype's column sums to B/K once converged.

    Args:
        scores: (B, K) scores ``zᵀ c`` (cosines for normalised z and prototypes). Not
            differentiated through (codes are targets).
        epsilon: ε, the entropy weight; smaller = sharper codes.
        iterations: Sinkhorn-Knopp iterations.
        all_reduce: sums a tensor over all processes; applied to every sum over the batch (and to
            the batch size) so B is the global batch. Identity on one device.
        all_reduce_max: the element-wise maximum over all processes, for the stabilising shift,
            so every process subtracts the same global maximum. Identity on one device.

    Returns:
        (B, K) codes in float32 (float64 if ``scores`` is float64), whatever the input dtype:
        ``exp(scores / ε)`` overflows half precision.

    Numerical stability: the maximum score is subtracted before ``exp``; a constant factor
    cancels in the first normalisation, so the result is the same as without it and nothing
    overflows. Underflow remains possible only if a prototype's (or a sample's) scores all lie
    more than ~87·ε below the maximum (float32), which cosine scores (range 2) cannot do at
    ε >= 0.03; the codes are then NaN, as in the official code. With several processes the
    maximum is the global one (``all_reduce_max``): a per-process maximum would rescale each
    process's columns and change the 3-iteration codes.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, K); got shape {tuple(scores.shape)}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive (SwAV uses 0.05); got {epsilon!r}")
    positive_int("iterations", iterations, "SwAV uses 3")
    dtype = torch.promote_types(scores.dtype, torch.float32)
    logits = scores.to(dtype) / epsilon
    # Qᵀ of the paper, (K, B), as in the official code.
    q = torch.exp(logits - all_reduce_max(logits.max())).T
    num_prototypes = q.shape[0]
    batch = all_reduce(torch.tensor(float(q.shape[1]), dtype=dtype, device=q.device))
    q = q / all_reduce(q.sum())
    for _ in range(iterations):
        q = q / all_reduce(q.sum(dim=1, keepdim=True)) / num_prototypes
        q = q / q.sum(dim=0, keepdim=True) / batch
    return (q * batch).T


def swav_loss(
    scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], temperature: float
) -> torch.Tensor:
    """SwAV's swapped-prediction loss, a scalar.

    https://arxiv.org/abs/2006.09882, eq. (1)-(2): ``ℓ(z_t, q_s) = −Σ_k q_s^(k) log p_t^(k)`` with
    ``p_t^(k) = softmax_k(z_tᵀ c_k / τ)``; with multi-crop, codes come from the global views only
    and each is predicted from every other view. As in the official ``main_swav.py``: for each
    coded view s, the cross-entropy (mean over the batch) is averaged over the V − 1 other views,
    then averaged over the coded views.

    Args:
        scores: V tensors (B, K), the prototype scores of every view (globals first).
        codes: G <= V tensors (B, K), codes of views 0..G-1 (from :func:`sinkhorn`).
        temperature: τ (SwAV uses 0.1).
    """
    _check_temperature(temperature)
    if len(scores) < 2 or not 1 <= len(codes) <= len(scores):
        raise ValueError(
            f"swav_loss needs >= 2 views and 1..{len(scores)} code tensors; got {len(scores)} views "
            f"and {len(codes)} codes"
        )
    log_probs = [F.log_softmax(s / temperature, dim=1) for s in scores]
    total = scores[0].new_zeros(())
    for s, q in enumerate(codes):
        others = [v for v in range(len(scores)) if v != s]
        total = total + sum(-(q * log_probs[v]).sum(dim=1).mean() for v in others) / len(others)
    return total / len(codes)


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """MoCo's momentum update, in place on ``target``: ``θ_k ← m θ_k + (1 − m) θ_q``.

    https://arxiv.org/abs/1911.05722, eq. (2). Applied to parameters; buffers (BatchNorm
    running statistics) are copied from ``online``. The two modules must have the same
    parameter and buffer names and shapes (``target`` is usually ``copy.deepcopy(online)``).
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m must be in [0, 1] (MoCo uses 0.999); got {m!r}")
    pairs = (
        (dict(online.named_parameters()), dict(target.named_parameters())),
        (dict(online.named_buffers()), dict(target.named_buffers())),
    )
    for source, destination in pairs:
        if source.keys() != destination.keys():
            raise ValueError(
                "online and target modules differ in structure; target must be a copy of online. "
                f"Only in online: {sorted(source.keys() - destination.keys())}; "
                f"only in target: {sorted(destination.keys() - source.keys())}"
            )
    params, buffers = pairs
    for name, theta_q in params[0].items():
        params[1][name].mul_(m).add_(theta_q, alpha=1.0 - m)
    for name, buffer in buffers[0].items():
        buffers[1][name].copy_(buffer)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's schedule, rising from ``base`` at step 0 to 1 at ``total_steps``.

    https://arxiv.org/abs/2006.07733, section 3.2:
    ``τ = 1 − (1 − τ_base) · (cos(πk/K) + 1) / 2``, k the current step, K the total.
    """
    if total_steps < 1 or not 0 <= step <= total_steps:
        raise ValueError(
            f"need 0 <= step <= total_steps and total_steps >= 1; got {step}, {total_steps}"
        )
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


def constant_momentum(step: int, total_steps: int, base: float) -> float:
    """The momentum ``base`` at every step (MoCo)."""
    return base


MOMENTUM_SCHEDULES: dict[str, Callable[[int, int, float], float]] = {
    "constant": constant_momentum,
    "cosine": cosine_momentum,
}


def check_momentum(momentum: object, schedule: object, hint: str) -> float:
    """``float(momentum)`` for an EMA coefficient in [0, 1] and a known schedule name, else a
    ValueError; ``hint`` names the values the method's paper uses."""
    if schedule not in MOMENTUM_SCHEDULES:
        raise ValueError(f"momentum_schedule must be one of {', '.join(MOMENTUM_SCHEDULES)}; got {schedule!r}")
    return fraction("momentum", momentum, hint)
