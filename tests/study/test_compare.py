"""Comparisons between models: which differences are real, the best model, the conclusion's
words, and seeds (a unit of several training runs)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from sslens.stats import wilson
from sslens.study import compare
from sslens.study.cache import StageResult
from sslens.study.config import load_study_config
from sslens.study.sections import tradeoff_rows


def _quality(correct: np.ndarray) -> StageResult:
    right = correct.astype(np.uint8)
    estimate = wilson(int(right.sum()), len(right), unit="test samples").to_dict()
    chance = {"mean": 0.1, "ci_low": 0.1, "ci_high": 0.1, "n": len(right), "unit": "test samples",
              "method": "exact", "confidence": 0.95}
    return StageResult({"knn_top1": estimate, "linear_top1": None, "chance": chance}, {"items__knn": right})


def _context(correct: dict[str, np.ndarray], groups: dict[str, str] | None = None) -> SimpleNamespace:
    groups = groups or {}
    models = {name: SimpleNamespace(group=groups.get(name), training_seconds=1.0, principle="contrastive") for name in correct}
    return SimpleNamespace(
        seed=0, models=models, outputs={"quality": {name: _quality(c) for name, c in correct.items()}},
        config=SimpleNamespace(settings={"quality": {"linear": False}}),
    )


def _answers(rng: np.random.Generator, accuracy: float, n: int = 400) -> np.ndarray:
    return rng.random(n) < accuracy


def test_a_large_difference_is_real_and_a_tiny_one_is_not():
    rng = np.random.default_rng(0)
    base = _answers(rng, 0.6)
    better = base | _answers(rng, 0.5)  # right wherever base is, and on half of the rest
    almost = base.copy()
    almost[np.flatnonzero(~base)[:2]] = True  # two more test samples right
    ctx = _context({"a": better, "b": base, "c": almost})
    rows = compare.comparisons(ctx)
    by_pair = {(r["a"], r["b"]): r for r in rows}
    assert by_pair[("a", "b")]["real"] and by_pair[("a", "b")]["difference"]["ci_low"] > 0.1
    assert by_pair[("a", "b")]["difference"]["mean"] == pytest.approx(better.mean() - base.mean())
    assert not by_pair[("b", "c")]["real"]
    assert by_pair[("b", "c")]["difference"]["unit"] == "test samples"
    metric = compare.metric_by_key(ctx)["knn_top1"]
    assert compare.best(ctx, metric, rows) == "a"
    sentences = compare.conclusion(ctx, rows)
    assert any(s.startswith("a's kNN top-1 is higher than b's by") and "over 400 test samples" in s for s in sentences)
    assert any(s.startswith("b and c are indistinguishable on kNN top-1 with 400 test samples") for s in sentences)


def test_no_best_model_without_a_real_win_over_every_other():
    rng = np.random.default_rng(1)
    base = _answers(rng, 0.6)
    ctx = _context({"a": base | _answers(rng, 0.5), "b": base | _answers(rng, 0.5), "c": base})
    rows = compare.comparisons(ctx)
    assert compare.best(ctx, compare.metric_by_key(ctx)["knn_top1"], rows) is None


def test_too_few_items_are_never_a_real_difference():
    ctx = _context({"a": np.ones(4, bool), "b": np.zeros(4, bool)})
    (row,) = compare.comparisons(ctx)
    assert row["difference"]["mean"] == 1.0 and not row["real"]
    assert "too few for a bootstrap interval" in compare.conclusion(ctx, [row])[0]


def test_seeds_form_one_unit_with_a_t_interval_and_welch_between_units():
    rng = np.random.default_rng(2)
    answers = {f"x-seed{k}": _answers(rng, 0.80 + 0.01 * k) for k in range(3)}
    answers |= {f"y-seed{k}": _answers(rng, 0.60 + 0.01 * k) for k in range(3)}
    ctx = _context(answers, {name: name.split("-")[0] for name in answers})
    assert compare.units(ctx) == {"x": ["x-seed0", "x-seed1", "x-seed2"], "y": ["y-seed0", "y-seed1", "y-seed2"]}
    rows = tradeoff_rows(ctx)
    assert [r["model"] for r in rows] == ["x", "y", "chance"]
    knn = rows[0]["knn_top1"]
    assert knn["unit"] == "seeds" and knn["n"] == 3 and knn["method"] == "t over seeds"
    assert knn["mean"] == pytest.approx(np.mean([answers[f"x-seed{k}"].mean() for k in range(3)]))
    assert set(knn["per_seed"]) == {"x-seed0", "x-seed1", "x-seed2"}
    (row,) = compare.comparisons(ctx)
    assert row["difference"]["method"] == "welch over seeds" and row["difference"]["n"] == 6
    assert row["real"]


def test_a_study_config_with_seeds_trains_each_model_once_per_seed():
    config = load_study_config(None, {"seeds": [3, 4], "models": [
        {"name": "a", "method": "simclr"}, {"name": "b", "checkpoint": "somewhere"}]})
    assert [(m.name, m.group, m.train and m.train.seed) for m in config.models] == [
        ("a-seed3", "a", 3), ("a-seed4", "a", 4), ("b", None, None)]
    # The resolved config lists each model once and loads back to the same models.
    again = load_study_config(None, config.to_dict())
    assert [m.name for m in again.models] == [m.name for m in config.models]


@pytest.mark.parametrize(("change", "message"), [
    ({"seeds": []}, "non-empty list"),
    ({"seeds": [1, 1]}, "twice"),
    ({"seeds": [0, 1], "models": [{"name": "a", "method": "simclr", "seed": 5}]}, "remove one"),
    ({"models": [{"name": "random-init", "method": "simclr"}]}, "floor model"),
])
def test_bad_seeds_and_a_taken_floor_name_are_refused(change, message):
    from sslens.errors import UserError

    raw = {"models": [{"name": "a", "method": "simclr"}], **change}
    with pytest.raises(UserError, match=message):
        load_study_config(None, raw)
