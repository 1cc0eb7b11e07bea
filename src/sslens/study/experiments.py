"""The study's experiments: one small function per experiment, found by name in :data:`EXPERIMENTS`.

Each per-model experiment is ``run(ctx, model, settings, samples) -> StageResult``: it measures
one model on the study's fixed, seeded sample of test images and returns JSON numbers plus the
arrays its figure draws. Its report section (figure, table, reading aid) is built from the
stored results alone by the matching function in :mod:`sslens.study.sections`, so a cached
stage redraws without recomputing. The trade-off table has no ``run``: it summarises the others.

Every explainer explains the *pooled* representation (``method.encoder("pooled")``), what kNN
and the linear probe evaluate; t-SNE shows both the pooled and the projection-head output.

Under ``torchrun`` the explanation experiments split their images across the ranks (through
:meth:`StudyContext.explain_fn` and :mod:`sslens.study.sharding`) and every rank gets all maps
back, so each rank computes the same result; the other experiments run whole on every rank.

To add an experiment, write its ``run`` and ``section`` functions and register them with
:func:`register_experiment`; list it in :data:`DEFAULT_EXPERIMENTS` to run it by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sslens.data.augment import create_views
from sslens.evaluate.embedding import effective_perplexity, tsne_embedding
from sslens.evaluate.features import extract_features
from sslens.evaluate.health import embedding_health, health_warnings
from sslens.evaluate.knn import nearest_neighbours
from sslens.evaluate.quality import evaluate_encoder
from sslens.explain.gradcam import flip_and_crop
from sslens.explain.metrics.faithfulness import deletion_insertion
from sslens.explain.metrics.invariance import saliency_invariance
from sslens.explain.metrics.localization import localization_scores
from sslens.explain.metrics.sanity import model_randomization_test
from sslens.explain.perceptual import COMPONENTS, PerceptualComponents
from sslens.registry import Registry
from sslens.stats import exact
from sslens.study import groundtruth, sections
from sslens.study.cache import StageResult
from sslens.study.context import StudyContext
from sslens.study.explainers import build_explainer
from sslens.study.measures import (
    CHANCE_DRAWS,
    CHANCE_MAPS,
    chance_maps,
    hits,
    image_mean,
    item_key,
    seed_for,
)
from sslens.study.models import StudyModel
from sslens.study.sharding import explain_rows

#: The built-in experiments are defined in this module; users register more with
#: :func:`register_experiment`.
EXPERIMENTS = Registry("experiment")

#: The experiments a study runs when its config names none, in report order.
DEFAULT_EXPERIMENTS = (
    "quality", "health", "tsne", "explorer", "invariance", "faithfulness", "localization", "sanity", "perceptual",
    "gradcam_pairs", "tradeoff",
)

RunFn = Callable[[StudyContext, StudyModel, dict, int | None], StageResult]


@dataclass(frozen=True)
class Experiment:
    """A registered experiment.

    Attributes:
        title, reading_aid: the report section's heading and one-line guide.
        run: the per-model measurement, or None for a summary of other experiments.
        section: ``section(ctx, outputs {model: StageResult}, settings) -> SectionContent``.
        defaults: every setting the experiment takes, with its default (types are checked
            against these).
        samples: default number of test images, or None when it takes no sample.
        min_samples: the fewest images the experiment can work with.
        explainers: explainers it always runs (those listed in ``settings["explainers"]`` are
            added); their options enter the stage's cache key.
        scope: "model" (``run`` once per model) or "study" (``run(ctx, None, ...)`` once, for
            an experiment with models of its own; its section gets ``{"study": result}``).
        check: ``check(settings)`` raises a UserError for settings the types alone do not catch.
    """

    title: str
    reading_aid: str
    run: RunFn | None
    section: Callable[..., sections.SectionContent]
    defaults: dict = field(default_factory=dict)
    samples: int | None = None
    min_samples: int = 1
    explainers: tuple[str, ...] = ()
    scope: str = "model"
    check: Callable[[dict], None] | None = None

    def explainers_used(self, settings: dict) -> list[str]:
        return sorted(set(self.explainers) | set(settings.get("explainers", [])))


def register_experiment(name: str, **fields: Any) -> Callable[[RunFn | None], RunFn | None]:
    """Decorator: ``@register_experiment("name", title=..., section=..., ...)`` on the run function."""

    def decorator(run: RunFn | None) -> RunFn | None:
        EXPERIMENTS.register(name)(Experiment(run=run, **fields))
        return run

    return decorator


def _pooled(ctx: StudyContext, model: StudyModel) -> torch.nn.Module:
    return model.encoder("pooled", ctx.test_data)


@register_experiment(
    "quality",
    title="Representation quality",
    reading_aid="Top-1 accuracy on the held-out split from frozen pooled features, with Wilson 95% intervals over the test samples; higher is better, chance is 1 / the number of classes.",
    section=sections.quality,
    defaults={"k": 200, "temperature": 0.1, "linear": True, "linear_epochs": 100},
)
def quality(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """Weighted kNN and linear-probe top-1 (:func:`sslens.evaluate.evaluate_encoder`), each with
    its Wilson interval; which test samples each got right is kept for paired comparisons."""
    result = evaluate_encoder(
        _pooled(ctx, model), ctx.train_data, ctx.test_data, k=settings["k"], temperature=settings["temperature"],
        linear=settings["linear"], linear_epochs=settings["linear_epochs"], device=ctx.device, seed=ctx.seed,
        keep_correct=True,
    )
    correct = result.pop("correct")
    intervals = result.pop("intervals")
    results = {
        "knn_top1": intervals["knn_top1"],
        "linear_top1": intervals.get("linear_top1"),
        "chance": exact(1 / len(ctx.test_data.class_names), len(ctx.test_data), "test samples").to_dict(),
        "details": result["details"],
    }
    arrays = {item_key(name): right.astype(np.uint8) for name, right in correct.items()}
    return StageResult(results, arrays)


#: The views every model's alignment is measured with: one recipe for all, so models compare.
HEALTH_VIEWS = "simclr"


@register_experiment(
    "health",
    title="Label-free health of the representations",
    reading_aid="Effective rank (RankMe; its maximum is min(images, dimensions)), alignment of two views (lower is better), uniformity (lower is better, a collapse scores 0) and the std of l2-normalised embeddings (about 1/sqrt(D) when spread, 0 when collapsed), on held-out images; then what the training log warned about.",
    section=sections.health,
    samples=512,
    min_samples=8,
)
def health(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """:func:`~sslens.evaluate.health.embedding_health` of the pooled and projection outputs on
    held-out images (two views from one recipe for every model), and the training log's health
    records and warnings."""
    indices = ctx.sample(samples)
    images = ctx.images(indices)
    data = ctx.test_data
    pixels = data.images[indices.to(data.images.device) if torch.is_tensor(data.images) else indices].cpu()
    recipe = create_views(HEALTH_VIEWS, image_size=data.image_size[0], mean=ctx.mean, std=ctx.std)
    first, second = recipe(pixels, ctx.generator("health.views"))[:2]
    encoders = {output: model.encoder(output, data) for output in ("pooled", "projection")}
    results: dict[str, Any] = embedding_health(
        encoders, images, (first.to(ctx.device), second.to(ctx.device)), seed=seed_for(ctx.seed, "health"),
    )
    log = [r for r in model.training_log() if r.get("kind") == "epoch"]
    keys = ("epoch", "loss", "positive_pair_top1", "rankme_projection", "std_projection", "std_reference",
            "health_warning")
    results["training"] = [{k: r[k] for k in keys if k in r} for r in log]
    results["warnings"] = health_warnings(log)
    results["num_images"] = len(indices)
    results["views"] = HEALTH_VIEWS
    return StageResult(results)


@register_experiment(
    "tsne",
    title="t-SNE of the embeddings",
    reading_aid="Each point is a test image coloured by its label; tight same-colour clusters mean the representation separates the classes.",
    section=sections.tsne,
    defaults={"perplexity": 30.0, "n_iter": 500, "neighbours": 5},
    samples=1000,
    min_samples=8,
)
def tsne(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """2-D t-SNE (fixed seed) of the pooled representation and of the projection output, and
    each image's nearest neighbours (cosine, in the representation) for the report's explorer."""
    indices = ctx.sample(samples)
    data = ctx.test_data.subset(indices)
    arrays = {"labels": data.labels.cpu().numpy(), "indices": indices.numpy()}
    for output in ("pooled", "projection"):
        features = extract_features(model.encoder(output, data), data, device=ctx.device)
        arrays[output] = tsne_embedding(
            features, seed=ctx.seed, perplexity=settings["perplexity"], n_iter=settings["n_iter"]
        )
        # Neighbours in the representation itself, not in the picture: t-SNE distorts distances.
        arrays[f"neighbours_{output}"] = nearest_neighbours(features, settings["neighbours"]).numpy()
    results = {
        "num_points": len(indices),
        "perplexity": effective_perplexity(len(indices), settings["perplexity"]),
        "n_iter": settings["n_iter"],
        "seed": ctx.seed,
    }
    return StageResult(results, arrays)


register_experiment(
    "explorer",
    title="Explorer: each image in every model",
    reading_aid="Hover a point for its image, label, nearest neighbours and per-image metrics; click it to pin every model's maps of that image; colour the points by label or by a metric; select points in one plot to see the same images in the others. Needs JavaScript; the other sections' static figures do not.",
    section=sections.explorer,
)(None)


def _agreement(raw: dict, seed: int, purpose: str) -> dict:
    """IoU and correlation of :func:`saliency_invariance`'s per-image values, with intervals."""
    return {
        "iou": image_mean(raw["per_image_iou"], seed, f"{purpose} iou"),
        "corr": image_mean(raw["per_image_corr"], seed, f"{purpose} corr"),
        "valid_fraction": raw["valid_fraction"],
    }


@register_experiment(
    "invariance",
    title="Saliency invariance (RELAX)",
    reading_aid="IoU of mean-binarised RELAX maps of an image and of its augmented copy, mapped back; 1 means the explanation follows the transformation exactly. Read each against the retest (same image, other masks: the most RELAX's own noise allows) and the random map (chance, about 1/3).",
    section=sections.invariance,
    defaults={"augmentations": ["hflip", "vflip", "rot15", "grayscale"], "retest": True},
    samples=24,
    explainers=("relax",),
)
def invariance(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """:func:`~sslens.explain.metrics.invariance.saliency_invariance` of RELAX maps (reference
    Table 1), with the same test on random and constant maps as chance levels."""
    indices = ctx.sample(samples)
    images = ctx.images(indices)
    encoder = _pooled(ctx, model)
    relax = ctx.explain_fn("relax", encoder, indices)
    first_maps = []  # the first image's map in each call: original, then each augmentation

    def explain(x: torch.Tensor) -> torch.Tensor:
        maps = relax(x)
        first_maps.append(maps[0].detach().cpu())
        return maps

    # Another seed draws other masks: the retest measures the explainer's own noise.
    retest = ctx.explain_fn("relax", encoder, indices, seed=ctx.seed + 1) if settings["retest"] else None
    augmentations = settings["augmentations"]
    raw = saliency_invariance(explain, images, augmentations=augmentations, mean=ctx.mean, std=ctx.std, retest_fn=retest)
    results: dict[str, Any] = {name: _agreement(value, ctx.seed, name) for name, value in raw.items()}
    arrays = {"example_maps": torch.stack(first_maps).numpy()}
    for name, value in raw.items():
        arrays[item_key(name, "iou")] = np.asarray(value["per_image_iou"], dtype=np.float64)
    # The mean over augmentations per image, the trade-off's invariance (the retest is a ceiling).
    arrays[item_key("average", "iou")] = np.nanmean([arrays[item_key(a, "iou")] for a in augmentations], axis=0)
    results["average"] = {"iou": image_mean(arrays[item_key("average", "iou")], ctx.seed, "mean iou")}
    results["chance"] = {
        kind: {"iou": image_mean(_chance_invariance(ctx, images, augmentations, kind), ctx.seed, f"{kind} iou")}
        for kind in CHANCE_MAPS
    }
    results["num_images"] = len(images)
    return StageResult(results, arrays)


def _chance_invariance(ctx: StudyContext, images: torch.Tensor, augmentations: list[str], kind: str) -> np.ndarray:
    """Per-image IoU (mean over augmentations) of a map that knows nothing. Random maps are drawn
    anew for every call, so the original's and the augmented copy's maps are independent."""
    calls = 0

    def maps(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return chance_maps((len(x), *x.shape[2:]), ctx.seed + calls, x.device)[kind]

    chance = saliency_invariance(maps, images, augmentations=augmentations, mean=ctx.mean, std=ctx.std)
    return np.nanmean([chance[a]["per_image_iou"] for a in augmentations], axis=0)


#: The four curves of :func:`deletion_insertion`, and which random curve is each one's chance.
_CURVES = ("deletion", "insertion")


@register_experiment(
    "faithfulness",
    title="Faithfulness: deletion and insertion",
    reading_aid="Cosine similarity to the original embedding as the most important pixels are removed (deletion, lower AUC is better) or revealed (insertion, higher is better), against a random order and a constant map (chance) on the same images.",
    section=sections.faithfulness,
    defaults={"explainers": ["relax", "gradcam"], "steps": 16, "baseline": "zero", "random_repeats": 1},
    samples=32,
)
def faithfulness(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """:func:`~sslens.explain.metrics.faithfulness.deletion_insertion` for each explainer, and for
    a constant map; the random pixel order is the chance curve. Every map (and uncertainty, with
    its per-image mean) is kept as float16 for the report's explorer."""
    encoder = _pooled(ctx, model)
    indices = ctx.sample(samples)
    images = ctx.images(indices)
    options = {"steps": settings["steps"], "baseline": settings["baseline"], "seed": ctx.seed,
               "random_repeats": settings["random_repeats"]}
    results: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for name in settings["explainers"]:
        explanation = ctx.explanation_fn(name, encoder, indices)(images)
        maps = explanation.importance.to(images.device)
        # Every map is kept (float16) for the report's explorer, which explains these images.
        arrays[f"maps__{name}__importance"] = explanation.importance.cpu().to(torch.float16).numpy()
        if explanation.uncertainty is not None:
            arrays[f"maps__{name}__uncertainty"] = explanation.uncertainty.cpu().to(torch.float16).numpy()
            arrays[item_key(name, "uncertainty")] = explanation.uncertainty.flatten(1).mean(1).double().cpu().numpy()
        raw = deletion_insertion(encoder, images, maps, **options)
        results[name] = {
            **{f"{curve}_auc": image_mean(raw["per_image"][f"{curve}_auc"], ctx.seed, f"{name} {curve}") for curve in _CURVES},
            "x": raw["x"], "curves": raw["curves"], "settings": raw["settings"],
        }
        for curve in _CURVES:
            arrays[item_key(name, f"{curve}_auc")] = np.asarray(raw["per_image"][f"{curve}_auc"])
        random_order = raw  # every explainer's random order is the same seeded one
    constant = deletion_insertion(encoder, images, chance_maps((len(images), *images.shape[2:]), ctx.seed, images.device)["constant map"], **options)
    results["chance"] = {
        "random order": {f"{c}_auc": image_mean(random_order["per_image"][f"random_{c}_auc"], ctx.seed, f"random {c}") for c in _CURVES},
        "constant map": {f"{c}_auc": image_mean(constant["per_image"][f"{c}_auc"], ctx.seed, f"constant {c}") for c in _CURVES},
    }
    results["chance_curves"] = {"random order": {c: random_order["curves"][f"random_{c}"] for c in _CURVES}}
    results["num_images"] = len(images)
    for curve in _CURVES:
        arrays[item_key("random order", f"{curve}_auc")] = np.asarray(random_order["per_image"][f"random_{curve}_auc"])
    # Each model's similarity falls at its own rate under any deletion, so AUCs compare across
    # models only as the gap to that model's own random order, image by image.
    for name in settings["explainers"]:
        for curve in _CURVES:
            gap = arrays[item_key(name, f"{curve}_auc")] - arrays[item_key("random order", f"{curve}_auc")]
            arrays[item_key(name, f"{curve}_gap")] = gap
            results[name][f"{curve}_gap"] = image_mean(gap, ctx.seed, f"{name} {curve} gap")
    return StageResult(results, arrays)


def _localization(maps: torch.Tensor, masks: torch.Tensor, settings: dict, seed: int) -> tuple[dict, dict]:
    """(estimates, per-image arrays) of the pointing game and the offset-free relevance mass."""
    raw = localization_scores(
        maps, masks, ("pointing_game", "relevance_mass"),
        options={"pointing_game": {"tolerance": settings["tolerance"]}}, seed=seed,
    )
    return (
        {"pointing_game": hits(raw["pointing_game"]["per_image"]),
         "relevance_mass": image_mean(raw["relevance_mass"]["per_image"], seed, "relevance mass")},
        {metric: np.asarray(raw[metric]["per_image"], dtype=np.float64) for metric in raw},
    )


def _chance_localization(masks: torch.Tensor, settings: dict, seed: int) -> dict:
    """Each chance map's pointing game and relevance mass, per image the mean over
    :data:`CHANCE_DRAWS` draws (maps and tie-breaking), with bootstrap intervals over images."""
    scores = {kind: {"pointing_game": 0.0, "relevance_mass": 0.0} for kind in CHANCE_MAPS}
    for draw in range(CHANCE_DRAWS):
        for kind, maps in chance_maps(tuple(masks.shape), seed + draw, masks.device).items():
            raw = localization_scores(maps, masks, ("pointing_game", "relevance_mass"),
                                      options={"pointing_game": {"tolerance": settings["tolerance"]}}, seed=seed + draw)
            for metric in scores[kind]:
                scores[kind][metric] = scores[kind][metric] + np.asarray(raw[metric]["per_image"]) / CHANCE_DRAWS
    return {kind: {metric: image_mean(values, seed, f"{kind} {metric}") for metric, values in per_metric.items()}
            for kind, per_metric in scores.items()}


@register_experiment(
    "localization",
    title="Localisation against the ground-truth object",
    reading_aid="Pointing game: how often the map's maximum lies on the object; relevance mass: the share of the map's offset-free importance (what stands above its own mean) inside it. Higher is better; a random map scores about the object's area, a constant map 0 for the mass.",
    section=sections.localization,
    defaults={"explainers": ["relax", "gradcam"], "tolerance": 0.0},
    samples=64,
)
def localization(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """Pointing game and relevance mass of each explainer's maps (datasets with object masks),
    and of random and constant maps on the same images."""
    if getattr(ctx.test_data, "masks", None) is None:
        return StageResult({"skipped": "the dataset has no ground-truth object masks"})
    indices = ctx.sample(samples, with_masks=True)
    images = ctx.images(indices)
    masks = ctx.test_data.masks[indices.to(ctx.test_data.masks.device)].to(images.device)
    encoder = _pooled(ctx, model)
    results: dict[str, Any] = {"explainers": {}, "chance": {}}
    arrays: dict[str, np.ndarray] = {}
    for name in settings["explainers"]:
        maps = ctx.explain_fn(name, encoder, indices)(images).to(images.device)
        results["explainers"][name], per_image = _localization(maps, masks, settings, ctx.seed)
        arrays.update({item_key(name, metric): values for metric, values in per_image.items()})
    results["chance"] = _chance_localization(masks, settings, ctx.seed)
    results["object_area"] = image_mean(masks.flatten(1).float().mean(1).cpu().numpy(), ctx.seed, "object area")
    results["num_images"] = len(indices)
    return StageResult(results, arrays)


@register_experiment(
    "sanity",
    title="Sanity check: cascading model-parameter randomisation",
    reading_aid="Spearman correlation between the maps of the trained model and of copies whose top blocks are re-initialised; it must drop below the threshold. The verdict comes from the 95% interval at the last step: passes (below), fails (at or above: the maps ignore the weights), inconclusive (straddles it: too few images).",
    section=sections.sanity,
    # 5 steps randomise every ResNet block (layer4 … stem): Adebayo et al.'s verdict is read at
    # the fully randomised model; stopping after the top blocks leaves low-level features intact.
    defaults={"explainers": ["relax", "gradcam"], "steps": 5, "threshold": 0.5},
    samples=16,
)
def sanity(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """:func:`~sslens.explain.metrics.sanity.model_randomization_test`, top block first."""
    encoder = _pooled(ctx, model)
    # Layer names as seen from the encoder (an InputAdapter puts the backbone one level down).
    prefix = next(name for name, module in encoder.named_modules() if module is model.method.backbone)
    layers = [f"{prefix}.{n}" if prefix else n for n in reversed(model.method.backbone.layer_names)]
    layers = layers[: settings["steps"]]
    indices = ctx.sample(samples)
    images = ctx.images(indices)
    results = {}
    for name in settings["explainers"]:
        results[name] = model_randomization_test(
            encoder, layers, lambda m, name=name: ctx.explain_fn(name, m, indices), images,
            seed=ctx.seed, threshold=settings["threshold"],
        )
    return StageResult(results)


@register_experiment(
    "perceptual",
    title="Perceptual components",
    reading_aid="A component's effect is the expected drop in cosine similarity when the component is removed from a random part of the image (1 − E[s]); higher means the representation depends more on it. Intervals are over images; the ranking orders each model's components by effect.",
    section=sections.perceptual,
    defaults={"components": ["color", "shape", "texture", "brightness", "sharpness", "depth", "lowpass", "highpass"]},
    samples=16,
    explainers=("perceptual",),
)
def perceptual(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """:class:`~sslens.explain.PerceptualComponents` effects and maps (every image's, float16, for
    the figure and the report's explorer), using the dataset's depth when it has one; the first
    image's component images are kept for the figure."""
    indices = ctx.sample(samples)
    images = ctx.images(indices)
    depth = getattr(ctx.test_data, "depth", None)
    depth = None if depth is None else depth[indices.to(depth.device)].to(images.device)
    explainer = build_explainer(
        "perceptual", _pooled(ctx, model), ctx.config.explainers.get("perceptual", {}), seed=ctx.seed,
        mean=ctx.mean, std=ctx.std, fixed={"components": settings["components"]},
    )
    explanation = explain_rows(explainer, images, per_image_info=("mean_similarity",), depth=depth)
    components, arrays = {}, {}
    for name, maps in explanation.components.items():
        effect = 1 - np.asarray(explanation.info["mean_similarity"][name])
        arrays[item_key(name, "effect")] = effect
        components[name] = {
            "effect": image_mean(effect, ctx.seed, f"{name} effect"),
            "mean_importance": image_mean(maps.flatten(1).mean(1).cpu().numpy(), ctx.seed, f"{name} importance"),
        }
    results = {
        "components": components,
        "ranking": sorted(components, key=lambda c: -components[c]["effect"]["mean"]),
        "skipped": explanation.info["skipped"],
        "depth_source": "dataset ground truth" if depth is not None else None,
        "num_images": len(indices),
    }
    arrays.update({f"maps__perceptual__{name}": maps.cpu().to(torch.float16).numpy()
                   for name, maps in explanation.components.items()})
    arrays.update({f"component_{name}": image for name, image in
                   component_images(explainer, images[:1], None if depth is None else depth[:1]).items()})
    return StageResult(results, arrays)


def component_images(explainer: PerceptualComponents, images: torch.Tensor, depth: torch.Tensor | None) -> dict[str, np.ndarray]:
    """uint8 (H, W, 3) of what each component's masked images are made of, for ``images[0]``:
    the image with the component removed (colour → grey, brightness → darker, low-/high-pass →
    the other band) or, where the component is an image of its own (edges, texture, sharpness,
    depth), that image."""
    mean, std = explainer._stats(images)
    pixels = (images * std + mean).clamp(0.0, 1.0)
    shown = {}
    for name in explainer.components:
        component = COMPONENTS[name]
        if component.needs_depth and depth is None:
            continue
        parts = component.build(pixels, depth, explainer.amounts)
        image = parts.absent if parts.absent is not None and parts.reference is pixels else parts.reference
        shown[name] = (image[0].clamp(0, 1).permute(1, 2, 0).mul(255).round().to(torch.uint8).cpu().numpy())
    return shown


@register_experiment(
    "gradcam_pairs",
    title="Grad-CAM of image pairs",
    reading_aid="Symmetric similarity Grad-CAM: for each pair, both images' maps of what makes their embeddings similar, with the cosine similarity in the row title; then the pair's correspondence map: which region of one image matches which region of the other (boxes of one colour are a matched pair of cells). Examples, not estimates: one pair of each kind.",
    section=sections.gradcam_pairs,
    samples=1,
    explainers=("gradcam", "correspondence"),
)
def gradcam_pairs(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """Per anchor image: an augmented view, a same-class image and a different-class image, each
    pair explained by symmetric similarity Grad-CAM and by its correspondence map
    (:class:`~sslens.explain.correspondence.Correspondence`: both images' maps and the
    best-matching cell pairs)."""
    anchors = ctx.sample(samples)
    labels = ctx.test_data.labels.cpu()
    generator = ctx.generator("gradcam_pairs.partners")
    firsts, seconds, kinds = [], [], []
    for anchor in anchors.tolist():
        same = torch.nonzero((labels == labels[anchor]) & (torch.arange(len(labels)) != anchor)).flatten()
        other = torch.nonzero(labels != labels[anchor]).flatten()
        image = ctx.images(torch.tensor([anchor]))
        firsts += [image] * 3
        seconds.append(flip_and_crop(image.cpu(), generator).to(image.device))
        kinds.append(("augmented view", anchor, anchor))
        for kind, pool in (("same class", same), ("different class", other)):
            partner = int(pool[torch.randint(len(pool), (1,), generator=generator)]) if len(pool) else anchor
            seconds.append(ctx.images(torch.tensor([partner])))
            kinds.append((kind, anchor, partner))
    first, second = torch.cat(firsts), torch.cat(seconds)
    cam = build_explainer(
        "gradcam", _pooled(ctx, model), ctx.config.explainers.get("gradcam", {}), seed=ctx.seed,
        mean=ctx.mean, std=ctx.std, fixed={"symmetric": True},
    )
    explanation = explain_rows(cam, first, per_image_info=("similarity",), reference=second)
    correspondence = build_explainer(
        "correspondence", _pooled(ctx, model), ctx.config.explainers.get("correspondence", {}), seed=ctx.seed,
        mean=ctx.mean, std=ctx.std,
    )
    matched = explain_rows(correspondence, first, per_image_info=("matches",), reference=second)
    results = {
        "pairs": [
            {"kind": kind, "image": a, "partner": b, "similarity": s}
            for (kind, a, b), s in zip(kinds, explanation.info["similarity"], strict=True)
        ],
        "layer": explanation.info["layer"],
        "correspondence": {key: matched.info[key] for key in ("layer", "grid", "reference_grid", "matches")},
    }
    arrays = {
        "first_images": ctx.display(first), "second_images": ctx.display(second),
        "first_maps": explanation.importance.cpu().numpy(),
        "second_maps": explanation.components["reference"].cpu().numpy(),
        "first_correspondence": matched.importance.cpu().numpy(),
        "second_correspondence": matched.components["reference"].cpu().numpy(),
    }
    return StageResult(results, arrays)


@register_experiment(
    "groundtruth",
    title="Ground truth: explainers against answers known in advance",
    reading_aid="Small models trained so that the answer is known: one reads a planted marker, one ignores colour, one ignores high frequencies, one sees only grayscale; trained with each listed method, grouped by learning principle. Each row says what a working explainer must show, what it showed (95% intervals over test images) and the verdict: passes, fails or inconclusive (the interval straddles the threshold).",
    section=sections.groundtruth,
    defaults={
        "tests": list(groundtruth.TESTS), "explainers": ["relax", "gradcam"],
        # Training method → its options; one per learning principle compares the principles.
        "methods": {"simclr": {"temperature": 0.2}},
        # A timm ViT (backbone: timm, backbone_options: {model_name: ..., img_size: 32, patch_size: 4})
        # lets the attention explainers take the tests too.
        "backbone": "resnet-tiny", "backbone_options": {}, "image_size": 32, "num_images": 256, "epochs": 30, "batch_size": 64,
        "lr": 2.0e-3,
    },
    samples=256,
    min_samples=8,
    explainers=("perceptual",),
    scope="study",
    check=groundtruth.check_settings,
)
def ground_truth(ctx: StudyContext, model: None, settings: dict, samples: int | None) -> StageResult:
    """:func:`sslens.study.groundtruth.run_groundtruth`: its own models, trained once per study."""
    return groundtruth.run_groundtruth(ctx, settings, samples)


register_experiment(
    "tradeoff",
    title="Trade-off: representation quality versus explanation quality",
    reading_aid="One row per model; good models are high on accuracy, invariance and pointing game, below 0 on deletion AUC − random order (their map deletes what matters faster than a random order does) and above 0 on insertion, and pass the sanity check.",
    section=sections.tradeoff,
)(None)


def stage_inputs(ctx: StudyContext, name: str) -> dict[str, Any]:
    """What a stage's result depends on besides the model (hashed into its cache key)."""
    experiment = EXPERIMENTS.get(name)
    settings = ctx.config.settings.get(name, {})
    return {
        "experiment": name,
        "settings": settings,
        "samples": ctx.config.samples.get(name),
        "explainers": {e: ctx.config.explainers.get(e, {}) for e in experiment.explainers_used(settings)},
        "dataset": ctx.config.dataset,
        "data": ctx.data_fingerprint,
        "seed": ctx.seed,
    }
