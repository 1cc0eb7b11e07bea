"""Perceptual-component importance maps (Yarici et al., ICIP 2024) and the report's extensions.

Paper: "Explaining Representation Learning with Perceptual Components",
https://arxiv.org/abs/2406.06930 — "we employ selective masking of these components to observe
changes in representations, resulting in distinct importance maps for each". Each component is a
RELAX importance map (same estimator, :class:`sslens.explain.relax.RelaxEstimator`) whose masked
image removes one perceptual component where ``M = 0``. In pixel space (images in [0, 1]):

============  ================================================  ==============================
component     masked image                                      compared with the embedding of
============  ================================================  ==============================
color         ``X ⊙ M + gray(X) ⊙ (1 − M)``                     ``X``
shape         ``edges(X) ⊙ M``  (Canny edges, 3 channels)       ``edges(X)``
texture       ``gray(X) ⊙ M_t + blur(gray(X)) ⊙ (1 − M_t)``,    ``gray(X)``
              ``M_t = max(M, edges(X))``
brightness    ``X ⊙ M + darker(X) ⊙ (1 − M)``                   ``X``
sharpness     ``sharp(X) ⊙ M + X ⊙ (1 − M)``                    ``sharp(X)``
depth         ``depth ⊙ M`` (3 channels)                        ``depth``
lowpass       ``X ⊙ M + low(X) ⊙ (1 − M)``                      ``X``
highpass      ``X ⊙ M + (high(X) + mean colour) ⊙ (1 − M)``     ``X``
============  ================================================  ==============================

The last five follow the reference report's extension: brightness — "convert the RGB image to
LAB, decrement the lightness channel, and then convert the modified image back to RGB"
(``darker``: L − ``brightness_decrement``); sharpness — "enhanced by using a Laplacian sharpening
kernel" (``sharp(X) = X − sharpen_amount · ∇²X`` with the 8-neighbour Laplacian, i.e. the
classic 3 × 3 sharpening kernel at amount 1; sharpness is *present* where M = 1 and removed
(back to X) where M = 0, like colour); depth — "we use the masks directly on the depth map",
as for shape; lowpass removes the high frequencies where M = 0 (so its map shows where high
frequencies matter), highpass removes the low frequencies where M = 0 (where low frequencies
matter). ``low(X)`` is a Gaussian blur of σ = ``lowpass_sigma``; ``high(X) = X − low(X)`` at
σ = ``highpass_sigma``, with the image's mean colour added back so that the high-pass image
keeps its overall brightness instead of turning black. :func:`frequency_split` returns
``(low, high)`` with ``low + high == X``.

The masks of a call are drawn once and shared by every component and every image.
``Explanation.importance`` is the mean of the computed component maps (no extra forward passes;
every component map is on the same scale, a mask-weighted mean cosine similarity).

Where sslens differs from the reference code (github.com/olivesgatech/
Explaining-Representation-Learning-with-Perceptual-Components), and why:

* Masks: ``masks="perceptual"`` (default, to reproduce the paper) is the reference's distribution,
  see :class:`sslens.explain.masks.PerceptualMasks` (one crop per mask, clamped to [0, 1]);
  ``masks="relax"`` uses RELAX's.
* Maps are raw. The reference z-scores each map; that is a display choice, offered here as the
  explicit post-processing function :func:`zscore`.
* Component images are built in pixel space: images are denormalised with (``mean``, ``std``),
  transformed, and renormalised (the reference applies grayscale and blur to normalised tensors).
* Edges: kornia's Canny (white edges on black, so masking removes edges); the reference uses a
  hand-written Sobel/non-maximum-suppression module whose edge image is inverted (black edges
  on white) and whose texture keep-mask is a thresholded gradient magnitude.
* The reference blurs texture with a 5 × 5 kernel at a random σ in [3, 4] per call; sslens uses
  a fixed ``texture_sigma`` (default 3.5) with the same 5 × 5 kernel, so maps are reproducible.
* All components run in one batched loop; the reference loops over masks in Python per component.
  Every component × image × mask shares forward passes of up to ``batch_size`` images (e.g. one
  image's 7 components × 36 masks in one pass of 252), so small images still fill a GPU.

>>> from torch import nn
>>> encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
>>> out = PerceptualComponents(encoder, components=("color", "shape"), num_masks=8)(torch.randn(1, 3, 16, 16))
>>> sorted(out.components), out.importance.shape
(['color', 'shape'], torch.Size([1, 16, 16]))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import kornia.color
import kornia.filters
import torch
from torch import nn

from sslens.checks import integer, positive_int
from sslens.data.base import IMAGENET_MEAN, IMAGENET_STD
from sslens.data.pixels import gaussian_blur, grayscale
from sslens.explain.base import EXPLAINERS, Explainer, Explanation
from sslens.explain.depth import DepthEstimator
from sslens.explain.engine import (
    PROBE,
    ProgressCallback,
    RelaxEstimator,
    autotuned_convolutions,
    check_batch_size,
    check_fast_inference,
    check_progress,
    default_batch_size,
    embed,
    inference_encoder,
    mask_rounds,
    packed_similarities,
    rechunk,
)
from sslens.explain.masks import MASK_SAMPLERS
from sslens.registry import lookup

ALL_COMPONENTS = ("color", "shape", "texture", "brightness", "sharpness", "depth", "lowpass", "highpass")


# ----------------------------------------------------------------------------- pure image builders


def canny_edges(images: torch.Tensor, low: float = 0.1, high: float = 0.2, sigma: float = 1.0) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → (B, 1, H, W) binary Canny edges (1 = edge), kornia's hysteresis."""
    return kornia.filters.canny(images, low_threshold=low, high_threshold=high, sigma=(sigma, sigma))[1]


def darken(images: torch.Tensor, decrement: float) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] → RGB with LAB lightness L lowered by ``decrement`` (floored at 0)."""
    lab = kornia.color.rgb_to_lab(images)
    lightness = (lab[:, :1] - decrement).clamp_min(0.0)
    return kornia.color.lab_to_rgb(torch.cat([lightness, lab[:, 1:]], dim=1), clip=True)


def sharpen(images: torch.Tensor, amount: float) -> torch.Tensor:
    """(B, 3, H, W) → ``clamp(X − amount · ∇²X, 0, 1)`` with the 3 × 3 8-neighbour Laplacian."""
    laplacian = kornia.filters.laplacian(images, kernel_size=3, border_type="replicate", normalized=False)
    return (images - amount * laplacian).clamp(0.0, 1.0)


def frequency_split(images: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) → ``(low, high)``: Gaussian low-pass at σ px and the rest; ``low + high == X``."""
    low = gaussian_blur(images, sigma)
    return low, images - low


def blend(present: torch.Tensor, absent: torch.Tensor | None, masks: torch.Tensor) -> torch.Tensor:
    """``present ⊙ M + absent ⊙ (1 − M)`` (``absent=None``: zeros), broadcasting images and masks.

    With present/absent (b, 1, 3, H, W) and masks (n, 1, H, W) the result is (b, n, 3, H, W).
    """
    if absent is None:
        return present * masks
    return present * masks + absent * (1 - masks)


# ----------------------------------------------------------------------------- components


@dataclass(frozen=True)
class Amounts:
    """Every amount a component uses; documented defaults (see :class:`PerceptualComponents`)."""

    canny_low: float = 0.1
    canny_high: float = 0.2
    canny_sigma: float = 1.0
    texture_sigma: float = 3.5
    texture_kernel: int = 5
    brightness_decrement: float = 20.0
    sharpen_amount: float = 1.0
    lowpass_sigma: float = 2.0
    highpass_sigma: float = 2.0


@dataclass
class ComponentImages:
    """Pixel images (B, 3, H, W) of one component: masked image = ``present ⊙ M_t + absent ⊙ (1 − M_t)``,
    ``M_t = max(M, keep)``; its embedding is compared with that of ``reference``."""

    reference: torch.Tensor
    present: torch.Tensor
    absent: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    def masked(self, index: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Masks (n, 1, H, W) → (b, n, 3, H, W) masked images of the images ``index``."""
        present = self.present[index, None]
        absent = None if self.absent is None else self.absent[index, None]
        if self.keep is not None:
            masks = torch.maximum(masks, self.keep[index, None])
        return blend(present, absent, masks)


@dataclass(frozen=True)
class Component:
    """How to build a component's images from pixels (B, 3, H, W), depth (B, H, W) or None, amounts."""

    build: Callable[[torch.Tensor, torch.Tensor | None, Amounts], ComponentImages]
    needs_depth: bool = False


def _color(x: torch.Tensor, depth: torch.Tensor | None, a: Amounts) -> ComponentImages:
    return ComponentImages(reference=x, present=x, absent=grayscale(x))


def _shape(x: torch.Tensor, depth: torch.Tensor | None, a: Amounts) -> ComponentImages:
    edges = canny_edges(x, a.canny_low, a.canny_high, a.canny_sigma).expand_as(x)
    return ComponentImages(reference=edges, present=edges)


def _texture(x: torch.Tensor, depth: torch.Tensor | None, a: Amounts) -> ComponentImages:
    gray = grayscale(x)
    blurred = gaussian_blur(gray, a.texture_sigma, a.texture_kernel)
    edges = canny_edges(x, a.canny_low, a.canny_high, a.canny_sigma)
    return ComponentImages(reference=gray, present=gray, absent=blurred, keep=edges)


def _brightness(x: torch.Tensor, depth: torch.Tensor | None, a: Amounts) -> ComponentImages:
    return ComponentImages(reference=x, present=x, absent=darken(x, a.brightness_decrement))


def _sharpness(x: torch.Tensor, depth: torch.Tensor | None, a: Amounts) -> ComponentImages:
    sharp = sharpen(x, a.sharpen_amount)
    return ComponentImages(reference=sharp, present=sharp, absent=x)


def _depth(x: torch.Tensor, depth: torch.Tensor | None, a: Amounts) -> ComponentImages:
    # MiDaS gives relative inverse depth with an arbitrary scale: min-max to [0, 1] per image.
    flat = depth.flatten(1)
    low, high = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
    image = ((depth - low) / (high - low).clamp_min(torch.finfo(depth.dtype).eps))[:, None].expand_as(x)
    return ComponentImages(reference=image, present=image)


def _lowpass(x: torch.Tensor, depth: torch.Tensor | None, a: Amounts) -> ComponentImages:
    return ComponentImages(reference=x, present=x, absent=frequency_split(x, a.lowpass_sigma)[0])


def _highpass(x: torch.Tensor, depth: torch.Tensor | None, a: Amounts) -> ComponentImages:
    high = frequency_split(x, a.highpass_sigma)[1] + x.mean(dim=(2, 3), keepdim=True)
    return ComponentImages(reference=x, present=x, absent=high)


#: Component name → how its images are built (the table's rows in the module docstring).
COMPONENTS: dict[str, Component] = {
    "color": Component(_color),
    "shape": Component(_shape),
    "texture": Component(_texture),
    "brightness": Component(_brightness),
    "sharpness": Component(_sharpness),
    "depth": Component(_depth, needs_depth=True),
    "lowpass": Component(_lowpass),
    "highpass": Component(_highpass),
}


def zscore(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) → per-map ``(R − mean) / std`` (unbiased std), the reference code's display scaling.

    Raises ValueError for a constant map, whose z-score is undefined (rather than returning zeros).
    """
    flat = maps.flatten(1)
    std = flat.std(dim=1)
    if (std == 0).any():
        raise ValueError("Cannot z-score a constant map (its standard deviation is 0); display it raw.")
    return (maps - flat.mean(dim=1)[:, None, None]) / std[:, None, None]


@EXPLAINERS.register("perceptual")
class PerceptualComponents(Explainer):
    """One RELAX importance map per perceptual component, for any image encoder.

    Args:
        encoder: ``nn.Module`` mapping (B, 3, H, W) normalised images to (B, D) embeddings.
        components: names from :data:`COMPONENTS` (default: all eight).
        num_masks: masks per call, shared by all components and images.
        batch_size: images per forward pass, packed across components and images; None
            (default): by device, as for :class:`~sslens.explain.relax.RELAX`.
        masks: mask distribution, ``"perceptual"`` (default, the paper's code) or ``"relax"``.
        mean, std: the normalisation of the images (default ImageNet), to build component
            images in pixel space.
        seed: seeds the masks.
        depth_estimator: a :data:`~sslens.explain.depth.DepthEstimator` for ``"depth"`` when no
            depth maps are passed to the call; without either, depth is skipped and reported
            in ``info["skipped"]``.
        canny_low, canny_high, canny_sigma: Canny hysteresis thresholds on the gradient
            magnitude of [0, 1] images and its Gaussian σ (kornia defaults 0.1, 0.2, 1).
        texture_sigma, texture_kernel: the texture blur (reference: 5 × 5 kernel, σ ∈ [3, 4]).
        brightness_decrement: LAB lightness units (of 0–100) removed where M = 0 (default 20).
        sharpen_amount: weight of the Laplacian in ``X − amount · ∇²X`` (1 = classic 3 × 3 kernel).
        lowpass_sigma, highpass_sigma: Gaussian σ in px of the frequency split (default 2).
        round_size: masks drawn per round (the seed's mask sequence depends on it).
        amp: bf16 autocast + channels_last for the encoder: None (default) on CUDA only, True
            on any device, False never.
        fast_inference: BatchNorms folded into convolutions in a private copy of the encoder,
            as for :class:`~sslens.explain.relax.RELAX` (default ``"auto"``: on the CPU).

    Call ``explainer(images, depth=None, progress=None)`` with (B, 3, H, W) normalised images,
    optional (B, H, W) depth maps and an optional ``progress(done, total)`` told the masks done
    (of ``num_masks``) after every round of them (:data:`~sslens.explain.engine.ProgressCallback`;
    the maps do not depend on it). Returns ``components = {name: (B, H, W)}``, ``importance`` =
    their mean.
    """

    #: Name in reports.
    label = "perceptual components"

    def __init__(
        self,
        encoder: nn.Module,
        components: Sequence[str] = ALL_COMPONENTS,
        num_masks: int = 3000,
        batch_size: int | None = None,
        masks: str = "perceptual",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
        depth_estimator: DepthEstimator | None = None,
        canny_low: float = 0.1,
        canny_high: float = 0.2,
        canny_sigma: float = 1.0,
        texture_sigma: float = 3.5,
        texture_kernel: int = 5,
        brightness_decrement: float = 20.0,
        sharpen_amount: float = 1.0,
        lowpass_sigma: float = 2.0,
        highpass_sigma: float = 2.0,
        round_size: int = 250,
        amp: bool | None = None,
        fast_inference: str | bool = "auto",
    ):
        super().__init__(encoder)
        if isinstance(components, str):
            raise TypeError(f"components must be a sequence of names, e.g. ({components!r},); got a string")
        if len(components) == 0 or len(set(components)) != len(components):
            raise ValueError(f"components must name at least one component, each once; got {components!r}")
        for name in components:
            lookup("perceptual component", COMPONENTS, name)
        self.components = tuple(components)
        self.num_masks = positive_int("num_masks", num_masks)
        self.batch_size = check_batch_size(batch_size)
        self.round_size = positive_int("round_size", round_size)
        self.sampler = lookup("mask distribution", MASK_SAMPLERS, masks)()
        self.mask_name = masks
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must be three per-channel values with std > 0; got {mean}, {std}")
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.seed = integer("seed", seed)
        if depth_estimator is not None and not callable(depth_estimator):
            raise TypeError("depth_estimator must be a callable (B, 3, H, W) images in [0, 1] → (B, H, W) depth")
        self.depth_estimator = depth_estimator
        self.amounts = Amounts(
            canny_low, canny_high, canny_sigma, texture_sigma, texture_kernel,
            brightness_decrement, sharpen_amount, lowpass_sigma, highpass_sigma,
        )
        for name in ("canny_sigma", "texture_sigma", "lowpass_sigma", "highpass_sigma"):
            if not getattr(self.amounts, name) > 0:
                raise ValueError(f"{name} is a Gaussian σ in pixels and must be > 0; got {getattr(self.amounts, name)!r}")
        if not 0 <= canny_low <= canny_high:
            raise ValueError(f"Canny thresholds need 0 ≤ canny_low ≤ canny_high; got {canny_low}, {canny_high}")
        if positive_int("texture_kernel", texture_kernel) % 2 == 0:
            raise ValueError(f"texture_kernel must be a positive odd integer; got {texture_kernel!r}")
        if brightness_decrement < 0 or sharpen_amount < 0:
            raise ValueError("brightness_decrement and sharpen_amount must be ≥ 0 (0 makes the component a no-op)")
        self.amp = None if amp is None else bool(amp)
        self.fast_inference = check_fast_inference(fast_inference)

    def _stats(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device)[:, None, None]
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device)[:, None, None]
        return mean, std

    def _depth(self, pixels: torch.Tensor, depth: torch.Tensor | None) -> tuple[torch.Tensor | None, str | None]:
        """(depth (B, H, W) or None, reason it is missing or None)."""
        source = "depth"
        if depth is None:
            if self.depth_estimator is None:
                return None, "no depth maps were passed (depth=...) and no depth_estimator was given"
            # Any callable is accepted, so its output gets the same check as depth passed in.
            depth, source = self.depth_estimator(pixels), "the depth_estimator's output"
        expected = (pixels.shape[0], *pixels.shape[2:])
        if not torch.is_tensor(depth) or tuple(depth.shape) != expected:
            shape = tuple(depth.shape) if torch.is_tensor(depth) else type(depth).__name__
            raise ValueError(f"{source} must be a (B, H, W) = {expected} tensor matching the images; got {shape}")
        return depth.to(device=pixels.device, dtype=pixels.dtype), None

    def explain(
        self, images: torch.Tensor, depth: torch.Tensor | None = None, progress: ProgressCallback | None = None
    ) -> Explanation:
        progress = check_progress(progress)
        self.encoder.eval()
        size = tuple(images.shape[2:])
        dtype = images.dtype if images.is_floating_point() else torch.float32
        images = images.to(dtype)
        mean, std = self._stats(images)
        skipped: dict[str, str] = {}
        with torch.inference_mode(), autotuned_convolutions(images.device):
            pixels = (images * std + mean).clamp(0.0, 1.0)
            depth_map, reason = (None, None)
            if any(COMPONENTS[name].needs_depth for name in self.components):
                depth_map, reason = self._depth(pixels, depth)
            built: dict[str, ComponentImages] = {}
            for name in self.components:
                component = COMPONENTS[name]
                if component.needs_depth and depth_map is None:
                    skipped[name] = reason
                    continue
                built[name] = component.build(pixels, depth_map, self.amounts)
            if not built:
                raise ValueError(f"Every requested component was skipped: {skipped}. Pass depth maps or a depth_estimator.")

            def normalise(x: torch.Tensor) -> torch.Tensor:
                return (x - mean) / std

            batch_size = self.batch_size or default_batch_size(images.device, tuple(images.shape[2:]))
            encoder, fast_info = inference_encoder(self.encoder, self.fast_inference, images[:PROBE], self.amp)
            references = {
                name: torch.cat([embed(encoder, normalise(x), self.amp) for x in parts.reference.split(batch_size)])
                for name, parts in built.items()
            }
            estimators = {
                name: RelaxEstimator(images.shape[0], size, ref.dtype, images.device) for name, ref in references.items()
            }
            groups = [
                (lambda index, m, parts=parts: normalise(parts.masked(index, m)), references[name])
                for name, parts in built.items()
            ]
            generator = torch.Generator(device=images.device).manual_seed(self.seed)
            rounds = mask_rounds(self.sampler, self.num_masks, self.round_size, size, generator, dtype)
            done = 0
            if progress is not None:
                progress(done, self.num_masks)
            # One forward pass per chunk: every component × image row gets batch_size // rows masks.
            for chunk in rechunk(rounds, max(1, batch_size // (len(built) * images.shape[0]))):
                scores = packed_similarities(encoder, groups, chunk, batch_size, self.amp)
                for estimator, component_scores in zip(estimators.values(), scores, strict=True):
                    estimator.update(component_scores, chunk)
                done += chunk.shape[0]
                if progress is not None:
                    progress(done, self.num_masks)
            maps = {name: estimator.importance.float() for name, estimator in estimators.items()}
        return Explanation(
            importance=torch.stack(list(maps.values())).mean(dim=0),
            components=maps,
            info={
                "method": "perceptual",
                "seed": self.seed,
                "num_masks_used": [self.num_masks] * images.shape[0],
                **self.sampler.info(),
                "components": list(maps),
                "skipped": skipped,
                "importance": "mean of the component maps",
                "amounts": asdict(self.amounts),
                "mean": list(self.mean),
                "std": list(self.std),
                "depth_source": None if depth_map is None else ("call" if depth is not None else "estimator"),
                "batch_size": batch_size,
                "fast_inference": fast_info,
                # Per component and image; the component's effect is 1 − this.
                "mean_similarity": {name: estimator.mean_similarity for name, estimator in estimators.items()},
            },
        )
