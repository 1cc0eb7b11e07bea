"""COCOA: the contrastive corpus target, IG through the shared core, masking, seeds, sets, state."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients
from torch import nn

from sslens.errors import UserError
from sslens.explain.base import EXPLAINERS, _hook_counts, create_explainer
from sslens.explain.baselines import make_baseline
from sslens.explain.cocoa import (
    CocoaGradients,
    CocoaMasking,
    cocoa_ig,
    contrastive_corpus_similarity,
    contrastive_direction,
)
from sslens.explain.engine import INITIAL_WEIGHT
from sslens.explain.masks import RelaxMasks

SIZE = 12


def tiny_encoder(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()).to(dtype)


def images(n: int, dtype: torch.dtype = torch.float64, seed: int = 1, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def as64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def explicit_target(encoder: nn.Module, corpus: torch.Tensor, foil: torch.Tensor):
    """The paper's sums: mean cosine similarity to every corpus image minus that to every foil image."""
    corpus_embeddings, foil_embeddings = encoder(corpus).detach(), encoder(foil).detach()

    def target(x: torch.Tensor) -> torch.Tensor:
        e = encoder(x)
        to_corpus = torch.stack([F.cosine_similarity(e, c[None], dim=1) for c in corpus_embeddings]).mean(0)
        to_foil = torch.stack([F.cosine_similarity(e, f[None], dim=1) for f in foil_embeddings]).mean(0)
        return to_corpus - to_foil

    return target


CORPUS, FOIL = images(4, seed=20), images(5, seed=30)


def test_the_target_equals_the_explicit_corpus_and_foil_sums():
    encoder, x = tiny_encoder(), images(3)
    direction = contrastive_direction(encoder(CORPUS).detach(), encoder(FOIL).detach())
    expected = explicit_target(encoder, CORPUS, FOIL)(x).detach()
    torch.testing.assert_close(contrastive_corpus_similarity(encoder(x).detach(), direction), expected)
    recorded = cocoa_ig(encoder, steps=4)(x, corpus=CORPUS, foil=FOIL).info["target"]
    torch.testing.assert_close(as64(recorded), expected)
    masked = CocoaMasking(encoder, num_masks=8, fast_inference=False)(x, corpus=CORPUS, foil=FOIL).info["target"]
    torch.testing.assert_close(as64(masked), expected)


def test_ig_equals_captum_on_the_explicit_target():
    """The IG core with COCOA's target agrees with Captum's IntegratedGradients on the paper's sums
    (to 1e-7 of the largest attribution in float64, as for the label-free target)."""
    encoder, x = tiny_encoder(), images(2)
    explanation = cocoa_ig(encoder, batch_size=16)(x, corpus=CORPUS, foil=FOIL)
    theirs = IntegratedGradients(explicit_target(encoder, CORPUS, FOIL)).attribute(x, baselines=torch.zeros_like(x))
    maps = theirs.sum(dim=1)
    assert (explanation.importance.double() - maps).abs().max() <= 1e-6 * maps.abs().max()
    info = explanation.info
    assert (info["method"], info["steps"], info["corpus_size"], info["foil_size"]) == ("cocoa-ig", 50, 4, 5)
    difference = as64(info["target"]) - as64(info["target_at_baseline"])
    assert (as64(info["completeness_gap"]).abs() < 0.01 * difference.abs()).all()


def test_masking_equals_the_explicit_weighted_sum_over_given_masks():
    encoder, x = tiny_encoder(), images(2)
    masks = torch.rand(20, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = explicit_target(encoder, CORPUS, FOIL)
    blurred = CocoaMasking(encoder, baseline="blur", blur_sigma=2.0, fast_inference=False, batch_size=7)
    explanation = blurred(x, corpus=CORPUS, foil=FOIL, masks=masks)
    baseline = make_baseline("blur", x, blur_sigma=2.0)
    for i in range(2):
        masked = x[i] * masks + baseline[i] * (1 - masks)  # (N, 3, H, W)
        scores = target(masked).detach()  # (N,)
        weight = INITIAL_WEIGHT + masks.sum(0)[0]
        importance = (scores[:, None, None] * masks[:, 0]).sum(0) / weight
        uncertainty = (masks[:, 0] * (scores[:, None, None] - importance) ** 2).sum(0) / weight
        torch.testing.assert_close(explanation.importance[i].double(), importance, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(explanation.uncertainty[i].double(), uncertainty, rtol=1e-4, atol=1e-8)
        assert explanation.info["mean_target"][i] == pytest.approx(scores.mean().item(), rel=1e-9)
    assert explanation.info["masks"] == "explicit" and explanation.info["num_masks_used"] == [20, 20]


def test_the_seed_fixes_the_masks():
    encoder, x = tiny_encoder(torch.float32), images(2, torch.float32)
    sets = {"corpus": CORPUS.float(), "foil": FOIL.float()}
    first = CocoaMasking(encoder, num_masks=200, seed=3)(x, **sets)
    again = CocoaMasking(encoder, num_masks=200, seed=3)(x, **sets)
    other = CocoaMasking(encoder, num_masks=200, seed=4)(x, **sets)
    assert torch.equal(first.importance, again.importance)
    assert not torch.allclose(first.importance, other.importance)
    assert first.info["seed"] == 3 and first.info["sampler"] == "orthogonal"
    # The seeded masks are RelaxMasks' (RELAX's) for that seed.
    masks = RelaxMasks(sampler="orthogonal")(200, (SIZE, SIZE), torch.Generator().manual_seed(3))
    given = CocoaMasking(encoder)(x, masks=masks, **sets)
    torch.testing.assert_close(first.importance, given.importance)
    json.dumps(first.info)


@pytest.mark.parametrize("name", ["cocoa-ig", "cocoa-masking"])
def test_a_batch_gives_the_maps_of_one_image_at_a_time(name):
    encoder, x = tiny_encoder(), images(3)
    options = {"batch_size": 5, **({"steps": 6} if name == "cocoa-ig" else {"num_masks": 40})}
    explainer = create_explainer(name, encoder, options)
    together = explainer(x, corpus=CORPUS, foil=FOIL).importance
    alone = torch.cat([explainer(x[i : i + 1], corpus=CORPUS, foil=FOIL).importance for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["cocoa-ig", "cocoa-masking"])
def test_sets_come_from_the_call_or_the_constructor_and_are_checked(name):
    encoder, x = tiny_encoder(), images(2)
    options = {"steps": 4} if name == "cocoa-ig" else {"num_masks": 16}
    built = create_explainer(name, encoder, {**options, "corpus": CORPUS, "foil": FOIL})
    other_corpus = images(3, seed=40, size=SIZE + 4)  # any size the encoder takes
    from_call = create_explainer(name, encoder, options)(x, corpus=other_corpus, foil=FOIL)
    # The call's corpus replaces the constructor's; the constructor's foil stays.
    torch.testing.assert_close(built(x, corpus=other_corpus).importance, from_call.importance)
    assert not torch.allclose(built(x).importance, from_call.importance)
    with pytest.raises(ValueError, match="COCOA needs a corpus set: pass corpus="):
        create_explainer(name, encoder, options)(x, foil=FOIL)
    with pytest.raises(ValueError, match="COCOA needs a foil set"):
        create_explainer(name, encoder, options)(x, corpus=CORPUS)
    with pytest.raises(ValueError, match=r"corpus must be a non-empty \(N, 3, H, W\) tensor"):
        built(x, corpus=CORPUS[0])
    with pytest.raises(ValueError, match="foil must be a non-empty"):
        built(x, foil=FOIL[:0])
    with pytest.raises(UserError, match=r"Invalid options for the .* foil must be a non-empty"):
        create_explainer(name, encoder, {**options, "foil": [1, 2, 3]})


def test_registered_names_build_through_create_explainer():
    encoder = tiny_encoder()
    assert isinstance(create_explainer("cocoa-ig", encoder, {"steps": 5}), CocoaGradients)
    assert EXPLAINERS.get("cocoa-masking") is CocoaMasking
    masking = create_explainer("cocoa-masking", encoder, {"num_masks": 64, "sampler": "iid"}, context={"seed": 7})
    assert (masking.num_masks, masking.seed, masking.mask_sampler.sampler) == (64, 7, "iid")
    with pytest.raises(UserError, match="Did you mean 'num_masks'"):
        create_explainer("cocoa-masking", encoder, {"num_mask": 64})
    with pytest.raises(UserError, match="Did you mean 'steps'"):
        create_explainer("cocoa-ig", encoder, {"step": 5})
    with pytest.raises(UserError, match="'seed' does not apply to the cocoa-ig"):
        create_explainer("cocoa-ig", encoder, {"seed": 1})
    with pytest.raises(UserError, match="num_masks must be a positive integer"):
        create_explainer("cocoa-masking", encoder, {"num_masks": 0})


class Exploding(nn.Module):
    """The caller's model, failing on its ``fail_on_call``-th forward pass."""

    def __init__(self, model: nn.Module, fail_on_call: int):
        super().__init__()
        self.model, self.fail_on_call, self.calls = model, fail_on_call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("boom inside the forward pass")
        return self.model(x)


def _state(model: nn.Module):
    return (
        {name: m.training for name, m in model.named_modules()},
        {name: p.requires_grad for name, p in model.named_parameters()},
        {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()},
        _hook_counts(model),
    )


@pytest.mark.parametrize(("name", "options", "fail_on_call"), [
    ("cocoa-ig", {"steps": 4}, 4),  # call 1 embeds the images, 2-3 the corpus and foil, 4: a gradient pass
    ("cocoa-masking", {"num_masks": 16, "fast_inference": False}, 4),  # 1-3: corpus, foil, images; 4: masked
])
def test_the_callers_model_is_left_as_it_was_also_after_an_exception(name, options, fail_on_call):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
    ).train()
    model[1].eval()
    model[1].requires_grad_(False)
    model[0].bias.grad = torch.ones_like(model[0].bias)
    model[2].register_forward_hook(lambda module, inputs, output: None)
    before = _state(model)
    x, sets = images(2, torch.float32), {"corpus": CORPUS.float(), "foil": FOIL.float()}
    exploding = Exploding(model, fail_on_call)
    with pytest.raises(RuntimeError, match="boom"):
        create_explainer(name, exploding, {**options, "batch_size": 32})(x, **sets)
    assert exploding.calls == fail_on_call
    for when in ("after the exception", "after success"):
        after = _state(model)
        assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3], when
        for key, grad in before[2].items():
            assert (grad is None and after[2][key] is None) or torch.equal(grad, after[2][key]), (when, key)
        create_explainer(name, model, options)(x, **sets)
