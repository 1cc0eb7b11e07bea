"""ViT attention maps (rollout, CLS attention, gradient-weighted attention) against hand-built
attention stacks and a ViT run by hand from its weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslens.errors import UserError
from sslens.explain.attention import (
    AttentionRollout,
    CLSAttention,
    GradientAttention,
    attention_rollout,
    gradient_weighted_rollout,
    recorded_attention,
)
from sslens.explain.base import EXPLAINERS, create_explainer, explainer_names, has_hooks
from sslens.models import create_backbone

timm = pytest.importorskip("timm")

from sslens.models.timm_backbone import TimmBackbone  # noqa: E402  (after the timm skip)

torch.set_num_threads(1)

TINY = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}
NAMES = ("rollout", "cls-attention", "gradient-attention")


def tiny_vit(**options) -> TimmBackbone:
    """A 2-block ViT on a 4x4 patch grid whose attention is far from uniform (timm's default
    initialisation gives nearly flat attention, which would hide a wrong row or column)."""
    torch.manual_seed(0)
    backbone = TimmBackbone("vit_tiny_patch16_224", **(TINY | options))
    with torch.no_grad():
        for block in backbone.model.blocks:
            block.attn.qkv.weight.normal_(0, 0.4)
    return backbone.eval()


@pytest.fixture(scope="module")
def vit() -> TimmBackbone:
    return tiny_vit()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def manual_forward(backbone: TimmBackbone, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(embedding, attentions) of the ViT computed from its weights: A = softmax(q kᵀ / √d) per
    block, the blocks' residual sums written out, the class token as the embedding."""
    model = backbone.model
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    attentions = []
    for block in model.blocks:
        batch, tokens, channels = x.shape
        heads = block.attn.num_heads
        qkv = F.linear(block.norm1(x), block.attn.qkv.weight, block.attn.qkv.bias)
        q, k, v = qkv.reshape(batch, tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) / (channels // heads) ** 0.5, dim=-1)
        attentions.append(attention)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, tokens, channels)
        x = x + block.attn.proj(mixed)
        x = x + block.mlp(block.norm2(x))
    return model.norm(x)[:, 0], attentions


def to_image(row: torch.Tensor, size: int = 16) -> torch.Tensor:
    """(B, 1 + 16) a class token's row → (B, size, size): patch columns on the 4x4 grid, upsampled."""
    grid = row[:, 1:].reshape(len(row), 1, 4, 4)
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def assert_maps_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert expected.std() > 0, "a flat reference map would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_rollout_of_a_hand_built_stack():
    # Block 1: token 0 splits its attention, token 1 attends to itself; block 2 swaps them.
    first = torch.tensor([[0.5, 0.5], [0.0, 1.0]])[None, None]
    second = torch.tensor([[0.0, 1.0], [1.0, 0.0]])[None, None]
    # (A + I) / 2: [[.75, .25], [0, 1]] and [[.5, .5], [.5, .5]]; their product, second @ first:
    expected = torch.tensor([[[0.375, 0.625], [0.375, 0.625]]])
    assert torch.equal(attention_rollout([first, second]), expected)
    # The order matters: first @ second is another matrix.
    assert not torch.equal(attention_rollout([second, first]), expected)

    identity, swap = torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    two_heads = torch.stack([identity, swap])[None]  # (1, 2, 2, 2)
    # Mean of the heads is uniform: (0.5 + 1, 0.5) / 2. Max is all ones: (1 + 1, 1) / 3.
    assert torch.equal(attention_rollout([two_heads]), torch.tensor([[[0.75, 0.25], [0.25, 0.75]]]))
    torch.testing.assert_close(
        attention_rollout([two_heads], head_fusion="max"), torch.tensor([[[2 / 3, 1 / 3], [1 / 3, 2 / 3]]])
    )
    with pytest.raises(ValueError, match="Unknown head fusion 'maximum'. Did you mean 'max'"):
        attention_rollout([two_heads], head_fusion="maximum")


def test_gradient_weighted_rollout_of_a_hand_built_stack():
    attention = torch.tensor([[0.5, 0.5], [0.25, 0.75]])[None, None].expand(1, 2, 2, 2)
    gradient = torch.stack([torch.tensor([[2.0, -2.0], [4.0, 0.0]]), torch.tensor([[-2.0, 2.0], [0.0, 4.0]])])[None]
    # (∇A ⊙ A)⁺ per head: [[1, 0], [1, 0]] and [[0, 1], [0, 3]]; their mean Ā = [[.5, .5], [.5, 1.5]].
    # R = I + Ā·I, then R + Ā·R = (I + Ā)².
    first = torch.tensor([[[1.5, 0.5], [0.5, 2.5]]])
    assert torch.equal(gradient_weighted_rollout([attention], [gradient]), first)
    assert torch.equal(gradient_weighted_rollout([attention] * 2, [gradient] * 2), first @ first)


def test_recorded_attention_is_softmax_of_q_k_from_the_qkv_weights(vit, images):
    blocks = [block.attn for block in vit.model.blocks]
    assert all(module.fused_attn for module in blocks), "timm should use its fused kernel here"
    with torch.no_grad(), recorded_attention(vit.model) as recorded:
        vit(images)
        _, expected = manual_forward(vit, images)
    assert len(recorded) == 2 and recorded[0].shape == (3, 2, 17, 17)
    for got, want in zip(recorded, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert want[0, 0].max() > 0.2, "attention this peaked tells rows and columns apart"
    assert all(module.fused_attn for module in blocks) and not has_hooks(vit)


def test_cls_attention_is_the_last_blocks_class_token_row_per_head(vit, images):
    explanation = CLSAttention(vit)(images)
    with torch.no_grad():
        _, attentions = manual_forward(vit, images)
    last = attentions[-1]
    assert sorted(explanation.components) == ["head0", "head1"]
    for head in range(2):
        assert_maps_equal(explanation.components[f"head{head}"], to_image(last[:, head, 0]))
    assert_maps_equal(explanation.importance, to_image(last[:, :, 0].mean(dim=1)))
    assert explanation.importance.dtype == torch.float32 and explanation.importance.shape == (3, 16, 16)


@pytest.mark.parametrize("head_fusion", ["mean", "max"])
def test_rollout_explainer_multiplies_the_vits_attention(vit, images, head_fusion):
    with torch.no_grad():
        _, attentions = manual_forward(vit, images)
    rollout = torch.eye(17).expand(3, 17, 17)
    for attention in attentions:
        fused = attention.mean(dim=1) if head_fusion == "mean" else attention.amax(dim=1)
        fused = fused + torch.eye(17)
        rollout = (fused / fused.sum(dim=-1, keepdim=True)) @ rollout
    explanation = AttentionRollout(vit, head_fusion=head_fusion)(images)
    assert_maps_equal(explanation.importance, to_image(rollout[:, 0]))
    assert explanation.info["head_fusion"] == head_fusion


def test_gradient_attention_matches_autograd_on_a_vit_run_by_hand(vit, images):
    references = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference_embeddings = vit(references)
    embedding, attentions = manual_forward(vit, images)
    torch.testing.assert_close(embedding, vit(images), rtol=1e-4, atol=1e-5)
    similarity = F.cosine_similarity(embedding, reference_embeddings, dim=1)
    gradients = torch.autograd.grad(similarity.sum(), attentions)
    relevance = torch.eye(17).expand(3, 17, 17)
    for attention, gradient in zip(attentions, gradients, strict=True):
        relevance = relevance + (gradient * attention).clamp(min=0).mean(dim=1) @ relevance
    explanation = GradientAttention(vit)(images, reference=references)
    assert_maps_equal(explanation.importance, to_image(relevance[:, 0]).detach())
    assert explanation.info["similarity"] == pytest.approx(similarity.tolist(), abs=1e-5)
    assert explanation.info["mode"] == "reference"


def test_gradient_attention_reference_modes(vit, images):
    explainer = GradientAttention(vit, seed=3)
    augmented = explainer(images, reference="augmented")
    direct = explainer(images, reference=explainer.augmented_views(images))
    assert torch.equal(augmented.importance, direct.importance)
    assert augmented.info["mode"] == "augmented" and augmented.info["seed"] == 3
    members = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mean = F.normalize(vit(members), dim=1).mean(dim=0)
    from_set = explainer(images, reference_set=members)
    assert from_set.info["similarity"] == pytest.approx(F.cosine_similarity(vit(images), mean[None]).tolist(), abs=1e-5)
    assert from_set.info["reference_set_size"] == 4
    with pytest.raises(ValueError, match="exactly one of reference"):
        explainer(images)
    with pytest.raises(ValueError, match="one per image or a single one"):
        explainer(images, reference=images[:2])


@pytest.mark.parametrize("name", NAMES)
def test_a_batch_gives_the_maps_of_each_image_alone(vit, images, name):
    kwargs = {"reference": images.flip(-1)} if name == "gradient-attention" else {}
    batched = EXPLAINERS.create(name, vit, batch_size=2)(images, **kwargs)
    for i in range(len(images)):
        single_kwargs = {key: value[i : i + 1] for key, value in kwargs.items()}
        alone = EXPLAINERS.create(name, vit)(images[i : i + 1], **single_kwargs)
        torch.testing.assert_close(batched.importance[i : i + 1], alone.importance, rtol=1e-5, atol=1e-7)
        for component, maps in alone.components.items():
            torch.testing.assert_close(batched.components[component][i : i + 1], maps, rtol=1e-5, atol=1e-7)


def test_average_pooled_vit_reads_the_mean_of_its_patch_rows(images):
    # A class and a register token before the patches, on a 4x2 grid (a swapped grid would show).
    backbone = tiny_vit(global_pool="avg", reg_tokens=1, img_size=(16, 8))
    narrow = images[..., :8]
    with recorded_attention(backbone.model) as attentions, torch.no_grad():
        backbone(narrow)
    rollout = attention_rollout(attentions)
    grid = rollout[:, 2:, 2:].mean(dim=1).reshape(3, 1, 4, 2)
    expected = F.interpolate(grid, size=(16, 8), mode="bilinear", align_corners=False)[:, 0]
    assert_maps_equal(AttentionRollout(backbone)(narrow).importance, expected)
    with pytest.raises(ValueError, match="pools its tokens with 'max'"):
        AttentionRollout(tiny_vit(global_pool="max"))


class Exploding(nn.Module):
    """Runs the ViT, then raises on its ``fail_on_call``-th forward: the attention was recorded
    (flags flipped, hooks on) when the exception escapes."""

    def __init__(self, backbone: nn.Module, fail_on_call: int):
        super().__init__()
        self.backbone = backbone
        self.fail_on_call = fail_on_call
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        embedding = self.backbone(x)
        if self.calls == self.fail_on_call:
            raise RuntimeError("boom after the attention ran")
        return embedding


def _caller_state(model: nn.Module):
    return (
        {name: m.training for name, m in model.named_modules()},
        {name: p.requires_grad for name, p in model.named_parameters()},
        [name for name, p in model.named_parameters() if p.grad is not None],
        [block.attn.fused_attn for block in model.model.blocks],
    )


@pytest.mark.parametrize(("name", "fail_on_call"), [("rollout", 1), ("cls-attention", 1), ("gradient-attention", 2)])
def test_callers_model_untouched_after_success_and_exception(images, name, fail_on_call):
    backbone = tiny_vit().train()
    backbone.model.blocks[0].eval()
    backbone.model.patch_embed.requires_grad_(False)
    backbone.model.blocks[1].attn.fused_attn = False  # a caller's mixed flags come back as they were
    before = _caller_state(backbone)
    assert before[2] == []
    kwargs = {"reference": images.flip(-1)} if name == "gradient-attention" else {}
    model = Exploding(backbone, fail_on_call)
    with pytest.raises(RuntimeError, match="boom"):
        EXPLAINERS.create(name, model)(images, **kwargs)
    assert model.calls == fail_on_call
    assert _caller_state(backbone) == before and not has_hooks(backbone)
    EXPLAINERS.create(name, model)(images, **kwargs)
    assert _caller_state(backbone) == before and not has_hooks(backbone)


def test_create_explainer_and_mistyped_options(vit, images):
    assert set(NAMES) <= set(explainer_names())
    explanation = create_explainer("rollout", vit, {"head_fusion": "max"})(images)
    assert explanation.info["head_fusion"] == "max"
    with pytest.raises(UserError, match="Option 'head_fusoin' does not apply .* Did you mean 'head_fusion'"):
        create_explainer("rollout", vit, {"head_fusoin": "max"})
    with pytest.raises(UserError, match="Invalid options for the rollout explainer: Unknown head fusion"):
        create_explainer("rollout", vit, {"head_fusion": "median"})
    with pytest.raises(UserError, match="batch_size must be a positive integer"):
        create_explainer("cls-attention", vit, {"batch_size": 0})
    with pytest.raises(UserError, match="holds no attention blocks"):
        create_explainer("gradient-attention", create_backbone("resnet-tiny"), {"seed": 1})
