"""BYOL: its loss in closed form and against lightly's, the target's EMA on BYOL's cosine schedule,
the stop-gradient, its asymmetric views, and a collapse the training health check must catch."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from lightly.loss import NegativeCosineSimilarity

from sslens.data.augment import create_views
from sslens.errors import SslensWarning
from sslens.methods import BYOL
from sslens.methods.losses import byol_loss
from sslens.models import create_backbone
from sslens.train import load_config, train


def small_byol(**options) -> BYOL:
    torch.manual_seed(0)
    return BYOL(create_backbone("resnet-tiny"), **{"hidden_dim": 32, "out_dim": 16, **options})


def test_byol_loss_is_two_minus_twice_the_cosine():
    rows = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert byol_loss(rows, 3 * rows).item() == pytest.approx(0.0, abs=1e-7)  # parallel
    assert byol_loss(rows, -rows).item() == pytest.approx(4.0)  # opposite
    assert byol_loss(rows, rows.flip(1)).item() == pytest.approx(2.0)  # orthogonal
    with pytest.raises(ValueError, match="two \\(N, D\\) embeddings"):
        byol_loss(rows, rows[:, :1])


def test_byol_loss_matches_lightly_symmetrised_as_in_its_byol_example():
    generator = torch.Generator().manual_seed(3)
    p0, p1, z0, z1 = (torch.randn(12, 16, generator=generator) for _ in range(4))
    ours = byol_loss(p0, z1) + byol_loss(p1, z0)
    # lightly's BYOL example: 0.5 · (−cos(p0, z1) − cos(p1, z0)); ours is 2 − 2 cos per direction.
    criterion = NegativeCosineSimilarity()
    theirs = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
    assert ours.item() == pytest.approx(4 + 4 * theirs.item(), rel=1e-6)


def test_the_target_gets_no_gradient_and_follows_the_cosine_schedule_exactly():
    method = small_byol(momentum=0.9)
    views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    method.training_step(views).loss.backward()
    assert all(p.grad is None for p in method.target_backbone.parameters())
    assert all(p.grad is not None for p in method.predictor.parameters())
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)  # the online network moved
    before = {name: p.clone() for name, p in method.target_backbone.named_parameters()}
    online = dict(method.backbone.named_parameters())
    step, total = 3, 10
    method.on_after_optimizer_step(step, total)
    tau = 1 - (1 - 0.9) * (math.cos(math.pi * step / total) + 1) / 2
    for name, p in method.target_backbone.named_parameters():
        torch.testing.assert_close(p, tau * before[name] + (1 - tau) * online[name], rtol=0, atol=1e-6)
    # The last step's τ is 1: the target stops moving.
    frozen = {name: p.clone() for name, p in method.target_projector.named_parameters()}
    method.on_after_optimizer_step(total, total)
    for name, p in method.target_projector.named_parameters():
        assert torch.equal(p, frozen[name])


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"momentum": 1.5}, ValueError, "momentum must be a number in \\[0, 1\\] \\(BYOL uses"),
    ({"momentum_schedule": "linear"}, ValueError, "constant, cosine"),
    ({"use_predictor": 1}, TypeError, "use_predictor must be True or False"),
    ({"out_dim": 0}, ValueError, "out_dim"),
])
def test_bad_options_say_what_to_use(options, error, message):
    with pytest.raises(error, match=message):
        small_byol(**options)


def test_byol_views_differ_in_blur_and_solarisation_and_blur_only_from_64_pixels():
    large = create_views("byol", image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3).describe()["views"]
    assert [(v["blur_p"], v["solarize_p"]) for v in large] == [(1.0, 0.0), (0.1, 0.2)]
    small = create_views("byol", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3).describe()["views"]
    assert [(v["blur_p"], v["solarize_p"]) for v in small] == [(0.0, 0.0), (0.0, 0.2)]
    with pytest.raises(ValueError, match="one probability per view"):
        create_views("byol", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, solarize_p=[0.2])


def test_without_predictor_and_momentum_byol_collapses_and_the_health_check_says_so(tmp_path):
    """BYOL's Table 5a: no predictor and τ = 0 collapse. The same run with both is the packaged
    config's (tests/train/test_learning.py asserts it ends without a health warning)."""
    config = load_config(None, {
        "method": "byol", "backbone": "resnet-tiny", "data": "synthetic", "image_size": 32,
        "data_options": {"num_images": 256}, "batch_size": 64, "optimizer": "adam", "lr": 1e-2,
        "warmup_epochs": 0, "epochs": 6, "knn_every": 0, "log_every": 100, "checkpoint_every": 100,
        "device": "cpu", "progress": False, "out": str(tmp_path / "run"),
        "method_options": {"use_predictor": False, "momentum": 0.0, "momentum_schedule": "constant",
                           "hidden_dim": 64, "out_dim": 32},
    })
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = train(config)
    epochs = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    # Measured: the std stays near 0.01 of a 1/√32 = 0.18 reference (the packaged config: 0.07 of 0.09).
    assert all(r["std_projection"] < 0.1 * r["std_reference"] for r in epochs[-3:]), epochs
    assert "collapsed" in epochs[0]["health_warning"]
    assert any("collapsed" in str(w.message) for w in caught if issubclass(w.category, SslensWarning))
