"""The ``synthetic`` dataset: a procedurally generated shapes world with exact ground truth.

Each image shows one main object (its shape is the label) over a textured background, with a few
small clutter shapes ("distractors") behind it. Because we draw every pixel ourselves, we know the
object's exact segmentation mask and a depth map, which the explainers are scored against; no
download is ever needed.

Everything is generated on the CPU in two pure, vectorised steps:

* :func:`sample_params` draws every random choice for N images from one seeded
  ``torch.Generator`` (resolution independent), and
* :func:`render` turns those parameters into (N, H, W, 3) uint8 images, (N, H, W) bool masks and
  (N, H, W) float32 inverse depth, using coordinate grids, per-image rotation and inside tests.

Optionally (``cue=True``) each image also carries a *planted cue*: a small black-and-white code,
different in every image, stamped over the scene (:func:`sample_cues`, :func:`stamp_cues`). A
contrastive model can tell its training images apart by reading the code, so a model trained on
marked images depends on the marker and one trained without it does not: an answer known in
advance that explainers are checked against.

>>> data = load_synthetic("train", image_size=32, num_images=16, seed=0)
>>> tuple(data.images.shape), data.class_names[:3]
((16, 32, 32, 3), ['circle', 'crescent', 'cross'])
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sslens.checks import fraction, is_int, suggestion
from sslens.data.base import DATASETS, ImageData
from sslens.errors import DatasetError

ShapeTest = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

OBJECT_SIZE = (0.4, 0.7)  # object diameter as a fraction of the image side
DISTRACTOR_SIZE = (0.15, 0.3)
MIN_OBJECT_CONTRAST = 0.3  # min RGB distance (colours in [0, 1]) between object and background
MIN_DISTRACTOR_CONTRAST = 0.25  # min RGB distance between a distractor and the object
SECOND_SHADE = 0.5  # an object's second colour is its first one times this (a darker shade)
NOISE_CELLS = 8  # the noise background is an 8 x 8 random grid, bilinearly upsampled
COLOR_CANDIDATES = 16
CLASS_HUE_SPREAD = 0.08  # width of a class's hue band (the bands are 1 / num_classes apart)
MAX_PIXELS_PER_CHUNK = 2**22  # render this many pixels at a time to bound memory
#: Where the planted cue goes: a named place, or "random" (uniform over every position where the
#: whole marker fits, drawn per image). Corners touch the image border.
CUE_POSITIONS = ("random", "center", "top-left", "top-right", "bottom-left", "bottom-right")
#: The colours a cue's cells take: black and white, or the 8 corners of the RGB cube.
CUE_PALETTES = {"binary": ((0, 0, 0), (255, 255, 255)), "gray": ((80, 80, 80), (176, 176, 176)), "cube": tuple(
    (255 * (i >> 2 & 1), 255 * (i >> 1 & 1), 255 * (i & 1)) for i in range(8)
)}

# Measured once with ``load_synthetic("train", image_size=32, num_images=20000, seed=0)``:
# ``images.float().div(255).mean((0, 1, 2))`` and ``.std((0, 1, 2))``. Other sizes and seeds differ
# in the third decimal, which does not matter for normalisation.
SYNTHETIC_MEAN = (0.4763, 0.4807, 0.4793)
SYNTHETIC_STD = (0.2008, 0.1967, 0.2001)


def _regular_star(x: torch.Tensor, y: torch.Tensor, n: int, inner: float) -> torch.Tensor:
    """Inside test for a regular n-pointed star with outer radius 1 and inner radius ``inner``.

    With ``inner = cos(pi / n)`` the star is the convex regular n-gon. The angle is folded into one
    half-sector [0, pi/n]; there the boundary is the segment from the vertex V = (1, 0) to the inner
    point I, and a point is inside when it lies on the origin's side of that segment.
    """
    sector = 2 * math.pi / n
    angle = torch.remainder(torch.atan2(y, x), sector)
    angle = torch.minimum(angle, sector - angle)
    radius = torch.sqrt(x * x + y * y)
    px, py = radius * torch.cos(angle), radius * torch.sin(angle)
    ix, iy = inner * math.cos(math.pi / n), inner * math.sin(math.pi / n)
    return (ix - 1.0) * py - iy * (px - 1.0) >= 0


def _circle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x * x + y * y <= 1.0


def _square(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _regular_star(x, y, 4, math.cos(math.pi / 4))


def _triangle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _regular_star(x, y, 3, math.cos(math.pi / 3))


def _star(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Fatter than the geometric pentagram (inner 0.38) so the arms survive at 32 px.
    return _regular_star(x, y, 5, 0.45)


def _cross(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Arm length 0.94 keeps the arm corners (0.94, 0.33) inside the unit disc.
    ax, ay = x.abs(), y.abs()
    return ((ax <= 0.94) & (ay <= 0.33)) | ((ay <= 0.94) & (ax <= 0.33))


def _ring(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r2 = x * x + y * y
    return (r2 <= 1.0) & (r2 >= 0.5**2)


def _crescent(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * x + y * y <= 1.0) & ((x - 0.45) ** 2 + y * y > 0.8**2)


def _heart(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # The classic implicit heart (X^2 + Y^2 - 1)^3 <= X^2 Y^3 has a smallest enclosing circle of
    # radius 1.2499 around (0, 0.25) (found numerically); scale and shift it into the unit disc.
    hx, hy = x * 1.26, y * 1.26 + 0.25
    return (hx * hx + hy * hy - 1.0) ** 3 - hx * hx * hy**3 <= 0


def _flat(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(u)


def _stripes(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    angle, frequency, phase = _col(r, 0) * math.pi, 2.0 + 4.0 * _col(r, 1), _col(r, 2)
    along = u * torch.cos(angle) + v * torch.sin(angle)
    return (torch.remainder(along * frequency + phase, 1.0) < 0.5).to(u.dtype)


def _checker(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    cells = torch.floor(2.0 + 5.0 * _col(r, 0))
    parity = torch.floor(u * cells) + torch.floor(v * cells)
    return torch.remainder(parity, 2.0)


def _noise(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return F.interpolate(noise[:, None], size=u.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def _gradient(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    angle = _col(r, 0) * 2 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Project onto the direction, then rescale so the image spans exactly [0, 1].
    along = (u - 0.5) * cos + (v - 0.5) * sin
    half_span = 0.5 * (cos.abs() + sin.abs())
    return (along / half_span + 1.0) * 0.5


def _flat_texture(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x, dtype=torch.bool)


def _stripes_texture(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.remainder(x, 0.8) < 0.4


def _dots_texture(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dx, dy = torch.remainder(x, 0.7) - 0.35, torch.remainder(y, 0.7) - 0.35
    return dx * dx + dy * dy <= 0.2**2


def _checker_texture(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.remainder(torch.floor(x / 0.5) + torch.floor(y / 0.5), 2.0) > 0


# A shape is an inside test in the object's own frame: (x, y) → bool, where the object is centred
# at 0 and fits in the unit disc (so a rotated object of radius r around a centre at least r away
# from every border is fully inside the image). The sorted names are the class names.
SHAPES: dict[str, ShapeTest] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
    "ring": _ring,
    "crescent": _crescent,
    "heart": _heart,
}
# A background is a blend field t in [0, 1] between its two colours: (u, v, r, noise) → (M, H, W).
BACKGROUNDS: dict[str, Callable[..., torch.Tensor]] = {
    "flat": _flat,
    "stripes": _stripes,
    "checker": _checker,
    "noise": _noise,
    "gradient": _gradient,
}
# An object texture says which pixels get the object's second shade: (x, y) → bool.
TEXTURES: dict[str, ShapeTest] = {
    "flat": _flat_texture,
    "stripes": _stripes_texture,
    "dots": _dots_texture,
    "checker": _checker_texture,
}

CLASS_NAMES: tuple[str, ...] = tuple(sorted(SHAPES))
BACKGROUND_KINDS: tuple[str, ...] = tuple(sorted(BACKGROUNDS))
TEXTURE_KINDS: tuple[str, ...] = tuple(sorted(TEXTURES))


def _col(r: torch.Tensor, index: int) -> torch.Tensor:
    """Column ``index`` of per-image parameters (M, K), shaped (M, 1, 1) to broadcast over pixels."""
    return r[:, index, None, None]


@dataclasses.dataclass(frozen=True)
class SceneParams:
    """Every random choice for N images; D = the maximum number of distractors.

    Positions are in normalised image coordinates: (x, y) in [0, 1]^2, x to the right, y down.
    Sizes are diameters as a fraction of the image side; angles are radians; colours are RGB in
    [0, 1], already quantised to multiples of 1/255 so rendered pixels hold them exactly.
    """

    label: torch.Tensor  # (N,) int64 index into CLASS_NAMES
    center: torch.Tensor  # (N, 2)
    size: torch.Tensor  # (N,)
    angle: torch.Tensor  # (N,)
    texture: torch.Tensor  # (N,) int64 index into TEXTURE_KINDS
    object_colors: torch.Tensor  # (N, 2, 3): main shade, second shade
    background: torch.Tensor  # (N,) int64 index into BACKGROUND_KINDS
    background_colors: torch.Tensor  # (N, 2, 3)
    background_params: torch.Tensor  # (N, 4) uniform in [0, 1), read by each background kind
    noise: torch.Tensor  # (N, NOISE_CELLS, NOISE_CELLS) uniform in [0, 1)
    distractor_active: torch.Tensor  # (N, D) bool
    distractor_label: torch.Tensor  # (N, D) int64
    distractor_center: torch.Tensor  # (N, D, 2)
    distractor_size: torch.Tensor  # (N, D)
    distractor_angle: torch.Tensor  # (N, D)
    distractor_color: torch.Tensor  # (N, D, 3)

    def __len__(self) -> int:
        return len(self.label)

    def select(self, index: slice | torch.Tensor) -> SceneParams:
        """The parameters of the images picked by ``index`` (a slice or an index tensor)."""
        return SceneParams(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    def replace(self, **changes: torch.Tensor) -> SceneParams:
        return dataclasses.replace(self, **changes)


def _quantise(colors: torch.Tensor) -> torch.Tensor:
    return torch.round(colors * 255.0) / 255.0


def _segment_distance(points: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance from points (N, K, 3) to the RGB segments [a, b] with a, b (N, 3).

    Every background pixel is a blend of its two colours, so the segment between them is the set
    of colours an object must stay away from to be visible everywhere.
    """
    a, ab = a[:, None], (b - a)[:, None]
    t = ((points - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)
    closest = a + t.clamp(0.0, 1.0)[..., None] * ab
    return (points - closest).norm(dim=-1)


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """(...) hue (wrapping), saturation, value in [0, 1] → (..., 3) RGB in [0, 1]."""
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0]) + 6.0 * torch.remainder(hue, 1.0)[..., None], 6.0)
    return value[..., None] - value[..., None] * saturation[..., None] * (
        torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    )


def _pick_colors(candidates: torch.Tensor, score: torch.Tensor, minimum: float) -> torch.Tensor:
    """Per row, the first candidate (N, K, 3) whose score (N, K) reaches ``minimum``, else the best.

    The candidates are random, so "the first that qualifies" is a random qualifying colour.
    """
    ok = score >= minimum
    choice = torch.where(ok.any(dim=1), ok.to(torch.int8).argmax(dim=1), score.argmax(dim=1))
    return candidates[torch.arange(len(candidates)), choice]


# The 8 corners of the RGB cube: always-available fallbacks far from most backgrounds.
_CUBE_CORNERS = torch.tensor(
    [[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.float32
)


def sample_params(
    n: int,
    generator: torch.Generator,
    distractors: int = 2,
    background_contrast: float = 1.0,
    texture_correlation: float = 0.0,
    color_correlation: float = 0.8,
    background_saturation: float = 0.25,
) -> SceneParams:
    """Draw every random choice for ``n`` images from ``generator`` (see :class:`SceneParams`).

    ``background_contrast`` in [0, 1] scales the distance between a background's two colours
    (0 = flat, 1 = two independent random colours).
    """
    g = generator
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    num_classes = len(CLASS_NAMES)
    label = torch.randint(num_classes, (n,), generator=g)
    size = OBJECT_SIZE[0] + (OBJECT_SIZE[1] - OBJECT_SIZE[0]) * rand(n)
    # The centre keeps a full radius from every border, so every rotation stays inside.
    center = size[:, None] / 2 + (1.0 - size[:, None]) * rand(n, 2)
    angle = 2 * math.pi * rand(n)
    texture = torch.randint(len(TEXTURE_KINDS), (n,), generator=g)
    # With probability texture_correlation an object wears its class's preferred texture, so (as
    # in natural images, where zebras are striped) a low-level cue correlates with the label.
    preferred = torch.remainder(label, len(TEXTURE_KINDS))
    texture = torch.where(rand(n) < texture_correlation, preferred, texture)
    background = torch.randint(len(BACKGROUND_KINDS), (n,), generator=g)
    first, second = rand(n, 3), rand(n, 3)
    background_colors = torch.stack([first, first + background_contrast * (second - first)], dim=1)
    gray = background_colors.mean(dim=-1, keepdim=True)
    background_colors = _quantise(gray + background_saturation * (background_colors - gray))

    corners = _CUBE_CORNERS.expand(n, 8, 3)
    random_colors = rand(n, COLOR_CANDIDATES, 3)
    # With probability color_correlation the object's colour is drawn around its class's hue.
    class_hue = (label[:, None] + 0.5) / num_classes + CLASS_HUE_SPREAD * (rand(n, COLOR_CANDIDATES) - 0.5)
    class_colors = _hsv_to_rgb(class_hue, 0.6 + 0.4 * rand(n, COLOR_CANDIDATES), 0.55 + 0.45 * rand(n, COLOR_CANDIDATES))
    use_class = (rand(n) < color_correlation)[:, None, None]
    candidates = torch.cat([_quantise(torch.where(use_class, class_colors, random_colors)), corners], dim=1)
    shades = _quantise(candidates * SECOND_SHADE)
    bg_a, bg_b = background_colors[:, 0], background_colors[:, 1]
    contrast = torch.minimum(
        _segment_distance(candidates, bg_a, bg_b), _segment_distance(shades, bg_a, bg_b)
    )
    main = _pick_colors(candidates, contrast, MIN_OBJECT_CONTRAST)
    object_colors = torch.stack([main, _quantise(main * SECOND_SHADE)], dim=1)

    d = distractors
    count = torch.randint(d + 1, (n,), generator=g)
    distractor_active = torch.arange(d)[None, :] < count[:, None]
    # Any class but the main one, so a distractor never shows the label's shape.
    offset = torch.randint(1, num_classes, (n, d), generator=g)
    distractor_label = torch.remainder(label[:, None] + offset, num_classes)
    distractor_size = DISTRACTOR_SIZE[0] + (DISTRACTOR_SIZE[1] - DISTRACTOR_SIZE[0]) * rand(n, d)
    distractor_center = distractor_size[..., None] / 2 + (1.0 - distractor_size[..., None]) * rand(
        n, d, 2
    )
    distractor_angle = 2 * math.pi * rand(n, d)
    candidates = _quantise(rand(n, d, COLOR_CANDIDATES, 3)).reshape(n * d, COLOR_CANDIDATES, 3)
    repeat = lambda t: t.repeat_interleave(d, dim=0)  # noqa: E731
    contrast = torch.minimum(
        _segment_distance(candidates, repeat(object_colors[:, 0]), repeat(object_colors[:, 0])),
        _segment_distance(candidates, repeat(object_colors[:, 1]), repeat(object_colors[:, 1])),
    )
    distractor_color = _pick_colors(candidates, contrast, MIN_DISTRACTOR_CONTRAST).reshape(n, d, 3)

    return SceneParams(
        label=label, center=center, size=size, angle=angle, texture=texture,
        object_colors=object_colors, background=background,
        background_colors=background_colors, background_params=rand(n, 4),
        noise=rand(n, NOISE_CELLS, NOISE_CELLS), distractor_active=distractor_active,
        distractor_label=distractor_label, distractor_center=distractor_center,
        distractor_size=distractor_size, distractor_angle=distractor_angle,
        distractor_color=distractor_color,
    )


def _local_coords(
    u: torch.Tensor, v: torch.Tensor, center: torch.Tensor, size: torch.Tensor, angle: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel grid (1, H, W) → each object's frame (M, H, W): translate, rotate by -angle, scale."""
    dx = u - center[:, 0, None, None]
    dy = v - center[:, 1, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    radius = (size / 2)[:, None, None]
    return (cos * dx + sin * dy) / radius, (cos * dy - sin * dx) / radius


def _dispatch(
    names: tuple[str, ...],
    table: dict[str, Callable[..., torch.Tensor]],
    kind: torch.Tensor,
    out: torch.Tensor,
    *args: torch.Tensor,
) -> torch.Tensor:
    """Fill ``out`` (M, H, W) by running each kind's function on the rows of that kind only."""
    for index, name in enumerate(names):
        rows = (kind == index).nonzero(as_tuple=True)[0]
        if len(rows):
            out[rows] = table[name](*(a[rows] for a in args)).to(out.dtype)
    return out


def render(
    params: SceneParams, image_size: int, *, draw_object: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw the scenes: background, then distractors back to front, then the main object.

    Pixels are sampled at their centres without anti-aliasing, so every pixel belongs to exactly
    one layer and the mask is exact.

    Args:
        params: N scenes from :func:`sample_params`.
        image_size: side S of the square images (>= 16).
        draw_object: False leaves the main object out (the mask is then all False); used to check
            that the object changes exactly the pixels of its mask.

    Returns:
        images (N, S, S, 3) uint8, masks (N, S, S) bool (visible pixels of the main object) and
        depth (N, S, S) float32 relative inverse depth in [0, 1]: background 0 (top) to 0.3
        (bottom) like a floor, distractor k of D at 0.4 + 0.4 (k + 1) / (D + 1), the object in
        [0.9, 1] (bigger = nearer).
    """
    n, s = len(params), image_size
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    uu, vv = u.expand(n, s, s), v.expand(n, s, s)

    blend = _dispatch(
        BACKGROUND_KINDS, BACKGROUNDS, params.background, torch.empty(n, s, s),
        uu, vv, params.background_params, params.noise,
    )
    bg_a, bg_b = params.background_colors[:, 0], params.background_colors[:, 1]
    image = bg_a[:, None, None] + blend[..., None] * (bg_b - bg_a)[:, None, None]
    depth = (0.3 * v).expand(n, s, s).clone()

    num_distractors = params.distractor_active.shape[1]
    for k in range(num_distractors):
        x, y = _local_coords(
            u, v, params.distractor_center[:, k], params.distractor_size[:, k],
            params.distractor_angle[:, k],
        )
        inside = _dispatch(
            CLASS_NAMES, SHAPES, params.distractor_label[:, k],
            torch.zeros(n, s, s, dtype=torch.bool), x, y,
        )
        inside &= params.distractor_active[:, k, None, None]
        image = torch.where(inside[..., None], params.distractor_color[:, k, None, None], image)
        depth[inside] = 0.4 + 0.4 * (k + 1) / (num_distractors + 1)

    mask = torch.zeros(n, s, s, dtype=torch.bool)
    if draw_object:
        x, y = _local_coords(u, v, params.center, params.size, params.angle)
        _dispatch(CLASS_NAMES, SHAPES, params.label, mask, x, y)
        second = _dispatch(
            TEXTURE_KINDS, TEXTURES, params.texture, torch.zeros(n, s, s, dtype=torch.bool), x, y
        )
        color = torch.where(
            second[..., None], params.object_colors[:, 1, None, None], params.object_colors[:, 0, None, None]
        )
        image = torch.where(mask[..., None], color, image)
        nearness = (params.size - OBJECT_SIZE[0]) / (OBJECT_SIZE[1] - OBJECT_SIZE[0])
        depth = torch.where(mask, (0.9 + 0.1 * nearness)[:, None, None], depth)

    images = torch.round(image * 255.0).to(torch.uint8)
    return images, mask, depth.to(torch.float32)


@dataclasses.dataclass(frozen=True)
class CueParams:
    """The planted cue of N images: a ``cells`` x ``cells`` code of black/white cells of
    ``cell_size`` px, its top-left pixel at ``position``."""

    pattern: torch.Tensor  # (N, cells, cells) int64 index into the palette
    position: torch.Tensor  # (N, 2) int64 (row, column) of the marker's top-left pixel
    cell_size: int

    @property
    def side(self) -> int:
        """The marker's side in pixels."""
        return self.pattern.shape[-1] * self.cell_size


def cue_generator(seed: int, split: str, index: int) -> torch.Generator:
    """The cue's own generator for image ``index`` of (seed, split).

    A separate stream per image (not the scene's generator), so switching the cue on leaves
    every scene parameter, and so every pixel outside the marker, bitwise unchanged, and image
    i's code does not depend on how many images are drawn.
    """
    digest = hashlib.sha256(f"sslens.synthetic.cue/{seed}/{split}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def sample_cues(
    n: int, seed: int, split: str, image_size: int, *, cells: int, cell_size: int, position: str,
    colors: int = 2,
) -> CueParams:
    """Draw the cue of each of ``n`` images: cells i.i.d. uniform over ``colors`` palette
    entries, and for ``position="random"`` a top-left pixel uniform over every place where the
    whole marker fits."""
    side = cells * cell_size
    span = image_size - side  # the largest top-left coordinate that keeps the marker inside
    patterns, positions = [], []
    for index in range(n):
        g = cue_generator(seed, split, index)
        patterns.append(torch.randint(colors, (cells, cells), generator=g))
        # Drawn for every position option, so the codes do not depend on where they go.
        positions.append(torch.randint(span + 1, (2,), generator=g))
    pattern = torch.stack(patterns)
    if position == "random":
        where = torch.stack(positions)
    else:
        row = {"top": 0, "center": span // 2, "bottom": span}[position.split("-")[0]]
        col = {"left": 0, "center": span // 2, "right": span}[position.split("-")[-1]]
        where = torch.tensor([row, col]).expand(n, 2).clone()
    return CueParams(pattern=pattern, position=where, cell_size=cell_size)


def cue_masks(cues: CueParams, image_size: int) -> torch.Tensor:
    """(N, S, S) bool: the pixels each image's marker covers."""
    pixels = torch.arange(image_size)
    top, left = cues.position[:, 0, None], cues.position[:, 1, None]
    rows = (pixels >= top) & (pixels < top + cues.side)  # (N, S)
    cols = (pixels >= left) & (pixels < left + cues.side)
    return rows[:, :, None] & cols[:, None, :]


def stamp_cues(
    images: torch.Tensor, cues: CueParams, palette: str = "binary"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw each image's marker over it in the colours of ``palette``, nothing else touched.

    Returns (stamped images (N, S, S, 3) uint8, cue masks (N, S, S) bool).
    """
    n, s = images.shape[:2]
    mask = cue_masks(cues, s)
    pixels = torch.arange(s)
    # Each pixel's cell in its image's code (clamped outside the marker, where mask is False).
    cell_row = ((pixels - cues.position[:, 0, None]) // cues.cell_size).clamp(0, cues.pattern.shape[1] - 1)
    cell_col = ((pixels - cues.position[:, 1, None]) // cues.cell_size).clamp(0, cues.pattern.shape[2] - 1)
    batch = torch.arange(n)[:, None, None]
    cell = cues.pattern[batch, cell_row[:, :, None], cell_col[:, None, :]]  # (N, S, S)
    code = torch.tensor(CUE_PALETTES[palette], dtype=torch.uint8)[cell]  # (N, S, S, 3)
    return torch.where(mask[..., None], code, images), mask


def split_generator(seed: int, split: str) -> torch.Generator:
    """A generator for (seed, split): train and test of one seed draw from unrelated streams.

    Hashing (rather than, say, ``2 * seed + split``) keeps every (seed, split) pair apart, so test
    of seed 0 never equals train of seed 1.
    """
    digest = hashlib.sha256(f"sslens.synthetic/{seed}/{split}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _check_memory(num_images: int, image_size: int) -> None:
    """Refuse a request whose images, masks and depth would not fit in half this machine's memory,
    before rendering any of it (``image_size=20000`` would otherwise swap the machine to a halt)."""
    needed = num_images * image_size * image_size * (3 + 1 + 4)  # uint8 RGB, bool mask, float32 depth
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return  # no way to tell on this system
    if needed > memory // 2:
        raise DatasetError(
            f"synthetic: {num_images} images of {image_size}x{image_size} px need {needed / 2**30:.1f} GiB, "
            f"more than half of this machine's {memory / 2**30:.1f} GiB. Lower num_images or image_size."
        )


def _check_int(name: str, value: object, minimum: int, hint: str) -> int:
    if not is_int(value):
        raise TypeError(f"synthetic: {name} must be an int; got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"synthetic: {name} must be >= {minimum}; got {value}. {hint}")
    return value


def _check_cue(
    cue: object, cells: object, cell_size: object, position: object, palette: object, image_size: int
) -> bool:
    """The cue options, checked whether or not the cue is on (a typo should not wait for cue=True)."""
    if not isinstance(cue, bool):
        raise TypeError(f"synthetic: cue must be True or False; got {cue!r} ({type(cue).__name__}).")
    cells = _check_int("cue_cells", cells, 2, "A code needs at least 2 x 2 cells (4 bits).")
    cell_size = _check_int("cue_cell_size", cell_size, 1, "Cells are at least one pixel wide.")
    if position not in CUE_POSITIONS:
        raise ValueError(
            f"synthetic: cue_position must be one of {', '.join(CUE_POSITIONS)}; got {position!r}."
            f"{suggestion(position, CUE_POSITIONS)}"
        )
    if palette not in CUE_PALETTES:
        raise ValueError(
            f"synthetic: cue_palette must be one of {', '.join(CUE_PALETTES)}; got {palette!r}."
            f"{suggestion(palette, CUE_PALETTES)}"
        )
    side = cells * cell_size
    if side > image_size:
        raise ValueError(
            f"synthetic: the cue is {cells} cells x {cell_size} px = {side} px wide, larger than the "
            f"{image_size}-px images; lower cue_cells or cue_cell_size."
        )
    return cue


@DATASETS.register("synthetic")
def load_synthetic(
    split: str,
    *,
    image_size: int = 32,
    num_images: int | None = None,
    seed: int = 0,
    distractors: int = 2,
    color_correlation: float = 0.8,
    texture_correlation: float = 0.0,
    background_contrast: float = 1.0,
    background_saturation: float = 0.25,
    cue: bool = False,
    cue_cells: int = 4,
    cue_cell_size: int = 2,
    cue_position: str = "random",
    cue_palette: str = "binary",
) -> ImageData:
    """The shapes world for ``split``: labelled images with exact object masks and depth.

    Args:
        split: "train" or "test" (independent streams of the same seed).
        image_size: side of the square images, >= 16 (shapes get unreadable below that).
        num_images: how many images; default 4000 for train and 1000 for test.
        seed: the images are bitwise identical for identical options.
        distractors: maximum number of clutter shapes per image (uniform in 0..distractors);
            0 disables them.
        color_correlation: probability that the object's colour is drawn from its class's hue
            band. Natural images carry their class in low-level cues too (skies behind planes);
            without such a cue a small network trained self-supervised for a few CPU minutes
            learns nothing about the label (measured: kNN stays at chance), so the default is
            0.8. Use 0 for a world where only the shape carries the class.
        texture_correlation: probability that the object wears its class's preferred texture.
        background_contrast: distance between a background's two colours, 0 (flat) to 1 (two
            independent random colours).
        background_saturation: saturation of the background colours relative to random RGB
            colours (0 = gray). Muted backgrounds (default 0.25) keep the object the salient,
            colourful thing in the scene; with fully saturated backgrounds a short
            self-supervised run mostly encodes the background's colour (measured: RELAX then
            puts no more importance on the object than off it).
        cue: stamp a planted cue on every image: a ``cue_cells`` x ``cue_cells`` grid of black
            and white cells of ``cue_cell_size`` px (default 4 x 4 cells of 2 px: 8 x 8 px, a
            16-bit code), a different random code per image, drawn over everything else. The
            codes and positions come from a generator of their own per (seed, split, image
            index) (:func:`cue_generator`), so every pixel outside the marker is bitwise the
            pixel of ``cue=False``, as are the labels, masks and depth: ``masks`` still holds
            the whole object, including pixels the marker covers (``masks & ~cue_mask`` is the
            visible object).
        cue_cells: cells per side of the code (>= 2).
        cue_cell_size: side of a cell in pixels (>= 1).
        cue_position: where the marker goes: ``"random"`` (default: per image, uniform over
            every place where it fits whole) or one of ``"center"``, ``"top-left"``,
            ``"top-right"``, ``"bottom-left"``, ``"bottom-right"`` (touching the corner).

    Returns:
        ImageData with ``masks`` and ``depth`` set and ``extras`` holding per-image tensors:
        center (N, 2), size (N,), angle (N,), texture (N,) index into ``TEXTURE_KINDS``,
        background (N,) index into ``BACKGROUND_KINDS``, num_distractors (N,),
        object_colors (N, 2, 3) uint8 and background_colors (N, 2, 3) uint8; with ``cue=True``
        also cue_mask (N, H, W) bool (the marker's pixels), cue_position (N, 2) int64 (row,
        column of its top-left pixel) and cue_pattern (N, cue_cells, cue_cells) bool (True =
        white).
    """
    if split not in ("train", "test"):
        raise ValueError(f"synthetic: split must be 'train' or 'test'; got {split!r}.")
    image_size = _check_int("image_size", image_size, 16, "Pass image_size=32 or larger.")
    if num_images is None:
        num_images = 4000 if split == "train" else 1000
    num_images = _check_int("num_images", num_images, 1, "Ask for at least one image.")
    seed = _check_int("seed", seed, 0, "Use a non-negative seed.")
    distractors = _check_int("distractors", distractors, 0, "Use 0 to disable distractors.")
    for name, value in (
        ("color_correlation", color_correlation),
        ("texture_correlation", texture_correlation),
        ("background_contrast", background_contrast),
        ("background_saturation", background_saturation),
    ):
        fraction(f"synthetic: {name}", value)
    cue = _check_cue(cue, cue_cells, cue_cell_size, cue_position, cue_palette, image_size)
    _check_memory(num_images, image_size)

    params = sample_params(
        num_images, split_generator(seed, split), distractors,
        background_contrast=background_contrast, texture_correlation=texture_correlation,
        color_correlation=color_correlation,
        background_saturation=background_saturation,
    )
    chunk = max(1, MAX_PIXELS_PER_CHUNK // (image_size * image_size))
    parts = [render(params.select(slice(i, i + chunk)), image_size) for i in range(0, num_images, chunk)]
    images, masks, depth = (torch.cat(p) for p in zip(*parts, strict=True))
    to_uint8 = lambda c: torch.round(c * 255.0).to(torch.uint8)  # noqa: E731
    extras = {
        "center": params.center,
        "size": params.size,
        "angle": params.angle,
        "texture": params.texture,
        "background": params.background,
        "num_distractors": params.distractor_active.sum(dim=1),
        "object_colors": to_uint8(params.object_colors),
        "background_colors": to_uint8(params.background_colors),
    }
    cue_source = ""
    if cue:
        cues = sample_cues(
            num_images, seed, split, image_size, cells=cue_cells, cell_size=cue_cell_size,
            position=cue_position, colors=len(CUE_PALETTES[cue_palette]),
        )
        images, extras["cue_mask"] = stamp_cues(images, cues, cue_palette)
        extras["cue_position"], extras["cue_pattern"] = cues.position, cues.pattern
        cue_source = f", cue={cue_cells}x{cue_cells} {cue_palette} cells of {cue_cell_size} px at {cue_position}"
    return ImageData(
        images=images,
        labels=params.label,
        class_names=list(CLASS_NAMES),
        masks=masks,
        depth=depth,
        mean=SYNTHETIC_MEAN,
        std=SYNTHETIC_STD,
        source=(
            f"synthetic shapes world, split={split}, image_size={image_size}, "
            f"num_images={num_images}, seed={seed}, distractors={distractors}, "
            f"color_correlation={color_correlation}, texture_correlation={texture_correlation}, "
            f"background_contrast={background_contrast}, background_saturation={background_saturation}{cue_source}"
        ),
        extras=extras,
    )
