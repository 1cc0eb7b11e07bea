"""Pairwise correspondence maps: which region of image A makes cos(f(A), f(B)) high, and where in
B it is matched.

In the spirit of BiLRP (Eberle et al. 2020, "Building and Interpreting Deep Similarity Models",
https://arxiv.org/abs/2003.05431): "We develop BiLRP, a scalable and theoretically founded method
to systematically decompose similarity scores on pairs of input features." BiLRP explains a dot
product ⟨φ(x), φ(x')⟩ by the sum over the embedding's dimensions m of outer products of two LRP
explanations, ``Σ_m LRP(φ_m, x) ⊗ LRP(φ_m, x')``: a relevance for every pair of input features.

sslens computes a simpler second-order map at one layer. With the similarity
``s = cos(f(A), f(B)) = ⟨f(A)/‖f(A)‖, f(B)/‖f(B)‖⟩``, the layer's feature maps ``F_A``
(C, h, w) and ``F_B`` (C, h', w') and the gradients of s, ``G_A = ∂s/∂F_A`` and
``G_B = ∂s/∂F_B`` (through both embeddings), each pair of cells (i of A, j of B; cells
row-major) gets

    M[i, j] = Σ_c (G_A ⊙ F_A)[c, i] · (G_B ⊙ F_B)[c, j],    i.e.  M = (G_A ⊙ F_A)ᵀ (G_B ⊙ F_B)

(:func:`correspondence_matrix`, (h·w, h'·w')): a cell pair scores high when the same channels carry
positive gradient × activation (first-order contribution to s) in both cells. From M:

* ``importance``: A's map, the row sums of M⁺ = max(M, 0), (h, w) upsampled to A's size;
* ``components["reference"]``: B's map, the column sums of M⁺, upsampled to B's size;
* ``info["matches"]``: per pair the ``top_k`` largest entries of M, each
  ``{"cell": [row, col], "reference_cell": [row, col], "score": M[i, j]}``, with
  ``info["grid"]`` = [h, w] and ``info["reference_grid"]`` = [h', w'] to draw them (cell (r, c)
  covers rows r·H/h … (r+1)·H/h and columns c·W/w … (c+1)·W/w of its image).

Maps are upsampled bilinearly (``align_corners=False``) and raw, never rescaled. Swapping A and B
transposes M and so swaps the two maps (s is symmetric).

The norms ‖f(A)‖ and ‖f(B)‖ are held constant in the gradients by default (``hold_norms=True``),
as LRP treats normalisations, so ``G_A = J_Aᵀ f̂(B) / ‖f(A)‖`` with J_A = ∂f(A)/∂F_A. The exact
cosine gradient, ``J_Aᵀ (f̂(B) − s f̂(A)) / ‖f(A)‖`` (``hold_norms=False``), is orthogonal to
f(A): s does not change when f(A) is scaled, so for a network that is linear in F_A the
contributions ``G_A ⊙ F_A`` sum to zero, and for similar images ``G_A ≈ −G_B`` channel by channel
(each embedding is pulled towards the other), which makes M negative almost everywhere and M⁺
empty. With the norms held, an encoder that global-average-pools F is explained by
``Σ_{c,i} (G_A ⊙ F_A)[c, i] = s``.

Where sslens differs from BiLRP:

* one backward pass of the scalar similarity replaces an LRP pass per embedding dimension
  (gradient × activation stands in for LRP), and the pairs are scored at the chosen layer's
  cells, not at input pixels;
* a channel's contributions in A and in B are multiplied and summed over channels, so M is a
  ranking of cell pairs, not a decomposition: it does not sum to s (BiLRP's relevances do,
  under its LRP rules);
* the cosine is explained, not a dot product; for B = A every gradient, and M, is zero (the
  cosine is at its maximum), so compare an image with another image or an augmented view.

Layers are resolved as for similarity Grad-CAM (:func:`~sslens.explain.gradcam.resolve_layer`),
and a ViT's tokens are laid out as their patch grid (:func:`~sslens.explain.gradcam.cam_reshape`),
so ResNets and ViTs both work.

>>> from sslens.models import create_backbone
>>> explainer = Correspondence(create_backbone("resnet-tiny"), top_k=3)
>>> a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
>>> explanation = explainer(a, reference=b)
>>> explanation.importance.shape, explanation.components["reference"].shape
(torch.Size([2, 32, 32]), torch.Size([2, 32, 32]))
>>> len(explanation.info["matches"][0]), explanation.info["grid"]
(3, [4, 4])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sslens.checks import boolean, integer, positive_int
from sslens.explain.base import EXPLAINERS, Explainer, Explanation
from sslens.explain.gradcam import cam_reshape, flip_and_crop, resolve_layer


def correspondence_matrix(
    features_a: torch.Tensor, gradients_a: torch.Tensor, features_b: torch.Tensor, gradients_b: torch.Tensor
) -> torch.Tensor:
    """``M = (G_A ⊙ F_A)ᵀ (G_B ⊙ F_B)`` per pair.

    Args:
        features_a, gradients_a: (B, C, h, w) feature maps of A and ∂s/∂F_A.
        features_b, gradients_b: (B, C, h', w') the same for B.

    Returns:
        (B, h·w, h'·w'): ``M[p, i, j] = Σ_c G_A F_A[p, c, i] · G_B F_B[p, c, j]``, cells row-major.
    """
    contribution_a = (gradients_a * features_a).flatten(2)
    contribution_b = (gradients_b * features_b).flatten(2)
    return contribution_a.transpose(1, 2) @ contribution_b


def _unchanged(output: torch.Tensor) -> torch.Tensor:
    """The reshape of a layer that already outputs (B, C, h, w) maps."""
    return output


@contextlib.contextmanager
def _recorded_outputs(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    outputs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


@EXPLAINERS.register("correspondence")
class Correspondence(Explainer):
    """Correspondence maps of image pairs (A, B) for s = cos(f(A), f(B)); see the module docstring.

    Args:
        encoder: images (B, 3, H, W) → embeddings (B, D).
        layer: the layer whose feature maps are paired (see
            :func:`~sslens.explain.gradcam.resolve_layer`); default the backbone's default layer
            (last stage; for a class-token ViT the last block's ``norm1``).
        top_k: matched cell pairs listed per image pair (at most h·w·h'·w' are listed).
        hold_norms: hold the embeddings' norms constant in the gradients (default; see the module
            docstring); False differentiates the exact cosine.
        seed: seeds the views of ``reference="augmented"`` (a fresh generator per call).
        batch_size: image pairs per forward pass.

    Call: ``explainer(images, reference=...)``: ``reference`` is (B or 1, 3, h, w) images (image i
    is paired with reference i, or all with the single one), or ``"augmented"``: a seeded
    :func:`~sslens.explain.gradcam.flip_and_crop` view of each image.

    Returns ``importance`` (B, H, W) and ``components["reference"]`` (B, h, w), float32 on the
    CPU; ``info`` holds the layer, mode, seed, grids, each pair's similarity and its matches.
    """

    label = "Correspondence"

    def __init__(
        self,
        encoder: nn.Module,
        layer: str | None = None,
        *,
        top_k: int = 5,
        hold_norms: bool = True,
        seed: int = 0,
        batch_size: int = 32,
    ):
        super().__init__(encoder)
        self.top_k = positive_int("top_k", top_k)
        self.hold_norms = boolean("hold_norms", hold_norms)
        self.seed = integer("seed", seed)
        self.batch_size = positive_int("batch_size", batch_size)
        self.layer, self.target_layer = resolve_layer(encoder, layer)
        self.reshape: Callable[[torch.Tensor], torch.Tensor] = cam_reshape(encoder, self.layer) or _unchanged

    def augmented_views(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → the views ``reference="augmented"`` pairs ``images`` with
        (:func:`~sslens.explain.gradcam.flip_and_crop` with a generator seeded with ``seed``)."""
        return flip_and_crop(images.detach().cpu(), torch.Generator().manual_seed(self.seed)).to(images.device)

    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (B, D), the layer's raw output) of one forward pass."""
        with _recorded_outputs(self.target_layer) as outputs:
            embeddings = self.encoder(images)
        if len(outputs) != 1:
            raise RuntimeError(
                f"Layer {self.layer!r} ran {len(outputs)} times in one forward pass; pick a layer "
                "that runs exactly once to produce the embedding."
            )
        return embeddings, outputs[0]

    def _as_map(self, output: torch.Tensor) -> torch.Tensor:
        grid = self.reshape(output)
        if grid.ndim != 4:
            raise ValueError(
                f"Layer {self.layer!r} outputs shape {tuple(output.shape)}, not a (B, C, h, w) feature "
                "map; pick a convolutional layer or a ViT block the backbone lists in layer_names."
            )
        return grid

    def _pair(
        self, images_a: torch.Tensor, images_b: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int], torch.Tensor]:
        """(M (B, h·w, h'·w'), grid of A, grid of B, similarities (B,)) of image pairs."""
        # Autograd is needed also when the caller runs under no_grad or inference_mode; clones
        # turn the caller's inference tensors into ones autograd can save.
        with torch.inference_mode(False), torch.enable_grad():
            embeddings_a, output_a = self._features(images_a.detach().clone().requires_grad_(True))
            embeddings_b, output_b = self._features(images_b.detach().clone().requires_grad_(True))
            similarity = F.cosine_similarity(embeddings_a, embeddings_b, dim=1)
            if self.hold_norms:
                # The same value as the cosine; only its gradient treats the norms as constants.
                norms = embeddings_a.norm(dim=1).detach() * embeddings_b.norm(dim=1).detach()
                target = (embeddings_a * embeddings_b).sum(dim=1) / norms
            else:
                target = similarity
            gradient_a, gradient_b = torch.autograd.grad(
                target.sum(), [output_a, output_b], allow_unused=True
            )
        if gradient_a is None or gradient_b is None:
            raise RuntimeError(
                f"The embedding does not depend on layer {self.layer!r} through a differentiable path; "
                "pick a layer that the embedding is computed from."
            )
        features_a, features_b = self._as_map(output_a.detach()), self._as_map(output_b.detach())
        matrix = correspondence_matrix(features_a, self.reshape(gradient_a), features_b, self.reshape(gradient_b))
        return matrix, tuple(features_a.shape[-2:]), tuple(features_b.shape[-2:]), similarity.detach()

    def explain(
        self,
        images: torch.Tensor,
        reference: torch.Tensor | str | None = None,
        reference_set: torch.Tensor | None = None,
    ) -> Explanation:
        if reference_set is not None:
            raise ValueError(
                "Correspondence pairs each image with one reference image; a reference_set's mean "
                "embedding has no feature map to match. Pass reference= images or 'augmented'."
            )
        if reference is None:
            raise ValueError(
                "Pass reference= (a (B or 1, 3, H, W) image tensor, or 'augmented' for a seeded "
                "augmented view of each image): correspondence maps explain image pairs."
            )
        info = {
            "method": "correspondence", "layer": self.layer, "hold_norms": self.hold_norms,
            "seed": self.seed, "mode": "reference",
        }
        if isinstance(reference, str):
            if reference != "augmented":
                raise ValueError(f"reference must be a tensor or 'augmented'; got {reference!r}")
            reference, info["mode"] = self.augmented_views(images), "augmented"
        _check_references(reference, len(images))
        reference = reference.expand(len(images), -1, -1, -1)
        self.encoder.eval()
        # Gradients flow to the layer's output only: with every parameter frozen, no .grad is touched.
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
        maps_a, maps_b, matches, similarities = [], [], [], []
        for chunk_a, chunk_b in zip(images.split(self.batch_size), reference.split(self.batch_size), strict=True):
            matrix, grid_a, grid_b, similarity = self._pair(chunk_a, chunk_b)
            positive = matrix.clamp(min=0)
            maps_a.append(_upsampled(positive.sum(dim=2), grid_a, tuple(chunk_a.shape[-2:])))
            maps_b.append(_upsampled(positive.sum(dim=1), grid_b, tuple(chunk_b.shape[-2:])))
            matches.extend(_top_matches(matrix, grid_a, grid_b, self.top_k))
            similarities.append(similarity)
        info |= {
            "top_k": min(self.top_k, grid_a[0] * grid_a[1] * grid_b[0] * grid_b[1]),
            "grid": list(grid_a), "reference_grid": list(grid_b),
            "similarity": torch.cat(similarities).tolist(), "matches": matches,
        }
        return Explanation(importance=torch.cat(maps_a), components={"reference": torch.cat(maps_b)}, info=info)


def _upsampled(cells: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(B, h·w) cell scores → (B, H, W) float32 on the CPU, bilinearly."""
    maps = cells.reshape(len(cells), 1, *grid)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0].float().cpu()


def cell_boxes(cells: Sequence[Sequence[int]], grid: Sequence[int], size: Sequence[int]) -> list[tuple[float, ...]]:
    """(top, left, bottom, right) in px of each (row, col) cell of an (h, w) ``grid`` laid over an
    image of ``size`` (H, W): cell (r, c) covers rows r·H/h … (r+1)·H/h and columns c·W/w … (c+1)·W/w.
    For drawing ``info["matches"]`` (``cell`` on ``grid``, ``reference_cell`` on ``reference_grid``)."""
    height, width = size[0] / grid[0], size[1] / grid[1]
    return [(row * height, col * width, (row + 1) * height, (col + 1) * width) for row, col in cells]


def _top_matches(matrix: torch.Tensor, grid_a: tuple[int, int], grid_b: tuple[int, int], top_k: int) -> list[list[dict]]:
    """Per pair, the ``top_k`` largest entries of M (B, h·w, h'·w') as cell pairs, best first."""
    scores, indices = matrix.flatten(1).topk(min(top_k, matrix[0].numel()), dim=1)
    cells_b = grid_b[0] * grid_b[1]
    return [
        [
            {
                "cell": list(divmod(index // cells_b, grid_a[1])),
                "reference_cell": list(divmod(index % cells_b, grid_b[1])),
                "score": score,
            }
            for score, index in zip(pair_scores, pair_indices, strict=True)
        ]
        for pair_scores, pair_indices in zip(scores.tolist(), indices.tolist(), strict=True)
    ]


def _check_references(reference: object, batch: int) -> None:
    if not torch.is_tensor(reference) or reference.ndim != 4 or reference.shape[1] != 3:
        shape = tuple(reference.shape) if torch.is_tensor(reference) else type(reference).__name__
        raise ValueError(f"reference must be an (N, 3, H, W) image tensor; got {shape}")
    if len(reference) not in (1, batch):
        raise ValueError(
            f"reference holds {len(reference)} images for {batch} explained images; pass one per image or a single one."
        )
