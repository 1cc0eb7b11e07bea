"""Batched, on-device augmentations and the named view recipes of SimCLR, MoCo v2 and SwAV.

The dataset lives on the training device as uint8 (N, H, W, 3); a :class:`ViewRecipe` turns a
batch of it into normalised float views with per-sample random parameters, all drawn from one
``torch.Generator`` in a few calls. No loop runs over samples and nothing waits on the device
(no ``.item()``, no Python branch on a tensor value), so a GPU never stalls on the host.

Every primitive takes and returns float (B, 3, H, W) images in [0, 1] on one device, and
follows the semantics of the torchvision transform of the same name unless its docstring says
otherwise.

Why not kornia: ``benchmarks/augment_speed.py`` (two SimCLR views of 512 images of 32 px)
measured 234k images/s here against 12k for the equivalent ``kornia.augmentation`` pipeline
on one H100 (torch 2.11), and 640 for torchvision's PIL transforms in one process; on one CPU
thread, 3.5k against 2.5k and 0.5k.

>>> images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
>>> recipe = create_views("simclr", image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
>>> views = recipe(images, torch.Generator().manual_seed(0))
>>> [tuple(v.shape) for v in views]
[(4, 3, 32, 32), (4, 3, 32, 32)]
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from sslens.checks import positive_int
from sslens.data.base import normalize, to_float
from sslens.data.pixels import LUMA_WEIGHTS, gaussian_kernel, luma, separable_blur
from sslens.registry import Registry

VIEW_RECIPES = Registry("view recipe")

# torchvision.transforms.RandomResizedCrop tries 10 random boxes before its fallback.
_CROP_ATTEMPTS = 10


# --------------------------------------------------------------------------------------------
# Argument checks shared by the primitives and ViewSpec.


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} is a probability and must lie in [0, 1]; got {p}")


def _check_range(name: str, value: Sequence[float], low: float, high: float) -> None:
    """Check ``value`` is an ordered pair inside (low, high]; ``low`` itself is excluded."""
    if len(value) != 2:
        raise ValueError(f"{name} must be a pair (min, max); got {value!r}")
    lo, hi = value
    if not (low < lo <= hi <= high):
        raise ValueError(
            f"{name} must be an ordered pair with {low} < min <= max <= {high}; got {tuple(value)}"
        )


def _check_images(x: torch.Tensor, generator: torch.Generator) -> None:
    if not x.is_floating_point() or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(
            f"Expected float images (B, 3, H, W); got {x.dtype} {tuple(x.shape)}. "
            "Convert uint8 (B, H, W, 3) batches with sslens.data.to_float first."
        )
    if generator.device.type != x.device.type:
        raise ValueError(
            f"The generator is on {generator.device} but the images are on {x.device}; "
            f"create it with torch.Generator(device={str(x.device)!r})."
        )


def _coin(p: float, batch: int, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B,) bool: True with probability ``p`` for each sample."""
    return torch.rand(batch, generator=generator, device=x.device) < p


# --------------------------------------------------------------------------------------------
# Geometry.


def _crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    x: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, h, w), each (B,) float, sampled as ``RandomResizedCrop.get_params``.

    torchvision draws up to 10 (area, log-aspect) candidates one after another and keeps the
    first that fits, else falls back to a centre crop with the aspect ratio clamped into
    ``ratio``. Here all 10 candidates of every sample are drawn at once and the first valid one
    is picked with an argmax, which gives the same distribution without a loop.
    """
    area = height * width
    u = torch.rand(
        (batch, _CROP_ATTEMPTS, 4), generator=generator, device=x.device, dtype=torch.float32
    )
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    # torch.round rounds half to even, as Python's round() in torchvision does.
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # argmax returns the first maximal index: the first candidate that fits.
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = valid.any(dim=1)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, first).squeeze(1)

    w, h = pick(w), pick(h)
    # randint(0, n + 1) as floor(U * (n + 1)); the clamp guards the float edge U * (n+1) == n+1.
    top = torch.minimum(torch.floor(pick(u[..., 2]) * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(pick(u[..., 3]) * (width - w + 1)), width - w)

    fallback_h, fallback_w = _fallback_box(height, width, ratio)
    h = torch.where(found, h, float(fallback_h))
    w = torch.where(found, w, float(fallback_w))
    top = torch.where(found, top, float((height - fallback_h) // 2))
    left = torch.where(found, left, float((width - fallback_w) // 2))
    return top, left, h, w


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's centre-crop fallback: the whole image, its aspect clamped into ``ratio``."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Crop a random box of each image and resize it to ``size`` x ``size``.

    The box is drawn as torchvision's ``RandomResizedCrop``: area a fraction U(``scale``) of the
    image, aspect ratio log-uniform in ``ratio``, position uniform. Resampling is bilinear
    through ``affine_grid`` + ``grid_sample`` (one call for the batch).

    Departures from torchvision: no antialiasing (a box shrunk by more than 2x aliases, which
    PIL would smooth), and a bilinear tap within half a pixel of the box edge reads the pixel
    just outside the box, where crop-then-resize would repeat the edge pixel.

    Args:
        x: (B, 3, H, W) float in [0, 1].
        size: output side length in pixels.
        scale: (min, max) fraction of the image area covered by the box.
        ratio: (min, max) aspect ratio (width / height) of the box.
        generator: random source on ``x``'s device.

    Returns:
        (B, 3, size, size), same dtype and device.
    """
    _check_images(x, generator)
    if size <= 0:
        raise ValueError(f"size must be a positive number of pixels; got {size}")
    _check_range("scale", scale, 0.0, 1.0)
    _check_range("ratio", ratio, 0.0, math.inf)
    batch, _, height, width = x.shape
    top, left, h, w = _crop_boxes(batch, height, width, scale, ratio, x, generator)
    # With align_corners=False, normalised -1 and +1 are the outer edges of the first and last
    # pixels, so a box [left, left + w) maps to centre (2 left + w) / W - 1 and half-width w / W.
    theta = torch.zeros(batch, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [batch, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) → (B, 3, size, size), bilinear with antialiasing; a no-op at that size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def random_horizontal_flip(
    x: torch.Tensor, p: float = 0.5, *, generator: torch.Generator
) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``. (B, 3, H, W) → (B, 3, H, W)."""
    _check_images(x, generator)
    _check_probability("p", p)
    flip = _coin(p, len(x), x, generator).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


# --------------------------------------------------------------------------------------------
# Colour.


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``values`` as a tensor on ``device``, made once.

    Building a tensor from Python numbers on a GPU is a blocking host-to-device copy that
    waits for every queued kernel; caching it keeps the augmentation free of syncs.
    """
    return torch.tensor(values, device=device, dtype=dtype)


def _blend(image: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``, factor * image + (1 - factor) * other clamped to [0, 1].

    Written as one ``lerp`` (other + factor * (image - other)); equal up to rounding.
    """
    return torch.lerp(other.expand_as(image), image, factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample ``F.adjust_brightness``: blend with black. ``factor`` (B,), 1 = unchanged."""
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample ``F.adjust_contrast``: blend with the image's mean luma. ``factor`` (B,)."""
    # The mean of the luma is the luma of the channel means: reduce first, weight (B, 3) after.
    weights = _constant(LUMA_WEIGHTS, x.device, x.dtype)
    mean = (x.mean(dim=(-2, -1)) @ weights).view(-1, 1, 1, 1)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample ``F.adjust_saturation``: blend with the luma image. ``factor`` (B,)."""
    return _blend(x, luma(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-sample ``F.adjust_hue``: rotate the HSV hue by ``shift`` (B,) turns in [-0.5, 0.5].

    We go through HSV, as torchvision does, rather than rotating in YIQ: a YIQ rotation is one
    3x3 matrix but leaves the RGB gamut and does not match torchvision's hue. A hue rotation
    keeps V = max and the chroma C = max - min, so only the hue H (in sextants, 6 H) is
    computed, with torchvision's tie order (red, then green). The way back is the closed form
    c_n = V - C clamp(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6, n = 5, 3, 1 for R, G, B:
    elementwise, with no sector masks, and inside [0, 1] without clamping.
    """
    r, g, b = x.unbind(dim=1)
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    is_r = r == value
    is_g = (g == value) & ~is_r
    # 6 H = (g - b) / C, 2 + (b - r) / C or 4 + (r - g) / C, with the offset folded into the
    # numerator. Grey pixels (C = 0) have numerator 0 and get hue 0 (the 1 avoids 0 / 0).
    numerator = torch.where(is_r, g - b, torch.where(is_g, b - r + 2 * chroma, r - g + 4 * chroma))
    sextant = numerator / torch.where(chroma > 0, chroma, 1.0) + 6.0 * shift.view(-1, 1, 1)
    n = _constant((5.0, 3.0, 1.0), x.device, x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(sextant.unsqueeze(1) + n, 6.0)
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * weight


def _jitter_range(name: str, strength: float) -> tuple[float, float]:
    """torchvision's factor interval [max(0, 1 - s), 1 + s] for brightness/contrast/saturation."""
    if strength < 0:
        raise ValueError(f"{name} must be non-negative; got {strength}")
    return max(0.0, 1.0 - strength), 1.0 + strength


def color_jitter(
    x: torch.Tensor,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hue: float = 0.0,
    p: float = 1.0,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)`` on a batch.

    Factors are drawn per sample as torchvision does: brightness, contrast and saturation
    uniformly from [max(0, 1 - s), 1 + s], the hue shift from [-hue, hue].

    Departure from torchvision: the four adjustments always run in the order brightness,
    contrast, saturation, hue, where torchvision draws a new order per image. A per-sample order
    would cost four times the work (every op on every sample at every position) or a host
    sync to read a per-batch order; the order changes the result only through clamping and is
    not part of the SimCLR/MoCo descriptions. An adjustment whose strength is 0 is skipped.

    Args:
        x: (B, 3, H, W) float in [0, 1].
        p: probability that a sample is jittered at all.

    Returns:
        (B, 3, H, W) in [0, 1], same dtype and device.
    """
    _check_images(x, generator)
    _check_probability("p", p)
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"hue is a shift in turns and must lie in [0, 0.5]; got {hue}")
    ranges = [
        _jitter_range("brightness", brightness),
        _jitter_range("contrast", contrast),
        _jitter_range("saturation", saturation),
        (-hue, hue),
    ]
    batch = len(x)
    # One draw for the whole batch: column j holds the factor of adjustment j, column 4 the coin.
    u = torch.rand((batch, 5), generator=generator, device=x.device, dtype=x.dtype)
    low = _constant(tuple(r[0] for r in ranges), x.device, x.dtype)
    high = _constant(tuple(r[1] for r in ranges), x.device, x.dtype)
    factors = low + (high - low) * u[:, :4]
    out = jitter_with_factors(
        x,
        brightness=factors[:, 0] if brightness > 0 else None,
        contrast=factors[:, 1] if contrast > 0 else None,
        saturation=factors[:, 2] if saturation > 0 else None,
        hue=factors[:, 3] if hue > 0 else None,
    )
    apply = (u[:, 4] < p).view(-1, 1, 1, 1)
    return torch.where(apply, out, x)


def jitter_with_factors(
    x: torch.Tensor,
    *,
    brightness: torch.Tensor | None = None,
    contrast: torch.Tensor | None = None,
    saturation: torch.Tensor | None = None,
    hue: torch.Tensor | None = None,
) -> torch.Tensor:
    """Colour jitter with explicit per-sample factors, each (B,) or None to skip that step.

    Brightness, contrast and saturation factors are multiplicative (1 = unchanged); ``hue`` is
    a shift in turns. Runs in the fixed order of :func:`color_jitter`.
    """
    steps = (
        (adjust_brightness, brightness),
        (adjust_contrast, contrast),
        (adjust_saturation, saturation),
        (adjust_hue, hue),
    )
    for step, factor in steps:
        if factor is not None:
            x = step(x, factor)
    return x


def random_grayscale(
    x: torch.Tensor, p: float = 0.1, *, generator: torch.Generator
) -> torch.Tensor:
    """Replace each image by its luma in all three channels with probability ``p``."""
    _check_images(x, generator)
    _check_probability("p", p)
    gray = _coin(p, len(x), x, generator).view(-1, 1, 1, 1)
    return torch.where(gray, luma(x).expand_as(x), x)


def random_solarize(
    x: torch.Tensor, threshold: float = 0.5, p: float = 0.5, *, generator: torch.Generator
) -> torch.Tensor:
    """Invert the pixels at or above ``threshold`` (as ``F.solarize``) with probability ``p``."""
    _check_images(x, generator)
    _check_probability("p", p)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1] for images in [0, 1]; got {threshold}")
    apply = _coin(p, len(x), x, generator).view(-1, 1, 1, 1)
    return torch.where(apply & (x >= threshold), 1.0 - x, x)


# --------------------------------------------------------------------------------------------
# Blur.


def simclr_kernel_size(size: int) -> int:
    """The SimCLR kernel for images of side ``size``: 10% of the side, made odd.

    SimCLR's code computes ``kernel_size = size // 10`` and blurs with radius
    ``kernel_size // 2``, i.e. 2 * radius + 1 taps: 3 at 32 px, 9 at 96 px, 23 at 224 px.
    """
    return 2 * ((size // 10) // 2) + 1


def random_gaussian_blur(
    x: torch.Tensor,
    kernel_size: int,
    sigma: tuple[float, float] = (0.1, 2.0),
    p: float = 0.5,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Blur each image with probability ``p`` by a Gaussian of per-sample sigma ~ U(``sigma``).

    As torchvision's ``GaussianBlur``: a separable ``kernel_size`` x ``kernel_size`` kernel with
    reflect padding. Both passes are single grouped convolutions with one kernel per
    (sample, channel). Samples that are not blurred get a delta kernel, which is exact.

    Args:
        x: (B, 3, H, W) float in [0, 1]; H and W must exceed ``kernel_size // 2``.
        kernel_size: odd number of taps.

    Returns:
        (B, 3, H, W), same dtype and device.
    """
    _check_images(x, generator)
    _check_probability("p", p)
    if kernel_size <= 0 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer; got {kernel_size}")
    _check_range("sigma", sigma, 0.0, math.inf)
    radius = kernel_size // 2
    u = torch.rand((len(x), 2), generator=generator, device=x.device, dtype=x.dtype)
    sigmas = sigma[0] + (sigma[1] - sigma[0]) * u[:, 0]
    delta = (torch.arange(-radius, radius + 1, device=x.device) == 0).to(x.dtype)
    kernels = torch.where(u[:, 1:] < p, gaussian_kernel(sigmas, radius), delta)  # (B, K)
    return separable_blur(x, kernels, padding="reflect")


# --------------------------------------------------------------------------------------------
# Views and recipes.


@dataclass(frozen=True)
class ViewSpec:
    """How one view is made: crop → flip → colour jitter → grayscale → blur → solarize.

    Every step with probability 0 (or strength 0) is skipped. ``crop_scale=None`` means no
    random crop: the whole image is resized to ``size`` (evaluation).
    """

    size: int
    crop_scale: tuple[float, float] | None = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_kernel_size: int = 3
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"A view's size must be a positive int (pixels); got {self.size!r}")
        # Store pairs as tuples of floats: configs arrive from YAML as lists.
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.crop_scale is not None:
            _check_range("crop_scale", self.crop_scale, 0.0, 1.0)
        _check_range("crop_ratio", self.crop_ratio, 0.0, math.inf)
        _check_range("blur_sigma", self.blur_sigma, 0.0, math.inf)
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            _check_probability(name, getattr(self, name))
        for name in ("brightness", "contrast", "saturation"):
            _jitter_range(name, getattr(self, name))
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5] (a shift in turns); got {self.hue}")
        if self.blur_kernel_size <= 0 or self.blur_kernel_size % 2 == 0:
            raise ValueError(
                f"blur_kernel_size must be a positive odd integer; got {self.blur_kernel_size}"
            )
        if self.blur_p > 0 and self.blur_kernel_size // 2 >= self.size:
            raise ValueError(
                f"blur_kernel_size {self.blur_kernel_size} is too large for {self.size}-pixel "
                f"views; use at most {2 * self.size - 1}."
            )
        if not 0.0 <= self.solarize_threshold <= 1.0:
            raise ValueError(
                f"solarize_threshold must lie in [0, 1]; got {self.solarize_threshold}"
            )

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] → (B, 3, size, size) float in [0, 1]."""
        if self.crop_scale is None:
            x = resize(x, self.size)
        else:
            x = random_resized_crop(
                x, self.size, self.crop_scale, self.crop_ratio, generator=generator
            )
        if self.flip_p > 0:
            x = random_horizontal_flip(x, self.flip_p, generator=generator)
        if self.jitter_p > 0:
            x = color_jitter(
                x,
                self.brightness,
                self.contrast,
                self.saturation,
                self.hue,
                self.jitter_p,
                generator=generator,
            )
        if self.grayscale_p > 0:
            x = random_grayscale(x, self.grayscale_p, generator=generator)
        if self.blur_p > 0:
            x = random_gaussian_blur(
                x, self.blur_kernel_size, self.blur_sigma, self.blur_p, generator=generator
            )
        if self.solarize_p > 0:
            x = random_solarize(x, self.solarize_threshold, self.solarize_p, generator=generator)
        return x

    def describe(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class ViewRecipe:
    """A list of view specs: uint8 batches in, normalised float views out.

    Consecutive identical specs (SimCLR's two views, SwAV's local crops) are made in one pass
    over a batch repeated that many times: fewer, larger kernels, same distribution.

    Args:
        name: the recipe's registered name (recorded in :meth:`describe`).
        views: one spec per output view, in output order.
        mean, std: per-channel normalisation applied to every view.
    """

    def __init__(self, name: str, views: Sequence[ViewSpec], mean, std):
        if not views:
            raise ValueError("A view recipe needs at least one view.")
        for stat, values in (("mean", mean), ("std", std)):
            if len(values) != 3:
                raise ValueError(f"{stat} needs one value per RGB channel; got {values!r}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive in every channel; got {std!r}")
        self.name = name
        self.views = list(views)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._groups: list[tuple[ViewSpec, int]] = []
        for spec in self.views:
            if self._groups and self._groups[-1][0] == spec:
                self._groups[-1] = (spec, self._groups[-1][1] + 1)
            else:
                self._groups.append((spec, 1))

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def view_sizes(self) -> list[int]:
        return [spec.size for spec in self.views]

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """(B, H, W, 3) uint8 → ``num_views`` tensors (B, 3, size, size) float32, normalised."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"A view recipe takes uint8 (B, H, W, 3) batches; got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        x = to_float(images)
        batch = len(x)
        # Device tensors, so that normalize() does not copy the statistics to the GPU each call.
        mean = _constant(self.mean, x.device, x.dtype)
        std = _constant(self.std, x.device, x.dtype)
        views: list[torch.Tensor] = []
        for spec, count in self._groups:
            stacked = spec(x.repeat(count, 1, 1, 1) if count > 1 else x, generator)
            out = normalize(stacked, mean, std)
            views.extend(out.split(batch))
        return views

    def describe(self) -> dict:
        """Every parameter of the recipe, JSON-serialisable (for run metadata)."""
        return {
            "name": self.name,
            "num_views": self.num_views,
            "mean": list(self.mean),
            "std": list(self.std),
            "views": [spec.describe() for spec in self.views],
        }

    def __repr__(self) -> str:
        return f"ViewRecipe({self.name!r}, view_sizes={self.view_sizes})"


def create_views(name: str, *, image_size: int, mean, std, **overrides) -> ViewRecipe:
    """Build the registered view recipe ``name`` for ``image_size``-pixel training images.

    ``overrides`` replace the recipe's defaults; a name the recipe does not know is rejected
    with the list of names it does.
    """
    factory = VIEW_RECIPES.get(name)
    positive_int("image_size", image_size, "pixels")
    valid = [
        p for p in inspect.signature(factory).parameters if p not in ("image_size", "mean", "std")
    ]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        known = ", ".join(valid) if valid else "none"
        raise ValueError(
            f"Unknown option(s) {', '.join(unknown)} for view recipe {name!r}. Valid: {known}."
        )
    return factory(image_size=image_size, mean=mean, std=std, **overrides)


def default_blur_p(image_size: int) -> float:
    """Blur with p = 0.5 from 64 px up, never below.

    SimCLR (https://arxiv.org/abs/2002.05709, appendix B.9) leaves Gaussian blur out for
    CIFAR-10's 32 px images, and lightly recommends the same for small images: at 32 px a
    3-tap blur with sigma up to 2 is nearly a box filter that wipes out most detail.
    """
    return 0.5 if image_size >= 64 else 0.0


def _uniform_views(
    name: str,
    image_size: int,
    mean,
    std,
    num_views: int,
    blur_p: float | None,
    blur_kernel_size: int | None,
    **spec,
) -> ViewRecipe:
    """``num_views`` identical views at ``image_size``; blur probability and kernel default to
    :func:`default_blur_p` and :func:`simclr_kernel_size` of the image size."""
    view = ViewSpec(
        size=image_size,
        blur_p=default_blur_p(image_size) if blur_p is None else blur_p,
        blur_kernel_size=simclr_kernel_size(image_size) if blur_kernel_size is None else blur_kernel_size,
        **spec,
    )
    return ViewRecipe(name, [view] * num_views, mean, std)


@VIEW_RECIPES.register("simclr")
def simclr_views(
    *,
    image_size: int,
    mean,
    std,
    num_views: int = 2,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    brightness: float = 0.8,
    contrast: float = 0.8,
    saturation: float = 0.8,
    hue: float = 0.2,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float | None = None,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    blur_kernel_size: int | None = None,
    solarize_p: float = 0.0,
) -> ViewRecipe:
    """SimCLR's views (https://arxiv.org/abs/2002.05709, appendix A), lightly's defaults.

    "random crop (with flip and resize), color distortion, and Gaussian blur": crop scale
    (0.08, 1), flip 0.5, colour jitter 0.8/0.8/0.8/0.2 with p 0.8, grayscale 0.2, blur with a
    kernel of 10% of the side (:func:`simclr_kernel_size`) and sigma U(0.1, 2).

    ``blur_p=None`` picks :func:`default_blur_p`: 0.5 from 64 px, off below (the paper's CIFAR
    setting). The paper's CIFAR colour strength is 0.5 (brightness/contrast/saturation 0.4,
    hue 0.1); we keep lightly's strength 1 by default, as an override away.
    """
    return _uniform_views(
        "simclr", image_size, mean, std, positive_int("num_views", num_views), blur_p, blur_kernel_size,
        crop_scale=crop_scale, crop_ratio=crop_ratio, flip_p=flip_p, brightness=brightness,
        contrast=contrast, saturation=saturation, hue=hue, jitter_p=jitter_p,
        grayscale_p=grayscale_p, blur_sigma=blur_sigma, solarize_p=solarize_p,
    )


@VIEW_RECIPES.register("moco-v2")
def moco_v2_views(
    *,
    image_size: int,
    mean,
    std,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    flip_p: float = 0.5,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float | None = None,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> ViewRecipe:
    """MoCo v2's query and key views (https://arxiv.org/abs/2003.04297).

    "we extend the augmentation in [MoCo v1] by including the blur augmentation": the official
    code's crop scale (0.2, 1), colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale 0.2, blur
    sigma U(0.1, 2) with p 0.5, flip 0.5. lightly's ``MoCoV2Transform`` instead reuses its
    SimCLR defaults (jitter 0.8, crop from 0.08); we follow the MoCo authors. ``blur_p=None``
    follows :func:`default_blur_p` (off below 64 px), and the kernel is 10% of the side.
    """
    return _uniform_views(
        "moco-v2", image_size, mean, std, 2, blur_p, None,
        crop_scale=crop_scale, flip_p=flip_p, brightness=brightness, contrast=contrast,
        saturation=saturation, hue=hue, jitter_p=jitter_p, grayscale_p=grayscale_p,
        blur_sigma=blur_sigma,
    )


@VIEW_RECIPES.register("byol")
def byol_views(
    *,
    image_size: int,
    mean,
    std,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    flip_p: float = 0.5,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: tuple[float, float] | None = None,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    solarize_p: tuple[float, float] = (0.0, 0.2),
) -> ViewRecipe:
    """BYOL's two asymmetric views (https://arxiv.org/abs/2006.07733, appendix B, Table 6).

    Both views: crop scale (0.08, 1), flip 0.5, colour jitter 0.4/0.4/0.2/0.1 with p 0.8,
    grayscale 0.2. They differ in blur (p 1.0 for the first view, 0.1 for the second) and
    solarisation (p 0 and 0.2). ``blur_p=None`` gives the paper's (1.0, 0.1) from 64 px and no blur
    below, as :func:`default_blur_p` does for SimCLR (solo-learn's CIFAR BYOL also drops it).
    """
    if blur_p is None:
        blur_p = (1.0, 0.1) if default_blur_p(image_size) > 0 else (0.0, 0.0)
    for name, pair in (("blur_p", blur_p), ("solarize_p", solarize_p)):
        if len(pair) != 2:
            raise ValueError(f"{name} takes one probability per view, e.g. [1.0, 0.1]; got {pair!r}")
    views = [
        ViewSpec(size=image_size, crop_scale=crop_scale, flip_p=flip_p, brightness=brightness, contrast=contrast,
                 saturation=saturation, hue=hue, jitter_p=jitter_p, grayscale_p=grayscale_p, blur_p=blur,
                 blur_kernel_size=simclr_kernel_size(image_size), blur_sigma=blur_sigma, solarize_p=solarize)
        for blur, solarize in zip(blur_p, solarize_p, strict=True)
    ]
    return ViewRecipe("byol", views, mean, std)


@VIEW_RECIPES.register("reference-cifar")
def reference_cifar_views(
    *,
    image_size: int,
    mean,
    std,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    flip_p: float = 0.5,
    jitter_p: float = 0.8,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> ViewRecipe:
    """The reference report's CIFAR-10 SimCLR views (two per image).

    The report: "Color Jitter: [0.8, 0.8, 0.8, 0.2] ... with a probability of 0.8. Random
    Resized Crop ... to a given size of 32x32. Random Horizontal Flip ... with a probability of
    0.5. Gaussian Blur ... with a kernel size of 0.1*size of the input image, i.e., 3x3 kernel
    for 32x32 image." It is silent on the crop scale, the blur's probability and its sigma:
    our choices are torchvision's crop scale (0.08, 1), blur p 0.5 and sigma U(0.1, 2) (the
    SimCLR values). It lists no grayscale step, so there is none.
    """
    return _uniform_views(
        "reference-cifar", image_size, mean, std, 2, blur_p, None,
        crop_scale=crop_scale, flip_p=flip_p, brightness=0.8, contrast=0.8, saturation=0.8,
        hue=0.2, jitter_p=jitter_p, blur_sigma=blur_sigma,
    )


@VIEW_RECIPES.register("swav")
def swav_views(
    *,
    image_size: int,
    mean,
    std,
    num_local: int = 6,
    local_size: int | None = None,
    global_scale: tuple[float, float] = (0.14, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.14),
    flip_p: float = 0.5,
    jitter_strength: float = 1.0,
    hue: float | None = None,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float | None = None,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> ViewRecipe:
    """SwAV's multi-crop (https://arxiv.org/abs/2006.09882), lightly's ``SwaVTransform`` defaults.

    "we use two standard resolution crops and sample V additional low resolution crops that
    cover only small parts of the image": 2 global crops at ``image_size`` with scale
    (0.14, 1), then ``num_local`` local crops at ``local_size`` (default
    round(image_size * 96 / 224), at least 8 px) with scale (0.05, 0.14). Every crop gets flip
    0.5, colour jitter 0.8/0.8/0.8/0.2 x ``jitter_strength`` with p 0.8, grayscale 0.2 and
    blur sigma U(0.1, 2), kernel 10% of that crop's side. Output order: globals, then locals.

    ``blur_p=None`` follows :func:`default_blur_p` of ``image_size`` for all crops, where
    lightly always uses 0.5: small local crops of small images are blurred enough already.
    ``hue=None`` keeps 0.2 x ``jitter_strength``; set it alone where hue carries the class
    (the synthetic shapes world).
    """
    if num_local < 0:
        raise ValueError(f"num_local must be 0 or more; got {num_local}")
    if local_size is None:
        local_size = max(8, round(image_size * 96 / 224))
    if jitter_strength < 0:
        raise ValueError(f"jitter_strength must be non-negative; got {jitter_strength}")
    blur_p = default_blur_p(image_size) if blur_p is None else blur_p

    def crop(size: int, scale: tuple[float, float]) -> ViewSpec:
        return ViewSpec(
            size=size,
            crop_scale=scale,
            flip_p=flip_p,
            brightness=0.8 * jitter_strength,
            contrast=0.8 * jitter_strength,
            saturation=0.8 * jitter_strength,
            hue=min(0.5, 0.2 * jitter_strength) if hue is None else hue,
            jitter_p=jitter_p,
            grayscale_p=grayscale_p,
            blur_p=blur_p,
            blur_kernel_size=simclr_kernel_size(size),
            blur_sigma=blur_sigma,
        )

    views = [crop(image_size, global_scale)] * 2 + [crop(local_size, local_scale)] * num_local
    return ViewRecipe("swav", views, mean, std)


@VIEW_RECIPES.register("eval")
def eval_views(*, image_size: int, mean, std) -> ViewRecipe:
    """No augmentation: one view, resized to ``image_size`` only if needed, then normalised."""
    return ViewRecipe("eval", [ViewSpec(size=image_size, crop_scale=None)], mean, std)
