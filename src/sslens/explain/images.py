"""Image files → model inputs: any size and mode, converted, resized, centre-cropped, normalised.

Every step is recorded in a JSON-serialisable dict, saved beside each explanation, so a map
can be related back to the pixels of the original file.

>>> from PIL import Image
>>> tensor, info = preprocess(Image.new("RGB", (64, 48)), (32, 32), (0.5,) * 3, (0.5,) * 3)
>>> tensor.shape, info["resized_to"], info["crop_box"]
(torch.Size([3, 32, 32]), [32, 43], [0, 5, 32, 37])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from sslens.data.base import normalize
from sslens.errors import UserError

#: File name endings treated as images when a folder is given (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


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
                    f"The folder {path} holds no image files ({', '.join(IMAGE_EXTENSIONS)}). "
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


def check_readable(files: Iterable[Path]) -> None:
    """Raise a :class:`UserError` naming the first file whose header is not an image's (cheap: no decoding)."""
    for path in files:
        try:
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError) as error:
            raise UserError(f"Cannot read {path} as an image ({error}). Is it an image file?") from error


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
    """(RGB image, how it was converted) for any PIL mode."""
    mode = image.mode
    if mode == "RGB":
        return image, "none"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit-depth and float images: PIL's own conversion to RGB clips at 255, so a 16-bit
        # scan would come out almost white. Scale by the dtype's range (16 bit) or the image's
        # own range (32-bit int, float) instead.
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            low, high, how = 0.0, 65535.0, "16-bit grey scaled by 255/65535"
        else:
            low, high, how = float(values.min()), float(values.max()), f"{mode} grey min-max scaled to 0..255"
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        grey = Image.fromarray(np.round(scaled * 255).astype(np.uint8), mode="L")
        return grey.convert("RGB"), how
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent pixels often hide arbitrary colours; composite them onto white as viewers do.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), f"{mode} alpha composited onto white"
    return image.convert("RGB"), f"{mode} converted to RGB"


def load_rgb(path: str | Path) -> tuple[Image.Image, dict]:
    """Read an image file as RGB, applying its EXIF orientation: (image, record).

    ``original_size`` is (height, width) after that rotation; ``exif_orientation`` (1 = none)
    says which one it was, so maps can be related back to the file's stored pixels.
    """
    path = Path(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            orientation = int(opened.getexif().get(ExifTags.Base.Orientation, 1))
            image = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UserError(f"Cannot read {path} as an image ({error}). Is it an image file, and complete?") from error
    rgb, conversion = _to_rgb(image)
    record = {"source": str(path), "original_mode": image.mode, "original_size": [image.height, image.width],
              "exif_orientation": orientation, "conversion": conversion}
    return rgb, record


#: Interpolation name (as timm's ``pretrained_cfg["interpolation"]`` and model meta spell it) →
#: PIL resampling filter.
INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def preprocess(
    image: Image.Image,
    size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
) -> tuple[torch.Tensor, dict]:
    """RGB image → normalised (3, H, W) float32 at ``size`` = (H, W): resize, centre crop, normalise.

    The image is resized (antialiased, ``interpolation``) by the one factor that makes it cover
    (H / crop_pct, W / crop_pct) — the shorter side relative to the target fits exactly — then
    the centre (H, W) is cropped, so nothing is stretched. ``crop_pct=1`` crops nothing more
    than the aspect ratio needs; ImageNet evaluation uses 0.875 (shorter side 256 → centre 224,
    as torchvision's reference scripts), timm models their ``pretrained_cfg["crop_pct"]``.
    Returns the tensor and a record of the steps (crop box is top, left, bottom, right in the
    resized image).
    """
    height, width = int(size[0]), int(size[1])
    if image.mode != "RGB":
        raise ValueError(f"preprocess needs an RGB image; got mode {image.mode}. Use load_rgb first.")
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, int | float) or not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1] (0.875 = resize 256, crop 224); got {crop_pct!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}; got {interpolation!r}")
    scale = max(height / crop_pct / image.height, width / crop_pct / image.width)
    new_h = max(height, round(image.height * scale))
    new_w = max(width, round(image.width * scale))
    resized = image.resize((new_w, new_h), INTERPOLATIONS[interpolation])
    top, left = (new_h - height) // 2, (new_w - width) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.array(cropped, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    tensor = normalize(pixels[None], mean, std)[0]
    record = {
        "resized_to": [new_h, new_w],
        "resample": interpolation,
        "crop_pct": float(crop_pct),
        "crop_box": [top, left, top + height, left + width],
        "input_size": [height, width],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }
    return tensor, record


def load_image_tensor(
    path: str | Path,
    size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
) -> tuple[torch.Tensor, dict]:
    """:func:`load_rgb` then :func:`preprocess`: (normalised (3, H, W), record of every step)."""
    image, record = load_rgb(path)
    tensor, steps = preprocess(image, size, mean, std, crop_pct=crop_pct, interpolation=interpolation)
    return tensor, {**record, **steps}
