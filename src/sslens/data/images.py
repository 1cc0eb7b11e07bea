"""The one image loader: files → RGB pixels, for training data and for explained images alike.

``imagefolder`` datasets decode their files here, and ``sslens explain`` prepares each image
here, so a model is explained on the pixels it was trained on: the same mode conversion, the
same resize and the same centre crop.

Mode conversion (:func:`to_rgb`), one policy for every path:

* 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and 32-bit integer grey (``I``, which
  Pillow uses for 16-bit PNG and TIFF files) hold 16-bit samples: scaled by 255/65535 and
  rounded (values above 65535 are clipped). The scale depends on the format, never on the
  image, so a dark 16-bit image stays dark.
* 32-bit float grey (``F``) is read on a [0, 1] scale (×255, clipped), the convention of float
  images in PyTorch and scikit-image.
* Transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, or a palette or grey image with a
  ``transparency`` entry) is composited onto white, as image viewers show it: transparent pixels
  often hide arbitrary colours.
* Everything else (grey, palette, CMYK, YCbCr, bilevel) goes through Pillow's ``convert("RGB")``.

Resizing (:func:`resize_center_crop`): one factor makes the image cover (H / crop_pct,
W / crop_pct), then the centre (H, W) is cropped, so nothing is stretched. Training data uses
``crop_pct=1`` and bilinear interpolation (antialiased by Pillow when shrinking); an imported
ImageNet model records its own (e.g. 0.875, bicubic) and is explained with it.

>>> from PIL import Image
>>> tensor, info = preprocess(Image.new("RGB", (64, 48)), (32, 32), (0.5,) * 3, (0.5,) * 3)
>>> tensor.shape, info["resized_to"], info["crop_box"]
(torch.Size([3, 32, 32]), [32, 43], [0, 5, 32, 37])
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from sslens.checks import is_number
from sslens.data.base import normalize
from sslens.errors import UserError

#: File name endings treated as images when a folder is listed (case-insensitive).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

#: What Pillow raises for a file that is not a complete, decodable image of a sane size.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

#: Interpolation name (as timm's ``pretrained_cfg["interpolation"]`` and model meta spell it) →
#: Pillow resampling filter.
INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}

#: How training data is resized: what a model trained by sslens saw.
TRAINING_INTERPOLATION = "bilinear"

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
    """(RGB image, how it was converted) for any Pillow mode (see the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image, "none"
    if mode in _SIXTEEN_BIT or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            scaled, how = values * 255.0, "float grey read on a 0..1 scale"
        else:
            scaled, how = values * (255.0 / 65535.0), f"{mode} grey scaled by 255/65535"
        grey = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB"), how
    if mode in _ALPHA or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), f"{mode} alpha composited onto white"
    return image.convert("RGB"), f"{mode} converted to RGB"


def read_rgb(path: str | Path, *, draft: Sequence[int] | None = None) -> tuple[Image.Image, dict]:
    """Decode an image file as RGB with its EXIF orientation applied: (image, record).

    ``draft`` (H, W) lets the JPEG decoder downscale by 2^k in the DCT domain, never below that
    size (a large photo decodes several times faster). ``record`` holds ``original_mode``,
    ``original_size`` (height, width after the rotation), ``exif_orientation`` (1 = none) and
    ``conversion``. Raises one of :data:`DECODE_ERRORS` for a file that is not a readable image.
    """
    with Image.open(path) as opened:
        if draft is not None:
            opened.draft(opened.mode, (int(draft[1]), int(draft[0])))
        opened.load()
        orientation = int(opened.getexif().get(ExifTags.Base.Orientation, 1))
        image = ImageOps.exif_transpose(opened)
    rgb, conversion = to_rgb(image)
    return rgb, {
        "source": str(path),
        "original_mode": image.mode,
        "original_size": [image.height, image.width],
        "exif_orientation": orientation,
        "conversion": conversion,
    }


#: What :func:`load_rgb` and :func:`unreadable_reason` catch: the decode errors, and Pillow's
#: decompression-bomb warning, which they turn into an error (see :func:`_refusing_bombs`).
_UNREADABLE = (*DECODE_ERRORS, UnidentifiedImageError, Image.DecompressionBombWarning)


@contextlib.contextmanager
def _refusing_bombs() -> Iterator[None]:
    """Inside, an image of more than Pillow's ``Image.MAX_IMAGE_PIXELS`` is refused when it is
    opened, before any pixel is decoded.

    Pillow only warns between that limit and twice it (and then decodes), and raises above; a
    file the user names could be a bomb either way, so both are errors here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _why_unreadable(path: str | Path, error: BaseException) -> str:
    """A short reason why Pillow failed on ``path``, e.g. "decompression bomb: 200,000,000 pixels, ..."."""
    if isinstance(error, Image.DecompressionBombError | Image.DecompressionBombWarning):
        # Pillow's message is "Image size (N pixels) exceeds limit of M pixels, ...".
        found = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(found[1]):,} pixels" if found else str(error)
        return (
            f"decompression bomb: {size}, more than Pillow's limit PIL.Image.MAX_IMAGE_PIXELS = "
            f"{Image.MAX_IMAGE_PIXELS:,}; not decoded"
        )
    if isinstance(error, UnidentifiedImageError):
        # Pillow says "cannot identify image file" for an empty file too.
        with contextlib.suppress(OSError):
            if Path(path).stat().st_size == 0:
                return "0 bytes"
        return "not an image file Pillow can identify"
    return f"truncated or corrupt: {error}"


def _unreadable_message(path: str | Path, reason: str) -> str:
    fix = (
        "If it is a genuine image, shrink it below that limit first."
        if reason.startswith("decompression bomb")
        else "Is it an image file, and complete?"
    )
    return f"Cannot read {path} as an image ({reason}). {fix}"


def load_rgb(path: str | Path) -> tuple[Image.Image, dict]:
    """:func:`read_rgb` for a file the user named: an unreadable file is a UserError, and a
    decompression bomb (more than Pillow's ``Image.MAX_IMAGE_PIXELS``) is refused unread."""
    try:
        with _refusing_bombs():
            return read_rgb(path)
    except _UNREADABLE as error:
        raise UserError(_unreadable_message(path, _why_unreadable(path, error))) from error


def resize_center_crop(
    image: Image.Image,
    size: Sequence[int],
    *,
    crop_pct: float = 1.0,
    interpolation: str = TRAINING_INTERPOLATION,
) -> tuple[Image.Image, dict]:
    """Resize ``image`` by the one factor that makes it cover (H / crop_pct, W / crop_pct), then
    crop the centre (H, W) = ``size``: (image, record of the resize and the crop box).

    ``crop_pct=1`` crops nothing more than the aspect ratio needs; ImageNet evaluation uses
    0.875 (shorter side 256 → centre 224, as torchvision's reference scripts). The crop box is
    (top, left, bottom, right) in the resized image.
    """
    height, width = int(size[0]), int(size[1])
    if not is_number(crop_pct) or not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1] (0.875 = resize 256, crop 224); got {crop_pct!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}; got {interpolation!r}")
    scale = max(height / crop_pct / image.height, width / crop_pct / image.width)
    new_h = max(height, round(image.height * scale))
    new_w = max(width, round(image.width * scale))
    resized = image.resize((new_w, new_h), INTERPOLATIONS[interpolation])
    top, left = (new_h - height) // 2, (new_w - width) // 2
    record = {
        "resized_to": [new_h, new_w],
        "resample": interpolation,
        "crop_pct": float(crop_pct),
        "crop_box": [top, left, top + height, left + width],
        "input_size": [height, width],
    }
    return resized.crop((left, top, left + width, top + height)), record


def decode_image(path: str | Path, image_size: int | None) -> np.ndarray:
    """One training image: (H, W, 3) uint8, resized and centre-cropped to ``image_size`` square
    (None keeps the native size). Raises one of :data:`DECODE_ERRORS` on an unreadable file."""
    draft = None if image_size is None else (image_size, image_size)
    image, _ = read_rgb(path, draft=draft)
    if image_size is not None:
        image, _ = resize_center_crop(image, (image_size, image_size))
    return np.array(image, dtype=np.uint8)  # a writable copy, so torch.from_numpy does not warn


def preprocess(
    image: Image.Image,
    size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_pct: float = 1.0,
    interpolation: str = TRAINING_INTERPOLATION,
) -> tuple[torch.Tensor, dict]:
    """RGB image → normalised (3, H, W) float32 at ``size``: :func:`resize_center_crop`, then
    ``(pixels / 255 − mean) / std``. Returns the tensor and a record of the steps."""
    if image.mode != "RGB":
        raise ValueError(f"preprocess needs an RGB image; got mode {image.mode}. Use load_rgb first.")
    cropped, record = resize_center_crop(image, size, crop_pct=crop_pct, interpolation=interpolation)
    pixels = torch.from_numpy(np.array(cropped, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    tensor = normalize(pixels[None], mean, std)[0]
    return tensor, {**record, "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def load_image_tensor(
    path: str | Path,
    size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_pct: float = 1.0,
    interpolation: str = TRAINING_INTERPOLATION,
) -> tuple[torch.Tensor, dict]:
    """:func:`load_rgb` then :func:`preprocess`: (normalised (3, H, W), record of every step)."""
    image, record = load_rgb(path)
    tensor, steps = preprocess(image, size, mean, std, crop_pct=crop_pct, interpolation=interpolation)
    return tensor, {**record, **steps}


def list_image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders into image files: a folder gives its image files, sorted by name.

    Files named explicitly are kept whatever their extension (they fail later, by name, if
    unreadable). A missing path or a folder without images is a :class:`UserError`.
    """
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise UserError(
                    f"The folder {path} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}). "
                    "Pass image files or a folder that contains some."
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path} does not exist. Pass existing image files or folders.")
    if not files:
        raise UserError("No images given. Pass at least one image file or folder.")
    return files


def unreadable_reason(path: str | Path) -> str | None:
    """Why ``path`` is not a readable image, found without decoding it, or None.

    Cheap: the file's header and (for PNG, whose chunks carry checksums) a read of its chunks,
    never its pixels. Reasons read "0 bytes", "not an image file Pillow can identify",
    "decompression bomb: 200,000,000 pixels, ..." (more than Pillow's ``Image.MAX_IMAGE_PIXELS``)
    or "truncated or corrupt: ...". A file that passes can still fail to decode (a truncated
    JPEG has no checksum to verify): :func:`load_rgb` then raises.
    """
    try:
        with _refusing_bombs(), Image.open(path) as image:
            image.verify()
    except _UNREADABLE as error:
        return _why_unreadable(path, error)
    return None


def check_readable(files: Iterable[Path]) -> None:
    """Raise a :class:`UserError` naming the first file :func:`unreadable_reason` refuses (cheap: no decoding)."""
    for path in files:
        reason = unreadable_reason(path)
        if reason is not None:
            raise UserError(_unreadable_message(path, reason))
