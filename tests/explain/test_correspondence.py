"""Correspondence maps against an explicit autograd computation of M = (G_A ⊙ F_A)ᵀ (G_B ⊙ F_B)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslens.errors import UserError
from sslens.explain.base import create_explainer, has_hooks
from sslens.explain.correspondence import Correspondence
from sslens.models import create_backbone
from sslens.models.base import Backbone

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    torch.manual_seed(0)
    model = create_backbone("resnet-tiny")
    # Non-trivial BatchNorm statistics, so eval mode differs from train mode.
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))
    return model.eval()


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=generator), torch.randn(3, 3, 32, 32, generator=generator)


def explicit(encoder: nn.Module, layer: nn.Module, a: torch.Tensor, b: torch.Tensor, grid=lambda t: t, hold_norms=True):
    """(M, A's map, B's map) written out: two forwards, s = cos(f(A), f(B)), autograd gradients
    (with the norms as constants: s = ⟨f(A), f(B)⟩ / (‖f(A)‖ ‖f(B)‖) with detached norms)."""
    outputs = []
    handle = layer.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    try:
        embedding_a = encoder(a.clone().requires_grad_(True))
        embedding_b = encoder(b.clone().requires_grad_(True))
    finally:
        handle.remove()
    if hold_norms:
        norm_a, norm_b = embedding_a.norm(dim=1).detach(), embedding_b.norm(dim=1).detach()
        similarity = ((embedding_a / norm_a[:, None]) * (embedding_b / norm_b[:, None])).sum()
    else:
        similarity = F.cosine_similarity(embedding_a, embedding_b, dim=1).sum()
    gradient_a, gradient_b = torch.autograd.grad(similarity, outputs)
    features_a, features_b = grid(outputs[0]).detach(), grid(outputs[1]).detach()
    gradient_a, gradient_b = grid(gradient_a), grid(gradient_b)
    matrix = torch.einsum("bcxy,bcuv->bxyuv", gradient_a * features_a, gradient_b * features_b)
    positive = matrix.clamp(min=0)
    map_a = F.interpolate(positive.sum(dim=(3, 4))[:, None], size=a.shape[-2:], mode="bilinear", align_corners=False)
    map_b = F.interpolate(positive.sum(dim=(1, 2))[:, None], size=b.shape[-2:], mode="bilinear", align_corners=False)
    return matrix, map_a[:, 0], map_b[:, 0]


def assert_maps_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert expected.std() > 0, "a flat reference map would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def assert_top_matches(matches: list[list[dict]], matrix: torch.Tensor, top_k: int) -> None:
    """Each pair's matches are the top_k entries of the (B, h, w, h', w') matrix, best first."""
    for pair_matches, pair_matrix in zip(matches, matrix, strict=True):
        expected = pair_matrix.flatten().sort(descending=True).values[:top_k]
        assert [m["score"] for m in pair_matches] == pytest.approx(expected.tolist(), rel=1e-5)
        for match in pair_matches:
            assert pair_matrix[(*match["cell"], *match["reference_cell"])].item() == pytest.approx(match["score"], rel=1e-5)


@pytest.mark.parametrize(("layer", "hold_norms"), [("layer3", True), ("layer4", True), ("layer3", False)])
def test_matches_the_explicit_computation_with_a_differently_sized_reference(backbone, pair, layer, hold_norms):
    # Non-square grids of different sizes, so a swapped row and column or A and B shows.
    images = pair[0][..., :24]
    references = torch.randn(3, 3, 24, 16, generator=torch.Generator().manual_seed(2))
    explanation = Correspondence(backbone, layer=layer, top_k=4, hold_norms=hold_norms)(images, reference=references)
    matrix, map_a, map_b = explicit(backbone, backbone.get_layer(layer), images, references, hold_norms=hold_norms)
    assert explanation.importance.shape == (3, 32, 24) and explanation.components["reference"].shape == (3, 24, 16)
    assert_maps_equal(explanation.importance, map_a)
    assert_maps_equal(explanation.components["reference"], map_b)
    assert explanation.info["grid"] == list(matrix.shape[1:3]) and explanation.info["reference_grid"] == list(matrix.shape[3:])
    assert_top_matches(explanation.info["matches"], matrix, 4)
    expected_similarity = F.cosine_similarity(backbone(images), backbone(references), dim=1)
    assert explanation.info["similarity"] == pytest.approx(expected_similarity.tolist(), abs=1e-6)
    assert explanation.info["hold_norms"] is hold_norms


def test_held_norms_keep_the_pooled_layers_matches_positive(backbone, pair):
    # layer4 is global-average-pooled ReLU features, so with the norms held every G and F is >= 0
    # and M >= 0; the exact cosine gradient of these similar embeddings (cos > 0.9) is orthogonal
    # to them, so the channels' contributions in A and B have opposite signs and M⁺ nearly vanishes.
    images, references = pair
    held = Correspondence(backbone, layer="layer4")(images, reference=references)
    exact = Correspondence(backbone, layer="layer4", hold_norms=False)(images, reference=references)
    assert min(held.info["similarity"]) > 0.9
    held_matrix, _, _ = explicit(backbone, backbone.layer4, images, references)
    exact_matrix, _, _ = explicit(backbone, backbone.layer4, images, references, hold_norms=False)
    assert held_matrix.min() >= 0 and held_matrix.max() > 0 and held.importance.min() > 0
    assert (exact_matrix > 0).float().mean() < 0.05 and exact_matrix.min() < 0
    assert torch.count_nonzero(exact.importance) < 0.05 * exact.importance.numel()


def test_vit_tokens_are_laid_out_on_the_patch_grid(pair):
    pytest.importorskip("timm")
    from sslens.models.timm_backbone import TimmBackbone

    torch.manual_seed(0)
    vit = TimmBackbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2).eval()
    images, references = pair
    explanation = Correspondence(vit, top_k=3)(images, reference=references)
    assert explanation.info["layer"] == "blocks.1.norm1"

    def grid(tokens: torch.Tensor) -> torch.Tensor:  # (B, 1 + 16, C) → (B, C, 4, 4), class token dropped
        return tokens[:, 1:].reshape(len(tokens), 4, 4, -1).permute(0, 3, 1, 2)

    matrix, map_a, map_b = explicit(vit, vit.model.blocks[1].norm1, images, references, grid)
    assert_maps_equal(explanation.importance, map_a)
    assert_maps_equal(explanation.components["reference"], map_b)
    assert_top_matches(explanation.info["matches"], matrix, 3)


def test_swapping_the_images_swaps_the_maps_and_the_matches(backbone, pair):
    images, references = pair
    explainer = Correspondence(backbone, top_k=5)
    forward, backward = explainer(images, reference=references), explainer(references, reference=images)
    assert_maps_equal(backward.importance, forward.components["reference"])
    assert_maps_equal(backward.components["reference"], forward.importance)
    for there, back in zip(forward.info["matches"], backward.info["matches"], strict=True):
        assert [(m["reference_cell"], m["cell"]) for m in there] == [(m["cell"], m["reference_cell"]) for m in back]
    assert backward.info["similarity"] == pytest.approx(forward.info["similarity"], abs=1e-6)


def test_a_batch_gives_the_maps_of_each_pair_alone(backbone, pair):
    images, references = pair
    batched = Correspondence(backbone, batch_size=2)(images, reference=references)
    for i in range(len(images)):
        alone = Correspondence(backbone)(images[i : i + 1], reference=references[i : i + 1])
        torch.testing.assert_close(batched.importance[i : i + 1], alone.importance, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(
            batched.components["reference"][i : i + 1], alone.components["reference"], rtol=1e-5, atol=1e-8
        )
        assert [m["cell"] for m in batched.info["matches"][i]] == [m["cell"] for m in alone.info["matches"][0]]


def test_single_and_augmented_references(backbone, pair):
    images, references = pair
    single = Correspondence(backbone)(images, reference=references[:1])
    _, map_a, _ = explicit(backbone, backbone.layer4, images, references[:1].expand(3, -1, -1, -1))
    assert_maps_equal(single.importance, map_a)
    explainer = Correspondence(backbone, seed=5)
    augmented = explainer(images, reference="augmented")
    assert augmented.info["mode"] == "augmented" and augmented.info["seed"] == 5
    direct = explainer(images, reference=explainer.augmented_views(images))
    assert torch.equal(augmented.importance, direct.importance)
    assert not torch.equal(Correspondence(backbone, seed=6)(images, reference="augmented").importance, augmented.importance)


def test_top_k_is_capped_at_the_number_of_cell_pairs(backbone, pair):
    images, references = pair
    explanation = Correspondence(backbone, top_k=1000)(images[:1], reference=references[:1])
    assert explanation.info["top_k"] == 16 * 16 and len(explanation.info["matches"][0]) == 256


class Exploding(nn.Module):
    """Raises on its ``fail_on_call``-th forward, after the explained layer ran (hook on)."""

    def __init__(self, backbone: nn.Module, fail_on_call: int):
        super().__init__()
        self.backbone = backbone
        self.fail_on_call = fail_on_call
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        embedding = self.backbone(x)
        if self.calls == self.fail_on_call:
            raise RuntimeError("boom after the layer ran")
        return embedding


def _caller_state(model: nn.Module):
    return (
        {name: m.training for name, m in model.named_modules()},
        {name: p.requires_grad for name, p in model.named_parameters()},
        [name for name, p in model.named_parameters() if p.grad is not None],
    )


def test_callers_model_untouched_after_success_and_exception(pair):
    images, references = pair
    torch.manual_seed(0)
    backbone = create_backbone("resnet-tiny").train()
    backbone.layer1.eval()
    backbone.stem.requires_grad_(False)
    before = _caller_state(backbone)
    # Call 1 embeds A, call 2 embeds B: the exception escapes with the hook on the layer.
    model = Exploding(backbone, fail_on_call=2)
    with pytest.raises(RuntimeError, match="boom"):
        Correspondence(model, layer="backbone.layer4")(images, reference=references)
    assert model.calls == 2
    assert _caller_state(backbone) == before and not has_hooks(backbone)
    Correspondence(model, layer="backbone.layer4")(images, reference=references)
    assert _caller_state(backbone) == before and not has_hooks(backbone)


def test_options_and_references_are_checked(backbone, pair):
    images, references = pair
    explanation = create_explainer("correspondence", backbone, {"layer": "layer3", "top_k": 2})(images, reference=references)
    assert explanation.info["layer"] == "layer3" and len(explanation.info["matches"][0]) == 2
    with pytest.raises(UserError, match="Option 'topk' does not apply .* Did you mean 'top_k'"):
        create_explainer("correspondence", backbone, {"topk": 2})
    with pytest.raises(UserError, match="top_k must be a positive integer"):
        create_explainer("correspondence", backbone, {"top_k": 0})
    with pytest.raises(UserError, match="no layer 'layer9'"):
        create_explainer("correspondence", backbone, {"layer": "layer9"})
    explainer = Correspondence(backbone)
    with pytest.raises(ValueError, match="Pass reference="):
        explainer(images)
    with pytest.raises(ValueError, match="no feature map to match"):
        explainer(images, reference_set=references)
    with pytest.raises(ValueError, match="one per image or a single one"):
        explainer(images, reference=references[:2])
    with pytest.raises(ValueError, match="'augmented'"):
        explainer(images, reference="flipped")
