"""RELAX: representation explainability by masking (Wickstrøm et al., IJCV 2023).

Paper: https://arxiv.org/abs/2112.10161 — "RELAX explains a representation by measuring the
similarity between the representation of the input and representations of masked-out
versions of the input": with ``h = f(X)`` and ``h̄ = f(X ⊙ M)``, ``s = cos(h, h̄)``,

    importance   R_ij = E_M[s · M_ij]            estimated as  R = Σ_n s_n M_n / Σ_n M_n
    uncertainty  U_ij = Var_M[s · M_ij]          estimated as  U = Σ_n M_n (s_n − R)² / Σ_n M_n

and U-RELAX keeps the importance where the uncertainty is at most its median.

The reference implementation is relax-xai 0.0.5 (``relax_xai.relax.RELAX``). Its masks are
reproduced bit for bit by :class:`sslens.explain.masks.RelaxMasks` (same seed → same masks), and
``RELAX(sampler="iid", round_size=100, seed=s)`` draws exactly the masks relax-xai draws after
``torch.manual_seed(s)`` on the CPU, so its importance matches to float tolerance (both tested).
The estimator, the packed forward passes and the BatchNorm-folded inference copy are the shared
masking engine (:mod:`sslens.explain.engine`). Every place sslens differs from relax-xai, and why
(the measurements behind each choice are in docs/BENCHMARKS.md, "RELAX"):

* **Uncertainty is normalised.** relax-xai's ``uncertainty`` is the running sum
  ``Σ w (s − R)(s − R_prev)`` (West's weighted update) and is never divided by the summed
  weights, so it grows with the number of masks and is not the variance the paper defines.
  sslens returns ``U = Σ w (s − R)(s − R_prev) / Σ w``, i.e. ``U_sslens · sum_of_weights ==
  U_relax_xai`` (tested), where ``sum_of_weights = 1e-10 + Σ_n M_n`` exactly as relax-xai
  initialises it (the ``1e-10`` prior at 0 is kept, so importance matches to float tolerance).
  U-RELAX therefore thresholds the variance at its median, where relax-xai thresholds the sum
  (which also ranks how much mask weight a pixel received).
* **Balanced masks by default** (``sampler="orthogonal"``; relax-xai's i.i.d. masks are
  ``sampler="iid"``). Each mask has exactly relax-xai's distribution (i.i.d. Bernoulli(0.5)
  cells, a uniform shift), so the estimator's expectations are unchanged, but masks come in
  blocks of 128 (7 × 7 cells) that form a randomised orthogonal array of strength 3 — a
  Hadamard array and its complements: inside a block every cell is on in exactly half the
  masks, every pair of cells in a quarter and every triple in an eighth, which cancels the noise
  that each other cell and each pair of other cells add to a cell's estimate — and the blocks'
  shifts are stratified, each of the 7 offsets per axis once in every 7 blocks (see
  :mod:`sslens.explain.masks`). The same map quality takes several times fewer masks. It needs
  p = 0.5.
* **Closed form over a batch.** relax-xai updates the estimate in a Python loop over single
  masks; sslens computes each round's weighted moments with two matrix products and merges
  rounds with Chan et al.'s parallel weighted update — numerically stable, no per-mask loop.
* **Batched and packed.** Several images and many masks go through one forward pass, filled
  across rounds of masks and across images. relax-xai takes one image per object and breaks on
  ``batch_size=1`` (its ``masks.squeeze()`` drops the batch axis). The default ``batch_size``
  depends on the device (:func:`~sslens.explain.engine.default_batch_size`).
* **Fast inference on the CPU** (``fast_inference="auto"``): the masked batches run through a
  private copy of the encoder whose eval-mode BatchNorms are folded into the preceding
  convolutions (:func:`~sslens.explain.fold.fold_batch_norms`): the same function up to float
  rounding (tested to rtol 1e-4). The caller's model is never modified; the copy is used only if
  it embeds the call's first images like the caller's model does, and never for a model with
  hooks. In fp32 on a CPU the folded model runs close to the CPU's matrix-product peak, so
  bf16 (``amp=True``) is the way to a larger speed-up where the CPU has bf16 matrix units.
* **Seeded.** Masks come from a ``torch.Generator`` on the images' device (relax-xai uses the
  global RNG). The masks of a call are drawn once and shared by all images of the call, so
  explaining several images together gives exactly the maps of explaining each alone.
  Orthogonal masks are drawn a cycle of 7 blocks (896 masks) at a time, so they depend only on
  the seed; i.i.d. masks are drawn a round (``round_size``) at a time, as relax-xai draws a
  batch at a time.
* **Baselines.** relax-xai masks with zeros in normalised space (``baseline="zero"``, the
  default); sslens also offers ``"blur"`` and ``"mean"`` (:mod:`sslens.explain.baselines`):
  ``X ⊙ M + B ⊙ (1 − M)``.
* **Adaptive stopping** (optional, not in the paper): masks are drawn in rounds of
  ``round_size`` (default 128, one block); an image stops once its stopping score is below
  ``tolerance``. The default score, ``stop="blocks"``, is the map's standard error estimated
  from the spread between blocks of 128 masks (batch means) relative to the map's spread — it
  sees the orthogonal sampler's balance inside blocks, which the older ``stop="stderr"`` (an
  i.i.d. bound) does not. It is conservative: a whole cycle of 7 blocks cancels the shift
  offsets' main effects, which batch means count as noise, so the score overstates the map's
  true noise about 3× (``benchmarks/relax_stopping_bias.py``). Its default tolerance 0.33 was
  calibrated on a trained resnet-tiny and checked on held-out images; it is about a tenth of
  the map's spread in true noise, an absolute criterion, so a model whose maps are far noisier
  (a random-weight ResNet-18 on noise images) is not stopped early. Masks come in the same
  seeded sequence, so stopping after n masks (a multiple of ``round_size``) gives exactly the
  map of ``num_masks=n``.
* Mixed precision: on CUDA the encoder runs under bf16 autocast with channels_last inputs
  (``amp=True`` asks for the same on the CPU, opt-in because it is slower than fp32 on a CPU
  without bf16 matrix units); similarities and the estimator are accumulated in fp32 (fp64 for
  fp64 inputs).

>>> from torch import nn
>>> encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
>>> explanation = RELAX(encoder, num_masks=20)(torch.randn(2, 3, 16, 16))
>>> explanation.importance.shape, explanation.info["num_masks_used"]
(torch.Size([2, 16, 16]), [20, 20])
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sslens.checks import integer, non_negative_int, positive_int
from sslens.explain.base import EXPLAINERS, Explainer, Explanation
from sslens.explain.baselines import check_baseline, make_baseline
from sslens.explain.engine import (
    INITIAL_WEIGHT,
    PROBE,
    ProgressCallback,
    RelaxEstimator,
    autotuned_convolutions,
    check_batch_size,
    check_fast_inference,
    check_masks,
    check_progress,
    default_batch_size,
    embed,
    inference_encoder,
    mask_rounds,
    packed_similarities,
    rechunk,
)
from sslens.explain.masks import RelaxMasks
from sslens.registry import lookup


def u_relax(importance: torch.Tensor, uncertainty: torch.Tensor) -> torch.Tensor:
    """(B, H, W) importance where the uncertainty is ≤ its per-image (lower) median, else 0."""
    median = uncertainty.flatten(1).median(dim=1).values[:, None, None]
    return importance * (uncertainty <= median)


#: Each stopping rule's default ``tolerance`` (see the rules' docstrings for the calibration;
#: ``"change"`` at 0.05 stopped i.i.d. runs at about 2000 masks, mean Pearson 0.99).
DEFAULT_TOLERANCE = {"stderr": 0.5, "change": 0.05, "blocks": 0.33}


def _relative_to_spread(noise: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    return noise / importance.flatten(1).std(1).clamp_min(torch.finfo(importance.dtype).eps)


def relative_standard_error(estimator: RelaxEstimator, previous: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(b,) estimated noise of the map relative to its spread: ``sqrt(mean(U / W)) / std(R)``.

    ``U / W`` bounds the variance of the weighted mean R at each pixel for i.i.d. masks (weights
    in [0, 1]). The bound is loose (U also holds the similarity's variation caused by other
    pixels' masks, and it ignores the balance of ``sampler="orthogonal"``), so its default
    tolerance 0.5 was calibrated empirically: on a random-weight ResNet at 32 px a score of 0.6
    came with Pearson 0.99 against the 3000-mask map (2000 masks), 0.8 with 0.95.
    """
    noise = (estimator.uncertainty[index] / estimator.sum_of_weights[index]).flatten(1).mean(1).sqrt()
    return _relative_to_spread(noise, estimator.importance[index])


def relative_change(estimator: RelaxEstimator, previous: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(b,) max |R − R_previous round| relative to the range of R (stricter: it tracks the worst pixel)."""
    new = estimator.importance[index]
    span = new.flatten(1).amax(1) - new.flatten(1).amin(1)
    return (new - previous).flatten(1).abs().amax(1) / span.clamp_min(torch.finfo(new.dtype).eps)


def block_standard_error(estimator: RelaxEstimator, previous: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(b,) the map's standard error estimated from independent blocks of masks, relative to its spread.

    Batch means (Asmussen & Glynn, *Stochastic Simulation*, 2007) with the ratio estimator's
    linearised variance (Cochran, *Sampling Techniques*, 1977, ch. 6): the K blocks of masks are
    independent, and R = Σ_k N_k / Σ_k D_k is a ratio of their sums, so to first order ``Var R ≈ K / (K − 1) · Σ_k (N_k − R D_k)² / (Σ_k D_k)²`` at each pixel. Unlike the
    ``"stderr"`` bound this measures the noise the map actually has — including the reduction
    from ``sampler="orthogonal"``, whose blocks are balanced inside. Their stratified shifts
    make blocks dependent: a cycle of 7 blocks cancels the shift offsets' main effects, which
    this estimate counts, so it errs high (about 3× the true standard error, measured in
    docs/BENCHMARKS.md; see the module docstring).
    Score: ``sqrt(mean over pixels of Var R) / std(R)``; infinite before two blocks. The default
    tolerance 0.33 was calibrated on a trained resnet-tiny (docs/BENCHMARKS.md); a
    noise-to-spread ratio r at n masks gives roughly Pearson
    ``sqrt((1 + r² n/N) / (1 + r²))`` with the N-mask map.
    """
    k = estimator.num_blocks[index].to(estimator.importance.dtype)[:, None]  # (b, 1)
    r = estimator.importance[index].flatten(1) - estimator.center[index]
    spread = (estimator.block_nn[index] - 2 * r * estimator.block_nd[index] + r * r * estimator.block_dd[index])
    weight = (estimator.sum_of_weights[index].flatten(1) - INITIAL_WEIGHT).clamp_min(torch.finfo(r.dtype).tiny)
    variance = spread.clamp_min(0.0) / (weight * weight) * k / (k - 1).clamp_min(1)
    score = _relative_to_spread(variance.mean(1).sqrt(), estimator.importance[index])
    return torch.where(k[:, 0] >= 2, score, torch.full_like(score, math.inf))


#: Stopping-rule name → ``rule(estimator, previous, index) -> (b,) score``.
STOPPING_RULES = {
    "stderr": relative_standard_error,
    "change": relative_change,
    "blocks": block_standard_error,
}


@EXPLAINERS.register("relax")
class RELAX(Explainer):
    """RELAX importance, uncertainty and U-RELAX maps for any image encoder.

    Args:
        encoder: ``nn.Module`` mapping (B, 3, H, W) normalised images to (B, D) embeddings.
        num_masks: masks per call (relax-xai: 30 batches × 100 = 3000); with ``adaptive`` the
            maximum.
        batch_size: images (image × mask pairs) per forward pass; None (default): by device
            (:func:`~sslens.explain.engine.default_batch_size`: 32 on the CPU, about 256 images
            at 224 px on a GPU). Passes are filled across rounds of masks and across images.
        num_cells, p, shift: mask distribution, see :class:`~sslens.explain.masks.RelaxMasks`.
        sampler: the cells' joint distribution: ``"orthogonal"`` (default: balanced blocks,
            relax-xai's distribution for every single mask but a less noisy map for the same
            number of masks; p = 0.5 only) or ``"iid"`` (relax-xai's masks), see
            :mod:`sslens.explain.masks`.
        baseline: what replaces masked-out pixels: ``"zero"`` (relax-xai), ``"blur"``, ``"mean"``.
        blur_sigma: Gaussian σ in px of the ``"blur"`` baseline.
        seed: seeds the masks; same seed → identical maps.
        adaptive: draw masks in rounds of ``round_size`` and stop an image once its stopping
            score is below ``tolerance``, after at least ``min_masks`` masks.
        stop: the score, from :data:`STOPPING_RULES`: ``"blocks"`` (default: the map's
            standard error estimated from independent blocks of masks, relative to its spread;
            it sees the orthogonal sampler's gain), ``"stderr"`` (an i.i.d. bound on that
            standard error) or ``"change"`` (the last round's max change relative to the
            map's range).
        tolerance: the stopping score's threshold; None: the rule's :data:`DEFAULT_TOLERANCE`.
        round_size: masks per round of the adaptive loop; None: one block (128 for 7 × 7
            cells). With ``stop="blocks"`` a multiple of the block size (128 for 7 × 7 cells).
            ``"iid"`` masks are drawn a round at a time, so their sequence depends on it (with
            ``round_size=100`` it is relax-xai's for the same seed); ``"orthogonal"`` ones are
            drawn a whole draw (:attr:`~sslens.explain.masks.RelaxMasks.draw_size`, 896 masks
            for 7 × 7 cells) at a time and do not.
        min_masks: masks before an image may stop.
        amp: bf16 autocast + channels_last for the encoder: None (default) on CUDA only, True
            on any device, False never.
        fast_inference: run the masked batches through a private copy of the encoder with its
            BatchNorms folded into the preceding convolutions (:func:`~sslens.explain.fold.fold_batch_norms`; equal
            maps up to float rounding, the caller's model untouched): ``"auto"`` (default) on
            the CPU, True on any device (raises if it cannot), False never.

    Call ``explainer(images, masks=None, progress=None)`` with (B, 3, H, W) normalised images;
    ``masks`` is an optional explicit (N, 1, H, W) tensor shared by all images (``num_masks`` is
    then ignored and the result is a deterministic function of the masks); ``progress(done,
    total)`` is told the masks done after every round (:data:`~sslens.explain.engine.ProgressCallback`;
    ``total`` is ``num_masks`` or N; the maps do not depend on it). Returns an
    :class:`~sslens.explain.base.Explanation` with (B, H, W) ``importance``, ``uncertainty``
    (normalised, see the module docstring) and ``components["u_relax"]``.
    """

    #: Name in reports.
    label = "RELAX"

    def __init__(
        self,
        encoder: nn.Module,
        num_masks: int = 3000,
        batch_size: int | None = None,
        num_cells: int = 7,
        p: float = 0.5,
        shift: str = "relax",
        sampler: str = "orthogonal",
        baseline: str = "zero",
        blur_sigma: float = 4.0,
        seed: int = 0,
        adaptive: bool = False,
        stop: str = "blocks",
        tolerance: float | None = None,
        round_size: int | None = None,
        min_masks: int = 500,
        amp: bool | None = None,
        fast_inference: str | bool = "auto",
    ):
        super().__init__(encoder)
        self.num_masks = positive_int("num_masks", num_masks)
        self.batch_size = check_batch_size(batch_size)
        self.mask_sampler = RelaxMasks(num_cells=num_cells, p=p, shift=shift, sampler=sampler)
        block = self.mask_sampler.block_size
        self.round_size = block if round_size is None else positive_int("round_size", round_size)
        lookup("stopping rule", STOPPING_RULES, stop)
        self.stop = stop
        if adaptive and stop == "blocks" and self.round_size % block:
            raise ValueError(
                f"round_size must be a multiple of the block size {block} with adaptive=True and "
                f"stop='blocks' (the rule compares whole blocks of masks); got {self.round_size}"
            )
        self.baseline = check_baseline(baseline, blur_sigma)
        self.blur_sigma = float(blur_sigma)
        self.seed = integer("seed", seed)
        tolerance = DEFAULT_TOLERANCE[stop] if tolerance is None else tolerance
        if not tolerance > 0:
            raise ValueError(f"tolerance is a fraction of the map's spread and must be > 0; got {tolerance!r}")
        non_negative_int("min_masks", min_masks)
        self.adaptive, self.tolerance, self.min_masks = bool(adaptive), float(tolerance), min_masks
        self.amp = None if amp is None else bool(amp)
        self.fast_inference = check_fast_inference(fast_inference)

    def explain(
        self, images: torch.Tensor, masks: torch.Tensor | None = None, progress: ProgressCallback | None = None
    ) -> Explanation:
        progress = check_progress(progress)
        self.encoder.eval()
        size = tuple(images.shape[2:])
        dtype = images.dtype if images.is_floating_point() else torch.float32
        images = images.to(dtype)
        num_images = images.shape[0]
        batch_size = self.batch_size or default_batch_size(images.device, size)
        with torch.inference_mode(), autotuned_convolutions(images.device):
            encoder, fast_info = inference_encoder(self.encoder, self.fast_inference, images[:PROBE], self.amp)
            if masks is None:
                generator = torch.Generator(device=images.device).manual_seed(self.seed)
                rounds = mask_rounds(self.mask_sampler, self.num_masks, self.round_size, size, generator, dtype)
                mask_info = self.mask_sampler.info()
            else:
                masks = check_masks(masks, images)
                rounds = iter(masks.split(self.round_size))
                mask_info = {"masks": "explicit", "count": masks.shape[0]}
            if not self.adaptive:
                # Nothing is decided between rounds: size every chunk to fill one forward pass.
                rounds = rechunk(rounds, max(1, batch_size // num_images))
            baseline = make_baseline(self.baseline, images, blur_sigma=self.blur_sigma)
            reference = torch.cat([embed(encoder, x, self.amp) for x in images.split(batch_size)])
            blocks = self.mask_sampler.block_size if self.adaptive and self.stop == "blocks" else None
            estimator = RelaxEstimator(num_images, size, reference.dtype, images.device, blocks)
            active = torch.arange(num_images, device=images.device)
            total = self.num_masks if masks is None else int(masks.shape[0])
            done = 0
            if progress is not None:
                progress(done, total)
            for round_masks in rounds:

                def build(index: torch.Tensor, m: torch.Tensor, rows: torch.Tensor = active) -> torch.Tensor:
                    x, base = images[rows[index], None], baseline[rows[index], None]
                    return x * m + base * (1 - m)

                (scores,) = packed_similarities(encoder, [(build, reference[active])], round_masks, batch_size, self.amp)
                # Only the stopping rules read the previous map; unrolled rounds skip the copy.
                previous = estimator.importance[active].clone() if self.adaptive else None
                estimator.update(scores, round_masks, active)
                done += round_masks.shape[0]
                if progress is not None:
                    progress(done, total)
                if self.adaptive:
                    active = self._still_running(estimator, previous, active)
                    if active.numel() == 0:
                        break
            # Adaptive stopping may end the call before ``total``: it is done all the same.
            if progress is not None and done < total:
                progress(total, total)
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
                "batch_size": batch_size,
                "fast_inference": fast_info,
                "mean_similarity": estimator.mean_similarity,
                "uncertainty": "mask-weighted variance (relax-xai's sum divided by the summed weights)",
            },
        )

    def _still_running(
        self, estimator: RelaxEstimator, previous: torch.Tensor, active: torch.Tensor
    ) -> torch.Tensor:
        """The images of ``active`` whose stopping score is still ≥ tolerance."""
        change = STOPPING_RULES[self.stop](estimator, previous, active)
        used = torch.tensor([estimator.num_masks[i] for i in active.tolist()], device=active.device)
        # A first round has no previous estimate to compare with: its "change" is from the prior at 0.
        done = (change < self.tolerance) & (used >= max(self.min_masks, 2 * self.round_size))
        return active[~done]
