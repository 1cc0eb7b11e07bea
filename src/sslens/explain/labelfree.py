"""Label-free feature importance (Crabbé & van der Schaar, ICML 2022): gradients of an embedding's
similarity to itself.

Paper: https://arxiv.org/abs/2203.01928 — "we introduce two crucial extensions of post-hoc
explanation techniques: (1) label-free feature importance and (2) label-free example importance
that respectively highlight influential features and training examples for a black-box to
construct representations at inference time". A feature-importance method ``a_i(g, x)`` for a
scalar function ``g`` becomes label-free by explaining, for the image ``x`` and its embedding
``f(x)`` held fixed,

    g_x(x̃) = ⟨f(x), f(x̃)⟩,        b_i(f, x) = a_i(g_x, x).

Two base methods, one registered name each (the registry's convention, as for the CAM family:
a name per method, each with only the options it uses, and its own label in reports):

* ``"labelfree-ig"`` — integrated gradients (Sundararajan et al., ICML 2017,
  https://arxiv.org/abs/1703.01365) along the straight path from a baseline ``x'``:
  ``IG_i = (x_i − x'_i) ∫_0^1 ∂g_x(x' + α (x − x'))/∂x̃_i dα``, the integral taken by a
  quadrature rule with ``steps`` nodes (:data:`PATH_RULES`; Gauss-Legendre by default, as in
  Captum and in the paper's reference code, lfxai, which calls Captum with its defaults).
* ``"labelfree-gxi"`` — gradient × input: ``x_i ∂g_x(x̃)/∂x̃_i`` at ``x̃ = x``.

Maps are the attributions summed over the three colour channels (signed), (B, H, W) float32,
never rescaled. IG is *complete*: its attributions sum to ``g_x(x) − g_x(x')`` exactly for the
integral; the quadrature's error is recorded per image as ``info["completeness_gap"]`` (sum of
attributions minus ``g_x(x) − g_x(x')``). Measured at the default 50 Gauss-Legendre steps
(zero baseline): below 2 % of ``|g_x(x) − g_x(x')|`` on the tests' tiny convolutional encoder
(tests/explain/test_labelfree.py asserts it) and on a random-weight ResNet-18 at 32 px
(``benchmarks/embedding_explainers.py`` prints it); ReLU networks make the integrand piecewise
smooth, so more steps shrink the gap only slowly.

The attribution core, :func:`integrated_gradients` and :func:`target_gradients`, takes any
scalar-per-image target of the embedding (:data:`EmbeddingTarget`), so other targets reuse it:
COCOA's contrastive corpus similarity (:mod:`sslens.explain.cocoa`) is one.

Where sslens differs from the paper's code, and why:

* **Its own IG, not Captum's.** The same quadrature nodes and weights as Captum's
  ``IntegratedGradients`` (equal to Captum's attributions to 1e-6 relative in float64, tested;
  Captum rounds its step sizes to float32), computed directly: image × step rows of several
  images are packed into forward passes of ``batch_size`` (Captum builds all ``B × steps``
  path images at once), gradients are taken with respect to the input only, and there is no
  runtime dependency. Captum would do it batched too, and is about as fast on the CPU
  (``benchmarks/embedding_explainers.py`` times both on the same target and steps; figures in
  docs/BENCHMARKS.md); the direct version is kept for the packing across images, the gradients
  for the input only and one IG core shared with COCOA, and Captum stays a test-only reference.
* **Trapezoid weights.** ``rule="riemann_trapezoid"`` uses the trapezoid rule on
  ``linspace(0, 1, steps)`` (weights ``1 / (steps − 1)``, halved at the ends, summing to 1).
  Captum's step sizes for it are ``1 / steps`` halved at the ends, which sum to
  ``1 − 1 / steps``, so Captum's trapezoid IG is sslens's times ``(steps − 1) / steps`` (tested).
* **Images and baselines.** lfxai explains autoencoders on MNIST and ECG with a black (zero)
  baseline; sslens explains normalised images, where ``baseline="zero"`` is the dataset's
  mean colour, and also offers ``"blur"`` and ``"mean"`` (:mod:`sslens.explain.baselines`) or
  any image tensor.
* **Deterministic**, so there is no ``seed``: nothing is drawn at random.

>>> from torch import nn
>>> encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
>>> explanation = labelfree_ig(encoder, steps=8)(torch.randn(2, 3, 16, 16))
>>> explanation.importance.shape, len(explanation.info["completeness_gap"])
(torch.Size([2, 16, 16]), 2)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from sslens.checks import positive_int
from sslens.explain.base import EXPLAINERS, Explainer, Explanation
from sslens.explain.baselines import BASELINES, check_baseline, make_baseline
from sslens.explain.engine import check_batch_size, default_batch_size, embed
from sslens.registry import lookup

#: ``target(embeddings, index) -> (n,)``: the scalar explained for each of n rows, from the rows'
#: embeddings (n, D) and the explained image each row belongs to (``index``, n int64 indices
#: into the call's images). It must treat rows independently (row r's score depends on row r only).
EmbeddingTarget = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _gauss_legendre(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    nodes, weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]
    return torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2)


def _riemann_trapezoid(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    weights = torch.full((steps,), 1 / (steps - 1), dtype=torch.float64)
    weights[[0, -1]] /= 2
    return torch.linspace(0, 1, steps, dtype=torch.float64), weights


def _riemann_middle(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    return alphas, torch.full((steps,), 1 / steps, dtype=torch.float64)


def _riemann_right(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    alphas = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    return alphas, torch.full((steps,), 1 / steps, dtype=torch.float64)


#: Quadrature rule name (Captum's names) → ``rule(steps) -> (alphas, weights)``, (steps,) float64
#: nodes in [0, 1] and weights summing to 1. ``"riemann_right"`` is the IG paper's sum (its eq. 3).
PATH_RULES: dict[str, Callable[[int], tuple[torch.Tensor, torch.Tensor]]] = {
    "gausslegendre": _gauss_legendre,
    "riemann_trapezoid": _riemann_trapezoid,
    "riemann_middle": _riemann_middle,
    "riemann_right": _riemann_right,
}


def check_path(steps: object, rule: str) -> int:
    """``steps`` if it is a valid number of nodes for quadrature rule ``rule``, else a ValueError."""
    lookup("path rule", PATH_RULES, rule)
    positive_int("steps", steps, "nodes of the path integral")
    if rule == "riemann_trapezoid" and steps < 2:
        raise ValueError("rule='riemann_trapezoid' needs steps ≥ 2 (both ends of the path); got steps=1")
    return steps


def embed_batches(
    encoder: nn.Module, images: torch.Tensor, batch_size: int, amp: bool | None = False
) -> torch.Tensor:
    """(N, D) embeddings of ``images`` (N, 3, H, W), ``batch_size`` images per pass, without
    gradients; fp32 or wider unless ``amp`` (see :func:`~sslens.explain.engine.embed`)."""
    with torch.no_grad():
        return torch.cat([embed(encoder, chunk, amp) for chunk in images.split(batch_size)])


def target_gradients(
    encoder: nn.Module, target: EmbeddingTarget, inputs: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """(n, 3, H, W) gradient of ``target`` with respect to ``inputs`` (n, 3, H, W), one pass.

    Rows are independent (the encoder in eval mode, the target row by row), so the gradient of
    the rows' summed target is every row's own gradient. Only the input's gradient is asked
    for, so no parameter's ``.grad`` is written. fp32 or wider: bf16 would cost IG its
    completeness.
    """
    inputs = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = target(embed(encoder, inputs, amp=False), index)
        (gradient,) = torch.autograd.grad(scores.sum(), inputs)
    return gradient


def integrated_gradients(
    encoder: nn.Module,
    target: EmbeddingTarget,
    images: torch.Tensor,
    baselines: torch.Tensor,
    steps: int = 50,
    rule: str = "gausslegendre",
    batch_size: int = 32,
) -> torch.Tensor:
    """(B, 3, H, W) integrated gradients of ``target`` from ``baselines`` to ``images`` (both (B, 3, H, W)).

    ``IG = (x − x') Σ_k w_k ∇target(x' + α_k (x − x'))`` with the nodes α and weights w of
    ``PATH_RULES[rule](steps)``. The B × steps path points are rows, image after image, packed
    into forward passes of ``batch_size`` rows, so memory is bounded by ``batch_size`` whatever
    B and ``steps`` are. In the images' dtype.
    """
    alphas, weights = (t.to(device=images.device, dtype=images.dtype) for t in PATH_RULES[rule](check_path(steps, rule)))
    difference = images - baselines
    path_gradients = torch.zeros_like(images)
    rows = images.shape[0] * steps
    for start in range(0, rows, batch_size):
        row = torch.arange(start, min(start + batch_size, rows), device=images.device)
        image, step = row.div(steps, rounding_mode="floor"), row % steps
        points = baselines[image] + alphas[step, None, None, None] * difference[image]
        weighted = weights[step, None, None, None] * target_gradients(encoder, target, points, image)
        # A pass holds consecutive runs of each image's steps: sum each run in order (index_add_
        # would add in an arbitrary order on CUDA, and the maps would vary from call to call).
        present, counts = image.unique_consecutive(return_counts=True)
        path_gradients[present] += torch.stack([run.sum(0) for run in weighted.split(counts.tolist())])
    return difference * path_gradients


def check_baseline_option(baseline: object, blur_sigma: float) -> str | torch.Tensor:
    """``baseline`` if it names a baseline (:data:`~sslens.explain.baselines.BASELINES`) or is a
    (3, H, W) or (N, 3, H, W) image tensor, else a ValueError or TypeError."""
    if isinstance(baseline, str):
        return check_baseline(baseline, blur_sigma)
    if not torch.is_tensor(baseline):
        raise TypeError(
            f"baseline must be one of {', '.join(BASELINES)} or an image tensor; got {type(baseline).__name__}"
        )
    if baseline.ndim not in (3, 4) or baseline.shape[-3] != 3 or not baseline.is_floating_point():
        raise ValueError(
            "A baseline tensor must be a floating-point (3, H, W) image or an (N, 3, H, W) batch "
            f"(one per explained image, or one for all) in the images' normalised space; got {tuple(baseline.shape)}"
        )
    return baseline.detach()


class TargetAttribution(Explainer):
    """Integrated gradients or gradient × input of a scalar target of the embedding.

    The base of :class:`LabelFree` and :class:`~sslens.explain.cocoa.CocoaGradients`:
    a subclass says what is explained by overriding one method, :meth:`target`.

    Args:
        encoder: ``nn.Module`` mapping (B, 3, H, W) normalised images to (B, D) embeddings.
        method: ``"ig"`` (integrated gradients) or ``"gxi"`` (gradient × input, which uses
            none of the options below but ``batch_size``).
        steps: nodes of the path integral.
        rule: the quadrature rule, a key of :data:`PATH_RULES`.
        baseline: where the path starts: ``"zero"`` (the dataset's mean colour in normalised
            space), ``"blur"``, ``"mean"`` (:mod:`sslens.explain.baselines`), or an image tensor
            (3, H, W) or (N, 3, H, W) with N = 1 or the number of explained images.
        blur_sigma: Gaussian σ in px of the ``"blur"`` baseline.
        batch_size: path points (image × step rows) per forward and backward pass; None
            (default): by device (:func:`~sslens.explain.engine.default_batch_size`).

    Call ``explainer(images, **target_options)`` with (B, 3, H, W) normalised images on any
    device (the encoder's); the options go to :meth:`target`. Returns an
    :class:`~sslens.explain.base.Explanation` whose ``importance`` (B, H, W) float32 is the
    attribution summed over colour channels. ``info``: ``method`` (the registered name),
    ``target`` (its value at each image), ``batch_size``; for IG also ``steps``, ``rule``,
    ``baseline``, ``target_at_baseline`` and ``completeness_gap`` per image (Σ attributions −
    (target(x) − target(x'))).
    """

    #: The registered names are ``f"{name}-{method}"``.
    name = "target"

    def __init__(
        self,
        encoder: nn.Module,
        method: str = "ig",
        steps: int = 50,
        rule: str = "gausslegendre",
        baseline: str | torch.Tensor = "zero",
        blur_sigma: float = 4.0,
        batch_size: int | None = None,
    ):
        super().__init__(encoder)
        if method not in ("ig", "gxi"):
            raise ValueError(f"method must be 'ig' (integrated gradients) or 'gxi' (gradient × input); got {method!r}")
        self.method = method
        self.steps = check_path(steps, rule)
        self.rule = rule
        self.baseline = check_baseline_option(baseline, blur_sigma)
        self.blur_sigma = float(blur_sigma)
        self.batch_size = check_batch_size(batch_size)

    def target(
        self, images: torch.Tensor, embeddings: torch.Tensor, batch_size: int, **options
    ) -> tuple[EmbeddingTarget, dict]:
        """The target for this call's ``images`` (B, 3, H, W) with ``embeddings`` (B, D), and
        what to record of it in ``info``."""
        raise NotImplementedError

    def baselines(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) path starts for ``images`` (B, 3, H, W)."""
        if isinstance(self.baseline, str):
            return make_baseline(self.baseline, images, blur_sigma=self.blur_sigma)
        baseline = self.baseline.to(device=images.device, dtype=images.dtype)
        baseline = baseline[None] if baseline.ndim == 3 else baseline
        if baseline.shape[0] not in (1, images.shape[0]) or baseline.shape[2:] != images.shape[2:]:
            raise ValueError(
                f"The baseline tensor {tuple(baseline.shape)} does not fit images {tuple(images.shape)}: "
                "pass one (3, H, W) baseline or one per image, at the images' size."
            )
        return baseline.expand_as(images)

    def baseline_info(self) -> dict:
        if isinstance(self.baseline, str):
            return {"baseline": self.baseline, **({"blur_sigma": self.blur_sigma} if self.baseline == "blur" else {})}
        return {"baseline": "tensor", "baseline_shape": list(self.baseline.shape)}

    def explain(self, images: torch.Tensor, **target_options) -> Explanation:
        self.encoder.eval()
        # Gradients flow to the input only: no weight gradient is computed and no .grad written
        # (preserved_state restores the flags).
        self.encoder.requires_grad_(False)
        batch_size = self.batch_size or default_batch_size(images.device, tuple(images.shape[2:]))
        dtype = images.dtype if images.is_floating_point() else torch.float32
        # Autograd also under the caller's no_grad or inference_mode; the copy turns an
        # inference tensor into one autograd can use.
        with torch.inference_mode(False):
            images = images.detach().to(dtype).clone()
            index = torch.arange(images.shape[0], device=images.device)
            embeddings = embed_batches(self.encoder, images, batch_size)
            target, target_info = self.target(images, embeddings, batch_size, **target_options)
            at_images = target(embeddings, index)
            info = {"method": f"{self.name}-{self.method}", **target_info, "target": at_images.tolist()}
            if self.method == "ig":
                baselines = self.baselines(images)
                attributions = integrated_gradients(
                    self.encoder, target, images, baselines, self.steps, self.rule, batch_size
                )
                at_baselines = target(embed_batches(self.encoder, baselines, batch_size), index)
                gap = attributions.flatten(1).sum(1) - (at_images - at_baselines)
                info |= {
                    "steps": self.steps, "rule": self.rule, **self.baseline_info(),
                    "target_at_baseline": at_baselines.tolist(), "completeness_gap": gap.tolist(),
                }
            else:
                gradients = torch.cat([
                    target_gradients(self.encoder, target, chunk, rows)
                    for chunk, rows in zip(images.split(batch_size), index.split(batch_size), strict=True)
                ])
                attributions = images * gradients
        return Explanation(importance=attributions.sum(dim=1).float(), info=info | {"batch_size": batch_size})


class LabelFree(TargetAttribution):
    """Label-free feature importance: the target of image i is ``⟨f(x_i), f(x̃)⟩`` with ``f(x_i)``
    computed once and detached (see the module docstring; options: :class:`TargetAttribution`).

    Its value at the image is ``‖f(x_i)‖²``, recorded as ``info["target"]``.
    """

    name = "labelfree"

    def target(self, images: torch.Tensor, embeddings: torch.Tensor, batch_size: int) -> tuple[EmbeddingTarget, dict]:
        reference = embeddings.detach()

        def similarity_to_own_embedding(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return (rows * reference[index].to(rows.dtype)).sum(dim=1)

        return similarity_to_own_embedding, {}


@EXPLAINERS.register("labelfree-ig")
def labelfree_ig(
    encoder: nn.Module,
    steps: int = 50,
    rule: str = "gausslegendre",
    baseline: str | torch.Tensor = "zero",
    blur_sigma: float = 4.0,
    batch_size: int | None = None,
) -> LabelFree:
    """Label-free integrated gradients; see :class:`LabelFree` and :class:`TargetAttribution`."""
    return LabelFree(
        encoder, method="ig", steps=steps, rule=rule, baseline=baseline, blur_sigma=blur_sigma, batch_size=batch_size
    )


labelfree_ig.label = "Label-free IG"


@EXPLAINERS.register("labelfree-gxi")
def labelfree_gxi(encoder: nn.Module, batch_size: int | None = None) -> LabelFree:
    """Label-free gradient × input; see :class:`LabelFree` and :class:`TargetAttribution`."""
    return LabelFree(encoder, method="gxi", batch_size=batch_size)


labelfree_gxi.label = "Label-free gradient × input"
