from collections import OrderedDict

import pytest
import torch
from torch import nn

from sslens.explain.metrics.sanity import (
    average_ranks,
    map_ssim,
    model_randomization_test,
    randomize_block,
    spearman,
)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3, padding=1), act1=nn.ReLU(),
        layer1=nn.Conv2d(8, 8, 3, padding=1), bn=nn.BatchNorm2d(8), act2=nn.ReLU(),
        layer2=nn.Conv2d(8, 8, 3, padding=1), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
    )).eval()


def _images():
    return torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def _edges(encoder):
    """Ignores the model: horizontal + vertical intensity differences."""
    def explain(x):
        gray = x.mean(1)
        dx = torch.zeros_like(gray)
        dy = torch.zeros_like(gray)
        dx[:, :, 1:] = (gray[:, :, 1:] - gray[:, :, :-1]).abs()
        dy[:, 1:, :] = (gray[:, 1:, :] - gray[:, :-1, :]).abs()
        return dx + dy
    return explain


def _gradient_times_input(encoder):
    def explain(x):
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(encoder(x)[:, 0].sum(), x)
        return (grad * x).sum(1)
    return explain


def test_average_ranks_and_spearman_exact_values():
    assert average_ranks(torch.tensor([[10.0, 30.0, 20.0, 20.0]])).tolist() == [[1.0, 4.0, 2.5, 2.5]]
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert spearman(a, a.exp()).item() == pytest.approx(1.0)  # monotone transform
    assert spearman(a, -a).item() == pytest.approx(-1.0)
    # ranks [1,2,3,4] vs [2,1,4,3]: 1 - 6 * (1+1+1+1) / (4 * 15) = 0.6
    assert spearman(a, torch.tensor([[[2.0, 1.0], [4.0, 3.0]]])).item() == pytest.approx(0.6)
    assert torch.isnan(spearman(a, torch.ones(1, 2, 2))).item()


def test_ssim_of_identical_maps_is_one():
    maps = torch.rand(2, 9, 9, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(map_ssim(maps, maps * 3 + 1), torch.ones(2), atol=1e-4)


def test_model_independent_explainer_fails_the_check():
    result = model_randomization_test(_model(), ["layer2", "layer1", "stem"], _edges, _images())
    assert result["steps"] == ["layer2", "layer1", "stem"]
    assert result["spearman_mean"] == pytest.approx([1.0, 1.0, 1.0])
    assert result["ssim_mean"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)
    assert result["changed"] is False
    assert result["verdict"] == "fails"


def test_gradient_map_changes_and_the_callers_model_is_untouched():
    model = _model()
    model.bn.running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = [("top", model.layer2), ("middle", model.layer1), ("bottom", model.stem)]
    result = model_randomization_test(model, layers, _gradient_times_input, _images(), seed=3)
    assert result["steps"] == ["top", "middle", "bottom"]
    assert result["spearman_mean"][-1] < 0.5
    assert result["changed"] is True and result["verdict"] == "passes"
    assert result["spearman_interval"][-1]["ci_high"] < 0.5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Same seed, same answer.
    again = model_randomization_test(model, layers, _gradient_times_input, _images(), seed=3)
    assert again["spearman_per_image"] == result["spearman_per_image"]


def test_randomize_block_is_seeded_and_resets_batch_norm_statistics():
    first, second = _model(), _model()
    first.bn.running_mean.fill_(5.0)
    state = torch.random.get_rng_state()
    randomize_block(first, seed=11)
    randomize_block(second, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG left alone
    assert torch.equal(first.layer1.weight, second.layer1.weight)
    assert torch.equal(first.bn.running_mean, torch.zeros(8))
    assert not torch.equal(first.layer1.weight, _model().layer1.weight)


def test_bad_layers_raise_with_a_hint():
    model = _model()
    with pytest.raises(ValueError, match="top-level children"):
        model_randomization_test(model, ["layer9"], _edges, _images())
    with pytest.raises(ValueError, match="not a submodule"):
        model_randomization_test(model, [("x", nn.Linear(2, 2))], _edges, _images())
    with pytest.raises(ValueError, match="non-empty"):
        model_randomization_test(model, [], _edges, _images())


def test_a_verdict_comes_from_the_interval_not_the_mean():
    from sslens.explain.metrics.sanity import sanity_verdict
    from sslens.stats import Estimate

    # 0.482 against a 0.5 threshold "passed" on its mean alone, from 3 images.
    assert sanity_verdict(Estimate(0.482, 0.30, 0.66, 3, "images", "bootstrap"), 0.5) == "inconclusive"
    assert sanity_verdict(Estimate(0.20, 0.10, 0.30, 16, "images", "bootstrap"), 0.5) == "passes"
    assert sanity_verdict(Estimate(0.90, 0.80, 0.95, 16, "images", "bootstrap"), 0.5) == "fails"
    assert sanity_verdict(Estimate(float("nan"), float("nan"), float("nan"), 0, "images", "bootstrap"), 0.5) == "fails"
