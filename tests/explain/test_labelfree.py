"""Label-free IG and gradient × input: exact maths, Captum agreement, completeness, batching, state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients
from torch import nn

from sslens.errors import UserError
from sslens.explain.base import EXPLAINERS, _hook_counts, create_explainer
from sslens.explain.labelfree import (
    PATH_RULES,
    LabelFree,
    integrated_gradients,
    labelfree_gxi,
    labelfree_ig,
)

SIZE = 10


def tiny_encoder(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()).to(dtype)


def images(n: int = 3, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def as64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def own_similarity(encoder: nn.Module, x: torch.Tensor):
    """The label-free target written out: row r of image i scores ⟨f(x_i), f(x̃_r)⟩."""
    reference = encoder(x).detach()
    return lambda embeddings, index: (embeddings * reference[index]).sum(dim=1)


def test_registered_names_build_through_create_explainer():
    encoder = tiny_encoder()
    ig = create_explainer("labelfree-ig", encoder, {"steps": 8, "rule": "riemann_middle"})
    gxi = create_explainer("labelfree-gxi", encoder, {"batch_size": 2})
    assert isinstance(ig, LabelFree) and (ig.method, ig.steps, ig.rule) == ("ig", 8, "riemann_middle")
    assert isinstance(gxi, LabelFree) and (gxi.method, gxi.batch_size) == ("gxi", 2)
    assert EXPLAINERS.get("labelfree-ig") is labelfree_ig
    with pytest.raises(UserError, match="Did you mean 'steps'"):
        create_explainer("labelfree-ig", encoder, {"step": 8})
    with pytest.raises(UserError, match="'steps' does not apply to the labelfree-gxi"):
        create_explainer("labelfree-gxi", encoder, {"steps": 8})
    with pytest.raises(UserError, match="steps must be a positive integer"):
        create_explainer("labelfree-ig", encoder, {"steps": 0})
    with pytest.raises(UserError, match="Unknown path rule 'simpson'"):
        create_explainer("labelfree-ig", encoder, {"rule": "simpson"})
    with pytest.raises(UserError, match="needs steps ≥ 2"):
        create_explainer("labelfree-ig", encoder, {"rule": "riemann_trapezoid", "steps": 1})
    with pytest.raises(UserError, match=r"\(3, H, W\) image"):
        create_explainer("labelfree-ig", encoder, {"baseline": torch.zeros(4, SIZE, SIZE)})
    with pytest.raises(UserError, match="Unknown baseline"):
        create_explainer("labelfree-ig", encoder, {"baseline": "black"})


def test_gradient_times_input_equals_autograd_by_hand():
    encoder, x = tiny_encoder(), images()
    leaf = x.clone().requires_grad_(True)
    similarity = (encoder(x).detach() * encoder(leaf)).sum()
    (gradient,) = torch.autograd.grad(similarity, leaf)
    explanation = labelfree_gxi(encoder, batch_size=2)(x)
    torch.testing.assert_close(explanation.importance, (x * gradient).sum(dim=1).float(), rtol=1e-6, atol=1e-9)
    assert explanation.importance.dtype == torch.float32
    torch.testing.assert_close(as64(explanation.info["target"]), encoder(x).detach().pow(2).sum(1))
    assert explanation.info["method"] == "labelfree-gxi"


def _nodes(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Each rule's nodes and weights written out independently of PATH_RULES."""
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (nodes + 1) / 2, weights / 2
    k = np.arange(steps)
    if rule == "riemann_trapezoid":
        weights = np.full(steps, 1 / (steps - 1))
        weights[[0, -1]] /= 2
        return k / (steps - 1), weights
    return ((k + 0.5) / steps if rule == "riemann_middle" else (k + 1) / steps), np.full(steps, 1 / steps)


@pytest.mark.parametrize("rule", sorted(PATH_RULES))
def test_integrated_gradients_equal_the_formula_step_by_step(rule):
    encoder, x, steps = tiny_encoder(), images(), 7
    baseline = images(3, seed=9)
    target = own_similarity(encoder, x)
    expected = torch.zeros_like(x)
    for alpha, weight in zip(*_nodes(rule, steps), strict=True):
        point = (baseline + alpha * (x - baseline)).requires_grad_(True)
        (gradient,) = torch.autograd.grad(target(encoder(point), torch.arange(3)).sum(), point)
        expected += weight * gradient
    expected *= x - baseline
    # Passes of 5 rows cut through images (7 steps each), so the packing is tested too.
    ours = integrated_gradients(encoder, target, x, baseline, steps, rule, batch_size=5)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)
    maps = labelfree_ig(encoder, steps=steps, rule=rule, baseline=baseline, batch_size=5)(x).importance
    torch.testing.assert_close(maps, expected.sum(dim=1).float())


def test_integrated_gradients_are_exact_for_a_linear_encoder():
    """With f(x) = W x the gradient of ⟨f(x), f(x̃)⟩ is Wᵀ W x everywhere: IG = (x − x') ⊙ Wᵀ W x, any rule."""
    torch.manual_seed(0)
    linear = nn.Linear(3 * SIZE * SIZE, 5, bias=False).double()
    encoder = nn.Sequential(nn.Flatten(), linear)
    x, baseline = images(2), images(1, seed=4)[0]
    weight = linear.weight.detach()
    expected = (x - baseline) * ((x.flatten(1) @ weight.T) @ weight).view_as(x)
    explanation = labelfree_ig(encoder, steps=3, rule="riemann_right", baseline=baseline)(x)
    torch.testing.assert_close(explanation.importance, expected.sum(1).float())
    assert max(abs(gap) for gap in explanation.info["completeness_gap"]) < 1e-10


def test_integrated_gradients_equal_captum():
    """Captum's IntegratedGradients on the same target: its Gauss-Legendre IG to 1e-7 of the
    largest attribution in float64 (Captum rounds its step sizes, and its Riemann nodes, to
    float32: measured ≤ 1e-9 for Gauss-Legendre, 2e-8 for the trapezoid); its trapezoid weights
    sum to 1 − 1/steps, so its trapezoid IG is ours × (steps − 1)/steps."""
    encoder, x, steps = tiny_encoder(), images(), 50
    reference = encoder(x).detach()
    target = own_similarity(encoder, x)
    captum = IntegratedGradients(lambda inputs, ref: (encoder(inputs) * ref).sum(dim=1))
    zero = torch.zeros_like(x)
    for rule, factor in (("gausslegendre", 1.0), ("riemann_trapezoid", (steps - 1) / steps)):
        theirs = captum.attribute(
            x, baselines=zero, additional_forward_args=(reference,), n_steps=steps, method=rule, internal_batch_size=30
        )
        ours = integrated_gradients(encoder, target, x, zero, steps, rule, batch_size=32)
        assert (ours * factor - theirs).abs().max() <= 1e-7 * theirs.abs().max(), rule
    maps = labelfree_ig(encoder)(x).importance
    theirs = captum.attribute(x, baselines=zero, additional_forward_args=(reference,))
    torch.testing.assert_close(maps, theirs.sum(dim=1).float(), rtol=1e-5, atol=1e-7)


def test_completeness_gap_at_the_default_steps():
    """Σ IG = g(x) − g(x') up to the quadrature: measured ≤ 0.15 % of |g(x) − g(x')| at the default
    50 Gauss-Legendre steps on these tiny ReLU encoders (5 seeds × 4 images); asserted below 1 %."""
    relative = []
    for seed in range(3):
        encoder, x = tiny_encoder(seed=seed), images(4, seed=seed + 10)
        explanation = labelfree_ig(encoder)(x)
        info = explanation.info
        embeddings, at_zero = encoder(x).detach(), encoder(torch.zeros_like(x)).detach()
        torch.testing.assert_close(as64(info["target"]), (embeddings * embeddings).sum(1))
        torch.testing.assert_close(as64(info["target_at_baseline"]), (embeddings * at_zero).sum(1))
        difference = as64(info["target"]) - as64(info["target_at_baseline"])
        # The recorded gap is the float64 attributions' sum; the float32 maps agree with it.
        summed = explanation.importance.double().flatten(1).sum(1)
        torch.testing.assert_close(summed - difference, as64(info["completeness_gap"]), rtol=0, atol=1e-5)
        relative += (as64(info["completeness_gap"]).abs() / difference.abs()).tolist()
    assert max(relative) < 0.01, relative
    encoder, x = tiny_encoder(), images(2)
    coarse, fine = (np.abs(labelfree_ig(encoder, steps=s)(x).info["completeness_gap"]).mean() for s in (16, 100))
    assert fine < coarse


@pytest.mark.parametrize("name", ["labelfree-ig", "labelfree-gxi"])
def test_a_batch_gives_the_maps_of_one_image_at_a_time(name):
    encoder, x = tiny_encoder(), images(3)
    options = {"batch_size": 4, **({"steps": 6} if name == "labelfree-ig" else {})}
    explainer = create_explainer(name, encoder, options)
    together = explainer(x)
    alone = [explainer(x[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(together.importance, torch.cat([a.importance for a in alone]), rtol=1e-6, atol=1e-9)
    for key in ("target", "completeness_gap") if name == "labelfree-ig" else ("target",):
        torch.testing.assert_close(
            as64(together.info[key]), as64([a.info[key][0] for a in alone]), rtol=1e-9, atol=1e-12
        )


def test_info_records_the_method_and_is_json():
    x = images(2, torch.float32)
    encoder = tiny_encoder(torch.float32)
    info = labelfree_ig(encoder, steps=5, baseline="blur", blur_sigma=2.0)(x).info
    assert {k: info[k] for k in ("method", "steps", "rule", "baseline", "blur_sigma")} == {
        "method": "labelfree-ig", "steps": 5, "rule": "gausslegendre", "baseline": "blur", "blur_sigma": 2.0,
    }
    assert len(info["completeness_gap"]) == 2
    json.dumps(info)
    tensor_info = labelfree_ig(encoder, steps=5, baseline=torch.zeros(3, SIZE, SIZE))(x).info
    assert (tensor_info["baseline"], tensor_info["baseline_shape"]) == ("tensor", [3, SIZE, SIZE])


def test_a_zero_baseline_tensor_is_the_zero_baseline_and_a_misfit_is_refused():
    encoder, x = tiny_encoder(), images(2)
    named = labelfree_ig(encoder, steps=5)(x).importance
    torch.testing.assert_close(labelfree_ig(encoder, steps=5, baseline=torch.zeros(1, 3, SIZE, SIZE))(x).importance, named)
    with pytest.raises(ValueError, match="does not fit images"):
        labelfree_ig(encoder, steps=5, baseline=torch.zeros(3, SIZE + 1, SIZE))(x)
    with pytest.raises(ValueError, match="does not fit images"):
        labelfree_ig(encoder, steps=5, baseline=torch.zeros(3, 3, SIZE, SIZE))(x)


def test_works_under_the_callers_inference_mode():
    encoder, x = tiny_encoder(), images(2)
    expected = labelfree_ig(encoder, steps=5)(x).importance
    with torch.inference_mode():
        inside = labelfree_ig(encoder, steps=5)(x).importance
    torch.testing.assert_close(inside.clone(), expected)


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


def _caller_model() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
    ).train()
    model[1].eval()
    model[3].requires_grad_(False)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    seen = []
    model[2].register_forward_hook(lambda module, inputs, output: seen.append(output.shape[0]))
    return model, seen


def _state(model: nn.Module):
    return (
        {name: m.training for name, m in model.named_modules()},
        {name: p.requires_grad for name, p in model.named_parameters()},
        {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()},
        _hook_counts(model),
    )


def _assert_same_state(before, after) -> None:
    assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3]
    for name, grad in before[2].items():
        assert (grad is None and after[2][name] is None) or torch.equal(grad, after[2][name]), name


@pytest.mark.parametrize("name", ["labelfree-ig", "labelfree-gxi"])
def test_the_callers_model_is_left_as_it_was_also_after_an_exception(name):
    model, seen = _caller_model()
    before = _state(model)
    x = images(2, torch.float32)
    # Call 1 embeds the images; call 2 is the first gradient pass.
    options = {"batch_size": 4, **({"steps": 4} if name == "labelfree-ig" else {})}
    with pytest.raises(RuntimeError, match="boom"):
        create_explainer(name, Exploding(model, fail_on_call=2), options)(x)
    _assert_same_state(before, _state(model))
    seen.clear()
    create_explainer(name, model, options)(x)
    _assert_same_state(before, _state(model))
    assert seen, "the caller's own hook still runs during the explanation"
