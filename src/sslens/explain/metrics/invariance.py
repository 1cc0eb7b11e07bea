"""Saliency invariance: do the maps follow the image when the image is flipped, rotated or greyed?

The reference report (Section 5.2, Table 1) describes the protocol: "For an image I, compute the
RELAX importance mask M_orig. Apply an augmentation A to obtain I_aug = A(I). Compute RELAX mask
M_aug on I_aug. Apply the inverse transformation A^-1 to M_aug -> M_aug_inv, aligning it back to
the original image space. [...] Threshold each mask using its mean importance value. Convert to
binary mask", then IoU = |M_orig ∩ M_aug_inv| / |M_orig ∪ M_aug_inv|.

Where we differ from the report:

* Every comparison is restricted to a *valid region*: the pixels of I whose content is still in
  A(I)'s frame after A and whose inverse-mapped value is not blended with padding. For flips and
  grayscale this is the whole image; for a rotation it drops I's corners (see :class:`Rotation`).
  The report does not say how the rotated border was handled.
* The mean used to binarise each map is taken over the valid region, and a pixel is "on" when it
  is strictly above that mean.
* Next to IoU we report the Pearson correlation of the raw maps over the valid region, which does
  not depend on a threshold.
* With ``retest_fn`` we also report the agreement of two maps of the *unchanged* images drawn
  with independent randomness (for RELAX: another mask seed), under :data:`RETEST`. An
  explainer's own noise lowers every IoU above, so this is the ceiling they can reach; the
  report's Table 1 gives no such reference, which leaves a noisy explainer looking like a
  non-invariant model.

The augmentations are found by name in :data:`INVARIANCE_AUGMENTATIONS`; each is built with the
normalisation statistics (only grayscale needs them) and offers ``apply``, ``invert_map`` and
``valid_region``.

>>> import torch
>>> images = torch.randn(2, 3, 8, 8)
>>> brightness = lambda x: x.mean(dim=1)          # commutes with flips
>>> result = saliency_invariance(brightness, images, augmentations=("hflip",))
>>> result["hflip"]["iou_mean"]
1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from sslens.data.base import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize
from sslens.data.pixels import grayscale
from sslens.registry import lookup

ExplainFn = Callable[[torch.Tensor], torch.Tensor]

#: Key of the retest entry in :func:`saliency_invariance`'s result: the same images explained
#: again with independent randomness. Not an augmentation, so it is left out of averages over them.
RETEST = "retest"


class InvertibleAugmentation:
    """An image augmentation whose effect on a saliency map can be undone.

    Subclasses implement :meth:`apply` ((B, 3, H, W) normalised → same shape) and
    :meth:`invert_map` ((B, H, W) map in A(I)'s frame → (B, H, W) map in I's frame); they override
    :meth:`valid_region` when part of I cannot be compared.
    """

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def invert_map(self, maps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def valid_region(self, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(H, W) bool: the pixels of I where ``invert_map(map(A(I)))`` can be compared to map(I)."""
        return torch.ones(height, width, dtype=torch.bool, device=device)


class Flip(InvertibleAugmentation):
    """Mirror along one image axis; a flip is its own inverse, so every pixel is valid."""

    def __init__(self, dim: int):
        # dim is counted from the end so the same flip serves images (B,3,H,W) and maps (B,H,W).
        self.dim = dim

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return images.flip(self.dim)

    def invert_map(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.flip(self.dim)


def _rotation_grid(
    batch: int, height: int, width: int, degrees: float, device: torch.device | str
) -> torch.Tensor:
    """(batch, H, W, 2) sampling grid that rotates an image counter-clockwise by ``degrees``.

    The rotation is about the image centre in *pixel* units (so non-square images are not
    sheared): output pixel p samples the input at R(-degrees) p. Coordinates are in
    ``grid_sample``'s normalised convention with ``align_corners=False``.
    """
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    # Derived in pixel units with y pointing down, then divided by the half-sizes W/2 and H/2.
    theta = torch.tensor(
        [[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]],
        dtype=torch.float32,
        device=device,
    )
    return F.affine_grid(theta.expand(batch, 2, 3), [batch, 1, height, width], align_corners=False)


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate (B, C, H, W) counter-clockwise by ``degrees`` with bilinear interpolation.

    Pixels whose source lies outside the frame are filled with 0 — for normalised images that is
    the dataset's mean colour, the least conspicuous fill available.
    """
    grid = _rotation_grid(x.shape[0], x.shape[-2], x.shape[-1], degrees, x.device).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Rotation(InvertibleAugmentation):
    """Rotate by ``degrees`` (bilinear, zero fill); the map is rotated back by ``-degrees``.

    Valid region: pixel p of I is compared only when the inverse rotation samples A(I)'s map at
    R(degrees) p with all four bilinear neighbours inside A(I)'s frame. This removes (1) the pixels
    of I that left A(I)'s frame when it was rotated (I's corners), and (2) the border pixels whose
    inverse-rotated value would be blended with the zero padding. The corners of A(I) that were
    filled with padding map back outside I's frame, so they never enter the comparison either.
    """

    def __init__(self, degrees: float):
        self.degrees = degrees

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return rotate(images, self.degrees)

    def invert_map(self, maps: torch.Tensor) -> torch.Tensor:
        return rotate(maps.unsqueeze(1), -self.degrees).squeeze(1)

    def valid_region(self, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        grid = _rotation_grid(1, height, width, -self.degrees, device)[0]
        # Pixel centres span [-(1 - 1/W), 1 - 1/W] in normalised units; a sample inside that box
        # has all four bilinear neighbours in frame. The tolerance absorbs float rounding.
        tol = 1e-5
        inside_x = grid[..., 0].abs() <= 1 - 1 / width + tol
        inside_y = grid[..., 1].abs() <= 1 - 1 / height + tol
        return inside_x & inside_y


class Grayscale(InvertibleAugmentation):
    """Replace colour by luminance in pixel space; geometry is untouched, so the inverse is identity.

    The images are denormalised with ``mean``/``std``, turned to gray with the one luma of
    :func:`sslens.data.pixels.grayscale` (repeated over the three channels), and normalised again.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(grayscale(denormalize(images, self.mean, self.std)), self.mean, self.std)

    def invert_map(self, maps: torch.Tensor) -> torch.Tensor:
        return maps


def _hflip(mean: Sequence[float], std: Sequence[float]) -> InvertibleAugmentation:
    return Flip(dim=-1)


def _vflip(mean: Sequence[float], std: Sequence[float]) -> InvertibleAugmentation:
    return Flip(dim=-2)


def _rot15(mean: Sequence[float], std: Sequence[float]) -> InvertibleAugmentation:
    return Rotation(15.0)


def _grayscale(mean: Sequence[float], std: Sequence[float]) -> InvertibleAugmentation:
    return Grayscale(mean, std)


#: Augmentation name → ``factory(mean, std) -> InvertibleAugmentation``.
INVARIANCE_AUGMENTATIONS: dict[str, Callable[[Sequence[float], Sequence[float]], InvertibleAugmentation]] = {
    "hflip": _hflip,
    "vflip": _vflip,
    "rot15": _rot15,
    "grayscale": _grayscale,
}


def invariance_augmentation(name: str, mean: Sequence[float], std: Sequence[float]) -> InvertibleAugmentation:
    """The augmentation ``name`` of :data:`INVARIANCE_AUGMENTATIONS`, for images normalised with
    ``mean``/``std``."""
    return lookup("invariance augmentation", INVARIANCE_AUGMENTATIONS, name)(mean, std)


def binarize_at_mean(maps: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, H, W) maps, (H, W) valid → (B, H, W) bool: strictly above the map's mean over ``valid``.

    Pixels outside ``valid`` are False.
    """
    flat = maps[:, valid]
    thresholds = flat.mean(dim=1)
    return (maps > thresholds.view(-1, 1, 1)) & valid


def masked_iou(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """IoU of two (B, H, W) bool masks over ``valid`` → (B,).

    Two empty masks (both maps constant, so nothing is above the mean) agree perfectly: IoU 1.
    """
    a, b = a & valid, b & valid
    intersection = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


def masked_pearson(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two (B, H, W) maps over ``valid`` → (B,); NaN where a map is constant."""
    x, y = a[:, valid].double(), b[:, valid].double()
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    denominator = (x.square().sum(1) * y.square().sum(1)).sqrt()
    corr = (x * y).sum(1) / denominator
    return torch.where(denominator > 0, corr, torch.full_like(corr, float("nan"))).float()


def _summary(values: torch.Tensor) -> tuple[float, float]:
    """Mean and population std (ddof=0, so one image gives std 0) over the non-NaN entries."""
    defined = values[~values.isnan()]
    if defined.numel() == 0:
        return float("nan"), float("nan")
    return float(defined.mean()), float(defined.std(correction=0))


def _check_maps(maps: torch.Tensor, images: torch.Tensor, where: str) -> torch.Tensor:
    expected = (images.shape[0], images.shape[2], images.shape[3])
    if not torch.is_tensor(maps) or tuple(maps.shape) != expected:
        got = tuple(maps.shape) if torch.is_tensor(maps) else type(maps).__name__
        raise ValueError(
            f"explain_fn must return maps of shape (B, H, W) = {expected} at input resolution; "
            f"got {got} for {where}. Upsample low-resolution maps before passing them here."
        )
    return maps.detach().float()


def saliency_invariance(
    explain_fn: ExplainFn,
    images: torch.Tensor,
    augmentations: Sequence[str] = ("hflip", "vflip", "rot15", "grayscale"),
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    retest_fn: ExplainFn | None = None,
) -> dict[str, dict]:
    """IoU and correlation between map(I) and A⁻¹(map(A(I))) for each augmentation A.

    Args:
        explain_fn: (B, 3, H, W) normalised images → (B, H, W) raw importance maps.
        images: (B, 3, H, W) normalised with ``mean``/``std``.
        augmentations: names in :data:`INVARIANCE_AUGMENTATIONS`.
        mean, std: the normalisation statistics of ``images`` (used by grayscale).
        retest_fn: optional, like ``explain_fn`` but with independent randomness (e.g. the same
            explainer with another seed); its maps of the unchanged images are compared with
            ``explain_fn``'s under :data:`RETEST`.

    Returns:
        ``{aug: {"iou_mean", "iou_std", "corr_mean", "corr_std", "per_image_iou",
        "per_image_corr", "valid_fraction"}}`` (and :data:`RETEST` with ``retest_fn``); the
        per-image values are lists of floats, stds are population stds, and a NaN correlation (a
        constant map) is left out of its mean and std.
    """
    if not callable(explain_fn):
        raise TypeError(f"explain_fn must be callable (images -> maps); got {type(explain_fn).__name__}")
    if retest_fn is not None and not callable(retest_fn):
        raise TypeError(f"retest_fn must be None or callable (images -> maps); got {type(retest_fn).__name__}")
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a normalised (B, 3, H, W) tensor; got {shape}")
    if isinstance(augmentations, str):
        raise TypeError(f"augmentations must be a sequence of names, e.g. ({augmentations!r},)")
    # Resolve every name before the (expensive) explainer runs, so a typo fails at once.
    transforms = {name: invariance_augmentation(name, mean, std) for name in augmentations}

    height, width = images.shape[-2:]
    original = _check_maps(explain_fn(images), images, "the original images")
    results = {}
    for name, transform in transforms.items():
        augmented = _check_maps(explain_fn(transform.apply(images)), images, f"{name!r} images")
        with torch.no_grad():
            aligned = transform.invert_map(augmented)
        results[name] = _agreement(original, aligned, transform.valid_region(height, width, device=images.device))
    if retest_fn is not None:
        again = _check_maps(retest_fn(images), images, "the retest of the original images")
        results[RETEST] = _agreement(original, again, torch.ones(height, width, dtype=torch.bool, device=images.device))
    return results


@torch.no_grad()
def _agreement(first: torch.Tensor, second: torch.Tensor, valid: torch.Tensor) -> dict:
    """IoU of the mean-binarised (B, H, W) maps and Pearson of the raw ones over ``valid`` (H, W)."""
    iou = masked_iou(binarize_at_mean(first, valid), binarize_at_mean(second, valid), valid)
    corr = masked_pearson(first, second, valid)
    iou_mean, iou_std = _summary(iou)
    corr_mean, corr_std = _summary(corr)
    return {
        "iou_mean": iou_mean,
        "iou_std": iou_std,
        "corr_mean": corr_mean,
        "corr_std": corr_std,
        "per_image_iou": iou.tolist(),
        "per_image_corr": corr.tolist(),
        "valid_fraction": float(valid.float().mean()),
    }
