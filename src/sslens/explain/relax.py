"""RELAX: representation explainability by masking (Wickstrøm et al., IJCV 2023).

Paper: https://arxiv.org/abs/2112.10161 — "RELAX explains a representation by measuring the
similarity between the representation of the input and representations of masked-out
versions of the input": with ``h = f(X)`` and ``h̄ = f(X ⊙ M)``, ``s = cos(h, h̄)``,

    importance   R_ij = E_M[s · M_ij]            estimated as  R = Σ_n s_n M_n / Σ_n M_n
    uncertainty  U_ij = Var_M[s · M_ij]          estimated as  U = Σ_n M_n (s_n − R)² / Σ_n M_n

and U-RELAX keeps the importance where the uncertainty is at most its median.

The reference implementation is relax-xai 0.0.5 (``relax_xai.relax.RELAX``). Its masks are
reproduced bit for bit by :class:`sslens.explain.masks.RelaxMasks` (same seed → same masks), its
importance to float tolerance. Every place sslens differs from relax-xai, and why:

* **Uncertainty is normalised.** relax-xai's ``uncertainty`` is the running sum
  ``Σ w (s − R)(s − R_prev)`` (West's weighted update) and is never divided by the summed
  weights, so it grows with the number of masks and is not the variance the paper defines.
  sslens returns ``U = Σ w (s − R)(s − R_prev) / Σ w``, i.e. ``U_sslens · sum_of_weights ==
  U_relax_xai`` (tested), where ``sum_of_weights = 1e-10 + Σ_n M_n`` exactly as relax-xai
  initialises it (the ``1e-10`` prior at 0 is kept, so importance matches to float tolerance).
  U-RELAX therefore thresholds the variance at its median, where relax-xai thresholds the sum
  (which also ranks how much mask weight a pixel received).
* **Closed form over a batch.** relax-xai updates the estimate in a Python loop over single
  masks. sslens computes each round's weighted moments with two matrix products
  (``(s − c) @ M`` and ``(s − c)² @ M`` with a per-image shift ``c`` to avoid cancellation) and
  merges rounds with Chan et al.'s parallel weighted update — numerically stable, no per-mask loop.
* **Batched.** Several images and many masks go through one forward pass (image × mask
  flattened into batches of up to ``batch_size``); relax-xai takes one image per object and
  breaks on ``batch_size=1`` (its ``masks.squeeze()`` drops the batch axis).
* **Seeded.** Masks come from a ``torch.Generator`` on the images' device (relax-xai uses the
  global RNG). The masks of a call are drawn once and shared by all images of the call, so
  explaining several images together gives exactly the maps of explaining each alone.
* **Baselines.** relax-xai masks with zeros in normalised space (``baseline="zero"``, the
  default); sslens also offers ``"blur"`` (the Gaussian-blurred image) and ``"mean"`` (the
  image's mean colour): ``X ⊙ M + B ⊙ (1 − M)``.
* **Adaptive stopping** (optional, not in the paper): masks are drawn in rounds; an image stops
  once its map's estimated standard error (or its last change) is below ``tolerance`` of the
  map's spread. Masks come in the same seeded sequence, so stopping after n masks gives exactly
  the map of ``num_masks=n``.
* Mixed precision: on CUDA the encoder runs under bf16 autocast with channels_last inputs
  (``amp=True`` asks for the same on the CPU, where oneDNN's bf16 kernels are several times
  faster on CPUs with AMX); similarities and the estimator are accumulated in fp32 (fp64 for
  fp64 inputs).

>>> from torch import nn
>>> encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
>>> explanation = RELAX(encoder, num_masks=20)(torch.randn(2, 3, 16, 16))
>>> explanation.importance.shape, explanation.info["num_masks_used"]
(torch.Size([2, 16, 16]), [20, 20])
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import kornia.filters
import torch
import torch.nn.functional as F
from torch import nn

from sslens.explain.base import EXPLAINERS, Explainer, Explanation
from sslens.explain.masks import RelaxMasks
from sslens.registry import Registry

BASELINES = Registry("baseline")

#: relax-xai's ``sum_of_weights_initial_value``: a prior of this weight at importance 0 that
#: keeps pixels no mask has covered at R = U = 0 instead of 0 / 0.
INITIAL_WEIGHT = 1e-10


def gaussian_blur(images: torch.Tensor, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """(B, C, H, W) → (B, C, H, W) Gaussian blur, kernel ``kernel_size`` (default ``2·⌈3σ⌉ + 1``).

    Replicate (not reflect) padding, so that kernels larger than tiny images still work.
    """
    size = 2 * math.ceil(3 * sigma) + 1 if kernel_size is None else kernel_size
    return kornia.filters.gaussian_blur2d(images, (size, size), (sigma, sigma), border_type="replicate")


@BASELINES.register("zero")
def zero_baseline(images: torch.Tensor, blur_sigma: float) -> torch.Tensor:
    """Zeros in normalised space (the dataset mean colour), as relax-xai's ``X ⊙ M``."""
    return torch.zeros_like(images)


@BASELINES.register("blur")
def blur_baseline(images: torch.Tensor, blur_sigma: float) -> torch.Tensor:
    """The image blurred with a Gaussian of ``blur_sigma`` px (blurring commutes with normalising)."""
    return gaussian_blur(images, blur_sigma)


@BASELINES.register("mean")
def mean_baseline(images: torch.Tensor, blur_sigma: float) -> torch.Tensor:
    """Each image's own mean colour, per channel."""
    return images.mean(dim=(2, 3), keepdim=True).expand_as(images)


def use_amp(amp: bool | None, device: torch.device) -> bool:
    """``amp=None`` means bf16 on CUDA only; True asks for it on the CPU too (fast where the CPU
    has bf16 matrix units, e.g. AMX; the maps then differ from fp32 ones by rounding)."""
    return device.type == "cuda" if amp is None else bool(amp)


@contextlib.contextmanager
def autotuned_convolutions(device: torch.device) -> Iterator[None]:
    """cuDNN autotuning on CUDA for the call, then the caller's setting back.

    Mask batches all have the same shape, so autotuning pays for itself after the first one;
    users of deterministic algorithms keep their setting.
    """
    previous = torch.backends.cudnn.benchmark
    if device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def embed(encoder: nn.Module, images: torch.Tensor, amp: bool | None = None) -> torch.Tensor:
    """(N, 3, H, W) → (N, D) embeddings, fp32 or wider; bf16 autocast + channels_last where
    :func:`use_amp` says so (by default on CUDA)."""
    if images.dtype == torch.float32 and use_amp(amp, images.device):
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            out = encoder(images.contiguous(memory_format=torch.channels_last))
    else:
        out = encoder(images)
    if not torch.is_tensor(out) or out.ndim != 2 or out.shape[0] != images.shape[0]:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(
            f"The encoder must map (N, 3, H, W) images to (N, D) embeddings; got {shape} for N = "
            f"{images.shape[0]}. Wrap it so that it pools and flattens its output."
        )
    return out.to(torch.promote_types(out.dtype, torch.float32))


def masked_similarities(
    encoder: nn.Module,
    build: Callable[[torch.Tensor], torch.Tensor],
    reference: torch.Tensor,
    masks: torch.Tensor,
    batch_size: int,
    amp: bool | None = None,
) -> torch.Tensor:
    """Cosine similarity of each image's reference embedding with its masked images' embeddings.

    Args:
        build: masks (n, 1, H, W) → masked images (b, n, 3, H, W), normalised.
        reference: (b, D) embeddings to compare with.
        masks: (N, 1, H, W).
        batch_size: images per forward pass; ``batch_size // b`` masks go in each pass.

    Returns:
        (b, N) similarities.
    """
    b = reference.shape[0]
    per_pass = max(1, batch_size // b)
    scores = []
    for chunk in masks.split(per_pass):
        masked = build(chunk)
        emb = embed(encoder, masked.flatten(0, 1), amp).view(b, chunk.shape[0], -1)
        scores.append(F.cosine_similarity(reference[:, None, :].to(emb.dtype), emb, dim=-1))
    return torch.cat(scores, dim=1)


class RelaxEstimator:
    """Running mask-weighted mean and variance of the similarity at every pixel.

    State per image: ``sum_of_weights`` W = 1e-10 + Σ M, ``importance`` R = Σ s M / W and
    ``squared_deviations`` S = Σ M (s − R)² (+ the prior's 1e-10 · R², as in relax-xai).
    :meth:`update` adds a round of masks in closed form and merges it with Chan et al.'s
    pairwise update (Chan, Golub & LeVeque 1979; weighted form as in West 1979):
    ``δ = R_b − R_a``, ``R = R_a + δ W_b / W``, ``S = S_a + S_b + δ² W_a W_b / W``.
    """

    def __init__(self, num_images: int, size: tuple[int, int], dtype: torch.dtype, device: torch.device):
        shape = (num_images, *size)
        self.sum_of_weights = torch.full(shape, INITIAL_WEIGHT, dtype=dtype, device=device)
        self.importance = torch.zeros(shape, dtype=dtype, device=device)
        self.squared_deviations = torch.zeros(shape, dtype=dtype, device=device)
        self.num_masks = [0] * num_images

    def update(self, similarities: torch.Tensor, masks: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Add ``similarities`` (b, n) of the masks (n, 1, H, W) to images ``index`` (b,), default all."""
        index = torch.arange(self.importance.shape[0], device=masks.device) if index is None else index
        b, n = similarities.shape
        size = self.importance.shape[1:]
        weights = masks.reshape(n, -1).to(self.importance.dtype)  # (n, HW)
        s = similarities.to(self.importance.dtype)
        # Shifting by the round's mean similarity keeps Σ w (s − c)² free of cancellation.
        shift = s.mean(dim=1, keepdim=True)  # (b, 1)
        d = s - shift
        w_round = weights.sum(dim=0)  # (HW,)
        first = d @ weights  # Σ w (s − c), (b, HW)
        second = (d * d) @ weights  # Σ w (s − c)²
        safe = w_round.clamp_min(torch.finfo(weights.dtype).tiny)
        mean_round = shift + first / safe
        dev_round = (second - first * first / safe).clamp_min(0.0)

        w_old = self.sum_of_weights[index].reshape(b, -1)
        mean_old = self.importance[index].reshape(b, -1)
        total = w_old + w_round
        delta = mean_round - mean_old
        self.importance[index] = (mean_old + delta * w_round / total).view(b, *size)
        self.squared_deviations[index] = (
            self.squared_deviations[index].reshape(b, -1) + dev_round + delta * delta * w_old * w_round / total
        ).view(b, *size)
        self.sum_of_weights[index] = total.view(b, *size)
        for i in index.tolist():
            self.num_masks[i] += n

    @property
    def uncertainty(self) -> torch.Tensor:
        """(B, H, W) mask-weighted variance ``S / W`` (relax-xai returns ``S``)."""
        return self.squared_deviations / self.sum_of_weights


def u_relax(importance: torch.Tensor, uncertainty: torch.Tensor) -> torch.Tensor:
    """(B, H, W) importance where the uncertainty is ≤ its per-image (lower) median, else 0."""
    median = uncertainty.flatten(1).median(dim=1).values[:, None, None]
    return importance * (uncertainty <= median)


STOPPING_RULES = Registry("stopping rule")


@STOPPING_RULES.register("stderr")
def relative_standard_error(estimator: RelaxEstimator, previous: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(b,) estimated noise of the map relative to its spread: ``sqrt(mean(U / W)) / std(R)``.

    ``U / W`` bounds the variance of the weighted mean R at each pixel (weights in [0, 1]). The
    bound is loose (U also holds the similarity's variation caused by other pixels' masks), so the
    default ``tolerance=0.5`` is calibrated empirically: on a random-weight ResNet at 32 px a
    score of 0.6 came with Pearson 0.99 against the 3000-mask map (2000 masks), 0.8 with 0.95.
    """
    importance = estimator.importance[index].flatten(1)
    noise = (estimator.uncertainty[index] / estimator.sum_of_weights[index]).flatten(1).mean(1).sqrt()
    return noise / importance.std(1).clamp_min(torch.finfo(importance.dtype).eps)


@STOPPING_RULES.register("change")
def relative_change(estimator: RelaxEstimator, previous: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(b,) max |R − R_previous round| relative to the range of R (stricter: it tracks the worst pixel)."""
    new = estimator.importance[index]
    span = new.flatten(1).amax(1) - new.flatten(1).amin(1)
    return (new - previous).flatten(1).abs().amax(1) / span.clamp_min(torch.finfo(new.dtype).eps)


def mask_rounds(
    sampler: Callable[..., torch.Tensor],
    num_masks: int,
    round_size: int,
    size: tuple[int, int],
    generator: torch.Generator,
    dtype: torch.dtype,
) -> Iterator[torch.Tensor]:
    """Yield ``num_masks`` masks from ``sampler`` in rounds of ``round_size``, (n, 1, H, W) each."""
    for start in range(0, num_masks, round_size):
        yield sampler(min(round_size, num_masks - start), size, generator, dtype)


def check_masks(masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Validate explicit masks: (N, 1, H, W) or (N, H, W), non-negative, finite → (N, 1, H, W)."""
    if not torch.is_tensor(masks):
        raise TypeError(f"masks must be a tensor of shape (N, 1, H, W); got {type(masks).__name__}")
    if masks.ndim == 3:
        masks = masks[:, None]
    if masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[2:] != images.shape[2:] or masks.shape[0] == 0:
        raise ValueError(
            f"masks must have shape (N, 1, {images.shape[2]}, {images.shape[3]}) to match the images; "
            f"got {tuple(masks.shape)}"
        )
    if not torch.isfinite(masks).all() or (masks < 0).any():
        raise ValueError("masks are the estimator's weights and must be finite and non-negative (e.g. in [0, 1])")
    return masks.to(device=images.device, dtype=images.dtype)


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is a positive int (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return value


@EXPLAINERS.register("relax")
class RELAX(Explainer):
    """RELAX importance, uncertainty and U-RELAX maps for any image encoder.

    Args:
        encoder: ``nn.Module`` mapping (B, 3, H, W) normalised images to (B, D) embeddings.
        num_masks: masks per call (relax-xai: 30 batches × 100 = 3000); with ``adaptive`` the
            maximum.
        batch_size: images (image × mask pairs) per forward pass.
        num_cells, p, shift: mask distribution, see :class:`~sslens.explain.masks.RelaxMasks`.
        baseline: what replaces masked-out pixels: ``"zero"`` (relax-xai), ``"blur"``, ``"mean"``.
        blur_sigma: Gaussian σ in px of the ``"blur"`` baseline.
        seed: seeds the masks; same seed → identical maps.
        adaptive: draw masks in rounds of ``round_size`` and stop an image once its stopping
            score is below ``tolerance``, after at least ``min_masks`` masks.
        stop: the score, from :data:`STOPPING_RULES`: ``"stderr"`` (default, the map's estimated
            standard error relative to its spread) or ``"change"`` (the last round's max change
            relative to the map's range).
        tolerance, round_size, min_masks: the stopping rule's threshold and granularity.
        amp: bf16 autocast + channels_last for the encoder: None (default) on CUDA only, True
            on any device, False never.

    Call ``explainer(images, masks=None)`` with (B, 3, H, W) normalised images; ``masks`` is an
    optional explicit (N, 1, H, W) tensor shared by all images (``num_masks`` is then ignored
    and the result is a deterministic function of the masks). Returns an
    :class:`~sslens.explain.base.Explanation` with (B, H, W) ``importance``, ``uncertainty``
    (normalised, see the module docstring) and ``components["u_relax"]``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_masks: int = 3000,
        batch_size: int = 256,
        num_cells: int = 7,
        p: float = 0.5,
        shift: str = "relax",
        baseline: str = "zero",
        blur_sigma: float = 4.0,
        seed: int = 0,
        adaptive: bool = False,
        stop: str = "stderr",
        tolerance: float = 0.5,
        round_size: int = 250,
        min_masks: int = 500,
        amp: bool | None = None,
    ):
        super().__init__(encoder)
        self.num_masks = check_positive_int("num_masks", num_masks)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.round_size = check_positive_int("round_size", round_size)
        self.sampler = RelaxMasks(num_cells=num_cells, p=p, shift=shift)
        BASELINES.get(baseline)
        self.baseline = baseline
        if not blur_sigma > 0:
            raise ValueError(f"blur_sigma is a Gaussian σ in pixels and must be > 0; got {blur_sigma!r}")
        self.blur_sigma = float(blur_sigma)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int; got {seed!r}")
        self.seed = seed
        if not tolerance > 0:
            raise ValueError(f"tolerance is a fraction of the map's range and must be > 0; got {tolerance!r}")
        if isinstance(min_masks, bool) or not isinstance(min_masks, int) or min_masks < 0:
            raise ValueError(f"min_masks must be a non-negative integer; got {min_masks!r}")
        self.adaptive, self.tolerance, self.min_masks = bool(adaptive), float(tolerance), min_masks
        STOPPING_RULES.get(stop)
        self.stop = stop
        self.amp = None if amp is None else bool(amp)

    def explain(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> Explanation:
        self.encoder.eval()
        size = tuple(images.shape[2:])
        dtype = images.dtype if images.is_floating_point() else torch.float32
        images = images.to(dtype)
        with torch.inference_mode(), autotuned_convolutions(images.device):
            if masks is None:
                generator = torch.Generator(device=images.device).manual_seed(self.seed)
                rounds = mask_rounds(self.sampler, self.num_masks, self.round_size, size, generator, dtype)
                mask_info = self.sampler.info()
            else:
                masks = check_masks(masks, images)
                rounds = iter(masks.split(self.round_size))
                mask_info = {"masks": "explicit", "count": masks.shape[0]}
            baseline = BASELINES.get(self.baseline)(images, self.blur_sigma)
            reference = torch.cat([embed(self.encoder, x, self.amp) for x in images.split(self.batch_size)])
            estimator = RelaxEstimator(images.shape[0], size, reference.dtype, images.device)
            active = torch.arange(images.shape[0], device=images.device)
            for round_masks in rounds:
                x, base = images[active, None], baseline[active, None]
                scores = masked_similarities(
                    self.encoder, lambda m, x=x, base=base: x * m + base * (1 - m),
                    reference[active], round_masks, self.batch_size, self.amp,
                )
                previous = estimator.importance[active].clone()
                estimator.update(scores, round_masks, active)
                if self.adaptive:
                    active = self._still_running(estimator, previous, active)
                    if active.numel() == 0:
                        break
            importance = estimator.importance.float()
            uncertainty = estimator.uncertainty.float()
        return Explanation(
            importance=importance,
            uncertainty=uncertainty,
            components={"u_relax": u_relax(importance, uncertainty)},
            info={
                "method": "relax",
                "seed": self.seed,
                "num_masks_used": list(estimator.num_masks),
                "num_masks_requested": self.num_masks if masks is None else int(masks.shape[0]),
                **mask_info,
                "baseline": self.baseline,
                **({"blur_sigma": self.blur_sigma} if self.baseline == "blur" else {}),
                "adaptive": self.adaptive,
                **(
                    {"stop": self.stop, "tolerance": self.tolerance, "round_size": self.round_size,
                     "min_masks": self.min_masks}
                    if self.adaptive else {}
                ),
                "uncertainty": "mask-weighted variance (relax-xai's sum divided by the summed weights)",
            },
        )

    def _still_running(
        self, estimator: RelaxEstimator, previous: torch.Tensor, active: torch.Tensor
    ) -> torch.Tensor:
        """The images of ``active`` whose stopping score is still ≥ tolerance."""
        change = STOPPING_RULES.get(self.stop)(estimator, previous, active)
        used = torch.tensor([estimator.num_masks[i] for i in active.tolist()], device=active.device)
        # A first round has no previous estimate to compare with: its "change" is from the prior at 0.
        done = (change < self.tolerance) & (used >= max(self.min_masks, 2 * self.round_size))
        return active[~done]
