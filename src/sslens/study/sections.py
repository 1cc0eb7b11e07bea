"""Report sections: each experiment's figures and tables, drawn from its stored results only.

A function here takes ``(ctx, outputs, settings)``, where ``outputs`` maps each model name to
the experiment's :class:`~sslens.study.cache.StageResult`, and returns a :class:`SectionContent`.
Nothing is recomputed here, so a study whose stages are all cached redraws its report in
seconds. Maps are shown raw with their own colour bar, except the perceptual examples, which are
z-scored per map for display (their bar chart and table use the raw values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sslens.explain.base import explainer_label
from sslens.explain.display import normalize_map
from sslens.explain.metrics.invariance import RETEST, invariance_augmentation
from sslens.report.figures import (
    bar_chart,
    curves_figure,
    heatmap_grid,
    invariance_table_figure,
    tsne_figure,
)
from sslens.report.html import Table

FLAG = "FLAGGED: maps ignore the weights"


@dataclass
class SectionContent:
    """Figures as (file stem, caption, PNG bytes) and tables of one report section."""

    figures: list[tuple[str, str, bytes]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def quality(ctx, outputs: dict, settings: dict) -> SectionContent:
    rows = [[m, o.results["knn_top1"], o.results["linear_top1"]] for m, o in outputs.items()]
    bars = {m: {"kNN top-1": (knn, 0.0), "linear top-1": (lin if lin is not None else float("nan"), 0.0)}
            for m, knn, lin in rows}
    return SectionContent(
        [("accuracy", "Held-out top-1 accuracy of each model's pooled features.",
          bar_chart(bars, ylabel="top-1 accuracy", xlabel="classifier", title="Representation quality"))],
        [Table(["model", "kNN top-1", "linear top-1"], rows,
               f"kNN (k={settings['k']}, T={settings['temperature']}) and linear probe ({settings['linear_epochs']} epochs).")],
    )


def tsne(ctx, outputs: dict, settings: dict) -> SectionContent:
    names = ctx.test_data.class_names
    figures = []
    for output in ("pooled", "projection"):
        panels = {m: (o.arrays[output], o.arrays["labels"]) for m, o in outputs.items()}
        figures.append((output, f"t-SNE of the {output} output, one panel per model (seed {ctx.seed}).",
                        tsne_figure(panels, names, title=f"t-SNE of the {output} output")))
    rows = [[m, o.results["num_points"], o.results["perplexity"], o.results["n_iter"]] for m, o in outputs.items()]
    return SectionContent(figures, [Table(["model", "points", "perplexity", "iterations"], rows, "t-SNE settings.")])


def invariance(ctx, outputs: dict, settings: dict) -> SectionContent:
    augmentations = settings["augmentations"]
    iou = {m: {a: o.results[a]["iou_mean"] for a in augmentations} for m, o in outputs.items()}
    # The retest (same image, other masks) is the column every augmentation's score is read against.
    columns = [*augmentations, RETEST] if settings["retest"] else list(augmentations)
    rows_iou = [[m, *[(o.results[a]["iou_mean"], o.results[a]["iou_std"]) for a in columns]]
                for m, o in outputs.items()]
    rows_corr = [[m, *[(o.results[a]["corr_mean"], o.results[a]["corr_std"]) for a in columns]]
                 for m, o in outputs.items()]
    retest_note = (" Retest: the unchanged image explained again with other masks (seed + 1), the ceiling"
                   " an augmentation's score can reach given RELAX's own noise." if settings["retest"] else "")
    # The images drawn, fewer than samples.invariance when the test split is smaller.
    indices = ctx.sample("invariance", ctx.config.samples["invariance"])
    count = len(indices)
    # The example row shows each augmented image with its own map, in the augmented frame.
    first = ctx.images(indices[:1])
    views = [("original", first)] + [
        (a, invariance_augmentation(a, ctx.mean, ctx.std).apply(first)) for a in augmentations
    ]
    pictures = {name: ctx.display(view)[0] for name, view in views}
    grid = [(m, [(name, pictures[name], o.arrays["example_maps"][i]) for i, (name, _) in enumerate(views)])
            for m, o in outputs.items()]
    return SectionContent(
        [("iou", "Mean IoU per model and augmentation (Table 1 of the reference report).",
          invariance_table_figure(iou)),
         ("examples", "RELAX importance of one image under each augmentation (raw maps, own colour bar).",
          heatmap_grid(grid))],
        [Table(["model", *columns], rows_iou,
               f"IoU of mean-binarised RELAX maps, mean ± std over {count} images.{retest_note}"),
         Table(["model", *columns], rows_corr, "Pearson correlation of the raw maps, mean ± std.")],
    )


def faithfulness(ctx, outputs: dict, settings: dict) -> SectionContent:
    figures, rows = [], []
    for model, output in outputs.items():
        curves = {}
        for name, result in output.results.items():
            x = np.asarray(result["x"])
            curves[f"{explainer_label(name)} deletion"] = (x, np.asarray(result["curves"]["deletion"]))
            curves[f"{explainer_label(name)} insertion"] = (x, np.asarray(result["curves"]["insertion"]))
            rows.append([model, explainer_label(name), result["deletion_auc"], result["random_deletion_auc"],
                         result["insertion_auc"], result["random_insertion_auc"]])
        result = next(iter(output.results.values()))
        # The images measured: fewer than samples.faithfulness when the test split is smaller.
        count = len(result["per_image"]["deletion_auc"])
        curves["random deletion"] = (np.asarray(result["x"]), np.asarray(result["curves"]["random_deletion"]))
        curves["random insertion"] = (np.asarray(result["x"]), np.asarray(result["curves"]["random_insertion"]))
        figures.append((model, f"Deletion and insertion curves of {model}.", curves_figure(
            curves, xlabel="fraction of pixels removed / inserted", ylabel="cosine similarity to the original",
            title=model)))
    table = Table(["model", "explainer", "deletion AUC", "random deletion AUC", "insertion AUC",
                   "random insertion AUC"], rows, f"Mean over {count} images; baseline {settings['baseline']!r}.")
    return SectionContent(figures, [table])


def localization(ctx, outputs: dict, settings: dict) -> SectionContent:
    scored = {m: o for m, o in outputs.items() if "skipped" not in o.results}
    if not scored:
        reason = next(iter(outputs.values())).results["skipped"]
        return SectionContent([], [Table(["model", "result"], [[m, reason] for m in outputs], "Not measured.")])
    bars, rows = {}, []
    for model, output in scored.items():
        for name, scores in output.results["explainers"].items():
            pointing, mass = scores["pointing_game"], scores["relevance_mass"]
            bars.setdefault(model, {})[f"{explainer_label(name)} pointing"] = (pointing["mean"], pointing["std"])
            bars[model][f"{explainer_label(name)} mass"] = (mass["mean"], mass["std"])
            rows.append([model, explainer_label(name), (pointing["mean"], pointing["std"]), (mass["mean"], mass["std"])])
    return SectionContent(
        [("scores", "Pointing game and relevance mass (mean ± std over images).",
          bar_chart(bars, ylabel="score", xlabel="metric", title="Localisation"))],
        [Table(["model", "explainer", "pointing game", "relevance mass"], rows,
               f"Over {output.results['num_images']} test images with an object mask.")],
    )


def sanity(ctx, outputs: dict, settings: dict) -> SectionContent:
    curves, rows = {}, []
    for model, output in outputs.items():
        for name, result in output.results.items():
            count = len(result["spearman_per_image"][0])  # the images measured
            steps = ["none", *result["steps"]]
            curves[f"{model} · {explainer_label(name)}"] = (np.arange(len(steps)), np.asarray([1.0, *result["spearman_mean"]]))
            rows.append([model, explainer_label(name), " → ".join(result["steps"]),
                         " / ".join("–" if v is None else f"{v:.3f}" for v in result["spearman_mean"]),
                         result["verdict"], "" if result["changed"] else FLAG])
    return SectionContent(
        [("spearman", "Mean Spearman correlation with the trained model's maps after randomising the top k blocks (k on the x axis).",
          curves_figure(curves, xlabel="blocks randomised (top first)", ylabel="Spearman correlation",
                        title="Cascading randomisation"))],
        [Table(["model", "explainer", "blocks randomised", "Spearman per step", "verdict", "flag"], rows,
               f"Threshold {settings['threshold']} on the last step; {count} images.")],
    )


def perceptual(ctx, outputs: dict, settings: dict) -> SectionContent:
    bars = {m: {c: (v["mean"], v["std"]) for c, v in o.results["components"].items()} for m, o in outputs.items()}
    components = list(dict.fromkeys(c for per_model in bars.values() for c in per_model))
    rows = [[m, *[bars[m].get(c) for c in components]] for m in outputs]
    picture = ctx.display(ctx.images(ctx.sample("perceptual", ctx.config.samples["perceptual"])[:1]))[0]
    grid = [(m, [(c, picture, normalize_map(o.arrays[f"map_{c}"], "zscore")) for c in components if f"map_{c}" in o.arrays])
            for m, o in outputs.items()]
    skipped = sorted({f"{c} ({why})" for o in outputs.values() for c, why in o.results["skipped"].items()})
    return SectionContent(
        [("importance", "Mean importance of each component (raw map pixel mean, ± std over images).",
          bar_chart(bars, ylabel="mean importance (expected cosine similarity)", title="Perceptual components")),
         ("examples", "Component maps of one image, z-scored per map for display only.", heatmap_grid(grid))],
        [Table(["model", *components], rows,
               "Mean importance ± std over images." + (f" Skipped: {'; '.join(skipped)}." if skipped else ""))],
    )


def gradcam_pairs(ctx, outputs: dict, settings: dict) -> SectionContent:
    grid, rows = [], []
    for model, output in outputs.items():
        a = output.arrays
        for i, pair in enumerate(output.results["pairs"]):
            title = f"{model}: {pair['kind']} (s={pair['similarity']:.2f})"
            grid.append((title, [("image", a["first_images"][i], a["first_maps"][i]),
                                 ("pair", a["second_images"][i], a["second_maps"][i])]))
            rows.append([model, pair["kind"], pair["image"], pair["partner"], pair["similarity"]])
    return SectionContent(
        [("pairs", "Each row: an image and its pair, each with its own Grad-CAM map (raw, own colour bar).",
          heatmap_grid(grid))],
        [Table(["model", "pair", "image", "partner", "cosine similarity"], rows, "Test-image indices of each pair.")],
    )


def _get(ctx, experiment: str, model: str, *path: str) -> Any:
    """A nested value of a stage's results, or None when the stage or key is missing."""
    value: Any = ctx.outputs.get(experiment, {}).get(model)
    value = None if value is None else value.results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def tradeoff_rows(ctx) -> list[dict[str, Any]]:
    """One dict per model with the trade-off numbers (None where an experiment was not run)."""
    rows = []
    for model, study_model in ctx.models.items():
        invariance = ctx.outputs.get("invariance", {}).get(model)
        ious = [] if invariance is None else [v["iou_mean"] for a, v in invariance.results.items() if a != RETEST]
        sanity = ctx.outputs.get("sanity", {}).get(model)
        verdicts = None if sanity is None else "; ".join(
            f"{explainer_label(name)}: {'passes' if r['changed'] else FLAG}" for name, r in sanity.results.items()
        )
        rows.append({
            "model": model,
            "linear_top1": _get(ctx, "quality", model, "linear_top1"),
            "knn_top1": _get(ctx, "quality", model, "knn_top1"),
            "invariance_iou": float(np.mean(ious)) if ious else None,
            "deletion_auc_relax": _get(ctx, "faithfulness", model, "relax", "deletion_auc"),
            "random_deletion_auc": _get(ctx, "faithfulness", model, "relax", "random_deletion_auc"),
            "pointing_game_relax": _get(ctx, "localization", model, "explainers", "relax", "pointing_game", "mean"),
            "sanity": verdicts,
            "training_seconds": study_model.training_seconds,
        })
    return rows


TRADEOFF_COLUMNS = {
    "model": "model",
    "linear_top1": "linear top-1",
    "knn_top1": "kNN top-1",
    "invariance_iou": "invariance IoU (mean over augmentations)",
    "deletion_auc_relax": "deletion AUC (RELAX)",
    "random_deletion_auc": "deletion AUC (random order)",
    "pointing_game_relax": "pointing game (RELAX)",
    "sanity": "sanity check",
    "training_seconds": "training time (s)",
}


def tradeoff(ctx, outputs: dict, settings: dict) -> SectionContent:
    rows = tradeoff_rows(ctx)
    table = Table(list(TRADEOFF_COLUMNS.values()), [[row[key] for key in TRADEOFF_COLUMNS] for row in rows],
                  "Representation quality (left) against explanation quality (right).")
    points = {
        row["model"]: (np.asarray([row["linear_top1"] if row["linear_top1"] is not None else row["knn_top1"]]),
                       np.asarray([row["invariance_iou"]]))
        for row in rows if row["invariance_iou"] is not None and (row["linear_top1"] or row["knn_top1"]) is not None
    }
    figures = []
    if points:
        figures.append(("scatter", "Each point is a model: representation quality against saliency invariance.",
                        curves_figure(points, xlabel="linear top-1 (kNN where no probe)",
                                      ylabel="invariance IoU", title="Trade-off")))
    return SectionContent(figures, [table])
