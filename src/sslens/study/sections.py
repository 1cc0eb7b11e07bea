"""Report sections: each experiment's figures, tables and notes, drawn from its stored results only.

A function here takes ``(ctx, outputs, settings)``, where ``outputs`` maps each model name to
the experiment's :class:`~sslens.study.cache.StageResult`, and returns a :class:`SectionContent`.
Nothing is recomputed here, so a study whose stages are all cached redraws its report in
seconds.

Every number is shown with its 95% interval and the size and unit of the sample behind it (in
the caption), next to its chance level measured on the same items: a random map, a constant map
or a random pixel order, and the ``random-init`` floor model. A model trained once per seed has
a row per seed and a row for their mean with Student's t interval over the seeds. Maps are shown
raw with their own colour bar, except the perceptual examples, which are z-scored per map for
display (their bar chart and table use the raw values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sslens.explain.base import explainer_label
from sslens.explain.correspondence import cell_boxes
from sslens.explain.display import normalize_map
from sslens.explain.metrics.invariance import RETEST, invariance_augmentation
from sslens.report.explorer import (
    EmbeddingView,
    ExplorerData,
    Interactive,
    embedding_explorer,
    tradeoff_scatter,
)
from sslens.report.figures import (
    bar_chart,
    curves_figure,
    heatmap_grid,
    invariance_table_figure,
    scatter_figure,
    tsne_figure,
)
from sslens.report.html import Drill, Table
from sslens.stats import format_estimate, over_seeds
from sslens.study import compare
from sslens.study.measures import CHANCE_DRAWS, CHANCE_MAPS, item_key
from sslens.study.spec import RANDOM_INIT, RANDOM_WEIGHTS

FLAG = "FLAGGED: maps ignore the weights"


@dataclass
class SectionContent:
    """Figures as (file stem, caption, PNG bytes), tables, notes (sentences) and interactive
    blocks (:class:`sslens.report.explorer.Interactive`) of one section."""

    figures: list[tuple[str, str, bytes]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    interactive: list[Interactive] = field(default_factory=list)


def _thumbnails(ctx, indices) -> dict[str, np.ndarray]:
    """{test index as text: (H, W, 3) uint8} of test images, for drill-downs."""
    indices = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    return {str(i): picture for i, picture in zip(indices.tolist(), ctx.display(ctx.images(indices)), strict=True)}


def _drill(title: str, value: str, values, thumbnails: dict[str, np.ndarray]) -> Drill:
    """A row's drill-down: ``values`` per image, in the order of ``thumbnails``' images."""
    items = [(item, None if v is None or not np.isfinite(v) else float(v))
             for item, v in zip(thumbnails, np.asarray(values, dtype=np.float64), strict=True)]
    return Drill(title, value, items, thumbnails)


def _get(results: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(results, dict) or key not in results:
            return None
        results = results[key]
    return results


def _rows(ctx, outputs: dict) -> list[tuple[str, list[str]]]:
    """(row label, models) for each table row: every model, and after the seeds of a model
    trained once per seed, a row for their mean."""
    rows = []
    for unit, models in compare.units(ctx).items():
        present = [m for m in models if m in outputs]
        rows += [(m, [m]) for m in present]
        if len(present) > 1:
            rows.append((f"{unit} (mean of {len(present)} seeds)", present))
    return rows


def _examples(ctx, outputs: dict) -> list[str]:
    """One model per unit for example figures: the first seed of a seed group."""
    return [models[0] for models in compare.units(ctx).values() if models[0] in outputs]


def _cell(outputs: dict, models: list[str], *path: str) -> dict | None:
    """The estimate at ``path`` of one model, or of several seeds (t interval over seeds)."""
    values = [_get(outputs[m].results, *path) for m in models]
    if any(v is None for v in values):
        return None
    if len(values) == 1:
        return values[0]
    return over_seeds([np.nan if v["mean"] is None else v["mean"] for v in values]).to_dict()


def _size(estimate: dict | None) -> str:
    return "–" if estimate is None else f"{estimate['n']} {estimate['unit']}"


def _mean(estimate: dict | None) -> float | None:
    return None if estimate is None else estimate["mean"]


def quality(ctx, outputs: dict, settings: dict) -> SectionContent:
    first = next(iter(outputs.values())).results
    chance = first["chance"]
    rows, bars = [], {}
    for label, models in _rows(ctx, outputs):
        knn, linear = _cell(outputs, models, "knn_top1"), _cell(outputs, models, "linear_top1")
        rows.append([label, knn, linear])
        bars[label] = {"kNN top-1": knn, "linear top-1": linear}
    rows.append(["chance (1 / classes)", chance, chance if settings["linear"] else None])
    caption = (f"Top-1 on {_size(first['knn_top1'])}: 95% Wilson intervals (Student's t over seeds for a seed "
               f"mean). kNN (k={settings['k']}, T={settings['temperature']}) and linear probe "
               f"({settings['linear_epochs']} epochs).")
    return SectionContent(
        [("accuracy", "Held-out top-1 accuracy of each model's pooled features, with 95% intervals; "
          "the dashed line is chance.",
          bar_chart(bars, ylabel="top-1 accuracy", xlabel="classifier", title="Representation quality",
                    reference={"kNN top-1": chance["mean"], "linear top-1": chance["mean"]}))],
        [Table(["model", "kNN top-1", "linear top-1"], rows, caption)],
    )


def health(ctx, outputs: dict, settings: dict) -> SectionContent:
    rows, notes = [], []
    for model, output in outputs.items():
        r = output.results
        for name in ("pooled", "projection"):
            e = r[name]
            rows.append([model, name, f"{e['rankme']:.1f} of {e['max_rank']}", e["std"], e["std_reference"],
                         e["alignment"], e["uniformity"]])
        notes += [f"{model}: {warning}" for warning in r["warnings"]]
    logged = {m: o.results["training"] for m, o in outputs.items() if o.results["training"]}
    figures = []
    for key, label in (("positive_pair_top1", "positive-pair top-1 (training batches)"),
                       ("std_projection", "normalised std of the projection")):
        curves = {m: (np.asarray([r["epoch"] for r in log if key in r]), np.asarray([r[key] for r in log if key in r]))
                  for m, log in logged.items() if any(key in r for r in log)}
        if curves:
            figures.append((key, f"{label.capitalize()} per training epoch, from each run's log.",
                            curves_figure(curves, xlabel="epoch", ylabel=label, title=label)))
    if not notes:
        notes.append("No training log warned about a falling positive-pair top-1 or a collapsing projection.")
    first = next(iter(outputs.values())).results
    return SectionContent(figures, [Table(
        ["model", "output", "effective rank (RankMe)", "normalised std", "1/√D", "alignment", "uniformity"], rows,
        f"On {first['num_images']} held-out images; alignment between two views from the {first['views']!r} recipe "
        f"(the same for every model). Std, alignment and uniformity with 95% bootstrap intervals over images; "
        f"RankMe without one: a resample repeats images, which lowers the rank, so its interval would be biased "
        f"— read it against the {RANDOM_INIT} row and its maximum.")], notes)


def tsne(ctx, outputs: dict, settings: dict) -> SectionContent:
    names = ctx.test_data.class_names
    figures = []
    for output in ("pooled", "projection"):
        panels = {m: (o.arrays[output], o.arrays["labels"]) for m, o in outputs.items()}
        figures.append((output, f"t-SNE of the {output} output, one panel per model (seed {ctx.seed}).",
                        tsne_figure(panels, names, title=f"t-SNE of the {output} output")))
    rows = [[m, o.results["num_points"], o.results["perplexity"], o.results["n_iter"]] for m, o in outputs.items()]
    return SectionContent(figures, [Table(["model", "points", "perplexity", "iterations"], rows,
                                          "t-SNE settings. A picture, not an estimate: no interval.")])


def _per_image(ctx, stage: str, key: str, rows: dict[int, int], count: int) -> dict[str, np.ndarray]:
    """{model: (count,) values} of a per-image array of ``stage`` placed at the explorer's rows
    (``rows``: test index → row), NaN for images the stage did not measure."""
    found = {}
    outputs = ctx.outputs.get(stage, {})
    if not outputs:
        # A stage that did not run has no sample to draw (localisation's needs object masks).
        return found
    indices = ctx.sample(ctx.config.samples.get(stage) or 0, with_masks=stage == "localization").tolist()
    for model, output in outputs.items():
        if key not in output.arrays:
            continue
        values = np.full(count, np.nan)
        for index, value in zip(indices, np.asarray(output.arrays[key], dtype=np.float64), strict=True):
            if index in rows:
                values[rows[index]] = value
        found[model] = values
    return found


def _explorer_metrics(ctx) -> list[tuple[str, str, str, str]]:
    """The per-image metrics the explorer colours by: (name, stage, array key, what it means)."""
    metrics = [("invariance IoU", "invariance", item_key("average", "iou"),
                "Mean IoU of the RELAX maps over the augmentations (higher: more invariant).")]
    for name in ctx.config.settings.get("faithfulness", {}).get("explainers", []):
        metrics.append((f"deletion AUC − random ({explainer_label(name)})", "faithfulness",
                        item_key(name, "deletion_gap"), "Below 0: the map deletes what matters faster than a random order."))
    for name in ctx.config.settings.get("localization", {}).get("explainers", []):
        metrics.append((f"pointing game ({explainer_label(name)})", "localization", item_key(name, "pointing_game"),
                        "1: the map's maximum lies on the object."))
    for name in ctx.config.settings.get("faithfulness", {}).get("explainers", []):
        metrics.append((f"uncertainty ({explainer_label(name)})", "faithfulness", item_key(name, "uncertainty"),
                        "The map's mean uncertainty (RELAX: the variance of the masked similarity)."))
    return metrics


def explorer(ctx, outputs: dict, settings: dict) -> SectionContent:
    tsne_outputs = ctx.outputs.get("tsne", {})
    if not tsne_outputs:
        return SectionContent(notes=["The explorer places images on each model's t-SNE: add the tsne experiment."])
    first = next(iter(tsne_outputs.values())).arrays
    indices = np.asarray(first["indices"])
    rows = {int(index): row for row, index in enumerate(indices)}
    names = ctx.test_data.class_names
    items = [str(int(i)) for i in indices]
    views = [EmbeddingView(model, output, o.arrays[output], o.arrays[f"neighbours_{output}"])
             for model, o in tsne_outputs.items() for output in ("pooled", "projection")]
    metrics, notes = {}, {}
    for label, stage, key, note in _explorer_metrics(ctx):
        values = _per_image(ctx, stage, key, rows, len(items))
        if values:
            metrics[label], notes[label] = values, note
    maps: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    # The explained images are the faithfulness and perceptual experiments' (nested samples):
    # their maps are stored with them, so the explorer explains nothing again.
    for stage in ("faithfulness", "perceptual"):
        indices_of_stage = ctx.sample(ctx.config.samples.get(stage) or 0).tolist()
        for model, output in ctx.outputs.get(stage, {}).items():
            for key, values in output.arrays.items():
                if not key.startswith("maps__"):
                    continue
                _, name, kind = key.split("__")
                title = explainer_label(name) if stage != "perceptual" else f"perceptual: {kind}"
                if kind == "uncertainty":
                    title += " uncertainty"
                for row, index in enumerate(indices_of_stage):
                    if index in rows:
                        maps.setdefault(str(index), {}).setdefault(model, {})[title] = values[row].astype(np.float32)
    thumbnails = ctx.display(ctx.images(torch.as_tensor(indices, dtype=torch.long)))
    data = ExplorerData(items, [names[int(label)] for label in first["labels"]], thumbnails, views,
                        metrics, maps, notes)
    # Without JavaScript (and in print): the first explained image's maps in every model.
    figures = []
    example = next((item for item in items if item in maps), None)
    if example is not None:
        picture = thumbnails[rows[int(example)]]
        # The perceptual section already draws every model's component maps.
        grid = [(model, [(kind, picture, values) for kind, values in per_model.items()
                         if not kind.startswith("perceptual")])
                for model, per_model in maps[example].items()]
        figures.append(("example", f"Every model's RELAX and Grad-CAM maps of test image {example} (raw maps, "
                        "own colour bar); the interactive explorer above shows every explained image.",
                        heatmap_grid(grid)))
    return SectionContent(figures, [], [
        f"{len(items)} points per plot (the t-SNE sample); {len(maps)} of them, outlined, are explained images "
        "with every model's maps (those of the faithfulness and perceptual experiments). Per-image metrics come "
        "from the experiments that measured the image: every experiment takes the first images of one seeded "
        "order, so its images are the first points."
    ], [embedding_explorer(data)])


def invariance(ctx, outputs: dict, settings: dict) -> SectionContent:
    augmentations = settings["augmentations"]
    columns = [*augmentations, "average"] + ([RETEST] if settings["retest"] else [])
    paths = {a: (a,) for a in augmentations} | {"average": ("average",), RETEST: (RETEST,)}
    rows_iou, rows_corr, heat, drills = [], [], {}, []
    indices = ctx.sample(ctx.config.samples["invariance"])
    thumbnails = _thumbnails(ctx, indices)
    for label, models in _rows(ctx, outputs):
        rows_iou.append([label, *[_cell(outputs, models, *paths[c], "iou") for c in columns]])
        drills.append(_drill(f"{label}: invariance IoU per image", "mean IoU over the augmentations",
                             outputs[label].arrays[item_key("average", "iou")], thumbnails)
                      if label in outputs else None)
        rows_corr.append([label, *[_cell(outputs, models, *paths[c], "corr") if c != "average" else None for c in columns]])
        heat[label] = {a: _mean(_cell(outputs, models, a, "iou")) for a in augmentations}
    first = next(iter(outputs.values())).results
    for kind in CHANCE_MAPS:
        rows_iou.append([kind, *[first["chance"][kind]["iou"] if c == "average" else None for c in columns]])
        drills.append(None)
    count = first["num_images"]
    retest_note = (" Retest: the unchanged image explained again with other masks (seed + 1), the ceiling"
                   " an augmentation's score can reach given RELAX's own noise." if settings["retest"] else "")
    # The example row shows each augmented image with its own map, in the augmented frame.
    image = ctx.images(indices[:1])
    views = [("original", image)] + [
        (a, invariance_augmentation(a, ctx.mean, ctx.std).apply(image)) for a in augmentations
    ]
    pictures = {name: ctx.display(view)[0] for name, view in views}
    grid = [(m, [(name, pictures[name], outputs[m].arrays["example_maps"][i]) for i, (name, _) in enumerate(views)])
            for m in _examples(ctx, outputs)]
    return SectionContent(
        [("iou", "Mean IoU per model and augmentation (Table 1 of the reference report); intervals in the table.",
          invariance_table_figure(heat)),
         ("examples", "RELAX importance of one image under each augmentation (raw maps, own colour bar).",
          heatmap_grid(grid))],
        [Table(["model", *columns], rows_iou, drill=drills, caption=
               f"IoU of mean-binarised RELAX maps over {count} images, 95% bootstrap intervals over images; "
               f"average: over the augmentations, per image. The random map (chance) and the constant map "
               f"are scored on the same images: a constant map is trivially invariant, so invariance "
               f"alone does not show that a map explains anything.{retest_note}"),
         Table(["model", *columns], rows_corr, f"Pearson correlation of the raw maps over {count} images, "
               "95% bootstrap intervals.")],
    )


def faithfulness(ctx, outputs: dict, settings: dict) -> SectionContent:
    figures, rows = [], []
    for model in _examples(ctx, outputs):
        results = outputs[model].results
        curves = {}
        for name in settings["explainers"]:
            x = np.asarray(results[name]["x"])
            for curve in ("deletion", "insertion"):
                curves[f"{explainer_label(name)} {curve}"] = (x, np.asarray(results[name]["curves"][curve]))
        for curve in ("deletion", "insertion"):
            curves[f"random order {curve}"] = (x, np.asarray(results["chance_curves"]["random order"][curve]))
        figures.append((model, f"Deletion and insertion curves of {model} (mean over images).", curves_figure(
            curves, xlabel="fraction of pixels removed / inserted", ylabel="cosine similarity to the original",
            title=model)))
    drills = []
    thumbnails = _thumbnails(ctx, ctx.sample(ctx.config.samples["faithfulness"]))
    for label, models in _rows(ctx, outputs):
        chance = {c: _cell(outputs, models, "chance", "random order", f"{c}_auc") for c in ("deletion", "insertion")}
        for name in [*settings["explainers"], "random order", "constant map"]:
            key = item_key(name, "deletion_auc")
            drills.append(_drill(f"{label} · {name}: deletion AUC per image", "deletion AUC",
                                 outputs[label].arrays[key], thumbnails)
                          if label in outputs and key in outputs[label].arrays else None)
            path = (name,) if name in settings["explainers"] else ("chance", name)
            deletion, insertion = (_cell(outputs, models, *path, f"{c}_auc") for c in ("deletion", "insertion"))
            verdict = "–"
            if name in settings["explainers"]:
                better = [compare.above_chance(deletion, chance["deletion"], False),
                          compare.above_chance(insertion, chance["insertion"], True)]
                verdict = {(True, True): "both", (True, False): "deletion only",
                           (False, True): "insertion only"}.get(tuple(bool(b) for b in better), "neither")
            rows.append([label, explainer_label(name) if name in settings["explainers"] else name,
                         deletion, insertion, verdict])
    count = next(iter(outputs.values())).results["num_images"]
    table = Table(["model", "map", "deletion AUC (lower is better)", "insertion AUC (higher is better)",
                   "better than the random order"], rows, drill=drills, caption=
                  f"Over {count} images, 95% bootstrap intervals over images; baseline {settings['baseline']!r}, "
                  f"{settings['steps']} steps. The random order and the constant map are each model's chance "
                  f"levels on the same images; 'better' means the interval lies wholly beyond the random "
                  f"order's mean.")
    return SectionContent(figures, [table])


def localization(ctx, outputs: dict, settings: dict) -> SectionContent:
    scored = {m: o for m, o in outputs.items() if "skipped" not in o.results}
    if not scored:
        reason = next(iter(outputs.values())).results["skipped"]
        return SectionContent([], [Table(["model", "result"], [[m, reason] for m in outputs], "Not measured.")])
    bars, rows, drills = {}, [], []
    first = next(iter(scored.values())).results
    thumbnails = _thumbnails(ctx, ctx.sample(ctx.config.samples["localization"], with_masks=True))
    for label, models in _rows(ctx, scored):
        for name in settings["explainers"]:
            pointing, mass = (_cell(scored, models, "explainers", name, metric)
                              for metric in ("pointing_game", "relevance_mass"))
            drills.append(_drill(f"{label} · {explainer_label(name)}: relevance mass per image", "relevance mass",
                                 scored[label].arrays[item_key(name, "relevance_mass")], thumbnails)
                          if label in scored else None)
            bars.setdefault(label, {})[f"{explainer_label(name)} pointing"] = pointing
            bars[label][f"{explainer_label(name)} mass"] = mass
            rows.append([label, explainer_label(name), pointing, mass])
    for kind in CHANCE_MAPS:
        rows.append([kind, "–", first["chance"][kind]["pointing_game"], first["chance"][kind]["relevance_mass"]])
        drills.append(None)
    reference = {}
    for name in settings["explainers"]:
        reference[f"{explainer_label(name)} pointing"] = first["chance"]["random map"]["pointing_game"]["mean"]
        reference[f"{explainer_label(name)} mass"] = first["chance"]["random map"]["relevance_mass"]["mean"]
    area = first["object_area"]
    return SectionContent(
        [("scores", "Pointing game and relevance mass with 95% intervals; the dashed line is a random map's score.",
          bar_chart(bars, ylabel="score", xlabel="metric", title="Localisation", reference=reference,
                    reference_label="random map"))],
        [Table(["model", "map", "pointing game", "relevance mass"], rows, drill=drills, caption=
               f"Over {first['num_images']} test images with an object mask (objects cover "
               f"{format_estimate(area)} of the image): pointing game with Wilson intervals, relevance "
               f"mass (offset-free: the map minus its mean, positive part) with bootstrap intervals. Chance "
               f"rows average {CHANCE_DRAWS} draws per image: a random map scores about the object's area "
               f"on both, a constant map the area on the pointing game (its ties broken at random) and 0 "
               f"on the mass. The {RANDOM_INIT} row shows how much of the score low-level contrast alone "
               f"earns.")],
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
                         result["spearman_interval"][-1], result["verdict"],
                         FLAG if result["verdict"] == "fails" else ""])
    return SectionContent(
        [("spearman", "Mean Spearman correlation with the trained model's maps after randomising the top k blocks (k on the x axis).",
          curves_figure(curves, xlabel="blocks randomised (top first)", ylabel="Spearman correlation",
                        title="Cascading randomisation"))],
        [Table(["model", "explainer", "blocks randomised", "Spearman per step", "last step (95% interval)",
                "verdict", "flag"], rows,
               f"Threshold {settings['threshold']} on the last step, {count} images, bootstrap interval over "
               f"images: passes when the whole interval lies below the threshold, fails when it lies at or "
               f"above it, inconclusive when it straddles it (more images would decide).")],
    )


def perceptual(ctx, outputs: dict, settings: dict) -> SectionContent:
    components = list(dict.fromkeys(c for o in outputs.values() for c in o.results["components"]))
    bars, rows, ranking = {}, [], []
    for label, models in _rows(ctx, outputs):
        effects = {c: _cell(outputs, models, "components", c, "effect") for c in components}
        bars[label] = effects
        rows.append([label, *[effects[c] for c in components]])
        order = sorted((c for c in components if _mean(effects[c]) is not None), key=lambda c: -effects[c]["mean"])
        ranking.append([label, " > ".join(order)])
    first = next(iter(outputs.values()))
    picture = ctx.display(ctx.images(ctx.sample(ctx.config.samples["perceptual"])[:1]))[0]
    shown = [c for c in components if f"component_{c}" in first.arrays]
    grid = [("components", [("input", picture, None)]
             + [(c, first.arrays[f"component_{c}"], None) for c in shown])]
    grid += [(m, [("input", picture, None)] + [(c, picture, normalize_map(outputs[m].arrays[f"maps__perceptual__{c}"][0].astype(np.float32), "zscore"))
                                               for c in shown if f"maps__perceptual__{c}" in outputs[m].arrays])
             for m in _examples(ctx, outputs)]
    skipped = sorted({f"{c} ({why})" for o in outputs.values() for c, why in o.results["skipped"].items()})
    count = first.results["num_images"]
    return SectionContent(
        [("effects", "Each component's effect (1 − E[s], the expected drop in cosine similarity when it is "
          "removed from a random region) with 95% intervals over images, on an axis scaled to the data.",
          bar_chart(bars, ylabel="effect: 1 − E[similarity]", title="Perceptual components")),
         ("examples", "First row: the input and what each component's masked images are made of (the image "
          "without the component, or the component's own image). Then each model's component maps over the "
          "input, z-scored per map for display only.", heatmap_grid(grid))],
        [Table(["model", *components], rows,
               f"Effect over {count} images, 95% bootstrap intervals over images. 0 means removing the component "
               f"leaves the embedding unchanged; compare with the {RANDOM_INIT} row."
               + (f" Skipped: {'; '.join(skipped)}." if skipped else "")),
         Table(["model", "components by effect (largest first)"], ranking,
               "Ranking by mean effect; neighbours whose intervals overlap are not distinguished.")],
    )


def gradcam_pairs(ctx, outputs: dict, settings: dict) -> SectionContent:
    grid, matched, rows = [], [], []
    for model in _examples(ctx, outputs):
        a, results = outputs[model].arrays, outputs[model].results
        found = results.get("correspondence")
        for i, pair in enumerate(results["pairs"]):
            title = f"{model}: {pair['kind']} (s={pair['similarity']:.2f})"
            grid.append((title, [("image", a["first_images"][i], a["first_maps"][i]),
                                 ("pair", a["second_images"][i], a["second_maps"][i])]))
            rows.append([model, pair["kind"], pair["image"], pair["partner"], pair["similarity"]])
            if found is not None:
                size = a["first_images"][i].shape[:2]
                matches = found["matches"][i]
                matched.append((title, [
                    ("image", a["first_images"][i], a["first_correspondence"][i],
                     cell_boxes([m["cell"] for m in matches], found["grid"], size)),
                    ("pair", a["second_images"][i], a["second_correspondence"][i],
                     cell_boxes([m["reference_cell"] for m in matches], found["reference_grid"], size)),
                ]))
    figures = [("pairs", "Each row: an image and its pair, each with its own Grad-CAM map (raw, own colour bar).",
                heatmap_grid(grid))]
    if matched:
        figures.append(("correspondence", "Each row: the pair's correspondence maps (raw, own colour bar) and its "
                        "best-matching cell pairs, one colour per pair of cells (strongest first: blue, orange, green, ...).",
                        heatmap_grid(matched)))
    return SectionContent(
        figures,
        [Table(["model", "pair", "image", "partner", "cosine similarity"], rows,
               "Test-image indices of each pair. Examples, not estimates: no interval.")],
    )


def _verdicts(ctx, models: list[str]) -> str | None:
    stages = ctx.outputs.get("sanity", {})
    if not all(m in stages for m in models):
        return None
    parts = []
    for name in stages[models[0]].results:
        verdicts = [stages[m].results[name]["verdict"] for m in models]
        counted = ", ".join(f"{v} {verdicts.count(v)}/{len(verdicts)}" for v in dict.fromkeys(verdicts))
        parts.append(f"{explainer_label(name)}: {verdicts[0] if len(set(verdicts)) == 1 else counted}")
    return "; ".join(parts)


def _health(ctx, models: list[str]) -> str | None:
    stages = ctx.outputs["health"]
    if not all(m in stages for m in models):
        return None
    ranks = " / ".join(f"{stages[m].results['pooled']['rankme']:.1f}" for m in models)
    warned = sum(bool(stages[m].results["warnings"]) for m in models)
    return f"{ranks}; " + (f"warned ({warned}/{len(models)})" if warned else "no warning")


def tradeoff_columns(ctx) -> dict[str, str]:
    """The trade-off table's columns: {row key: header}."""
    headline = [m for m in compare.metrics(ctx) if m.headline]
    health = {"health": "health (RankMe pooled; warnings)"} if "health" in ctx.outputs else {}
    return {"model": "model", "principle": "learning principle", **{m.key: m.label for m in headline},
            "sanity": "sanity check", **health,
            "training_seconds": "training time (s)"}


def grouped_units(ctx) -> dict[str, list[str]]:
    """:func:`compare.units` with the units of one learning principle next to each other, the
    principles in the order they first appear and the random-weight floor last."""
    units = compare.units(ctx)
    principles = [ctx.models[models[0]].principle for models in units.values()]
    order = list(dict.fromkeys(p for p in principles if p != RANDOM_WEIGHTS)) + [RANDOM_WEIGHTS]
    return dict(sorted(units.items(), key=lambda item: order.index(ctx.models[item[1][0]].principle)))


def tradeoff_rows(ctx) -> list[dict[str, Any]]:
    """One dict per unit of comparison (a model, or a model's seeds) with its headline metrics
    as estimate dicts, its sanity verdicts and training time; then a ``chance`` row."""
    headline = [m for m in compare.metrics(ctx) if m.headline]
    rows = []
    for unit, models in grouped_units(ctx).items():
        seconds = [ctx.models[m].training_seconds for m in models]
        row: dict[str, Any] = {"model": unit, "principle": ctx.models[models[0]].principle}
        row.update({m.key: compare.estimate(ctx, m, models) for m in headline})
        row["sanity"] = _verdicts(ctx, models)
        if "health" in ctx.outputs:
            row["health"] = _health(ctx, models)
        row["training_seconds"] = None if None in seconds else float(np.mean(seconds))
        rows.append(row)
    if rows:
        first = compare.units(ctx)[rows[0]["model"]]
        chance = {"model": "chance", "principle": None} | {m.key: compare.chance(ctx, m, first) for m in headline}
        rows.append(chance | {"sanity": None, "training_seconds": None}
                    | ({"health": None} if "health" in ctx.outputs else {}))
    return rows


def precision_notes(ctx) -> list[str]:
    """How wide the study's intervals are: the median half-width of each headline metric."""
    notes = []
    for metric in (m for m in compare.metrics(ctx) if m.headline):
        widths = [
            (e["ci_high"] - e["ci_low"]) / 2
            for models in compare.units(ctx).values()
            if (e := compare.estimate(ctx, metric, models)) is not None and e["ci_low"] is not None
        ]
        sizes = {_size(e) for models in compare.units(ctx).values() if (e := compare.estimate(ctx, metric, models))}
        if widths:
            notes.append(f"{metric.label}: ±{float(np.median(widths)):.3f} (median half-width of the 95% "
                         f"intervals, {', '.join(sorted(sizes))}).")
    return notes


def tradeoff(ctx, outputs: dict, settings: dict) -> SectionContent:
    rows = tradeoff_rows(ctx)
    columns = tradeoff_columns(ctx)
    pairs = compare.comparisons(ctx)
    metrics = compare.metric_by_key(ctx)
    best = {key: compare.best(ctx, metrics[key], pairs) for key in columns if key in metrics}
    cells = []
    for row in rows:
        line = []
        for key in columns:
            value = row[key]
            if best.get(key) is not None and best[key] == row["model"]:
                value = f"{format_estimate(value)} ▲"
            line.append(value)
        cells.append(line)
    table = Table(list(columns.values()), cells, sortable=True, caption=
                  "Representation quality (left) against explanation quality (right), 95% intervals (sample "
                  "sizes in each section). ▲: better than every other trained model, the paired difference's "
                  "interval excluding 0. The chance row: 1 / classes, a random map, a random pixel order.")
    shown = [r for r in pairs if r["metric"] in columns]
    comparison = Table(
        ["metric", "model a", "model b", "a − b (95% interval)", "items", "real difference"],
        [[r["label"], r["a"], r["b"], r["difference"], _size(r["difference"]), "yes" if r["real"] else "no"]
         for r in shown],
        "Paired differences on the same items (bootstrap; Welch's interval over seeds when both models have "
        "several). Real: the interval excludes 0. Intervals are per comparison, not corrected for their number.",
    )
    others = [r for r in pairs if r["metric"] not in columns and r["real"]]
    tables = [table, comparison]
    if others:
        tables.append(Table(
            ["metric", "model a", "model b", "a − b (95% interval)", "items"],
            [[r["label"], r["a"], r["b"], r["difference"], _size(r["difference"])] for r in others],
            "The other metrics' real differences (all pairs in results.json, 'comparisons').",
        ))
    figures = []
    x_key = "linear_top1" if "linear_top1" in columns else "knn_top1"
    if x_key in columns and "invariance_iou" in columns:
        points = {row["model"]: (row[x_key], row["invariance_iou"]) for row in rows[:-1]
                  if row[x_key] is not None and row["invariance_iou"] is not None}
        chance = rows[-1]
        if points:
            figures.append(("scatter", "Each point is a model with its 95% intervals: representation quality "
                            "against saliency invariance; dashed lines are chance.",
                            scatter_figure(points, xlabel=columns[x_key], ylabel=columns["invariance_iou"],
                                           title="Trade-off", reference=(_mean(chance[x_key]), _mean(chance["invariance_iou"])))))
    notes = compare.conclusion(ctx, pairs) + ["How precise these numbers are: " + " ".join(precision_notes(ctx))]
    numeric = [key for key in columns if key in metrics]
    interactive = []
    if len(numeric) >= 2:
        trained = rows[:-1]
        choose = lambda key, default: key if key in numeric else default  # noqa: E731
        x = choose(x_key, numeric[0])
        y = choose("invariance_iou", next(k for k in numeric if k != x))
        interactive.append(tradeoff_scatter(
            [row["model"] for row in trained], {columns[k]: [row[k] for row in trained] for k in numeric},
            x=columns[x], y=columns[y]))
    return SectionContent(figures, tables, notes, interactive)


def _ground_truth_row(row: dict) -> list:
    what = explainer_label(row["explainer"]) if "explainer" in row else f"{row['component']} component"
    if row["test"] == "planted_cue":
        against = [row["control"], row["random_map"]]
        contrast = (f"ratio to control {format_estimate(row['ratio'], 2)}, to random "
                    f"{format_estimate(row['ratio_to_random'], 2)} (threshold {row['threshold']:g})")
        direct = "–"
    elif row["test"] == "grayscale_floor":
        against = ["–", "–"]
        contrast = f"largest |effect| {row['largest_abs_effect']:.1e} (threshold {row['threshold']:g})"
        direct = "–"
    else:
        against = [row["control"], "–"]
        contrast = f"{row['difference_of']}: {format_estimate(row['difference'])}"
        direct = f"{format_estimate(row['direct_difference'])} ({row['direct_verdict']})"
    return [row["principle"], row["method"], row["test"].replace("_", " "), what, row["value"], *against, contrast,
            direct, row["verdict"]]


def _ground_truth_drill(result, row: dict) -> Drill | None:
    """The images behind a ground-truth row and each one's value of the row's measure."""
    if row["test"] == "planted_cue":
        images, key = "cue_images", item_key(row["method"], row["explainer"], "cue", "share")
    elif row["test"] == "grayscale_floor":
        images, key = "policy_images", item_key(row["method"], "grayscale_floor", "effect")
    elif "explainer" in row:
        images, key = "policy_images", item_key(row["method"], row["test"], row["augmented_model"], row["explainer"],
                                                "map_correlation")
    else:
        images, key = "policy_images", item_key(row["method"], row["test"], row["augmented_model"], row["component"],
                                                "effect")
    if images not in result.arrays or key not in result.arrays:
        return None
    thumbnails = {f"{row['test']}-{i}": picture for i, picture in enumerate(result.arrays[images])}
    what = explainer_label(row["explainer"]) if "explainer" in row else f"{row['component']} component"
    return _drill(f"{row['method']} · {row['test'].replace('_', ' ')} · {what}: {row['measure']} per image",
                  row["measure"], result.arrays[key], thumbnails)


def groundtruth(ctx, outputs: dict, settings: dict) -> SectionContent:
    result = outputs["study"]
    rows = result.results["tests"]
    notes = []
    for test in dict.fromkeys(row["test"] for row in rows):
        first = next(row for row in rows if row["test"] == test)
        notes.append(f"{test.replace('_', ' ')}: expected: {first['expected']}; failing means: {first['failing_means']}.")
    figures = []
    for method in dict.fromkeys(row["method"] for row in rows):
        cue = [row["explainer"] for row in rows if row["test"] == "planted_cue" and row["method"] == method]
        if not cue:
            continue
        images = result.arrays["cue_images"][:3]
        grid = [(f"image {i + 1}", [("input", images[i], None)] + [
            (f"{explainer_label(name)} · {model}", images[i], result.arrays[f"maps__{method}__{name}__{model}"][i])
            for name in cue for model in ("cue", "cue-control")]) for i in range(len(images))]
        figures.append((f"planted-cue-{method}", f"{method}: marked test images and each explainer's raw map for the "
                        "cue model and the control (the marker is the black-and-white square).", heatmap_grid(grid)))
    table = Table(
        ["learning principle", "training method", "test", "explainer or component", "measured", "control model", "random map", "contrast",
         "direct contrast (no explainer)", "verdict"],
        [_ground_truth_row(row) for row in rows], drill=[_ground_truth_drill(result, row) for row in rows], caption=
        f"{result.results['num_images']} test images per test, 95% bootstrap intervals over images (paired where "
        f"two models see the same images). Planted cue: share of offset-free importance on the marker; policy "
        f"tests: the component's effect 1 − E[s] of the augmented model, its control trained without the "
        f"augmentation, and their difference, oriented so that the expected answer is > 0; the direct contrast is the "
        f"same difference of the similarity drop when the component is removed from the whole image. Map policy "
        f"tests: the correlation of each image's map with the map of its grayscale or blurred version, for the "
        f"augmented model and the control; the direct contrast is the same difference of cos(f(x), f(T(x))).",
    )
    return SectionContent(figures, [table], notes=notes)
