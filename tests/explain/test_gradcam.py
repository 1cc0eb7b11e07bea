"""Similarity Grad-CAM against a direct autograd computation of its formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslens.explain.base import EXPLAINERS, _hook_counts
from sslens.explain.gradcam import CAM_METHODS, SimilarityCAM, flip_and_crop, resolve_layer
from sslens.models import create_backbone
from sslens.models.base import Backbone

torch.set_num_threads(1)


def formula_map(encoder: nn.Module, layer: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """ReLU(Σ_k α_k A^k), α_k = mean_ij ∂cos(f(x), ref)/∂A^k_ij, upsampled; in eval mode."""
    captured = []
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        embedding = encoder(x.clone().requires_grad_(True))
    finally:
        handle.remove()
    activations = captured[0]
    similarity = F.cosine_similarity(embedding, ref.detach(), dim=1).sum()
    (grads,) = torch.autograd.grad(similarity, activations)
    return weighted(activations, grads, x.shape[-2:])


def weighted(activations: torch.Tensor, grads: torch.Tensor, size) -> torch.Tensor:
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((alpha * activations).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0].detach()


def assert_maps_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert expected.abs().max() > 0, "a degenerate all-zero reference map would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    torch.manual_seed(0)
    model = create_backbone("resnet-tiny")
    # Non-trivial BatchNorm statistics, so eval mode differs from train mode.
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 16, 16))
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layer", ["layer3", "layer4"])
def test_gradcam_matches_formula_with_reference_images(backbone, images, layer):
    refs = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    explanation = SimilarityCAM(backbone, layer=layer)(images, reference=refs)
    with torch.no_grad():
        ref_embeddings = backbone(refs)
    expected = formula_map(backbone, backbone.get_layer(layer), images, ref_embeddings)
    assert explanation.importance.shape == (3, 16, 16)
    assert explanation.importance.dtype == torch.float32
    assert_maps_equal(explanation.importance, expected)
    expected_sim = F.cosine_similarity(backbone(images), ref_embeddings, dim=1)
    assert explanation.info["similarity"] == pytest.approx(expected_sim.tolist(), abs=1e-6)
    assert explanation.info["layer"] == layer and explanation.info["mode"] == "reference"


def test_single_reference_is_broadcast_and_projection_encoder_resolves_layer4(backbone, images):
    encoder = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, 8))
    ref = torch.randn(1, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    explanation = SimilarityCAM(encoder, layer="layer3")(images, reference=ref)
    with torch.no_grad():
        ref_embedding = encoder(ref).expand(3, -1)
    assert_maps_equal(explanation.importance, formula_map(encoder, backbone.layer3, images, ref_embedding))
    assert SimilarityCAM(encoder).layer == "layer4"


def test_augmented_reference_matches_formula_and_is_seeded(backbone, images):
    explainer = SimilarityCAM(backbone, layer="layer3", seed=7)
    explanation = explainer(images, reference="augmented")
    view = flip_and_crop(images, torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref_embeddings = backbone(view)
    assert_maps_equal(explanation.importance, formula_map(backbone, backbone.layer3, images, ref_embeddings))
    assert torch.equal(explainer(images, reference="augmented").importance, explanation.importance)
    other = SimilarityCAM(backbone, layer="layer3", seed=8)(images, reference="augmented")
    assert other.info["similarity"] != explanation.info["similarity"]


def test_custom_augmentation_is_used(backbone, images):
    flipped = SimilarityCAM(backbone, augment=lambda x, generator: x.flip(-1))(images, reference="augmented")
    direct = SimilarityCAM(backbone)(images, reference=images.flip(-1))
    assert torch.equal(flipped.importance, direct.importance)


def test_reference_set_uses_mean_of_normalised_embeddings(backbone, images):
    members = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    explanation = SimilarityCAM(backbone, layer="layer3", batch_size=2)(images, reference_set=members)
    with torch.no_grad():
        mean = F.normalize(backbone(members), dim=1).mean(dim=0).expand(3, -1)
    assert_maps_equal(explanation.importance, formula_map(backbone, backbone.layer3, images, mean))
    assert explanation.info["mode"] == "reference_set" and explanation.info["reference_set_size"] == 5


def test_symmetric_pairs_each_images_own_activations_and_gradients(backbone, images):
    refs = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    explanation = SimilarityCAM(backbone, layer="layer3", symmetric=True)(images, reference=refs)
    # Direct: one forward of both images, s = cos(f(x), f(r)) with gradient through both.
    captured = []
    handle = backbone.layer3.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        embeddings = backbone(torch.cat([images, refs]).requires_grad_(True))
    finally:
        handle.remove()
    activations = captured[0]
    similarity = F.cosine_similarity(embeddings[:3], embeddings[3:], dim=1).sum()
    (grads,) = torch.autograd.grad(similarity, activations)
    map_x = weighted(activations[:3], grads[:3], (16, 16))
    map_r = weighted(activations[3:], grads[3:], (16, 16))
    assert_maps_equal(explanation.importance, map_x)
    assert_maps_equal(explanation.components["reference"], map_r)
    # The pairing matters: the image's activations with the reference's gradients differ.
    swapped = weighted(activations[:3], grads[3:], (16, 16))
    assert not torch.allclose(swapped, map_x, rtol=1e-3, atol=1e-3 * float(map_x.max()))


class Conv1x1(Backbone):
    """f(x) = GAP(conv1x1(x)): the layer output at input resolution, so no interpolation."""

    layer_names = ("conv",)
    feature_dim = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_raw_scale_is_kept():
    # Tiling the image twice side by side leaves the embedding unchanged but halves every
    # ∂s/∂A (the pooled mean spreads over twice the pixels), so the raw map is the tiled map
    # divided by 2 exactly. A min-max rescaled map would not halve.
    torch.manual_seed(0)
    model = Conv1x1()
    x = torch.randn(2, 3, 6, 6)
    ref = torch.randn(2, 3, 6, 6)
    single = SimilarityCAM(model)(x, reference=ref).importance
    tiled = SimilarityCAM(model)(torch.cat([x, x], dim=-1), reference=ref).importance
    assert single.max() > 0
    torch.testing.assert_close(tiled, torch.cat([single, single], dim=-1) / 2, rtol=1e-5, atol=1e-8)


def test_identical_reference_gives_zero_map(backbone, images):
    # cos(f(x), f(x)) is at its maximum, so every gradient vanishes: the raw map is all zeros.
    explanation = SimilarityCAM(backbone)(images, reference=images)
    assert explanation.importance.abs().max() < 1e-6


class Exploding(nn.Module):
    """Wraps a backbone; its ``calls``-th forward raises, to test cleanup mid-computation."""

    def __init__(self, backbone: nn.Module, fail_on_call: int):
        super().__init__()
        self.backbone = backbone
        self.fail_on_call = fail_on_call
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("boom inside the forward pass")
        return self.backbone(x)


def _caller_state(model: nn.Module):
    return (
        {name: m.training for name, m in model.named_modules()},
        {name: p.requires_grad for name, p in model.named_parameters()},
        {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()},
    )


@pytest.mark.parametrize("cam", ["gradcam", "scorecam"])
def test_caller_state_restored_after_success_and_exception(cam):
    torch.manual_seed(0)
    backbone = create_backbone("resnet-tiny").train()
    backbone.layer1.eval()
    backbone.stem.requires_grad_(False)
    backbone.layer4[0].conv1.weight.grad = torch.ones_like(backbone.layer4[0].conv1.weight)
    x = torch.randn(2, 3, 8, 8)
    hooks = _hook_counts(backbone)
    before = _caller_state(backbone)

    # Calls 1 and 2 embed the reference and the images; call 3 is the CAM's forward, with hooks on.
    model = Exploding(backbone, fail_on_call=3)
    with pytest.raises(RuntimeError, match="boom"):
        EXPLAINERS.create(cam, model)(x, reference=x.flip(-1))
    assert model.calls == 3
    for when in ("after the exception", "after success"):
        after = _caller_state(backbone)
        assert after[0] == before[0], when
        assert after[1] == before[1], when
        assert after[2].keys() == before[2].keys()
        for name, grad in before[2].items():
            assert (grad is None and after[2][name] is None) or torch.equal(grad, after[2][name]), name
        assert _hook_counts(backbone) == hooks, when
        assert all(len(m._forward_hooks) == 0 for m in backbone.modules()), when
        EXPLAINERS.create(cam, backbone)(x, reference=x.flip(-1))


def test_unknown_layer_lists_valid_names(backbone):
    with pytest.raises(ValueError, match="stem, layer1, layer2, layer3, layer4"):
        SimilarityCAM(backbone, layer="layer9")
    with pytest.raises(ValueError, match="Valid layer names: 0, 1"):
        resolve_layer(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "conv")
    with pytest.raises(ValueError, match="no submodules"):
        resolve_layer(nn.Flatten(), "conv")


def test_dotted_backbone_paths_resolve_through_a_projection_encoder(backbone):
    encoder = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, 8))
    assert resolve_layer(encoder, "layer4.0.conv2")[1] is backbone.layer4[0].conv2
    assert resolve_layer(encoder, "0.layer4.0.conv2")[1] is backbone.layer4[0].conv2


def test_a_layer_outside_the_embedding_is_named_in_the_error(images):
    class SideBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.unused = nn.Conv2d(4, 4, 3)
            self.ignored = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            self.ignored(x)  # runs, but the embedding does not depend on it
            return self.conv(x).mean(dim=(2, 3))

    with pytest.raises(RuntimeError, match="'unused' recorded no activation"):
        SimilarityCAM(SideBranch(), layer="unused")(images, reference="augmented")
    with pytest.raises(RuntimeError, match="'ignored' recorded no gradient"):
        SimilarityCAM(SideBranch(), layer="ignored")(images, reference="augmented")


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_inside_the_callers_no_grad_or_inference_mode(backbone, images, context):
    refs = images.flip(-1)
    expected = SimilarityCAM(backbone, layer="layer3", symmetric=True)(images, reference=refs)
    with context():
        # Tensors made in inference mode cannot be saved for backward unless cloned.
        inner_images, inner_refs = images.clone(), refs.clone()
        got = SimilarityCAM(backbone, layer="layer3", symmetric=True)(inner_images, reference=inner_refs)
    assert torch.equal(got.importance, expected.importance)
    assert torch.equal(got.components["reference"], expected.components["reference"])


def test_plain_module_uses_dotted_names_and_last_conv_by_default():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 5, 3), nn.ReLU()))
    assert resolve_layer(model, None)[0] == "2.0"
    assert resolve_layer(model, "0")[1] is model[0]
    assert resolve_layer(create_backbone("resnet-tiny"), "layer4.0.conv2")[0] == "layer4.0.conv2"


def test_bad_arguments_raise_with_a_fix(backbone, images):
    with pytest.raises(ValueError, match="Unknown CAM method 'gradcam3'. Did you mean 'gradcam'"):
        SimilarityCAM(backbone, cam="gradcam3")
    explainer = SimilarityCAM(backbone)
    with pytest.raises(ValueError, match="exactly one of reference"):
        explainer(images)
    with pytest.raises(ValueError, match="'augmented'"):
        explainer(images, reference="flipped")
    with pytest.raises(ValueError, match="one per image or a single one"):
        explainer(images, reference=images[:2])
    with pytest.raises(ValueError, match="needs reference images"):
        SimilarityCAM(backbone, symmetric=True)(images, reference_set=images)


@pytest.mark.parametrize("name", sorted(CAM_METHODS))
def test_every_registered_cam_gives_finite_raw_maps(backbone, images, name):
    explanation = EXPLAINERS.create(name, backbone, layer="layer3")(images[:2], reference="augmented")
    maps = explanation.importance
    assert maps.shape == (2, 16, 16)
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    assert explanation.info["method"] == name
