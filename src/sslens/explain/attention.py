"""Attention maps of Vision Transformers: attention rollout, the class token's last attention, and
the gradient-weighted attention relevance of a similarity.

All three read the attention probabilities ``A = softmax(q kᵀ / √d)`` (B, heads, N, N) of every
block of a timm ``VisionTransformer`` inside the encoder (rows are queries, N tokens = the
``num_prefix_tokens`` class/register tokens, then the h·w patch tokens row-major).

* ``"rollout"``, attention rollout (Abnar & Zuidema 2020, https://arxiv.org/abs/2005.00928):
  "We propose two methods for approximating the attention to input tokens given attention
  weights, attention rollout and attention flow". Residual connections are modelled as the
  paper's ``A = 0.5 W_att + 0.5 I`` and the blocks multiplied, ``Ã(l_i) = A(l_i) Ã(l_{i−1})``:
  :func:`attention_rollout`.
* ``"cls-attention"``, the class token's attention in the last block, as DINO shows it (Caron et
  al. 2021, https://arxiv.org/abs/2104.14294): "We look at the self-attention of the [CLS] token
  on the heads of the last layer."
* ``"gradient-attention"``, gradient-weighted attention relevance (Chefer et al. 2021,
  "Generic Attention-model Explainability", https://arxiv.org/abs/2103.15679: "we propose the
  first method to explain prediction by any Transformer-based architecture"; LeGrad, Bousselham
  et al. 2024, weights attention by its gradient in the same spirit): per block
  ``Ā = E_h((∇A ⊙ A)⁺)`` (eq. 5) and ``R ← R + Ā · R`` from ``R = I`` (eq. 6), see
  :func:`gradient_weighted_rollout`, where the explained score is the cosine similarity
  ``s = cos(f(x), e_ref)`` of similarity Grad-CAM (:mod:`sslens.explain.gradcam`).

Every map is the row of the token the embedding is read from (the class token for timm's
``global_pool="token"``), restricted to the patch tokens, laid out as the (h, w) patch grid and
upsampled bilinearly (``align_corners=False``) to the input size. Maps are raw, never rescaled.

Where sslens differs from the papers:

* A ViT that average-pools its tokens (``global_pool="avg"``) has no class token to read; its
  maps use the mean of the rows its pooling averages (the patch rows, or every row with
  ``pool_include_prefix``), which is what the embedding is. Other poolings (max, attention
  pooling) are refused.
* ``head_fusion="max"`` (not in the paper, common in rollout code) fuses heads by their maximum;
  rows are then renormalised after adding I, so every fused matrix stays row-stochastic.
* Chefer et al. explain a class logit; sslens explains the cosine similarity with a reference
  embedding, passed as for similarity Grad-CAM (reference images, ``"augmented"`` views, or a
  ``reference_set``). An image's own embedding is not offered as the default reference: the
  cosine is at its maximum there, so every gradient, and the map, is zero.

How the probabilities are read: timm's ``Attention`` computes them with a fused kernel
(``fused_attn``) that never exposes them. During one call sslens sets ``fused_attn = False`` on
each block, so timm takes its explicit path, ``softmax(q kᵀ · scale)`` followed by ``attn_drop``,
and a forward hook on ``attn_drop`` records its output (the probabilities: every explainer runs
the encoder in eval mode, where dropout is the identity). :func:`recorded_attention` restores
each flag and removes the hooks on exit, also after an exception; the explainer base restores
modes and ``requires_grad`` flags, and gradients are taken with respect to the attention only, so
no parameter's ``.grad`` is touched.

>>> from sslens.models.timm_backbone import TimmBackbone
>>> vit = TimmBackbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
>>> AttentionRollout(vit)(torch.randn(2, 3, 32, 32)).importance.shape
torch.Size([2, 32, 32])
>>> sorted(CLSAttention(vit)(torch.randn(1, 3, 32, 32)).components)
['head0', 'head1']
>>> GradientAttention(vit)(torch.randn(1, 3, 32, 32), reference="augmented").importance.shape
torch.Size([1, 32, 32])
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sslens.checks import integer, positive_int
from sslens.explain.base import EXPLAINERS, Explainer, Explanation
from sslens.explain.gradcam import flip_and_crop
from sslens.registry import lookup

#: ``head_fusion`` name → reduction over the heads axis of (B, heads, N, N).
HEAD_FUSIONS = {"mean": torch.mean, "max": torch.amax}


def attention_rollout(attentions: Sequence[torch.Tensor], head_fusion: str = "mean") -> torch.Tensor:
    """Attention rollout ``Â_L ⋯ Â_1`` with ``Â_l = rownorm(fuse_heads(A_l) + I)``.

    Args:
        attentions: L tensors (B, heads, N, N), first block first, rows summing to 1.
        head_fusion: a key of :data:`HEAD_FUSIONS`; ``"mean"`` gives the paper's
            ``0.5 A + 0.5 I`` exactly.

    Returns:
        (B, N, N): row i is how much the last block's output token i draws on each input token
        (rows sum to 1).
    """
    fuse = lookup("head fusion", HEAD_FUSIONS, head_fusion)
    if not attentions:
        raise ValueError("attention_rollout needs the attention of at least one block")
    rollout = None
    for attention in attentions:
        fused = fuse(attention, dim=1)
        residual = fused + torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        residual = residual / residual.sum(dim=-1, keepdim=True)
        rollout = residual if rollout is None else residual @ rollout
    return rollout


def gradient_weighted_rollout(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chefer et al.'s self-attention relevance: ``R = I``, then per block ``R ← R + Ā · R`` with
    ``Ā = mean_heads((∇A ⊙ A)⁺)``.

    Args:
        attentions: L tensors A (B, heads, N, N), first block first.
        gradients: L tensors ∇A = ∂s/∂A of the same shapes.

    Returns:
        (B, N, N) relevance R; row i, minus the identity's 1 at (i, i), is how relevant each
        input token is to output token i.
    """
    if not attentions or len(attentions) != len(gradients):
        raise ValueError(
            f"gradient_weighted_rollout needs one gradient per attention (at least one); got "
            f"{len(attentions)} attentions and {len(gradients)} gradients"
        )
    batch, _, tokens, _ = attentions[0].shape
    relevance = torch.eye(tokens, dtype=attentions[0].dtype, device=attentions[0].device).expand(batch, -1, -1)
    for attention, gradient in zip(attentions, gradients, strict=True):
        weighted = (gradient * attention).clamp(min=0).mean(dim=1)
        relevance = relevance + weighted @ relevance
    return relevance


def find_vision_transformer(encoder: nn.Module) -> nn.Module:
    """The first timm ``VisionTransformer`` among ``encoder``'s modules (the encoder itself, a
    :class:`~sslens.models.timm_backbone.TimmBackbone`'s model, or one inside a projection
    encoder); a ValueError when there is none or its blocks' attention is not timm's ``Attention``.
    """
    # A model holding a timm ViT has imported its module; looking it up instead of importing it
    # keeps timm optional and does not load it for a CNN.
    timm_vit = sys.modules.get("timm.models.vision_transformer")
    vit = None
    if timm_vit is not None:
        vit = next((m for m in encoder.modules() if isinstance(m, timm_vit.VisionTransformer)), None)
    if vit is None:
        raise ValueError(
            f"The encoder ({type(encoder).__name__}) holds no attention blocks: attention maps need a "
            "timm VisionTransformer (backbone 'timm' with a vit_* model_name). For a CNN use the "
            "gradcam, relax or correspondence explainer."
        )
    for index, block in enumerate(vit.blocks):
        attention = getattr(block, "attn", None)
        if not isinstance(attention, timm_vit.Attention):
            raise ValueError(
                f"Block {index} of the ViT has attention {type(attention).__name__}, not timm's Attention, "
                "whose probabilities sslens knows how to read; use gradcam or relax for this model."
            )
    return vit


@contextlib.contextmanager
def recorded_attention(vit: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the attention probabilities of every block of the timm ViT ``vit``.

    Inside the ``with`` block each forward pass appends one (B, heads, N, N) tensor per block, in
    block order, to the yielded list (see the module docstring: timm's explicit attention path,
    ``fused_attn = False``, and a hook on ``attn_drop``; in train mode the recorded tensor has
    dropout applied). On exit every ``fused_attn`` flag is restored and the hooks removed, also
    after an exception.
    """
    modules = [block.attn for block in vit.blocks]
    flags = [module.fused_attn for module in modules]
    records: list[torch.Tensor] = []
    handles = []
    try:
        for module in modules:
            module.fused_attn = False
            handles.append(module.attn_drop.register_forward_hook(lambda m, inputs, output: records.append(output)))
        yield records
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in zip(modules, flags, strict=True):
            module.fused_attn = flag


def _pooled_rows(vit: nn.Module) -> slice:
    """The token rows the ViT's embedding is read from: its class token, or the tokens it averages."""
    pool = "attention pooling" if getattr(vit, "attn_pool", None) is not None else vit.global_pool
    if pool == "token" and vit.has_class_token:
        return slice(0, 1)
    if pool == "avg":
        return slice(0 if getattr(vit, "pool_include_prefix", False) else vit.num_prefix_tokens, None)
    raise ValueError(
        f"This ViT pools its tokens with {pool!r}; attention maps are defined for class-token "
        "(global_pool='token') and average-pooled (global_pool='avg') ViTs. Use gradcam or relax "
        "for this model."
    )


class _AttentionExplainer(Explainer):
    """Shared parts: the ViT, its pooled rows, batching and the token row → image map step."""

    def __init__(self, encoder: nn.Module, batch_size: int):
        super().__init__(encoder)
        self.vit = find_vision_transformer(encoder)
        self.rows = _pooled_rows(self.vit)
        self.batch_size = positive_int("batch_size", batch_size)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(embeddings (B, D), L attention tensors (B, heads, N, N)) of one forward pass."""
        with recorded_attention(self.vit) as attentions:
            embeddings = self.encoder(images)
        if len(attentions) != len(self.vit.blocks):
            raise RuntimeError(
                f"Recorded {len(attentions)} attention maps for the ViT's {len(self.vit.blocks)} blocks: "
                "the encoder must run its ViT exactly once per forward pass."
            )
        return embeddings, attentions

    def _image_maps(self, matrix: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, N, N) token matrix → (B, H, W): the pooled rows over the patch tokens, upsampled."""
        row = matrix[:, self.rows].mean(dim=1)[:, self.vit.num_prefix_tokens :]
        height, width = self.vit.patch_embed.dynamic_feat_size(size)
        if height * width != row.shape[1]:
            raise ValueError(
                f"{row.shape[1]} patch tokens do not form the {height}x{width} patch grid of a "
                f"{size[0]}x{size[1]} px input; use the input size the ViT was built for."
            )
        grid = row.reshape(len(row), 1, height, width)
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[:, 0].float().cpu()


@EXPLAINERS.register("rollout")
class AttentionRollout(_AttentionExplainer):
    """Attention rollout maps of a ViT (see the module docstring and :func:`attention_rollout`).

    Args:
        encoder: images (B, 3, H, W) → embeddings (B, D), holding a timm VisionTransformer.
        head_fusion: ``"mean"`` (the paper) or ``"max"`` over heads, see :data:`HEAD_FUSIONS`.
        batch_size: images per forward pass.

    Call: ``rollout(images) -> Explanation`` with ``importance`` (B, H, W) float32 on the CPU:
    the rollout row of the pooled token over the patch tokens; ``info`` holds the head fusion.
    """

    label = "Attention rollout"

    def __init__(self, encoder: nn.Module, head_fusion: str = "mean", *, batch_size: int = 32):
        super().__init__(encoder, batch_size)
        lookup("head fusion", HEAD_FUSIONS, head_fusion)
        self.head_fusion = head_fusion

    @torch.no_grad()
    def explain(self, images: torch.Tensor) -> Explanation:
        self.encoder.eval()
        size = tuple(images.shape[-2:])
        maps = [
            self._image_maps(attention_rollout(self._forward(chunk)[1], self.head_fusion), size)
            for chunk in images.split(self.batch_size)
        ]
        info = {"method": "rollout", "head_fusion": self.head_fusion, "blocks": len(self.vit.blocks)}
        return Explanation(importance=torch.cat(maps), info=info)


@EXPLAINERS.register("cls-attention")
class CLSAttention(_AttentionExplainer):
    """The last block's attention of the pooled token over the patches, per head (DINO's maps).

    Args:
        encoder: images (B, 3, H, W) → embeddings (B, D), holding a timm VisionTransformer.
        batch_size: images per forward pass.

    Call: ``cls_attention(images) -> Explanation``: ``components["head0"]`` ... (B, H, W) one map
    per head, ``importance`` their mean (the head-averaged attention), float32 on the CPU.
    """

    label = "CLS attention"

    def __init__(self, encoder: nn.Module, *, batch_size: int = 32):
        super().__init__(encoder, batch_size)

    @torch.no_grad()
    def explain(self, images: torch.Tensor) -> Explanation:
        self.encoder.eval()
        size = tuple(images.shape[-2:])
        heads: list[list[torch.Tensor]] = []
        means = []
        for chunk in images.split(self.batch_size):
            last = self._forward(chunk)[1][-1]
            heads.append([self._image_maps(last[:, head], size) for head in range(last.shape[1])])
            means.append(self._image_maps(last.mean(dim=1), size))
        components = {f"head{head}": torch.cat([chunk[head] for chunk in heads]) for head in range(len(heads[0]))}
        info = {"method": "cls-attention", "block": len(self.vit.blocks) - 1, "heads": len(components)}
        return Explanation(importance=torch.cat(means), components=components, info=info)


@EXPLAINERS.register("gradient-attention")
class GradientAttention(_AttentionExplainer):
    """Gradient-weighted attention relevance of ``s = cos(f(x), e_ref)`` (Chefer et al.'s rule).

    Args:
        encoder: images (B, 3, H, W) → embeddings (B, D), holding a timm VisionTransformer.
        seed: seeds the views of ``reference="augmented"`` (a fresh generator per call).
        batch_size: images per forward pass, also when embedding references.

    Call: ``explainer(images, reference=None, reference_set=None)`` with exactly one of
        * ``reference``: (B or 1, 3, h, w) images (image i is compared with reference i, or all
          with the single one), or ``"augmented"``: a seeded
          :func:`~sslens.explain.gradcam.flip_and_crop` view of each image;
        * ``reference_set``: (M, 3, h, w) images whose mean L2-normalised embedding is every
          image's reference.

    The reference embedding is held fixed (detached). Returns ``importance`` (B, H, W) float32 on
    the CPU: the pooled token's relevance row over the patch tokens; ``info`` holds the mode, seed
    and each image's similarity s.
    """

    label = "Gradient-weighted attention"

    def __init__(self, encoder: nn.Module, *, seed: int = 0, batch_size: int = 32):
        super().__init__(encoder, batch_size)
        self.seed = integer("seed", seed)

    def augmented_views(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → the views ``reference="augmented"`` compares ``images`` with
        (:func:`~sslens.explain.gradcam.flip_and_crop` with a generator seeded with ``seed``)."""
        return flip_and_crop(images.detach().cpu(), torch.Generator().manual_seed(self.seed)).to(images.device)

    @torch.no_grad()
    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.encoder(chunk) for chunk in images.split(self.batch_size)])

    def _reference_embeddings(
        self, images: torch.Tensor, reference: torch.Tensor | str | None, reference_set: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict]:
        """(B, D) fixed reference embeddings and what they are, for ``info``."""
        if (reference is None) == (reference_set is None):
            raise ValueError(
                "Pass exactly one of reference= (a (B or 1, 3, H, W) image tensor, or 'augmented' for "
                "a seeded augmented view of each image) and reference_set= (an (M, 3, H, W) tensor "
                "whose mean embedding is the reference). An image's own embedding is no reference: "
                "the similarity is at its maximum there and every gradient is zero."
            )
        if reference_set is not None:
            _check_images("reference_set", reference_set)
            mean = F.normalize(self._embed(reference_set), dim=1).mean(dim=0)
            return mean.expand(len(images), -1), {"mode": "reference_set", "reference_set_size": len(reference_set)}
        info = {"mode": "reference"}
        if isinstance(reference, str):
            if reference != "augmented":
                raise ValueError(f"reference must be a tensor or 'augmented'; got {reference!r}")
            reference, info = self.augmented_views(images), {"mode": "augmented"}
        _check_images("reference", reference, len(images))
        return self._embed(reference).expand(len(images), -1), info

    def explain(
        self,
        images: torch.Tensor,
        reference: torch.Tensor | str | None = None,
        reference_set: torch.Tensor | None = None,
    ) -> Explanation:
        self.encoder.eval()
        # Gradients flow to the attention only: with every parameter frozen, no .grad is touched.
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
        size = tuple(images.shape[-2:])
        references, info = self._reference_embeddings(images, reference, reference_set)
        maps, similarities = [], []
        for chunk, chunk_references in zip(images.split(self.batch_size), references.split(self.batch_size), strict=True):
            # Autograd is needed also when the caller runs under no_grad or inference_mode; clones
            # turn the caller's inference tensors into ones autograd can save.
            with torch.inference_mode(False), torch.enable_grad():
                inputs = chunk.detach().clone().requires_grad_(True)
                embeddings, attentions = self._forward(inputs)
                similarity = F.cosine_similarity(embeddings, chunk_references.clone(), dim=1)
                gradients = torch.autograd.grad(similarity.sum(), attentions)
            relevance = gradient_weighted_rollout([a.detach() for a in attentions], gradients)
            maps.append(self._image_maps(relevance, size))
            similarities.append(similarity.detach())
        info = {"method": "gradient-attention", "seed": self.seed, **info,
                "similarity": torch.cat(similarities).tolist()}
        return Explanation(importance=torch.cat(maps), info=info)


def _check_images(name: str, images: object, batch: int | None = None) -> None:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{name} must be an (N, 3, H, W) image tensor; got {shape}")
    if batch is not None and len(images) not in (1, batch):
        raise ValueError(
            f"{name} holds {len(images)} images for {batch} explained images; pass one per image or a single one."
        )
