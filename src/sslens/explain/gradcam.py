"""Similarity Grad-CAM and its CAM family, for embeddings instead of class scores.

Grad-CAM (Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391): "we first compute the
gradient of the score for class c, y^c ..., with respect to feature map activations A^k of a
convolutional layer ... These gradients flowing back are global-average-pooled over the width
and height dimensions to obtain the neuron importance weights α_k^c", and the map is
ReLU(Σ_k α_k^c A^k).

A self-supervised encoder has no class score, so the score here is the cosine similarity
``s = cos(f(x), e_ref)`` between the explained image's embedding and a reference embedding:
another image, an augmented view of the image itself, or the mean of a set of images (e.g. a
class). The CAM methods themselves come from pytorch-grad-cam (``pytorch_grad_cam``); sslens
supplies the similarity target and works around three of its habits:

* it min-max rescales every map to [0, 1]; sslens returns the raw ReLU(Σ_k α_k A^k), upsampled
  bilinearly (``align_corners=False``) to the input size, so maps of different images and
  models stay comparable (normalising for display is :mod:`sslens.explain.display`'s job);
* its constructor calls ``model.eval()`` and its backward fills the parameters' ``.grad``:
  sslens restores the caller's modes and ``requires_grad`` flags (:func:`preserved_state`) and
  takes gradients only with respect to the input, so no ``.grad`` is touched;
* its ``__exit__`` swallows ``IndexError``; sslens never uses it as a context manager and
  releases its hooks in ``finally``.

Vision Transformers: a block outputs tokens (B, N, C), not a (B, C, h, w) map. For a backbone
that provides ``cam_reshape(layer)`` (:class:`~sslens.models.timm_backbone.TimmBackbone`) the
class/register tokens are dropped and the patch tokens laid out as their (h, w) grid before
α_k and Σ_k α_k A^k are computed (pytorch-grad-cam's ``reshape_transform``); see docs/MODELS.md
for which CAM methods suit ViTs.

>>> from sslens.models import create_backbone
>>> cam = SimilarityCAM(create_backbone("resnet-tiny"), cam="gradcam")
>>> x = torch.randn(2, 3, 32, 32)
>>> cam(x, reference="augmented").importance.shape
torch.Size([2, 32, 32])
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.base_cam import BaseCAM
from torch import nn

from sslens.checks import integer, positive_int
from sslens.explain.base import EXPLAINERS, Explainer, Explanation
from sslens.models.base import Backbone
from sslens.registry import lookup

#: Registered explainer name → (pytorch-grad-cam class, name in reports). Each becomes an
#: ``EXPLAINERS`` entry.
CAM_METHODS: dict[str, tuple[type[BaseCAM], str]] = {
    "gradcam": (GradCAM, "Grad-CAM"),
    "gradcam++": (GradCAMPlusPlus, "Grad-CAM++"),
    "xgradcam": (XGradCAM, "XGrad-CAM"),
    "layercam": (LayerCAM, "LayerCAM"),
    "eigencam": (EigenCAM, "Eigen-CAM"),
    "scorecam": (ScoreCAM, "Score-CAM"),
    "hirescam": (HiResCAM, "HiResCAM"),
}

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class SimilarityTarget:
    """A pytorch-grad-cam target: embedding (D,) → cosine similarity with a fixed ``reference`` (D,).

    The reference is detached, so gradients flow only through the explained image.
    """

    def __init__(self, reference: torch.Tensor):
        if reference.ndim != 1:
            raise ValueError(f"reference must be one (D,) embedding; got shape {tuple(reference.shape)}")
        self.reference = reference.detach()

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(output, self.reference.to(output), dim=0)


def flip_and_crop(images: torch.Tensor, generator: torch.Generator, min_scale: float = 0.5) -> torch.Tensor:
    """The default view for ``reference="augmented"``: a random crop + horizontal flip per image.

    Each image is cropped to a random box covering ``min_scale``..1 of each side (aspect kept
    free), resized back to (H, W) bilinearly, and flipped with probability 1/2. All draws come
    from ``generator`` (on the CPU), so a seed fixes the views. (B, 3, H, W) → (B, 3, H, W).
    """
    _, _, height, width = images.shape
    views = []
    for image in images:
        scale_h, scale_w, top, left, flip = torch.rand(5, generator=generator).tolist()
        crop_h = max(1, round(height * (min_scale + (1 - min_scale) * scale_h)))
        crop_w = max(1, round(width * (min_scale + (1 - min_scale) * scale_w)))
        y0 = int(top * (height - crop_h + 1))
        x0 = int(left * (width - crop_w + 1))
        view = image[None, :, y0 : y0 + crop_h, x0 : x0 + crop_w]
        view = F.interpolate(view, size=(height, width), mode="bilinear", align_corners=False)
        views.append(view.flip(-1) if flip < 0.5 else view)
    return torch.cat(views)


def resolve_layer(encoder: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    """(name, module) of the layer to explain.

    Names go through the first :class:`~sslens.models.base.Backbone` inside ``encoder`` (the
    encoder itself or the first module of ``nn.Sequential(backbone, projector)``), so "layer4"
    works for both encoder outputs; ``None`` picks the backbone's default (last) stage. Any
    dotted submodule name of ``encoder`` (e.g. "0.layer4.0.conv2") or of its backbone
    ("layer4.0.conv2") is accepted too. Without a Backbone, ``None`` picks the last ``nn.Conv2d``.
    """
    backbone = next((m for m in encoder.modules() if isinstance(m, Backbone)), None)
    if backbone is not None:
        if layer is None:
            layer = backbone.default_layer
        if layer in backbone.layer_names:
            return layer, backbone.get_layer(layer)
        valid = list(backbone.layer_names)
    elif layer is None:
        convs = [name for name, m in encoder.named_modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ValueError(
                "The encoder has no nn.Conv2d layer to explain; pass layer= with a dotted submodule name."
            )
        return convs[-1], encoder.get_submodule(convs[-1])
    else:
        valid = [name for name, _ in encoder.named_children()]
    # Dotted paths resolve from the encoder and, like the stage names, from its backbone, so
    # "layer4.0.conv2" works for nn.Sequential(backbone, projector) too.
    for root in (encoder, backbone) if backbone is not None else (encoder,):
        with contextlib.suppress(AttributeError):
            return layer, root.get_submodule(layer)
    if not valid:
        raise ValueError(f"The encoder has no layer {layer!r}: it has no submodules, so no layer to explain.")
    raise ValueError(
        f"The encoder has no layer {layer!r}. Valid layer names: {', '.join(valid)} "
        f"(or any dotted submodule path of the encoder, e.g. {valid[-1] + '.0'!r})."
    )


def cam_reshape(encoder: nn.Module, layer: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The ``reshape_transform`` that turns layer ``layer``'s output into (B, C, h, w), or None.

    A backbone whose layers output tokens (a ViT's (B, N, C)) provides it as
    ``backbone.cam_reshape(layer)`` (see :class:`sslens.models.timm_backbone.TimmBackbone`); the
    convolutional backbones need none. pytorch-grad-cam applies it to activations and gradients.
    """
    backbone = next((m for m in encoder.modules() if isinstance(m, Backbone)), None)
    reshape = getattr(backbone, "cam_reshape", None)
    if reshape is None or layer not in backbone.layer_names:
        return None
    return reshape(layer)


class _NoZeroGrad(nn.Module):
    """What pytorch-grad-cam sees of the encoder.

    Its ``forward`` calls ``model.zero_grad()``, which would wipe the caller's ``.grad``; during
    an explanation no parameter requires grad (gradients flow to the input only), so there is
    nothing to zero and the call is a no-op here.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None


def _raw_cam_class(cam_class: type[BaseCAM]) -> type[BaseCAM]:
    """``cam_class`` with the min-max rescaling replaced by raw maps upsampled with torch."""

    class RawCAM(cam_class):
        def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
            activations = [a.cpu().numpy() for a in self.activations_and_grads.activations]
            grads = [g.cpu().numpy() for g in self.activations_and_grads.gradients]
            # pytorch-grad-cam would fail later on a None array with an unrelated message.
            if len(activations) < len(self.target_layers) or (self.uses_gradients and len(grads) < len(activations)):
                raise RuntimeError(
                    f"Layer {self.layer_name!r} recorded no {'gradient' if activations else 'activation'}: "
                    "it must run in the encoder's forward pass and the embedding must depend on its output."
                )
            size = tuple(input_tensor.shape[-2:])
            maps = []
            for i, target_layer in enumerate(self.target_layers):
                cam = self.get_cam_image(
                    input_tensor, target_layer, targets,
                    activations[i] if i < len(activations) else None,
                    grads[i] if i < len(grads) else None,
                    eigen_smooth,
                )
                cam = torch.from_numpy(np.maximum(cam, 0).astype(np.float32))[:, None]
                maps.append(F.interpolate(cam, size=size, mode="bilinear", align_corners=False))
            return maps

        def aggregate_multi_layers(self, cam_per_target_layer):
            # Mean over layers (one layer in sslens), without pytorch-grad-cam's rescaling.
            return torch.cat(cam_per_target_layer, dim=1).mean(dim=1)

    RawCAM.__name__ = RawCAM.__qualname__ = f"Raw{cam_class.__name__}"
    return RawCAM


class SimilarityCAM(Explainer):
    """A CAM method explaining the cosine similarity of embeddings.

    Args:
        encoder: images (B, 3, H, W) → embeddings (B, D).
        cam: a key of :data:`CAM_METHODS` ("gradcam", "gradcam++", "xgradcam", "layercam",
            "eigencam", "scorecam", "hirescam").
        layer: the layer whose activations A are weighted (see :func:`resolve_layer`); default
            the backbone's default layer (last stage; for a class-token ViT the last block's
            ``norm1``). Token layers are reshaped to a grid by :func:`cam_reshape`.
        symmetric: also explain the reference images (only with image references). The gradient
            of s = cos(f(x), f(r)) flows through both embeddings; each image's map pairs its own
            activations with its own gradient ∂s/∂A. This equals explaining x against the fixed
            f(r) and r against the fixed f(x), which is how it is computed.
        augment: ``(images, generator) -> views`` for ``reference="augmented"``; default
            :func:`flip_and_crop`.
        seed: seeds the generator of the augmented views (a fresh generator per call, so the
            same call gives the same views).
        batch_size: images per forward pass when embedding a ``reference_set`` and for ScoreCAM's
            masked inputs.

    Call: ``cam(images, reference=None, reference_set=None) -> Explanation``, exactly one of
        * ``reference``: a (B or 1, 3, h, w) tensor of images (image i is compared with
          reference i, or all with the single one), or ``"augmented"``: a seeded view of each image;
        * ``reference_set``: (M, 3, h, w) images whose mean embedding is every image's reference
          (the mean of the L2-normalised embeddings: the direction cosine similarity compares
          with, so no member dominates by its norm).

    Returns raw maps ``importance`` (B, H, W) float32 on the CPU; with ``symmetric=True`` also
    ``components["reference"]`` (B, h, w): the maps of the reference images. ``info`` holds the
    CAM method, layer, mode, seed and the cosine similarity of each pair.
    """

    def __init__(
        self,
        encoder: nn.Module,
        cam: str = "gradcam",
        layer: str | None = None,
        *,
        symmetric: bool = False,
        augment: Augmentation | None = None,
        seed: int = 0,
        batch_size: int = 32,
    ):
        super().__init__(encoder)
        lookup("CAM method", CAM_METHODS, cam)
        if augment is not None and not callable(augment):
            raise TypeError("augment must be a callable (images, generator) -> views, or None for flip + crop")
        integer("seed", seed)
        positive_int("batch_size", batch_size)
        self.cam = cam
        self.layer, self.target_layer = resolve_layer(encoder, layer)
        self.reshape_transform = cam_reshape(encoder, self.layer)
        self.symmetric = bool(symmetric)
        self.augment = augment if augment is not None else flip_and_crop
        self.seed = seed
        self.batch_size = batch_size

    def augmented_views(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → the (B, 3, H, W) views ``reference="augmented"`` compares ``images``
        with: ``augment`` with one generator seeded with ``seed``, image after image (so a
        batch split across processes must draw its views before the split)."""
        generator = torch.Generator().manual_seed(self.seed)
        return self.augment(images.detach().cpu(), generator).to(images.device)

    @torch.no_grad()
    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.encoder(chunk) for chunk in images.split(self.batch_size)])

    def _maps(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Raw maps (B, H, W) of ``images`` against fixed reference embeddings (B, D)."""
        cam = _raw_cam_class(CAM_METHODS[self.cam][0])(
            _NoZeroGrad(self.encoder), [self.target_layer], reshape_transform=self.reshape_transform
        )
        try:
            # Gradients flow to the input only: with every parameter frozen the layer's output
            # still requires grad, and the caller's parameter .grad stays untouched.
            cam.compute_input_gradient = True
            cam.batch_size = self.batch_size
            cam.layer_name = self.layer
            # ScoreCAM draws a tqdm progress bar per image on stderr; keep the caller's terminal
            # clean, but only there, so no other method's warnings are hidden.
            quiet = contextlib.redirect_stderr(io.StringIO()) if self.cam == "scorecam" else contextlib.nullcontext()
            # The backward needs autograd also when the caller runs under no_grad or
            # inference_mode; clones turn the caller's inference tensors into ones autograd can save.
            with torch.inference_mode(False), torch.enable_grad(), quiet:
                targets = [SimilarityTarget(r.clone()) for r in references]
                maps = cam(images.detach().clone(), targets)
        finally:
            cam.activations_and_grads.release()
        return maps.float()

    def explain(
        self,
        images: torch.Tensor,
        reference: torch.Tensor | str | None = None,
        reference_set: torch.Tensor | None = None,
    ) -> Explanation:
        if (reference is None) == (reference_set is None):
            raise ValueError(
                "Pass exactly one of reference= (a (B or 1, 3, H, W) image tensor, or 'augmented' for "
                "a seeded augmented view of each image) and reference_set= (an (M, 3, H, W) tensor "
                "whose mean embedding is the reference)."
            )
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()
        batch = len(images)
        info = {"method": self.cam, "layer": self.layer, "seed": self.seed, "symmetric": self.symmetric}
        if isinstance(reference, str):
            if reference != "augmented":
                raise ValueError(f"reference must be a tensor or 'augmented'; got {reference!r}")
            reference = self.augmented_views(images)
            info["mode"] = "augmented"
            info["augmentation"] = getattr(self.augment, "__name__", type(self.augment).__name__)
        elif reference is not None:
            info["mode"] = "reference"
        if reference is not None:
            reference = _check_batch(reference, batch, "reference")
            reference = reference.expand(batch, -1, -1, -1) if len(reference) == 1 else reference
            ref_embeddings = self._embed(reference)
        else:
            if self.symmetric:
                raise ValueError("symmetric=True needs reference images, not a reference_set.")
            reference_set = _check_batch(reference_set, None, "reference_set")
            mean = F.normalize(self._embed(reference_set), dim=1).mean(dim=0)
            ref_embeddings = mean.expand(batch, -1)
            info["mode"] = "reference_set"
            info["reference_set_size"] = len(reference_set)
        embeddings = self._embed(images)
        info["similarity"] = F.cosine_similarity(embeddings, ref_embeddings, dim=1).tolist()
        components = {}
        if self.symmetric:
            components["reference"] = self._maps(reference, embeddings)
        return Explanation(importance=self._maps(images, ref_embeddings), components=components, info=info)


def _check_batch(images: torch.Tensor, batch: int | None, name: str) -> torch.Tensor:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{name} must be an (N, 3, H, W) image tensor; got {shape}")
    if batch is not None and len(images) not in (1, batch):
        raise ValueError(
            f"{name} holds {len(images)} images for {batch} explained images; pass one per image or a single one."
        )
    return images


def _register(name: str) -> None:
    def factory(
        encoder: nn.Module,
        layer: str | None = None,
        *,
        symmetric: bool = False,
        augment: Augmentation | None = None,
        seed: int = 0,
        batch_size: int = 32,
    ) -> SimilarityCAM:
        return SimilarityCAM(
            encoder, cam=name, layer=layer, symmetric=symmetric, augment=augment, seed=seed,
            batch_size=batch_size,
        )

    factory.__name__ = factory.__qualname__ = name.replace("+", "_plus")
    cam_class, label = CAM_METHODS[name]
    factory.__doc__ = f"Similarity {cam_class.__name__}; see :class:`SimilarityCAM`."
    factory.label = label
    EXPLAINERS.register(name)(factory)


for _name in CAM_METHODS:
    _register(_name)
