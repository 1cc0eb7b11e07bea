"""The self-supervised losses against closed forms, invariants and naive reference code."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslens.methods.losses import (
    cosine_momentum,
    info_nce,
    info_nce_logits,
    momentum_update,
    nt_xent,
    nt_xent_logits,
    positive_pair_top1,
    sinkhorn,
    swav_loss,
)


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- NT-Xent -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 5])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_closed_form_for_orthonormal_identical_views(n: int, temperature: float):
    # z1 == z2 == N orthonormal vectors: each anchor's positive has cosine 1 and its 2N - 2
    # negatives cosine 0, so ℓ = −log(e^{1/τ} / (e^{1/τ} + 2N − 2)) = log(1 + (2N − 2) e^{−1/τ}).
    z = torch.eye(n, 8, dtype=torch.float64)
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / temperature))
    assert nt_xent(z, z, temperature).item() == pytest.approx(expected, rel=1e-12)


def test_nt_xent_is_symmetric_and_scale_invariant():
    z1, z2 = _random(6, 4, seed=1), _random(6, 4, seed=2)
    loss = nt_xent(z1, z2, 0.3)
    torch.testing.assert_close(nt_xent(z2, z1, 0.3), loss)
    torch.testing.assert_close(nt_xent(3.0 * z1, 0.01 * z2, 0.3), loss)


def _naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    z = torch.cat([z1, z2])
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        sim = [F.cosine_similarity(z[i], z[k], dim=0).item() / temperature for k in range(n2)]
        denominator = sum(math.exp(sim[k]) for k in range(n2) if k != i)
        total += -math.log(math.exp(sim[j]) / denominator)
    return total / n2


def test_nt_xent_matches_naive_double_loop():
    z1, z2 = _random(5, 3, seed=3), _random(5, 3, seed=4)
    assert nt_xent(z1, z2, 0.2).item() == pytest.approx(_naive_nt_xent(z1, z2, 0.2), rel=1e-10)


def test_nt_xent_has_2n_minus_1_candidates_per_anchor():
    logits, targets = nt_xent_logits(_random(3, 4), _random(3, 4, seed=9), 0.5)
    assert logits.shape == (6, 6)
    assert torch.isinf(logits.diagonal()).all()
    assert torch.isfinite(logits).sum(dim=1).tolist() == [5] * 6
    assert targets.tolist() == [3, 4, 5, 0, 1, 2]


@pytest.mark.parametrize("temperature", [0, -0.1, "0.5"])
def test_losses_reject_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(_random(2, 3), _random(2, 3), temperature)


# --- InfoNCE -----------------------------------------------------------------------------------


def test_info_nce_exact_small_case():
    query = torch.tensor([[2.0, 0.0]], dtype=torch.float64)  # normalised to [1, 0]
    key = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    # logits [q·k+, q·n1, q·n2] / τ = [1, 0, -1] / 0.5
    expected = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    assert info_nce(query, key, queue, 0.5).item() == pytest.approx(expected, rel=1e-12)


def test_info_nce_equals_cross_entropy_with_positive_first():
    q, k, queue = (
        _random(4, 3, seed=5),
        _random(4, 3, seed=6),
        F.normalize(_random(7, 3, seed=7), dim=1),
    )
    logits, targets = info_nce_logits(q, k, queue, 0.2)
    assert logits.shape == (4, 8) and targets.tolist() == [0] * 4
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    manual = [
        -torch.log_softmax(torch.cat([(qn[i] @ kn[i])[None], queue @ qn[i]]) / 0.2, dim=0)[0]
        for i in range(4)
    ]
    torch.testing.assert_close(info_nce(q, k, queue, 0.2), torch.stack(manual).mean())


def test_info_nce_rejects_queue_of_wrong_width():
    with pytest.raises(ValueError, match="queue must be"):
        info_nce(_random(2, 3), _random(2, 3), _random(5, 4), 0.2)


# --- positive_pair_top1 ------------------------------------------------------------------------


def test_positive_pair_top1_exact():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [2.0, 2.0, 0.0], [0.0, 1.0, 4.0]])
    targets = torch.tensor([0, 0, 0, 2])
    # hit, miss, tie (a miss), hit
    assert positive_pair_top1(logits, targets).item() == 0.5


def test_positive_pair_top1_for_nt_xent_and_collapse():
    z = torch.eye(4)
    assert positive_pair_top1(*nt_xent_logits(z, z, 0.5)).item() == 1.0
    collapsed = torch.ones(4, 3)
    assert positive_pair_top1(*nt_xent_logits(collapsed, collapsed, 0.5)).item() == 0.0
    # Swapping the second view's rows 0 and 1 makes anchors 0, 1 and their partners miss.
    swapped = z[[1, 0, 2, 3]]
    assert positive_pair_top1(*nt_xent_logits(z, swapped, 0.5)).item() == 0.5


def test_positive_pair_top1_among_1_plus_k_for_moco():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0]])  # the second query matches a negative better
    assert positive_pair_top1(*info_nce_logits(q, k, queue, 0.2)).item() == 0.5


# --- Sinkhorn-Knopp ----------------------------------------------------------------------------


def _official_sinkhorn(out: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Transcribed from facebookresearch/swav main_swav.py, distributed_sinkhorn (one process)."""
    q = torch.exp(out / epsilon).t()
    b, k = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def test_sinkhorn_matches_official_code():
    scores = torch.tanh(_random(12, 5, seed=11))
    torch.testing.assert_close(sinkhorn(scores, 0.05, 3), _official_sinkhorn(scores, 0.05, 3))


def test_sinkhorn_converged_marginals_are_exact():
    batch, prototypes = 12, 4
    scores = torch.tanh(_random(batch, prototypes, seed=12)).float()
    codes = sinkhorn(scores, epsilon=0.5, iterations=300)
    assert codes.shape == (batch, prototypes) and codes.dtype == torch.float32
    # Every sample is a distribution over prototypes; every prototype gets mass B / K.
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(batch), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        codes.sum(dim=0), torch.full((prototypes,), batch / prototypes), atol=1e-5, rtol=0
    )


def test_sinkhorn_rows_sum_to_one_after_few_iterations_and_is_deterministic():
    scores = torch.tanh(_random(8, 6, seed=13)).float()
    codes = sinkhorn(scores)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(8), atol=1e-6, rtol=0)
    assert torch.equal(codes, sinkhorn(scores))


def test_sinkhorn_is_stable_for_large_scores_and_half_precision():
    # exp(scores / 0.05) overflows float32 unless the maximum is subtracted first; a constant
    # shift cancels, so the codes are those of the unshifted scores.
    scores = torch.tanh(_random(8, 6, seed=14)).float()
    codes = sinkhorn(scores + 10.0)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes, sinkhorn(scores))
    half = sinkhorn(torch.tanh(_random(8, 6, seed=15)).half())
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert sinkhorn(_random(8, 6, seed=16)).dtype == torch.float64


def test_sinkhorn_all_reduce_sums_over_processes():
    # Two processes holding the same batch: all_reduce doubles every batch sum, which must give
    # the codes of the concatenated batch.
    scores = torch.tanh(_random(6, 4, seed=17))
    doubled = sinkhorn(scores, all_reduce=lambda t: 2 * t)
    together = sinkhorn(torch.cat([scores, scores]))
    torch.testing.assert_close(doubled, together[:6])


def test_sinkhorn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(torch.zeros(2, 3), epsilon=0)
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn(torch.zeros(2, 3), iterations=0)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        sinkhorn(torch.zeros(2, 3, 4))


# --- SwAV loss ---------------------------------------------------------------------------------


def test_swav_loss_exact_two_views():
    s0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    s1 = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    q0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    q1 = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    # view 1 predicts q0: −log softmax([0, 10])[0]; view 0 predicts q1: −½ Σ log softmax([10, 0])
    log_p1 = torch.log_softmax(s1 / 0.1, dim=1)[0]
    log_p0 = torch.log_softmax(s0 / 0.1, dim=1)[0]
    expected = (-log_p1[0] + -(0.5 * log_p0[0] + 0.5 * log_p0[1])) / 2
    torch.testing.assert_close(swav_loss([s0, s1], [q0, q1], 0.1), expected)


def _official_swav_loss(scores, codes, temperature):
    """Transcribed from main_swav.py's training loop (output = concatenated views)."""
    loss = 0
    for crop_id, q in enumerate(codes):
        subloss = 0
        for v in [v for v in range(len(scores)) if v != crop_id]:
            x = scores[v] / temperature
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (len(scores) - 1)
    return loss / len(codes)


def test_swav_loss_matches_official_with_local_crops():
    scores = [torch.tanh(_random(5, 7, seed=s)) for s in range(4)]
    codes = [sinkhorn(s) for s in scores[:2]]
    torch.testing.assert_close(
        swav_loss(scores, codes, 0.1), _official_swav_loss(scores, codes, 0.1)
    )


# --- momentum ----------------------------------------------------------------------------------


def test_momentum_update_follows_formula_and_copies_buffers():
    torch.manual_seed(0)
    online, target = (
        nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)),
        nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)),
    )
    online[1].running_mean.fill_(0.7)
    online[1].num_batches_tracked.fill_(5)
    before = {k: v.clone() for k, v in target.named_parameters()}
    momentum_update(online, target, 0.9)
    for name, theta_q in online.named_parameters():
        expected = 0.9 * before[name] + (1 - 0.9) * theta_q
        torch.testing.assert_close(
            dict(target.named_parameters())[name], expected, rtol=1e-6, atol=1e-7
        )
    assert torch.equal(target[1].running_mean, torch.full((2,), 0.7))
    assert int(target[1].num_batches_tracked) == 5
    # m = 1 freezes the target exactly; m = 0 copies the online weights exactly.
    frozen = {k: v.clone() for k, v in target.named_parameters()}
    momentum_update(online, target, 1.0)
    assert all(torch.equal(v, frozen[k]) for k, v in target.named_parameters())
    momentum_update(online, target, 0.0)
    assert all(
        torch.equal(a, b) for a, b in zip(online.parameters(), target.parameters(), strict=True)
    )


def test_momentum_update_rejects_different_modules_and_bad_m():
    with pytest.raises(ValueError, match="differ in structure"):
        momentum_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.9)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        momentum_update(nn.Linear(2, 2), nn.Linear(2, 2), 1.5)


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        cosine_momentum(101, 100, 0.99)
