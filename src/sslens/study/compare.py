"""Which differences between the study's models are real: every metric, its chance level, and
the paired difference of every pair of models, with a conclusion in plain words.

The experiments keep each metric's per-item values (per test sample or per image) in their stage
arrays, measured on the same items for every model (:mod:`sslens.study.measures`). This module
reads them back through one catalogue of :class:`Metric` entries, built from the stages that ran:

* a *unit* of comparison is a model, or a model the study trained once per seed (``seeds``);
  the unit's estimate is then Student's t interval over its per-seed means
  (:func:`sslens.stats.over_seeds`), and its per-item values are the mean over its seeds;
* two units are compared by the mean of their per-item differences with a paired bootstrap
  interval (:func:`sslens.stats.paired_difference`); when both units hold several seeds, by
  Welch's interval of the difference of their seed means instead
  (:func:`sslens.stats.difference_over_seeds`), so training noise counts;
* a difference is *real* when its 95% interval excludes 0 and, for a bootstrap, rests on at least
  :data:`~sslens.stats.MIN_BOOTSTRAP_ITEMS` items. The intervals are per comparison, not
  corrected for the number of comparisons; with many pairs and metrics expect about one in
  twenty differences that are truly zero to be called real, and read single calls with care.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sslens.explain.base import explainer_label
from sslens.stats import (
    MIN_BOOTSTRAP_ITEMS,
    difference_over_seeds,
    exact,
    format_estimate,
    over_seeds,
    paired_difference,
)
from sslens.study.measures import item_key, seed_for
from sslens.study.spec import RANDOM_INIT


@dataclass(frozen=True)
class Metric:
    """One reported metric of one experiment.

    Attributes:
        key: the name in ``results.json``'s trade-off rows and comparisons, e.g. ``knn_top1``.
        label: what the report calls it.
        experiment: the stage it comes from.
        path: where its estimate lies in the stage's results.
        items: the stage-array name of its per-item values.
        higher_is_better: the direction of "better".
        chance: where the chance level's estimate lies in the stage's results, or None.
        headline: whether the trade-off table and the conclusion show it.
    """

    key: str
    label: str
    experiment: str
    path: tuple[str, ...]
    items: str
    higher_is_better: bool = True
    chance: tuple[str, ...] | None = None
    headline: bool = False


#: The chance path of a gap to the random order: the random order's own gap, 0 by definition.
ZERO_GAP = ("zero gap",)


def _get(results: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(results, dict) or key not in results:
            return None
        results = results[key]
    return results


def _explainers(ctx, experiment: str) -> list[str]:
    return list(ctx.config.settings.get(experiment, {}).get("explainers", []))


def metrics(ctx) -> list[Metric]:
    """Every comparable metric of the stages that ran, in report order."""
    ran = set(ctx.outputs)
    found: list[Metric] = []
    if "quality" in ran:
        found.append(Metric("knn_top1", "kNN top-1", "quality", ("knn_top1",), item_key("knn"),
                            chance=("chance",), headline=True))
        if ctx.config.settings["quality"]["linear"]:
            found.append(Metric("linear_top1", "linear top-1", "quality", ("linear_top1",), item_key("linear"),
                                chance=("chance",), headline=True))
    if "invariance" in ran:
        found.append(Metric("invariance_iou", "invariance IoU", "invariance", ("average", "iou"),
                            item_key("average", "iou"), chance=("chance", "random map", "iou"), headline=True))
    if "faithfulness" in ran:
        for name in _explainers(ctx, "faithfulness"):
            label = explainer_label(name)
            # The gap to the model's own random order: raw AUCs depend on how fast each model's
            # similarity falls under any deletion, so only the gap compares across models.
            found.append(Metric(f"deletion_gap_{name}", f"deletion AUC − random order ({label})", "faithfulness",
                                (name, "deletion_gap"), item_key(name, "deletion_gap"), higher_is_better=False,
                                chance=ZERO_GAP, headline=name == "relax"))
            found.append(Metric(f"insertion_gap_{name}", f"insertion AUC − random order ({label})", "faithfulness",
                                (name, "insertion_gap"), item_key(name, "insertion_gap"),
                                chance=ZERO_GAP, headline=name == "relax"))
    if "localization" in ran and not any("skipped" in o.results for o in ctx.outputs["localization"].values()):
        for name in _explainers(ctx, "localization"):
            label = explainer_label(name)
            found.append(Metric(f"pointing_game_{name}", f"pointing game ({label})", "localization",
                                ("explainers", name, "pointing_game"), item_key(name, "pointing_game"),
                                chance=("chance", "random map", "pointing_game"), headline=name == "relax"))
            found.append(Metric(f"relevance_mass_{name}", f"relevance mass ({label})", "localization",
                                ("explainers", name, "relevance_mass"), item_key(name, "relevance_mass"),
                                chance=("chance", "random map", "relevance_mass"), headline=name == "relax"))
    if "perceptual" in ran:
        components = dict.fromkeys(c for o in ctx.outputs["perceptual"].values() for c in o.results["components"])
        for component in components:
            found.append(Metric(f"effect_{component}", f"{component} effect", "perceptual",
                                ("components", component, "effect"), item_key(component, "effect")))
    return found


def units(ctx) -> dict[str, list[str]]:
    """The units of comparison: {name: its models}, a seed group under its configured name."""
    found: dict[str, list[str]] = {}
    for name, model in ctx.models.items():
        found.setdefault(model.group or name, []).append(name)
    return found


def estimate(ctx, metric: Metric, unit: list[str]) -> dict | None:
    """The metric's estimate dict for a unit: the model's own, or the t interval over its seeds
    (with ``per_seed`` values)."""
    stages = ctx.outputs.get(metric.experiment, {})
    values = [_get(stages[m].results, metric.path) if m in stages else None for m in unit]
    if any(v is None for v in values):
        return None
    if len(unit) == 1:
        return values[0]
    spread = over_seeds([v["mean"] if v["mean"] is not None else float("nan") for v in values]).to_dict()
    return {**spread, "per_seed": {m: v["mean"] for m, v in zip(unit, values, strict=True)}}


def chance(ctx, metric: Metric, unit: list[str]) -> dict | None:
    """The chance level's estimate for a unit (its first model's: chance maps are drawn the same
    for every model; a random pixel order is scored on each model, so per model)."""
    if metric.chance is None:
        return None
    stage = ctx.outputs.get(metric.experiment, {}).get(unit[0])
    if metric.chance == ZERO_GAP:
        return None if stage is None else exact(0.0, stage.results["num_images"], "images").to_dict()
    return None if stage is None else _get(stage.results, metric.chance)


def _items(ctx, metric: Metric, unit: list[str]) -> np.ndarray | None:
    stages = ctx.outputs.get(metric.experiment, {})
    arrays = [stages[m].arrays.get(metric.items) if m in stages else None for m in unit]
    if any(a is None for a in arrays):
        return None
    return np.nanmean(np.stack([np.asarray(a, dtype=np.float64) for a in arrays]), axis=0)


def _seed_means(ctx, metric: Metric, unit: list[str]) -> list[float]:
    stages = ctx.outputs[metric.experiment]
    return [float(np.nanmean(np.asarray(stages[m].arrays[metric.items], dtype=np.float64))) for m in unit]


def difference(ctx, metric: Metric, a: str, b: str, all_units: dict[str, list[str]]) -> dict | None:
    """``a − b`` on the metric with its interval (see the module docstring), or None."""
    first, second = all_units[a], all_units[b]
    left, right = _items(ctx, metric, first), _items(ctx, metric, second)
    if left is None or right is None or left.shape != right.shape:
        return None
    if len(first) > 1 and len(second) > 1:
        return difference_over_seeds(_seed_means(ctx, metric, first), _seed_means(ctx, metric, second)).to_dict()
    return paired_difference(
        left, right, unit="test samples" if metric.experiment == "quality" else "images",
        seed=seed_for(ctx.seed, f"{metric.key} {a} {b}"),
    ).to_dict()


def too_few(diff: dict) -> bool:
    """Whether a bootstrap difference rests on too few items to trust its interval."""
    return diff["method"] == "paired bootstrap" and diff["n"] < MIN_BOOTSTRAP_ITEMS


def is_real(diff: dict | None) -> bool:
    """Whether a difference's interval excludes 0 (and rests on enough items to say so)."""
    return (diff is not None and diff["ci_low"] is not None and diff["ci_high"] is not None
            and not too_few(diff) and (diff["ci_low"] > 0 or diff["ci_high"] < 0))


def above_chance(value: dict | None, level: dict | None, higher_is_better: bool) -> bool | None:
    """Whether ``value``'s interval lies wholly on the good side of the chance level's mean."""
    if value is None or level is None or value.get("ci_low") is None or level.get("mean") is None:
        return None
    return value["ci_low"] > level["mean"] if higher_is_better else value["ci_high"] < level["mean"]


def comparisons(ctx) -> list[dict[str, Any]]:
    """Every pair of units on every metric: ``{"metric", "a", "b", "difference", "real"}``,
    the difference being ``a − b`` (``a`` listed first in the study)."""
    all_units = units(ctx)
    names = list(all_units)
    rows = []
    for metric in metrics(ctx):
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                diff = difference(ctx, metric, a, b, all_units)
                if diff is not None:
                    rows.append({"metric": metric.key, "label": metric.label, "a": a, "b": b,
                                 "difference": diff, "real": is_real(diff),
                                 "higher_is_better": metric.higher_is_better})
    return rows


def best(ctx, metric: Metric, rows: list[dict]) -> str | None:
    """The unit that is better than every other trained unit on ``metric`` by a real difference."""
    candidates = [u for u in units(ctx) if u != RANDOM_INIT]
    for unit in candidates:
        wins = 0
        for row in rows:
            if row["metric"] != metric.key or unit not in (row["a"], row["b"]) or not row["real"]:
                continue
            if RANDOM_INIT in (row["a"], row["b"]):
                continue
            sign = 1 if row["a"] == unit else -1
            better = sign * row["difference"]["mean"] > 0
            wins += better == metric.higher_is_better
        if len(candidates) > 1 and wins == len(candidates) - 1:
            return unit
    return None


def _size(diff: dict) -> str:
    return f"{diff['n']} {diff['unit']}"


def _sentence(row: dict) -> str:
    diff = row["difference"]
    a, b, d = row["a"], row["b"], diff["mean"]
    if row["real"]:
        higher, lower = (a, b) if d > 0 else (b, a)
        low, high = sorted((abs(diff["ci_low"]), abs(diff["ci_high"])))
        direction = "" if row["higher_is_better"] else " (lower is better)"
        return (f"{higher}'s {row['label']} is higher than {lower}'s by {abs(d):.3f} "
                f"[{low:.3f}, {high:.3f}] over {_size(diff)}{direction}.")
    if too_few(diff):
        return (f"{a} and {b} cannot be told apart on {row['label']}: {_size(diff)} are too few for a "
                f"bootstrap interval (at least {MIN_BOOTSTRAP_ITEMS}; difference {format_estimate(diff)}).")
    return (f"{a} and {b} are indistinguishable on {row['label']} with {_size(diff)} "
            f"(difference {format_estimate(diff)}).")


def conclusion(ctx, rows: list[dict]) -> list[str]:
    """The trade-off section's conclusion: one sentence per headline metric and pair of trained
    models, then what each trained model does better than its random-weight floor."""
    headline = [m for m in metrics(ctx) if m.headline]
    sentences = []
    for metric in headline:
        pairs = [r for r in rows if r["metric"] == metric.key and RANDOM_INIT not in (r["a"], r["b"])]
        tied = [r for r in pairs if not r["real"]]
        sentences += [_sentence(r) for r in pairs if r["real"]]
        if tied and len(tied) == len(pairs) and len(pairs) > 1:
            sentences.append(f"No two models differ on {metric.label} with {_size(tied[0]['difference'])}.")
        else:
            sentences += [_sentence(r) for r in tied]
    if RANDOM_INIT in units(ctx):
        for unit in (u for u in units(ctx) if u != RANDOM_INIT):
            beats, ties = [], []
            for metric in headline:
                row = next((r for r in rows if r["metric"] == metric.key and {r["a"], r["b"]} == {unit, RANDOM_INIT}), None)
                if row is None:
                    continue
                sign = 1 if row["a"] == unit else -1
                good = row["real"] and (sign * row["difference"]["mean"] > 0) == metric.higher_is_better
                (beats if good else ties).append(metric.label)
            if beats or ties:
                sentences.append(
                    f"Against the same network with random weights, {unit} is better on "
                    f"{_listing(beats) or 'no headline metric'}"
                    + (f" and not better on {_listing(ties)}." if ties else ".")
                )
    return sentences


def _listing(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def metric_by_key(ctx) -> dict[str, Metric]:
    return {m.key: m for m in metrics(ctx)}

