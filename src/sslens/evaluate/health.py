"""Label-free health of a representation: effective rank, alignment, uniformity and the spread
of normalised embeddings, and the training-log warnings built on them.

* RankMe — Garrido et al. 2023, "RankMe: Assessing the Downstream Performance of Pretrained
  Self-Supervised Representations by Their Rank" (https://arxiv.org/abs/2210.02885): "the
  exponential of the Shannon entropy of the normalised singular values", ``exp(−Σ p_k log p_k)``
  with ``p_k = σ_k / ‖σ‖₁ + ε``. A rank-k embedding whose k directions carry equal energy scores
  exactly k; a collapsed one 1; the maximum is min(N, D).
* Alignment and uniformity — Wang & Isola 2020, "Understanding Contrastive Representation
  Learning through Alignment and Uniformity on the Hypersphere"
  (https://arxiv.org/abs/2005.10242): on l2-normalised embeddings, alignment is
  ``E ‖f(x) − f(y)‖²`` over positive pairs (lower is better, 0 when views agree) and uniformity
  ``log E exp(−2 ‖f(x) − f(y)‖²)`` over all pairs (lower is better; −4 is its floor, 0 a
  collapse to one point).
* Normalised std — lightly's collapse indicator (``lightly.utils.debug.std_of_l2_normalized``):
  the per-dimension standard deviation of l2-normalised embeddings, averaged over dimensions.
  It is 0 for a collapse and about ``1/√D`` when the embeddings spread over the sphere, so it is
  reported with that reference.

Where we differ: RankMe is computed on the un-augmented images' embeddings (the paper uses the
source dataset, as here) and carries no interval — a bootstrap resample repeats rows, which
lowers the rank, so its interval would be biased; the random-weight floor and ``min(N, D)``
bracket it instead. Uniformity's bootstrap leaves out the pairs a resample makes of one image
with itself.

>>> z = torch.eye(4).repeat(8, 1)  # four directions, equal energy
>>> round(rankme(z), 3)
4.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslens.models.health import eval_mode
from sslens.stats import RESAMPLES, Estimate, bootstrap_mean, undefined

#: RankMe's ε (the paper's value), which keeps log p finite for zero singular values.
RANKME_EPS = 1e-7
#: Epochs in a row of falling positive-pair top-1 that draw a warning (with a drop of at least
#: :data:`FALL_MARGIN` below the run's best, so noise around a plateau does not).
FALLING_EPOCHS = 3
FALL_MARGIN = 0.1
#: A normalised std below this fraction of ``1/√D`` is reported as a collapse. Healthy runs
#: sit near 1/√D and a young MoCo projection near 0.4 of it, so 0.1 flags only a real collapse.
COLLAPSE_FRACTION = 0.1
#: A self-distillation run (DINO) whose teacher's outputs carry less than this fraction of log K
#: nats of information about the image (the ``teacher_mutual_information`` metric, epoch mean) is
#: reported as a collapse: its output no longer depends on the input, whether it went uniform or
#: onto one dimension, the two collapses centring and sharpening balance (Caron et al. 2021,
#: https://arxiv.org/abs/2104.14294, section 5.3). Measured on the shapes world: 0 to 0.004 once
#: DINO without centring has collapsed onto one dimension; 0.20 at the end of the packaged
#: ``dino-synthetic`` run; 0.06 for the few fast steps of the centred unit-test run.
TEACHER_INFORMATION_FLOOR = 0.01
#: Bootstrap resamples for the statistics recomputed per resample (uniformity and the std).
HEALTH_RESAMPLES = RESAMPLES // 2


def rankme(embeddings: torch.Tensor) -> float:
    """RankMe of (N, D) embeddings (see the module docstring)."""
    singular = torch.linalg.svdvals(embeddings.double())
    if singular.sum() == 0:
        return 1.0
    p = singular / singular.sum() + RANKME_EPS
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(N,) ``‖f(x) − f(y)‖²`` per positive pair of l2-normalised (N, D) embeddings."""
    return (F.normalize(first.double(), dim=1) - F.normalize(second.double(), dim=1)).square().sum(1)


def _kernel(embeddings: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    z = F.normalize(embeddings.double(), dim=1)
    return torch.exp(-t * torch.cdist(z, z).square())


def uniformity(embeddings: torch.Tensor, t: float = 2.0) -> float:
    """``log E exp(−t ‖f(x) − f(y)‖²)`` over the distinct pairs of (N, D) embeddings."""
    kernel = _kernel(embeddings, t)
    n = len(kernel)
    off_diagonal = (kernel.sum() - kernel.diagonal().sum()) / (n * (n - 1))
    return float(off_diagonal.log())


def normalized_std(embeddings: torch.Tensor) -> float:
    """Mean over dimensions of the std over samples of l2-normalised (N, D) embeddings."""
    return float(F.normalize(embeddings.double(), dim=1).std(dim=0).mean())


def _resamples(n: int, seed: int, resamples: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(seed)).integers(0, n, size=(resamples, n))


def _percentile_estimate(value: float, draws: Sequence[float], n: int, unit: str) -> Estimate:
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if len(draws) == 0:
        return Estimate(value, math.nan, math.nan, n, unit, "bootstrap")
    low, high = np.percentile(draws, [2.5, 97.5])
    return Estimate(value, float(low), float(high), n, unit, "bootstrap")


def uniformity_estimate(embeddings: torch.Tensor, *, seed: int, resamples: int = HEALTH_RESAMPLES) -> Estimate:
    """:func:`uniformity` with a bootstrap interval over the images (pairs of an image with a
    copy of itself left out)."""
    n = len(embeddings)
    if n < 3:
        return undefined("images", "bootstrap")
    kernel = _kernel(embeddings).numpy()
    draws = []
    for index in _resamples(n, seed, resamples):
        distinct = index[:, None] != index[None, :]
        draws.append(math.log(kernel[np.ix_(index, index)][distinct].mean()))
    return _percentile_estimate(uniformity(embeddings), draws, n, "images")


def std_estimate(embeddings: torch.Tensor, *, seed: int, resamples: int = HEALTH_RESAMPLES) -> Estimate:
    """:func:`normalized_std` with a bootstrap interval over the images. A resample's variance
    is scaled by n / (n − 1): repeated rows shrink it by that factor on average, which would put
    the whole interval below the statistic."""
    n = len(embeddings)
    if n < 3:
        return undefined("images", "bootstrap")
    z = F.normalize(embeddings.double(), dim=1).numpy()
    draws = [float(np.sqrt(z[index].var(axis=0, ddof=1) * n / (n - 1)).mean())
             for index in _resamples(n, seed, resamples)]
    return _percentile_estimate(normalized_std(embeddings), draws, n, "images")


@torch.inference_mode()
def _embed(encoder: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    with eval_mode(encoder):
        return torch.cat([encoder(part).float() for part in images.split(batch_size)]).cpu()


def embedding_health(
    encoders: Mapping[str, nn.Module],
    images: torch.Tensor,
    views: tuple[torch.Tensor, torch.Tensor],
    *,
    seed: int = 0,
    intervals: bool = True,
    batch_size: int = 256,
) -> dict[str, dict]:
    """The health of each encoder's embedding: ``{output: {"rankme", "max_rank", "std",
    "std_reference", "alignment", "uniformity"}}``.

    Args:
        encoders: ``{"pooled": ..., "projection": ...}``, each (B, 3, H, W) → (B, D).
        images: (N, 3, H, W) normalised un-augmented images (rank, std, uniformity).
        views: two (N, 3, H', W') augmented views of the same images (alignment).
        seed: the bootstrap's seed.
        intervals: estimate dicts with 95% bootstrap intervals over the images (alignment,
            uniformity, std); False gives plain floats (the training log's per-epoch values).
    """
    report = {}
    for name, encoder in encoders.items():
        clean = _embed(encoder, images, batch_size)
        first, second = (_embed(encoder, view, batch_size) for view in views)
        distances = alignment(first, second).numpy()
        entry: dict = {"rankme": rankme(clean), "max_rank": min(clean.shape), "dimension": clean.shape[1],
                       "std_reference": 1 / math.sqrt(clean.shape[1])}
        if intervals:
            entry["std"] = std_estimate(clean, seed=seed).to_dict()
            entry["alignment"] = bootstrap_mean(distances, unit="images", seed=seed).to_dict()
            entry["uniformity"] = uniformity_estimate(clean, seed=seed).to_dict()
        else:
            entry.update(std=normalized_std(clean), alignment=float(distances.mean()), uniformity=uniformity(clean))
        report[name] = entry
    return report


def health_warnings(records: Sequence[Mapping]) -> list[str]:
    """What a training log's epoch records say is wrong, one sentence each (empty when healthy):
    positive-pair top-1 falling for :data:`FALLING_EPOCHS` epochs in a row to at least
    :data:`FALL_MARGIN` below its best, the projection's normalised std below
    :data:`COLLAPSE_FRACTION` of ``1/√D``, and the mutual information between an image and a
    self-distillation teacher's output (``teacher_mutual_information``) below
    :data:`TEACHER_INFORMATION_FLOOR`.

    DINO needs the last: when its teacher collapses onto one dimension (every output the same
    one-hot) the bottleneck embeddings can still spread more than the std check's threshold, since
    a margin of a few hundredths in cosine makes a 0.04-temperature softmax one-hot.
    """
    epochs = [r for r in records if r.get("kind") == "epoch"]
    found = []
    top1 = [(r["epoch"], r["positive_pair_top1"]) for r in epochs if r.get("positive_pair_top1") is not None]
    for end in range(FALLING_EPOCHS, len(top1)):
        window = [value for _, value in top1[end - FALLING_EPOCHS: end + 1]]
        best = max(value for _, value in top1[: end + 1])
        if all(b < a for a, b in zip(window, window[1:], strict=False)) and best - window[-1] >= FALL_MARGIN:
            found.append(
                f"positive-pair top-1 fell for {FALLING_EPOCHS} epochs in a row, to {window[-1]:.3f} at epoch "
                f"{top1[end][0]} from a best of {best:.3f}: the projection may be collapsing (partly); "
                f"check the learning rate, temperature and queue or batch size."
            )
            break
    for record in epochs:
        std, reference = record.get("std_projection"), record.get("std_reference")
        if std is not None and reference and std < COLLAPSE_FRACTION * reference:
            found.append(
                f"the normalised embedding std fell to {std:.4f} at epoch {record['epoch']}, under "
                f"{COLLAPSE_FRACTION:g} × 1/√D = {COLLAPSE_FRACTION * reference:.4f}: the projection collapsed "
                f"towards a point."
            )
            break
    for record in epochs:
        information = record.get("teacher_mutual_information")
        if information is not None and information < TEACHER_INFORMATION_FLOOR:
            entropy = record.get("teacher_entropy")
            mode = ""
            if entropy is not None:
                mode = (" onto one dimension (its outputs are one-hot and alike: is centring on, and is the teacher's "
                        "momentum high enough?)" if entropy < 0.5
                        else " to uniform outputs (lower the teacher temperature, or add BatchNorm to the head)")
            found.append(
                f"the teacher's output carried {information:.4f} × log K of information about the image at epoch "
                f"{record['epoch']}, under {TEACHER_INFORMATION_FLOOR:g}: it no longer depends on the input, the model "
                f"collapsed{mode}."
            )
            break
    return found
