"""Vision Transformers through TimmBackbone: Grad-CAM on the token grid, RELAX, model directories."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslens.explain import create_explainer
from sslens.explain.base import EXPLAINERS
from sslens.explain.gradcam import SimilarityCAM

timm = pytest.importorskip("timm")

from sslens.methods.imported import ImportedMethod  # noqa: E402  (after the timm skip)
from sslens.models.timm_backbone import TimmBackbone  # noqa: E402

torch.set_num_threads(1)

TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def tiny_vit(**options) -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone("vit_tiny_patch16_224", **TINY, **options).eval()


def formula_map(backbone: TimmBackbone, layer: str, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """ReLU(Σ_k α_k A^k) on the patch-token grid, α_k = grid mean of ∂cos(f(x), ref)/∂A^k."""
    captured = []
    module = backbone.model.get_submodule(layer)
    handle = module.register_forward_hook(lambda m, inputs, output: captured.append(output))
    try:
        embedding = backbone(x.clone().requires_grad_(True))
    finally:
        handle.remove()
    tokens = captured[0]
    (grads,) = torch.autograd.grad(F.cosine_similarity(embedding, ref, dim=1).sum(), tokens)

    def grid(t: torch.Tensor) -> torch.Tensor:  # (B, prefix + 16, C) → (B, C, 4, 4), written out
        return t[:, backbone.num_prefix_tokens :].reshape(len(t), 4, 4, -1).permute(0, 3, 1, 2)

    activations, gradients = grid(tokens), grid(grads)
    alpha = gradients.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((alpha * activations).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].detach()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def references() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_layers_and_prefix_tokens():
    backbone = tiny_vit(reg_tokens=2)
    assert backbone.num_prefix_tokens == 3  # class token + 2 register tokens
    assert backbone.layer_names == ("blocks.0", "blocks.1", "blocks.1.norm1")
    assert backbone.feature_dim == 32
    assert backbone.forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 32, 4, 4)
    with pytest.raises(ValueError, match="Valid layer names: blocks.0, blocks.1"):
        backbone.get_layer("layer4")
    with pytest.raises(ValueError, match="Unknown timm model"):
        TimmBackbone("vit_tinyy_patch16_224")


@pytest.mark.parametrize("layer", ["blocks.0", "blocks.1"])
def test_gradcam_matches_formula_on_token_grid(images, references, layer):
    # Average pooling over patch tokens, with register tokens that must be dropped.
    backbone = tiny_vit(global_pool="avg", reg_tokens=2)
    with torch.no_grad():
        ref_embeddings = backbone(references)
    expected = formula_map(backbone, layer, images, ref_embeddings)
    actual = SimilarityCAM(backbone, cam="gradcam", layer=layer)(images, reference=references).importance
    assert expected.abs().max() > 0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_class_token_vit_defaults_to_last_norm1(images, references):
    backbone = tiny_vit()  # global_pool="token"
    cam = SimilarityCAM(backbone, cam="gradcam")
    assert cam.layer == "blocks.1.norm1"
    with torch.no_grad():
        ref_embeddings = backbone(references)
    expected = formula_map(backbone, "blocks.1.norm1", images, ref_embeddings)
    assert expected.abs().max() > 0
    torch.testing.assert_close(cam(images, reference=references).importance, expected,
                               rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    # Why: after the last block only the class token is read, so its patch tokens get no gradient.
    last = SimilarityCAM(backbone, cam="gradcam", layer="blocks.1")(images, reference=references)
    assert torch.count_nonzero(last.importance) == 0


def test_eigencam_and_relax_run_on_a_vit(images):
    backbone = tiny_vit()
    eigen = EXPLAINERS.create("eigencam", backbone)(images, reference="augmented").importance
    assert eigen.shape == (2, 32, 32) and torch.isfinite(eigen).all()
    # The registry fills itself on the first lookup: this file alone never imports relax.
    relax = create_explainer("relax", backbone, {"num_masks": 40, "batch_size": 20, "amp": False})(images)
    assert relax.importance.shape == (2, 32, 32) and torch.isfinite(relax.importance).all()
    assert relax.importance.std() > 0


def test_vit_model_directory_round_trip(tmp_path):
    from sslens.store import load_model, provenance, save_model

    backbone = tiny_vit()
    head = [["linear", 32, 16, True], ["relu"], ["linear", 16, 8, True]]
    method = ImportedMethod(backbone, head=head, num_prototypes=5)
    meta = {
        "method": "imported", "method_options": {"head": head, "num_prototypes": 5},
        "backbone": "timm", "backbone_options": {"model_name": "vit_tiny_patch16_224", **TINY},
        "image_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "class_names": [],
        "data": "test", "epoch": None, "step": None, **provenance(),
    }
    loaded, _ = load_model(save_model(tmp_path / "vit", method, meta))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for output in ("pooled", "projection", "prototypes"):
            torch.testing.assert_close(loaded.encoder(output)(x), method.eval().encoder(output)(x), rtol=0, atol=0)
