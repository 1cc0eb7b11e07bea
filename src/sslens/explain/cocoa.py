"""COCOA: contrastive corpus attribution (Lin, Chen, Kim & Lee, ICLR 2023).

Paper: https://arxiv.org/abs/2210.00107 — "we propose contrastive corpus similarity, a novel and
semantically meaningful scalar explanation output based on a reference corpus and a contrasting
foil set of samples", and COCOA attributes it with a feature-attribution method. With the
cosine similarity ``s``, a corpus set C and a foil set F, the target of an image x̃ is

    y(x̃) = 1/|C| Σ_{c ∈ C} s(f(x̃), f(c)) − 1/|F| Σ_{φ ∈ F} s(f(x̃), f(φ))
         = ⟨f(x̃) / ‖f(x̃)‖, μ_C − μ_F⟩,

where μ_C and μ_F are the means of the L2-normalised corpus and foil embeddings, computed once
per call and detached (the reference code's ``implementation="mean"`` computes it the same way).
It does not involve the explained image's own embedding: COCOA asks which features make an
image look like the corpus rather than the foil. Two attributions, one registered name each:

* ``"cocoa-ig"`` — integrated gradients of y (:class:`CocoaGradients`), through the attribution
  core of the label-free explainers (:func:`sslens.explain.labelfree.integrated_gradients`):
  the same steps, quadrature rules, baselines and completeness gap in ``info``.
* ``"cocoa-masking"`` — RISE-style masking (:class:`CocoaMasking`) with RELAX's masks and
  estimator: ``R = Σ_n y(x ⊙ M_n + b ⊙ (1 − M_n)) M_n / Σ_n M_n`` per pixel, and the
  mask-weighted variance as ``uncertainty``. Since ``y = ‖μ_C − μ_F‖ · cos(f(x̃), μ_C − μ_F)``,
  the masked images go through the masking engine's packed forward passes
  (:func:`~sslens.explain.engine.packed_similarities`) with ``μ_C − μ_F`` as the reference.

Corpus and foil are (N_C, 3, h, w) and (N_F, 3, h, w) normalised images (any size the encoder
takes), given to the constructor or to the call, ``explainer(images, corpus=..., foil=...)``;
the call's win. Which images to use (e.g. the explained image's class as the corpus, random
images as the foil, as in the paper) is the caller's choice.

Where sslens differs from the paper's code (github.com/suinleelab/cl-explainability), and why:

* **Masking is RELAX's, not RISE's.** The reference RISE draws 7 × 7 (CIFAR: 4 × 4) Bernoulli(0.5)
  grids with RISE's shift, 5000 masks, new masks for every image, and divides Σ y M by
  ``N · p``. sslens uses :class:`~sslens.explain.masks.RelaxMasks` (``shift="rise"`` gives
  RISE's shift; the default ``sampler="orthogonal"`` balances the cells), one seeded set of
  masks shared by every image of a call, and RELAX's per-pixel normalisation by the summed
  mask weight ``Σ M`` (with relax-xai's 1e-10 prior), which does not assume that every pixel
  is covered ``p · N`` times. Default 3000 masks, as RELAX's.
* **Baselines.** The reference code starts IG from, and masks with, a black image; sslens's
  ``baseline="zero"`` is zero in normalised space (the dataset's mean colour); ``"blur"``,
  ``"mean"`` or (for IG) an image tensor are the alternatives.
* Maps are raw per-pixel (B, H, W) float32: IG summed over colour channels (the reference
  keeps channels), never rescaled.
* **A zero baseline and a network without biases.** y depends on f(x̃) only through its
  direction, so for a positively homogeneous encoder (ReLU convolutions without biases, e.g. a
  ResNet at initialisation, whose BatchNorm still has its initial statistics) y is constant
  along the straight path from ``baseline="zero"`` and jumps at the baseline itself: the
  attributions sum to 0 instead of y(x) − y(0), ``info["completeness_gap"]`` is the whole
  difference, and the map is gradient × input times the quadrature's Σ w/α. Trained networks
  have biases; for such an encoder use ``baseline="blur"`` or ``"mean"``.

>>> from torch import nn
>>> encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
>>> corpus, foil = torch.randn(4, 3, 16, 16), torch.randn(6, 3, 16, 16)
>>> explainer = CocoaMasking(encoder, num_masks=64)
>>> explainer(torch.randn(2, 3, 16, 16), corpus=corpus, foil=foil).importance.shape
torch.Size([2, 16, 16])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslens.checks import integer, positive_int
from sslens.explain.base import EXPLAINERS, Explainer, Explanation
from sslens.explain.baselines import check_baseline, make_baseline
from sslens.explain.engine import (
    PROBE,
    RelaxEstimator,
    autotuned_convolutions,
    check_batch_size,
    check_fast_inference,
    check_masks,
    default_batch_size,
    inference_encoder,
    mask_rounds,
    packed_similarities,
    rechunk,
)
from sslens.explain.labelfree import EmbeddingTarget, TargetAttribution, embed_batches
from sslens.explain.masks import RelaxMasks


def check_image_set(name: str, images: object) -> torch.Tensor | None:
    """``images`` if it is None or a non-empty (N, 3, H, W) floating-point tensor, else a ValueError."""
    if images is None:
        return None
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(
            f"{name} must be a non-empty (N, 3, H, W) tensor of normalised images, like the explained "
            f"images; got {shape}"
        )
    if not images.is_floating_point():
        raise ValueError(f"{name} must hold normalised floating-point images; got dtype {images.dtype}")
    return images


def chosen_set(name: str, at_call: object, at_construction: torch.Tensor | None) -> torch.Tensor:
    """The call's ``name`` set if given, else the constructor's; a ValueError if neither is."""
    images = check_image_set(name, at_call)
    images = at_construction if images is None else images
    if images is None:
        raise ValueError(
            f"COCOA needs a {name} set: pass {name}= an (N, 3, H, W) image tensor to the call, "
            f"explainer(images, corpus=..., foil=...), or to the constructor."
        )
    return images


def contrastive_direction(corpus_embeddings: torch.Tensor, foil_embeddings: torch.Tensor) -> torch.Tensor:
    """(D,) ``μ_C − μ_F`` from (N_C, D) and (N_F, D) embeddings: the difference of the means of
    the L2-normalised embeddings, so that ``⟨f̂(x̃), μ_C − μ_F⟩`` is the mean cosine similarity to
    the corpus minus that to the foil."""
    return F.normalize(corpus_embeddings, dim=1).mean(dim=0) - F.normalize(foil_embeddings, dim=1).mean(dim=0)


def contrastive_corpus_similarity(embeddings: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """(n,) contrastive corpus similarity of embeddings (n, D) given ``direction`` (D,) = μ_C − μ_F."""
    return F.normalize(embeddings, dim=1) @ direction.to(embeddings.dtype)


def embedded_direction(
    encoder: nn.Module,
    images: torch.Tensor,
    corpus: torch.Tensor,
    foil: torch.Tensor,
    batch_size: int,
    amp: bool | None = False,
) -> tuple[torch.Tensor, dict]:
    """(D,) μ_C − μ_F of ``corpus`` and ``foil`` embedded by ``encoder`` on the device and in the
    dtype of ``images``, ``batch_size`` images per pass, and what to record of them in ``info``."""
    corpus, foil = (group.to(device=images.device, dtype=images.dtype) for group in (corpus, foil))
    direction = contrastive_direction(
        embed_batches(encoder, corpus, batch_size, amp), embed_batches(encoder, foil, batch_size, amp)
    )
    return direction, {"corpus_size": corpus.shape[0], "foil_size": foil.shape[0]}


class CocoaGradients(TargetAttribution):
    """COCOA by integrated gradients (or gradient × input) of the contrastive corpus similarity.

    Args:
        encoder: ``nn.Module`` mapping (B, 3, H, W) normalised images to (B, D) embeddings.
        corpus, foil: (N, 3, h, w) normalised images, or None to pass them to the call.
        method, steps, rule, baseline, blur_sigma, batch_size: see
            :class:`~sslens.explain.labelfree.TargetAttribution`.

    Call ``explainer(images, corpus=None, foil=None)``: (B, 3, H, W) images; sets given here
    replace the constructor's. Returns (B, H, W) float32 ``importance`` (summed over colour
    channels); ``info`` as for ``"labelfree-ig"`` (``target`` is y at each image) plus
    ``corpus_size`` and ``foil_size``.
    """

    name = "cocoa"

    def __init__(
        self,
        encoder: nn.Module,
        corpus: torch.Tensor | None = None,
        foil: torch.Tensor | None = None,
        method: str = "ig",
        steps: int = 50,
        rule: str = "gausslegendre",
        baseline: str | torch.Tensor = "zero",
        blur_sigma: float = 4.0,
        batch_size: int | None = None,
    ):
        super().__init__(
            encoder, method=method, steps=steps, rule=rule, baseline=baseline, blur_sigma=blur_sigma,
            batch_size=batch_size,
        )
        self.corpus = check_image_set("corpus", corpus)
        self.foil = check_image_set("foil", foil)

    def explain(
        self, images: torch.Tensor, corpus: torch.Tensor | None = None, foil: torch.Tensor | None = None
    ) -> Explanation:
        # Spelled out (not **options) so that callers see from the signature that a call takes
        # a corpus and a foil, as they do for CocoaMasking.
        return super().explain(images, corpus=corpus, foil=foil)

    def target(
        self,
        images: torch.Tensor,
        embeddings: torch.Tensor,
        batch_size: int,
        corpus: torch.Tensor | None = None,
        foil: torch.Tensor | None = None,
    ) -> tuple[EmbeddingTarget, dict]:
        corpus, foil = chosen_set("corpus", corpus, self.corpus), chosen_set("foil", foil, self.foil)
        direction, info = embedded_direction(self.encoder, images, corpus, foil, batch_size)

        def contrastive_similarity(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return contrastive_corpus_similarity(rows, direction)

        return contrastive_similarity, info


@EXPLAINERS.register("cocoa-ig")
def cocoa_ig(
    encoder: nn.Module,
    corpus: torch.Tensor | None = None,
    foil: torch.Tensor | None = None,
    steps: int = 50,
    rule: str = "gausslegendre",
    baseline: str | torch.Tensor = "zero",
    blur_sigma: float = 4.0,
    batch_size: int | None = None,
) -> CocoaGradients:
    """COCOA by integrated gradients; see :class:`CocoaGradients`."""
    return CocoaGradients(
        encoder, corpus=corpus, foil=foil, method="ig", steps=steps, rule=rule, baseline=baseline,
        blur_sigma=blur_sigma, batch_size=batch_size,
    )


cocoa_ig.label = "COCOA (IG)"


@EXPLAINERS.register("cocoa-masking")
class CocoaMasking(Explainer):
    """COCOA by masking: the mask-weighted mean contrastive corpus similarity at every pixel.

    Args:
        encoder: ``nn.Module`` mapping (B, 3, H, W) normalised images to (B, D) embeddings.
        corpus, foil: (N, 3, h, w) normalised images, or None to pass them to the call.
        num_masks: masks per call.
        batch_size: image × mask rows per forward pass; None (default): by device
            (:func:`~sslens.explain.engine.default_batch_size`).
        num_cells, p, shift, sampler: the masks, see :class:`~sslens.explain.masks.RelaxMasks`
            (default: RELAX's balanced ``"orthogonal"`` masks).
        baseline: what replaces masked-out pixels: ``"zero"``, ``"blur"``, ``"mean"``.
        blur_sigma: Gaussian σ in px of the ``"blur"`` baseline.
        seed: seeds the masks: the same seed gives the same masks (those of
            :class:`~sslens.explain.relax.RELAX` with the same seed and mask options) and maps.
        amp, fast_inference: as for :class:`~sslens.explain.relax.RELAX` (bf16 on CUDA by
            default; on the CPU a private BatchNorm-folded copy of the encoder embeds the
            corpus, the foil and the masked images).

    Call ``explainer(images, corpus=None, foil=None, masks=None)``: (B, 3, H, W) images; sets
    given here replace the constructor's; ``masks`` (N, 1, H, W) replaces the drawn ones
    (shared by all images). Returns ``importance`` R and ``uncertainty`` (mask-weighted
    variance of y), (B, H, W) float32. ``info``: method, seed, masks, baseline, ``target`` (y
    of each unmasked image), ``mean_target`` (y averaged over the masked images),
    ``corpus_size``, ``foil_size``, ``batch_size``, ``fast_inference``.
    """

    label = "COCOA (masking)"

    def __init__(
        self,
        encoder: nn.Module,
        corpus: torch.Tensor | None = None,
        foil: torch.Tensor | None = None,
        num_masks: int = 3000,
        batch_size: int | None = None,
        num_cells: int = 7,
        p: float = 0.5,
        shift: str = "relax",
        sampler: str = "orthogonal",
        baseline: str = "zero",
        blur_sigma: float = 4.0,
        seed: int = 0,
        amp: bool | None = None,
        fast_inference: str | bool = "auto",
    ):
        super().__init__(encoder)
        self.corpus = check_image_set("corpus", corpus)
        self.foil = check_image_set("foil", foil)
        self.num_masks = positive_int("num_masks", num_masks)
        self.batch_size = check_batch_size(batch_size)
        self.mask_sampler = RelaxMasks(num_cells=num_cells, p=p, shift=shift, sampler=sampler)
        self.baseline = check_baseline(baseline, blur_sigma)
        self.blur_sigma = float(blur_sigma)
        self.seed = integer("seed", seed)
        self.amp = None if amp is None else bool(amp)
        self.fast_inference = check_fast_inference(fast_inference)

    def explain(
        self,
        images: torch.Tensor,
        corpus: torch.Tensor | None = None,
        foil: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> Explanation:
        corpus, foil = chosen_set("corpus", corpus, self.corpus), chosen_set("foil", foil, self.foil)
        self.encoder.eval()
        size = tuple(images.shape[2:])
        dtype = images.dtype if images.is_floating_point() else torch.float32
        images = images.to(dtype)
        num_images = images.shape[0]
        batch_size = self.batch_size or default_batch_size(images.device, size)
        with torch.inference_mode(), autotuned_convolutions(images.device):
            encoder, fast_info = inference_encoder(self.encoder, self.fast_inference, images[:PROBE], self.amp)
            direction, set_info = embedded_direction(encoder, images, corpus, foil, batch_size, self.amp)
            if masks is None:
                generator = torch.Generator(device=images.device).manual_seed(self.seed)
                # Rounds of one block, as RELAX draws them, so a seed gives RELAX's masks.
                rounds = mask_rounds(
                    self.mask_sampler, self.num_masks, self.mask_sampler.block_size, size, generator, dtype
                )
                mask_info = self.mask_sampler.info()
            else:
                masks = check_masks(masks, images)
                rounds = iter([masks])
                mask_info = {"masks": "explicit", "count": masks.shape[0]}
            baseline = make_baseline(self.baseline, images, blur_sigma=self.blur_sigma)
            # y = ‖μ_C − μ_F‖ · cos(f(x̃), μ_C − μ_F): the engine's cosine similarities, rescaled.
            scale = direction.norm()
            reference = direction.expand(num_images, -1)
            at_images = contrastive_corpus_similarity(embed_batches(encoder, images, batch_size, self.amp), direction)
            estimator = RelaxEstimator(num_images, size, reference.dtype, images.device)

            def build(index: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
                x, base = images[index, None], baseline[index, None]
                return x * m + base * (1 - m)

            # Nothing is decided between rounds: size every chunk to fill one forward pass.
            for chunk in rechunk(rounds, max(1, batch_size // num_images)):
                (cosines,) = packed_similarities(encoder, [(build, reference)], chunk, batch_size, self.amp)
                estimator.update(cosines * scale, chunk)
            importance = estimator.importance.float()
            uncertainty = estimator.uncertainty.float()
        return Explanation(
            importance=importance,
            uncertainty=uncertainty,
            info={
                "method": "cocoa-masking",
                "seed": self.seed,
                "num_masks_used": list(estimator.num_masks),
                **mask_info,
                "baseline": self.baseline,
                **({"blur_sigma": self.blur_sigma} if self.baseline == "blur" else {}),
                **set_info,
                "target": at_images.tolist(),
                "mean_target": estimator.mean_similarity,
                "batch_size": batch_size,
                "fast_inference": fast_info,
                "uncertainty": "mask-weighted variance of the contrastive corpus similarity",
            },
        )
