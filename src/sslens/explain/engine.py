"""The masking engine shared by RELAX and the perceptual components.

Both explainers estimate, at every pixel, the mask-weighted mean similarity between an image's
embedding and the embeddings of masked versions of it (:class:`RelaxEstimator`); they differ
only in how a masked image is built. Everything else lives here, once:

* **Masks in rounds** (:func:`mask_rounds`, :func:`rechunk`): a sampler's masks, drawn a round at
  a time (or in whole draws, for samplers whose sequence must not depend on the rounds) and
  regrouped into the sizes forward passes need.
* **Packed forward passes** (:func:`packed_similarities`): every pass holds up to ``batch_size``
  image × mask rows, filled across rounds, images and (for the perceptual components)
  components, so small images still fill a GPU and memory stays bounded.
* **Fast inference** (:func:`inference_encoder`): on the CPU the passes run through a private
  copy of the encoder with BatchNorm folded into its convolutions (:mod:`sslens.explain.fold`),
  used only if it embeds the call's first images like the caller's encoder does; bf16 autocast
  with channels_last on CUDA (:func:`embed`); cuDNN autotuning for the call.
* **Batch sizes by device** (:func:`default_batch_size`): 32 images on the CPU, about 256
  images' worth of 224-px pixels on a GPU.
* **The estimator** (:class:`RelaxEstimator`): each round's weighted moments in closed form (two
  matrix products), merged with Chan et al.'s parallel update — exactly relax-xai's running
  estimate on the same masks, without its per-mask Python loop.
* **Progress** (:data:`ProgressCallback`): both explainers take an optional
  ``progress(done, total)`` in their call and report the masks done after each round, without
  touching the computation (the maps are bitwise those of a call without it).

Measured speeds are in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sslens.checks import positive_int
from sslens.explain.base import has_hooks
from sslens.explain.fold import fold_batch_norms

#: relax-xai's ``sum_of_weights_initial_value``: a prior of this weight at importance 0 that
#: keeps pixels no mask has covered at R = U = 0 instead of 0 / 0.
INITIAL_WEIGHT = 1e-10


#: Images per forward pass when ``batch_size=None``, by device type: on the CPU small batches
#: ran fastest (measured in docs/BENCHMARKS.md, "RELAX", CPU).
DEFAULT_BATCH_SIZE = {"cpu": 32}


#: On GPUs a batch holds about this many pixels (256 images at 224 px), so that small images still
#: fill the device (2048 at 32 px: batches of 256 such images are too short to keep a large GPU
#: busy), at most :data:`GPU_MAX_BATCH_SIZE` images.
GPU_BATCH_PIXELS = 256 * 224 * 224
GPU_MAX_BATCH_SIZE = 2048


def default_batch_size(device: torch.device, size: tuple[int, int]) -> int:
    """Images per forward pass for ``batch_size=None`` on ``device`` for images of ``size`` (H, W)."""
    if device.type in DEFAULT_BATCH_SIZE:
        return DEFAULT_BATCH_SIZE[device.type]
    return max(1, min(GPU_MAX_BATCH_SIZE, GPU_BATCH_PIXELS // (size[0] * size[1])))


def use_amp(amp: bool | None, device: torch.device) -> bool:
    """``amp=None`` means bf16 on CUDA only; True asks for it on the CPU too, which pays only on a
    CPU with bf16 matrix units (see docs/BENCHMARKS.md); the maps then differ from fp32 ones by
    rounding."""
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


def check_fast_inference(value: object) -> str | bool:
    """``value`` if it is ``"auto"``, True or False, else a ValueError."""
    if value is not True and value is not False and not (isinstance(value, str) and value == "auto"):
        raise ValueError(f"fast_inference must be 'auto', True or False; got {value!r}")
    return value


#: The folded copy must give the caller's embeddings, up to float rounding (bf16 autocast
#: included): minimum cosine similarity on the probe images.
FOLD_AGREEMENT = 1 - 1e-4


#: Images of a call that check the folded copy.
PROBE = 4


def inference_encoder(
    encoder: nn.Module,
    fast_inference: str | bool,
    probe: torch.Tensor,
    amp: bool | None = None,
) -> tuple[nn.Module, str]:
    """The module to run the masked batches through, and what was done (for ``info``).

    ``fast_inference="auto"`` folds BatchNorms into convolutions (:func:`fold_batch_norms`) on
    the CPU, where it was measured; True on any device; False never. The folded copy is used
    only if its embeddings of ``probe`` (a few (n, 3, H, W) images) have cosine similarity at
    least :data:`FOLD_AGREEMENT` with the caller's encoder's. The caller's module is used as
    is when it has hooks (they must see its own modules run), nothing can be folded, it cannot
    be traced or the check fails; with True those raise instead.
    """
    if fast_inference is False or (fast_inference == "auto" and probe.device.type != "cpu"):
        return encoder, "off"
    if has_hooks(encoder):
        reason = "the encoder has hooks, which must see its own modules run"
    elif not any(isinstance(module, nn.BatchNorm2d) for module in encoder.modules()):
        reason = "the encoder has no BatchNorm2d"  # checked first: no copy of a large BatchNorm-free model
    else:
        try:
            folded_encoder, folded = fold_batch_norms(encoder)
        except Exception as error:  # torch.fx raises many types for untraceable forwards
            reason = f"torch.fx could not trace the encoder ({type(error).__name__}: {error})"
        else:
            agreement = F.cosine_similarity(embed(folded_encoder, probe, amp), embed(encoder, probe, amp)).min()
            if not folded:
                reason = "no BatchNorm2d directly follows a Conv2d it can be folded into"
            elif agreement < FOLD_AGREEMENT:
                reason = f"the folded copy's embeddings differ from the encoder's (cosine {agreement.item():.6f})"
            else:
                return folded_encoder, f"{folded} BatchNorm layers folded into convolutions (private copy)"
    if fast_inference is True:
        raise ValueError(f"fast_inference=True cannot fold this encoder: {reason}; use 'auto' or False.")
    return encoder, f"off: {reason}"


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


#: One kind of masked image: ``build(index, masks)`` turns masks (n, 1, H, W) into the masked
#: images (len(index), n, 3, H, W) of the images ``index``, whose embeddings are compared with
#: ``reference[index]`` (b, D).
MaskedGroup = tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor]


def packed_similarities(
    encoder: nn.Module,
    groups: Sequence[MaskedGroup],
    masks: torch.Tensor,
    batch_size: int,
    amp: bool | None = None,
) -> list[torch.Tensor]:
    """Cosine similarities of masked images with their references, packed into full batches.

    Every (group, image) pair is a row; each forward pass holds up to ``batch_size`` rows × masks:
    ``batch_size // rows`` masks of every row when the rows fit in one pass (e.g. 4 images ×
    500 masks in one pass of 2000), else slices of ``batch_size`` rows one mask at a time. So
    a GPU is filled by several images (and perceptual components) when one image's masks do
    not fill it, and memory stays bounded by ``batch_size`` images.

    Args:
        groups: (build, reference) pairs, see :data:`MaskedGroup`.
        masks: (N, 1, H, W).

    Returns:
        one (b, N) tensor of similarities per group.
    """
    rows = [(g, i) for g, (_, reference) in enumerate(groups) for i in range(reference.shape[0])]
    scores = [
        torch.empty(reference.shape[0], masks.shape[0], dtype=reference.dtype, device=reference.device)
        for _, reference in groups
    ]
    for first in range(0, len(rows), batch_size):
        chunk_rows = rows[first : first + batch_size]
        parts = []  # (group, image index) of the rows of this slice, one entry per group
        for g in dict.fromkeys(g for g, _ in chunk_rows):
            index = torch.tensor([i for h, i in chunk_rows if h == g], device=masks.device)
            parts.append((g, index))
        per_pass = max(1, batch_size // len(chunk_rows))
        for start in range(0, masks.shape[0], per_pass):
            chunk = masks[start : start + per_pass]
            n = chunk.shape[0]
            batch = torch.cat([groups[g][0](index, chunk).flatten(0, 1) for g, index in parts])
            emb = embed(encoder, batch, amp)
            for (g, index), part in zip(parts, emb.split([len(index) * n for _, index in parts]), strict=True):
                reference = groups[g][1][index]
                part = part.view(len(index), n, -1)
                scores[g][index, start : start + n] = F.cosine_similarity(
                    reference[:, None, :].to(part.dtype), part, dim=-1
                ).to(scores[g].dtype)
    return scores


class RelaxEstimator:
    """Running mask-weighted mean and variance of the similarity at every pixel.

    State per image: ``sum_of_weights`` W = 1e-10 + Σ M, ``importance`` R = Σ s M / W and
    ``squared_deviations`` S = Σ M (s − R)² (+ the prior's 1e-10 · R², as in relax-xai).
    :meth:`update` adds a round of masks in closed form and merges it with Chan et al.'s
    pairwise update (Chan, Golub & LeVeque 1979; weighted form as in West 1979):
    ``δ = R_b − R_a``, ``R = R_a + δ W_b / W``, ``S = S_a + S_b + δ² W_a W_b / W``.

    With ``block_size`` it also keeps, per pixel, the sums over blocks k of ``block_size``
    consecutive masks of ``N_k²``, ``N_k D_k`` and ``D_k²``, where ``D_k = Σ_{n∈k} M_n`` and
    ``N_k = Σ_{n∈k} M_n (s_n − c)`` (c: the image's first-round mean similarity, so the sums
    stay free of cancellation) — what :func:`block_standard_error` needs.
    """

    def __init__(
        self,
        num_images: int,
        size: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
        block_size: int | None = None,
    ):
        shape = (num_images, *size)
        self.sum_of_weights = torch.full(shape, INITIAL_WEIGHT, dtype=dtype, device=device)
        self.importance = torch.zeros(shape, dtype=dtype, device=device)
        self.squared_deviations = torch.zeros(shape, dtype=dtype, device=device)
        self.num_masks = [0] * num_images
        # Σ_n s_n per image: E[s] over masks, the expected similarity a masking keeps.
        self.similarity_sum = torch.zeros(num_images, dtype=torch.float64, device=device)
        self.block_size = block_size
        if block_size is not None:
            self.center = torch.zeros(num_images, 1, dtype=dtype, device=device)
            self.num_blocks = torch.zeros(num_images, dtype=torch.long, device=device)
            self.block_nn = torch.zeros(num_images, size[0] * size[1], dtype=dtype, device=device)
            self.block_nd = torch.zeros_like(self.block_nn)
            self.block_dd = torch.zeros_like(self.block_nn)

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
        if self.block_size is not None:
            self._update_blocks(d, shift, weights, index)

        w_old = self.sum_of_weights[index].reshape(b, -1)
        mean_old = self.importance[index].reshape(b, -1)
        total = w_old + w_round
        delta = mean_round - mean_old
        self.importance[index] = (mean_old + delta * w_round / total).view(b, *size)
        self.squared_deviations[index] = (
            self.squared_deviations[index].reshape(b, -1) + dev_round + delta * delta * w_old * w_round / total
        ).view(b, *size)
        self.sum_of_weights[index] = total.view(b, *size)
        self.similarity_sum[index] += similarities.double().sum(dim=1)
        for i in index.tolist():
            self.num_masks[i] += n

    def _update_blocks(self, d: torch.Tensor, shift: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> None:
        """Add the round's blocks of ``block_size`` masks (the last may be partial) to the block sums."""
        new = self.num_blocks[index] == 0
        self.center[index[new]] = shift[new]
        offset = shift - self.center[index]  # (b, 1): Σ w (s − c) = Σ w (s − shift) + (shift − c) Σ w
        nn_, nd, dd = self.block_nn[index], self.block_nd[index], self.block_dd[index]
        for d_k, w_k in zip(d.split(self.block_size, dim=1), weights.split(self.block_size), strict=True):
            den = w_k.sum(dim=0)  # (HW,)
            num = d_k @ w_k + offset * den  # (b, HW)
            nn_ += num * num
            nd += num * den
            dd += den * den
        self.block_nn[index], self.block_nd[index], self.block_dd[index] = nn_, nd, dd
        self.num_blocks[index] += -(-d.shape[1] // self.block_size)

    @property
    def mean_similarity(self) -> list[float]:
        """E_M[s] per image: the mean cosine similarity of the masked images' embeddings with
        the reference over every mask used (1 − it is the expected drop a masking causes)."""
        counts = torch.tensor(self.num_masks, dtype=torch.float64, device=self.similarity_sum.device)
        return (self.similarity_sum / counts.clamp_min(1)).tolist()

    @property
    def uncertainty(self) -> torch.Tensor:
        """(B, H, W) mask-weighted variance ``S / W`` (relax-xai returns ``S``)."""
        return self.squared_deviations / self.sum_of_weights


def mask_rounds(
    sampler: Callable[..., torch.Tensor],
    num_masks: int,
    round_size: int,
    size: tuple[int, int],
    generator: torch.Generator,
    dtype: torch.dtype,
) -> Iterator[torch.Tensor]:
    """Yield ``num_masks`` masks from ``sampler`` in rounds of ``round_size``, (n, 1, H, W) each.

    A sampler with a ``draw_size`` (the orthogonal one: whole cycles of blocks) is drawn in units of that
    size and regrouped, so its masks do not depend on ``round_size``; others are drawn a round
    at a time.
    """
    unit = getattr(sampler, "draw_size", None) or round_size
    draws = (sampler(min(unit, num_masks - start), size, generator, dtype) for start in range(0, num_masks, unit))
    yield from (draws if unit == round_size else rechunk(draws, round_size))


def rechunk(rounds: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """The masks of ``rounds``, in order, regrouped into tensors of exactly ``size`` masks (the
    last may hold fewer). The masks a seed draws depend on the rounds they are drawn in, so
    rounds stay fixed and forward passes are sized here instead."""
    pending: list[torch.Tensor] = []
    count = 0
    for masks in rounds:
        pending.append(masks)
        count += masks.shape[0]
        while count >= size:
            joined = torch.cat(pending)
            yield joined[:size]
            pending, count = [joined[size:]], count - size
    if count:
        yield torch.cat(pending)


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


#: ``progress(done, total)``: ``done`` of the call's ``total`` masks have been through the
#: encoder (for every image still running). Called with ``done = 0`` before the first forward
#: pass, after every round of masks, and with ``done = total`` at the end (also when adaptive
#: stopping ends a call early), so the counts rise monotonically to the total.
ProgressCallback = Callable[[int, int], None]


def check_progress(value: object) -> ProgressCallback | None:
    """``value`` if it is None or callable (``progress(done, total)``), else a TypeError."""
    if value is not None and not callable(value):
        raise TypeError(f"progress must be a callable progress(done, total) or None; got {type(value).__name__}")
    return value


def check_batch_size(value: object) -> int | None:
    """``batch_size``: None (by device, :data:`DEFAULT_BATCH_SIZE`) or a positive int."""
    return None if value is None else positive_int("batch_size", value)
