"""Label-free health: RankMe, alignment, uniformity and normalised std against known cases, the
training log's warnings, and a run that collapses by construction."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from sslens.errors import SslensWarning
from sslens.evaluate.health import (
    alignment,
    embedding_health,
    health_warnings,
    normalized_std,
    rankme,
    std_estimate,
    uniformity,
    uniformity_estimate,
)
from sslens.methods.base import METHODS, SSLMethod, StepOutput
from sslens.methods.losses import positive_pair_top1
from sslens.models.heads import ProjectionHead
from sslens.store import load_model
from sslens.train.config import load_config
from sslens.train.loop import train


@pytest.mark.parametrize("k", [1, 4, 16])
def test_rankme_of_a_rank_k_embedding_is_about_k(k):
    generator = torch.Generator().manual_seed(k)
    z = torch.randn(2000, k, generator=generator) @ torch.randn(k, 64, generator=generator)
    # A Gaussian's k singular values are nearly equal at N = 2000, so the entropy is nearly log k.
    assert rankme(z) == pytest.approx(k, rel=0.1)
    assert rankme(torch.eye(k).repeat(5, 1)) == pytest.approx(k, abs=1e-4)  # equal energy: exactly k


def test_collapse_and_spread_have_their_known_values():
    generator = torch.Generator().manual_seed(0)
    point = torch.ones(100, 32)
    assert normalized_std(point) == 0.0 and uniformity(point) == pytest.approx(0.0)
    assert rankme(point) == pytest.approx(1.0, abs=1e-3)
    spread = torch.randn(4000, 32, generator=generator)
    assert normalized_std(spread) == pytest.approx(1 / math.sqrt(32), rel=0.02)
    # Uniform on S^31: E exp(-2‖x−y‖²) = e^{-4} E e^{4 x·y} ≈ e^{-4 + 8/32}, so about −3.75.
    assert uniformity(spread) == pytest.approx(-4 + 8 / 32, abs=0.05)
    assert alignment(spread, 3 * spread).abs().max() < 1e-12  # the same directions align perfectly
    assert alignment(spread, -spread).mean() == pytest.approx(4.0)


def test_bootstrap_intervals_hold_the_statistic():
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    for estimate in (std_estimate(z, seed=0, resamples=200), uniformity_estimate(z, seed=0, resamples=200)):
        assert estimate.ci_low < estimate.mean < estimate.ci_high and estimate.n == 64


def test_embedding_health_reports_every_output_with_intervals():
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 8))
    images = torch.randn(32, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    health = embedding_health({"pooled": encoder}, images, (images, images + 0.1), seed=0)
    entry = health["pooled"]
    assert entry["max_rank"] == 8 and entry["std_reference"] == pytest.approx(1 / math.sqrt(8))
    assert 1 < entry["rankme"] <= 8
    assert entry["alignment"]["unit"] == "images" and entry["alignment"]["n"] == 32
    plain = embedding_health({"pooled": encoder}, images, (images, images), intervals=False)["pooled"]
    assert plain["alignment"] == pytest.approx(0.0, abs=1e-12) and isinstance(plain["std"], float)


def _epochs(top1, std=0.08):
    return [{"kind": "epoch", "epoch": i + 1, "positive_pair_top1": v, "std_projection": std, "std_reference": 0.088}
            for i, v in enumerate(top1)]


def test_a_falling_top1_is_warned_about_and_a_noisy_plateau_is_not():
    # The demo's MoCo: up to 0.51 at epoch 2, then down every epoch.
    (warning,) = health_warnings(_epochs([0.30, 0.51, 0.40, 0.25, 0.12, 0.06]))
    assert "fell for 3 epochs in a row" in warning and "epoch 5" in warning
    assert health_warnings(_epochs([0.50, 0.52, 0.51, 0.505, 0.50, 0.53])) == []
    (collapse,) = health_warnings(_epochs([0.5, 0.6], std=0.005))
    assert "collapsed" in collapse and "epoch 1" in collapse


class _Collapse(SSLMethod):
    """Test only: pulls the two views together with no negatives (no predictor, no momentum,
    no variance term), the textbook way to collapse to a constant."""

    default_views = "simclr"

    def __init__(self, backbone, seed: int = 0):
        super().__init__(backbone)
        self.projector = ProjectionHead(backbone.feature_dim, backbone.feature_dim, 32)

    def training_step(self, views):
        z1, z2 = (F.normalize(z, dim=1) for z in self.project(torch.cat(views)).chunk(2))
        loss = (z1 - z2).square().sum(1).mean()
        logits = z1 @ z2.T / 0.1
        return StepOutput(loss, {"positive_pair_top1": positive_pair_top1(logits, torch.arange(len(z1)))})


TINY = {
    "backbone": "resnet-tiny", "data": "synthetic", "image_size": 32, "data_options": {"num_images": 256},
    "batch_size": 64, "optimizer": "adam", "warmup_epochs": 0, "knn_every": 0, "log_every": 100,
    "checkpoint_every": 100, "device": "cpu", "progress": False,
}


@pytest.fixture
def collapse_method():
    """``collapse-test`` registered for one test only: the method list other tests check stays the
    built-in one."""
    METHODS.register("collapse-test")(_Collapse)
    yield "collapse-test"
    del METHODS._entries["collapse-test"]


def test_a_collapsing_run_is_warned_about_in_the_log(tmp_path, collapse_method):
    config = load_config(None, {**TINY, "method": collapse_method, "epochs": 6, "lr": 3e-3, "out": str(tmp_path / "run")})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = train(config)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert all({"rankme_pooled", "rankme_projection", "std_projection", "alignment_projection",
                "uniformity_projection"} <= set(r) for r in epochs)
    assert epochs[-1]["std_projection"] < 0.25 * epochs[-1]["std_reference"]
    flagged = [r for r in epochs if "health_warning" in r]
    assert flagged and "collapsed" in flagged[0]["health_warning"]
    said = [str(w.message) for w in caught if issubclass(w.category, SslensWarning)]
    assert any("collapsed" in message for message in said)


def test_the_health_monitor_never_changes_the_weights(tmp_path):
    common = {**TINY, "method": "simclr", "epochs": 1, "lr": 1e-3, "deterministic": True}
    runs = [train(load_config(None, {**common, "health_every": every, "out": str(tmp_path / str(every))}))
            for every in (0, 1)]
    (a, _), (b, _) = (load_model(run) for run in runs)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    logs = [[json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in runs]
    assert "rankme_pooled" not in logs[0][-1] and "rankme_pooled" in logs[1][-1]
