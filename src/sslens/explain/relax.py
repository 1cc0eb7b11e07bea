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
Every place sslens differs from relax-xai, and why:

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
  :mod:`sslens.explain.masks`). Measured on held-out images (docs/BENCHMARKS.md), mean Pearson
  with the same sampler's 3000-mask map: on a trained resnet-tiny 0.981 at 512 masks and 0.992
  at 768 (i.i.d. masks: 0.900 and 0.952); on a random-weight ResNet-18, 0.984 at 1024 masks
  (i.i.d.: 0.937). Two independent 3000-mask maps of the random ResNet-18 correlate 0.929 with
  it against 0.880 for i.i.d. masks. It needs p = 0.5.
* **Closed form over a batch.** relax-xai updates the estimate in a Python loop over single
  masks. sslens computes each round's weighted moments with two matrix products
  (``(s − c) @ M`` and ``(s − c)² @ M`` with a per-image shift ``c`` to avoid cancellation) and
  merges rounds with Chan et al.'s parallel weighted update — numerically stable, no per-mask loop.
* **Batched and packed.** Several images and many masks go through one forward pass: every
  forward pass holds up to ``batch_size`` image × mask pairs, filled across rounds of masks and
  across images (4 images × 500 masks in one pass of 2000; :func:`packed_similarities`).
  relax-xai takes one image per object and breaks on ``batch_size=1`` (its
  ``masks.squeeze()`` drops the batch axis). The default ``batch_size`` depends on the device:
  32 on the CPU, where smaller batches ran faster (on 2 Xeon cores ResNet-18 at 32 px ran 1.1×
  faster in batches of 32 than in relax-xai's 100, and 1.4× faster than in batches of 192);
  on GPUs about 256 images' worth of 224-px pixels (256 at 224 px, 2048 at 32 px), so that small
  images fill the device too.
* **Fast inference on the CPU** (``fast_inference="auto"``): the masked batches run through a
  private copy of the encoder whose eval-mode BatchNorms are folded into the preceding
  convolutions (:func:`fold_batch_norms`, traced with ``torch.fx``): the same function up to
  float rounding (tested to rtol 1e-4), one pass over the activations fewer per BatchNorm (about
  5% faster on ResNet-18 at 32 px). The caller's model is never modified; an untraceable wrapper
  (e.g. :class:`~sslens.models.adapt.InputAdapter`) keeps its forward and has its children
  folded; the copy is used only if it embeds the call's first images like the caller's model
  does (cosine ≥ 1 − 1e-4), and never for a model with hooks. The copy, trace and check cost
  74 ms per call for ResNet-18 and 0.24 s for ResNet-50 on the 2 cores, paid back from a few
  hundred masks per call on ResNet-18 (fewer on ResNet-50). Measured and dropped:
  ``torch.inference_mode`` instead of ``no_grad`` (no difference; sslens uses inference mode
  anyway), channels_last on the CPU (no gain in fp32), ``torch.compile`` with inductor and
  freezing (no faster than the folded eager model at batch 32, plus compile time), Winograd
  convolutions (NNPACK's and a PyTorch-ops one, both slower than oneDNN's direct convolutions on
  AVX-512), and running two single-threaded streams (4%: oneDNN's two-thread efficiency is
  already 94%). The folded ResNet-18 runs at about 310 GFLOP/s on the two cores (1.1 GFLOP per
  32-px image in 3.6 ms), 85% of what a large fp32 matrix product reaches there, so in fp32
  sslens is about 1.2× relax-xai and cannot be much more without doing less arithmetic; bf16
  (``amp=True``) is the way to 3×.
* **Seeded.** Masks come from a ``torch.Generator`` on the images' device (relax-xai uses the
  global RNG). The masks of a call are drawn once and shared by all images of the call, so
  explaining several images together gives exactly the maps of explaining each alone.
  Orthogonal masks are drawn a cycle of 7 blocks (896 masks) at a time, so they depend only on
  the seed; i.i.d. masks are drawn a round (``round_size``) at a time, as relax-xai draws a
  batch at a time.
* **Baselines.** relax-xai masks with zeros in normalised space (``baseline="zero"``, the
  default); sslens also offers ``"blur"`` (the Gaussian-blurred image) and ``"mean"`` (the
  image's mean colour): ``X ⊙ M + B ⊙ (1 − M)``.
* **Adaptive stopping** (optional, not in the paper): masks are drawn in rounds of
  ``round_size`` (default 128, one block); an image stops once its stopping score is below
  ``tolerance``. The default score, ``stop="blocks"``, is the map's standard error estimated
  from the spread between blocks of 128 masks (batch means) relative to the map's spread — it
  sees the orthogonal sampler's balance inside blocks, which the older ``stop="stderr"`` (an
  i.i.d. bound) does not. It is conservative: a whole cycle of 7 blocks cancels the shift
  offsets' main effects, which batch means count as noise, so the score was 2.8–3.6× the map's
  true noise (measured between independent seeds, ``benchmarks/relax_stopping_bias.py``) on
  both a trained and a random-weight model. Its default tolerance 0.33 is the largest tried
  (0.28, 0.33, 0.36, 0.4) whose mean Pearson with the 3000-mask map was at least 0.985 on
  calibration images (a trained resnet-tiny, synthetic test images 0–15: 3.5× fewer masks,
  0.988); on held-out images 16–31 it used 3.04× fewer masks than 3000 at mean Pearson 0.991
  (minimum 0.974). The tolerance is thus about a tenth of the map's spread in true noise, an
  absolute criterion: a random-weight ResNet-18 on noise images, whose map is far noisier (true
  noise 0.26 of its spread at 896 masks, the trained model's 0.10), does not reach it within
  3000 masks and is not stopped early — there even two independent 3000-mask maps correlate only
  0.93, although 1024 masks correlate 0.984 with the 3000-mask map they are part of. Masks come
  in the same seeded sequence, so stopping after n masks (a multiple of ``round_size``) gives
  exactly the map of ``num_masks=n``.
* Mixed precision: on CUDA the encoder runs under bf16 autocast with channels_last inputs
  (``amp=True`` asks for the same on the CPU, where oneDNN's bf16 kernels ran 3.2× faster than
  fp32 on a CPU with AMX, but 0.7× as fast on one with AVX512-BF16 alone, hence opt-in);
  similarities and the estimator are accumulated in fp32 (fp64 for fp64 inputs).

>>> from torch import nn
>>> encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
>>> explanation = RELAX(encoder, num_masks=20)(torch.randn(2, 3, 16, 16))
>>> explanation.importance.shape, explanation.info["num_masks_used"]
(torch.Size([2, 16, 16]), [20, 20])
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import kornia.filters
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from sslens.explain.base import EXPLAINERS, Explainer, Explanation
from sslens.explain.masks import RelaxMasks
from sslens.registry import Registry

BASELINES = Registry("baseline")

#: relax-xai's ``sum_of_weights_initial_value``: a prior of this weight at importance 0 that
#: keeps pixels no mask has covered at R = U = 0 instead of 0 / 0.
INITIAL_WEIGHT = 1e-10

#: Images per forward pass when ``batch_size=None``, by device type. On the CPU smaller batches
#: ran faster: on 2 Xeon cores ResNet-18 at 32 px took 1.1× less time per image in batches of 32
#: than in relax-xai's 100 and 1.4× less than in 192 (docs/BENCHMARKS.md).
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
    has bf16 matrix units (AMX: 3.2× there; AVX512-BF16 alone ran 0.7× as fast as fp32); the maps
    then differ from fp32 ones by rounding)."""
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


def _hooked(model: nn.Module) -> bool:
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None)
        for m in model.modules()
    )


def fold_batch_norms(encoder: nn.Module) -> tuple[nn.Module, int]:
    """A private inference copy of ``encoder`` (eval mode) with every BatchNorm2d that directly
    follows a Conv2d folded into that convolution, and the number folded.

    In eval mode BatchNorm is the per-channel affine map ``γ (x − μ) / √(σ² + ε) + β``, so
    ``BN(conv(x))`` is one convolution with rescaled weights and a bias
    (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`): the same function up to float rounding,
    one pass over the activations fewer per BatchNorm. The copy is traced with ``torch.fx``; a
    pair is folded only when the convolution's output feeds nothing but the BatchNorm, the
    convolution module is called once and its parameters are not read elsewhere. A module
    whose forward cannot be traced (e.g. data-dependent branches, as in
    :class:`~sslens.models.adapt.InputAdapter`) keeps its own forward and has its children
    folded instead. ``encoder`` itself is never modified. Raises the tracing error when
    nothing could be traced.
    """
    return _fold(copy.deepcopy(encoder).eval())


def _fold(module: nn.Module) -> tuple[nn.Module, int]:
    try:
        traced = torch.fx.symbolic_trace(module)
    except Exception as error:  # torch.fx raises many types for untraceable forwards
        folded = 0
        for name, child in module.named_children():
            if any(isinstance(m, nn.BatchNorm2d) for m in child.modules()):
                with contextlib.suppress(Exception):  # an untraceable child stays as it is
                    new, count = _fold(child)
                    if count:
                        setattr(module, name, new)
                        folded += count
        if not folded:
            raise error
        return module, folded
    modules = dict(traced.named_modules())
    calls: dict[str, int] = {}
    read: set[str] = set()  # modules whose parameters the graph reads directly
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            read.add(node.target.rpartition(".")[0])
    folded = 0
    for node in list(traced.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or len(node.args) != 1:
            continue
        source = node.args[0]
        conv = modules.get(source.target) if isinstance(source, torch.fx.Node) and source.op == "call_module" else None
        if (
            not isinstance(conv, nn.Conv2d) or len(source.users) != 1 or calls[source.target] != 1
            or source.target in read
        ):
            continue
        parent, _, name = source.target.rpartition(".")
        setattr(traced.get_submodule(parent), name, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(source)
        traced.graph.erase_node(node)
        folded += 1
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced, folded


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
    if _hooked(encoder):
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
    def uncertainty(self) -> torch.Tensor:
        """(B, H, W) mask-weighted variance ``S / W`` (relax-xai returns ``S``)."""
        return self.squared_deviations / self.sum_of_weights


def u_relax(importance: torch.Tensor, uncertainty: torch.Tensor) -> torch.Tensor:
    """(B, H, W) importance where the uncertainty is ≤ its per-image (lower) median, else 0."""
    median = uncertainty.flatten(1).median(dim=1).values[:, None, None]
    return importance * (uncertainty <= median)


STOPPING_RULES = Registry("stopping rule")

#: Each stopping rule's default ``tolerance`` (see the rules' docstrings for the calibration;
#: ``"change"`` at 0.05 stopped i.i.d. runs at about 2000 masks, mean Pearson 0.99).
DEFAULT_TOLERANCE = {"stderr": 0.5, "change": 0.05, "blocks": 0.33}


def _relative_to_spread(noise: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    return noise / importance.flatten(1).std(1).clamp_min(torch.finfo(importance.dtype).eps)


@STOPPING_RULES.register("stderr")
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


@STOPPING_RULES.register("change")
def relative_change(estimator: RelaxEstimator, previous: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(b,) max |R − R_previous round| relative to the range of R (stricter: it tracks the worst pixel)."""
    new = estimator.importance[index]
    span = new.flatten(1).amax(1) - new.flatten(1).amin(1)
    return (new - previous).flatten(1).abs().amax(1) / span.clamp_min(torch.finfo(new.dtype).eps)


@STOPPING_RULES.register("blocks")
def block_standard_error(estimator: RelaxEstimator, previous: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(b,) the map's standard error estimated from independent blocks of masks, relative to its spread.

    Batch means (Asmussen & Glynn, *Stochastic Simulation*, 2007) with the ratio estimator's
    linearised variance (Cochran, *Sampling Techniques*, 1977, ch. 6): the K blocks of masks are
    independent, and R = Σ_k N_k / Σ_k D_k is a ratio of their sums, so to first order ``Var R ≈ K / (K − 1) · Σ_k (N_k − R D_k)² / (Σ_k D_k)²`` at each pixel. Unlike the
    ``"stderr"`` bound this measures the noise the map actually has — including the reduction
    from ``sampler="orthogonal"``, whose blocks are balanced inside. Their stratified shifts
    make blocks dependent: a cycle of 7 blocks cancels the shift offsets' main effects, which
    this estimate counts, so it errs high (measured 2.8–3.6× the true standard error; see the
    module docstring).
    Score: ``sqrt(mean over pixels of Var R) / std(R)``; infinite before two blocks. The default
    tolerance 0.33 was calibrated on a trained resnet-tiny (see the module docstring: 3.04× fewer
    than 3000 orthogonal masks at mean Pearson 0.991 on held-out images); a noise-to-spread ratio
    r at n masks gives roughly Pearson
    ``sqrt((1 + r² n/N) / (1 + r²))`` with the N-mask map.
    """
    k = estimator.num_blocks[index].to(estimator.importance.dtype)[:, None]  # (b, 1)
    r = estimator.importance[index].flatten(1) - estimator.center[index]
    spread = (estimator.block_nn[index] - 2 * r * estimator.block_nd[index] + r * r * estimator.block_dd[index])
    weight = (estimator.sum_of_weights[index].flatten(1) - INITIAL_WEIGHT).clamp_min(torch.finfo(r.dtype).tiny)
    variance = spread.clamp_min(0.0) / (weight * weight) * k / (k - 1).clamp_min(1)
    score = _relative_to_spread(variance.mean(1).sqrt(), estimator.importance[index])
    return torch.where(k[:, 0] >= 2, score, torch.full_like(score, math.inf))


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


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is a positive int (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return value


def check_batch_size(value: object) -> int | None:
    """``batch_size``: None (by device, :data:`DEFAULT_BATCH_SIZE`) or a positive int."""
    return None if value is None else check_positive_int("batch_size", value)


@EXPLAINERS.register("relax")
class RELAX(Explainer):
    """RELAX importance, uncertainty and U-RELAX maps for any image encoder.

    Args:
        encoder: ``nn.Module`` mapping (B, 3, H, W) normalised images to (B, D) embeddings.
        num_masks: masks per call (relax-xai: 30 batches × 100 = 3000); with ``adaptive`` the
            maximum.
        batch_size: images (image × mask pairs) per forward pass; None (default): 32 on the
            CPU (measured fastest there, see :data:`DEFAULT_BATCH_SIZE`), on GPUs about 256 images
            at 224 px (:data:`GPU_BATCH_PIXELS`; 2048 at 32 px). Passes
            are filled across rounds of masks and across images.
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
            BatchNorms folded into the preceding convolutions (:func:`fold_batch_norms`; equal
            maps up to float rounding, the caller's model untouched): ``"auto"`` (default) on
            the CPU, True on any device (raises if it cannot), False never.

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
        self.num_masks = check_positive_int("num_masks", num_masks)
        self.batch_size = check_batch_size(batch_size)
        self.mask_sampler = RelaxMasks(num_cells=num_cells, p=p, shift=shift, sampler=sampler)
        block = self.mask_sampler.block_size
        self.round_size = block if round_size is None else check_positive_int("round_size", round_size)
        STOPPING_RULES.get(stop)
        self.stop = stop
        if adaptive and stop == "blocks" and self.round_size % block:
            raise ValueError(
                f"round_size must be a multiple of the block size {block} with adaptive=True and "
                f"stop='blocks' (the rule compares whole blocks of masks); got {self.round_size}"
            )
        BASELINES.get(baseline)
        self.baseline = baseline
        if not blur_sigma > 0:
            raise ValueError(f"blur_sigma is a Gaussian σ in pixels and must be > 0; got {blur_sigma!r}")
        self.blur_sigma = float(blur_sigma)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int; got {seed!r}")
        self.seed = seed
        tolerance = DEFAULT_TOLERANCE[stop] if tolerance is None else tolerance
        if not tolerance > 0:
            raise ValueError(f"tolerance is a fraction of the map's spread and must be > 0; got {tolerance!r}")
        if isinstance(min_masks, bool) or not isinstance(min_masks, int) or min_masks < 0:
            raise ValueError(f"min_masks must be a non-negative integer; got {min_masks!r}")
        self.adaptive, self.tolerance, self.min_masks = bool(adaptive), float(tolerance), min_masks
        self.amp = None if amp is None else bool(amp)
        self.fast_inference = check_fast_inference(fast_inference)

    def explain(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> Explanation:
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
            baseline = BASELINES.get(self.baseline)(images, self.blur_sigma)
            reference = torch.cat([embed(encoder, x, self.amp) for x in images.split(batch_size)])
            blocks = self.mask_sampler.block_size if self.adaptive and self.stop == "blocks" else None
            estimator = RelaxEstimator(num_images, size, reference.dtype, images.device, blocks)
            active = torch.arange(num_images, device=images.device)
            for round_masks in rounds:

                def build(index: torch.Tensor, m: torch.Tensor, rows: torch.Tensor = active) -> torch.Tensor:
                    x, base = images[rows[index], None], baseline[rows[index], None]
                    return x * m + base * (1 - m)

                (scores,) = packed_similarities(encoder, [(build, reference[active])], round_masks, batch_size, self.amp)
                # Only the stopping rules read the previous map; unrolled rounds skip the copy.
                previous = estimator.importance[active].clone() if self.adaptive else None
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
                "batch_size": batch_size,
                "fast_inference": fast_info,
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
