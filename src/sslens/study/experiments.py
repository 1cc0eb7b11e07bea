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

import torch

from sslens.evaluate.embedding import effective_perplexity, tsne_embedding
from sslens.evaluate.features import extract_features
from sslens.evaluate.quality import evaluate_encoder
from sslens.explain.gradcam import flip_and_crop
from sslens.explain.metrics.faithfulness import deletion_insertion
from sslens.explain.metrics.invariance import saliency_invariance
from sslens.explain.metrics.localization import localization_scores
from sslens.explain.metrics.sanity import model_randomization_test
from sslens.registry import Registry
from sslens.study import sections
from sslens.study.cache import StageResult
from sslens.study.context import StudyContext
from sslens.study.explainers import build_explainer
from sslens.study.models import StudyModel
from sslens.study.sharding import explain_rows

#: The built-in experiments are defined in this module; users register more with
#: :func:`register_experiment`.
EXPERIMENTS = Registry("experiment")

#: The experiments a study runs when its config names none, in report order.
DEFAULT_EXPERIMENTS = (
    "quality", "tsne", "invariance", "faithfulness", "localization", "sanity", "perceptual",
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
    """

    title: str
    reading_aid: str
    run: RunFn | None
    section: Callable[..., sections.SectionContent]
    defaults: dict = field(default_factory=dict)
    samples: int | None = None
    min_samples: int = 1
    explainers: tuple[str, ...] = ()

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
    reading_aid="Top-1 accuracy on the held-out split from frozen pooled features; higher is better.",
    section=sections.quality,
    defaults={"k": 200, "temperature": 0.1, "linear": True, "linear_epochs": 100},
)
def quality(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """Weighted kNN and linear-probe top-1 (:func:`sslens.evaluate.evaluate_encoder`)."""
    result = evaluate_encoder(
        _pooled(ctx, model), ctx.train_data, ctx.test_data, k=settings["k"], temperature=settings["temperature"],
        linear=settings["linear"], linear_epochs=settings["linear_epochs"], device=ctx.device, seed=ctx.seed,
    )
    return StageResult(result)


@register_experiment(
    "tsne",
    title="t-SNE of the embeddings",
    reading_aid="Each point is a test image coloured by its label; tight same-colour clusters mean the representation separates the classes.",
    section=sections.tsne,
    defaults={"perplexity": 30.0, "n_iter": 500},
    samples=1000,
    min_samples=8,
)
def tsne(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """2-D t-SNE (fixed seed) of the pooled representation and of the projection output."""
    indices = ctx.sample("tsne", samples)
    data = ctx.test_data.subset(indices)
    arrays = {"labels": data.labels.cpu().numpy()}
    for output in ("pooled", "projection"):
        features = extract_features(model.encoder(output, data), data, device=ctx.device)
        arrays[output] = tsne_embedding(
            features, seed=ctx.seed, perplexity=settings["perplexity"], n_iter=settings["n_iter"]
        )
    results = {
        "num_points": len(indices),
        "perplexity": effective_perplexity(len(indices), settings["perplexity"]),
        "n_iter": settings["n_iter"],
        "seed": ctx.seed,
    }
    return StageResult(results, arrays)


@register_experiment(
    "invariance",
    title="Saliency invariance (RELAX)",
    reading_aid="IoU of mean-binarised RELAX maps of an image and of its augmented copy, mapped back; 1 means the explanation follows the transformation exactly. The retest column explains the unchanged image again with other masks: the most an augmentation's score can reach given RELAX's own noise.",
    section=sections.invariance,
    defaults={"augmentations": ["hflip", "vflip", "rot15", "grayscale"], "retest": True},
    samples=8,
    explainers=("relax",),
)
def invariance(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """:func:`~sslens.explain.metrics.invariance.saliency_invariance` of RELAX maps (reference Table 1)."""
    images = ctx.images(ctx.sample("invariance", samples))
    encoder = _pooled(ctx, model)
    relax = ctx.explain_fn("relax", encoder)
    first_maps = []  # the first image's map in each call: original, then each augmentation

    def explain(x: torch.Tensor) -> torch.Tensor:
        maps = relax(x)
        first_maps.append(maps[0].detach().cpu())
        return maps

    # Another seed draws other masks: the retest measures the explainer's own noise.
    retest = ctx.explain_fn("relax", encoder, seed=ctx.seed + 1) if settings["retest"] else None
    results = saliency_invariance(
        explain, images, augmentations=settings["augmentations"], mean=ctx.mean, std=ctx.std, retest_fn=retest
    )
    return StageResult(results, {"example_maps": torch.stack(first_maps).numpy()})


@register_experiment(
    "faithfulness",
    title="Faithfulness: deletion and insertion",
    reading_aid="Cosine similarity to the original embedding as the most important pixels are removed (deletion, lower AUC is better) or revealed (insertion, higher is better), against a random order.",
    section=sections.faithfulness,
    defaults={"explainers": ["relax", "gradcam"], "steps": 16, "baseline": "zero", "random_repeats": 1},
    samples=8,
)
def faithfulness(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """:func:`~sslens.explain.metrics.faithfulness.deletion_insertion` for each explainer."""
    encoder = _pooled(ctx, model)
    images = ctx.images(ctx.sample("faithfulness", samples))
    results = {}
    for name in settings["explainers"]:
        maps = ctx.explain_fn(name, encoder)(images).to(images.device)
        results[name] = deletion_insertion(
            encoder, images, maps, steps=settings["steps"], baseline=settings["baseline"],
            seed=ctx.seed, random_repeats=settings["random_repeats"],
        )
    return StageResult(results)


@register_experiment(
    "localization",
    title="Localisation against the ground-truth object",
    reading_aid="Pointing game: how often the map's maximum lies on the object; relevance mass: the share of positive importance inside it. Higher is better.",
    section=sections.localization,
    defaults={"explainers": ["relax", "gradcam"], "tolerance": 0.0},
    samples=16,
)
def localization(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """Pointing game and relevance mass of each explainer's maps (datasets with object masks)."""
    if getattr(ctx.test_data, "masks", None) is None:
        return StageResult({"skipped": "the dataset has no ground-truth object masks"})
    indices = ctx.sample("localization", samples, with_masks=True)
    images = ctx.images(indices)
    masks = ctx.test_data.masks[indices.to(ctx.test_data.masks.device)].to(images.device)
    encoder = _pooled(ctx, model)
    results = {}
    for name in settings["explainers"]:
        maps = ctx.explain_fn(name, encoder)(images).to(images.device)
        results[name] = localization_scores(
            maps, masks, ("pointing_game", "relevance_mass"),
            options={"pointing_game": {"tolerance": settings["tolerance"]}},
        )
    return StageResult({"explainers": results, "num_images": len(indices)})


@register_experiment(
    "sanity",
    title="Sanity check: cascading model-parameter randomisation",
    reading_aid="Spearman correlation between the maps of the trained model and of copies whose top blocks are re-initialised; it must drop, else the explainer is FLAGGED (its maps ignore the weights).",
    section=sections.sanity,
    # 5 steps randomise every ResNet block (layer4 … stem): Adebayo et al.'s verdict is read at
    # the fully randomised model; stopping after the top blocks leaves low-level features intact.
    defaults={"explainers": ["relax", "gradcam"], "steps": 5, "threshold": 0.5},
    samples=4,
)
def sanity(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """:func:`~sslens.explain.metrics.sanity.model_randomization_test`, top block first."""
    encoder = _pooled(ctx, model)
    # Layer names as seen from the encoder (an InputAdapter puts the backbone one level down).
    prefix = next(name for name, module in encoder.named_modules() if module is model.method.backbone)
    layers = [f"{prefix}.{n}" if prefix else n for n in reversed(model.method.backbone.layer_names)]
    layers = layers[: settings["steps"]]
    images = ctx.images(ctx.sample("sanity", samples))
    results = {}
    for name in settings["explainers"]:
        results[name] = model_randomization_test(
            encoder, layers, lambda m, name=name: ctx.explain_fn(name, m), images,
            seed=ctx.seed, threshold=settings["threshold"],
        )
    return StageResult(results)


@register_experiment(
    "perceptual",
    title="Perceptual components",
    reading_aid="Mean importance of a component = the pixel mean of its raw map, i.e. the expected cosine similarity to the reference embedding when that component is kept under a random mask; higher means the representation depends more on that component being present.",
    section=sections.perceptual,
    defaults={"components": ["color", "shape", "texture", "brightness", "sharpness", "depth", "lowpass", "highpass"]},
    samples=4,
    explainers=("perceptual",),
)
def perceptual(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """:class:`~sslens.explain.PerceptualComponents` maps, using the dataset's depth when it has one."""
    indices = ctx.sample("perceptual", samples)
    images = ctx.images(indices)
    depth = getattr(ctx.test_data, "depth", None)
    depth = None if depth is None else depth[indices.to(depth.device)].to(images.device)
    explainer = build_explainer(
        "perceptual", _pooled(ctx, model), ctx.config.explainers.get("perceptual", {}), seed=ctx.seed,
        mean=ctx.mean, std=ctx.std, fixed={"components": settings["components"]},
    )
    explanation = explain_rows(explainer, images, depth=depth)
    components = {}
    for name, maps in explanation.components.items():
        per_image = maps.flatten(1).mean(1)
        components[name] = {
            "mean": float(per_image.mean()),
            "std": float(per_image.std(correction=0)),
            "per_image": per_image.tolist(),
        }
    results = {
        "components": components,
        "skipped": explanation.info["skipped"],
        "depth_source": "dataset ground truth" if depth is not None else None,
        "num_images": len(indices),
    }
    arrays = {f"map_{name}": maps[0].cpu().numpy() for name, maps in explanation.components.items()}
    return StageResult(results, arrays)


@register_experiment(
    "gradcam_pairs",
    title="Grad-CAM of image pairs",
    reading_aid="Symmetric similarity Grad-CAM: for each pair, both images' maps of what makes their embeddings similar, with the cosine similarity in the row title.",
    section=sections.gradcam_pairs,
    samples=1,
    explainers=("gradcam",),
)
def gradcam_pairs(ctx: StudyContext, model: StudyModel, settings: dict, samples: int | None) -> StageResult:
    """Per anchor image: an augmented view, a same-class image and a different-class image."""
    anchors = ctx.sample("gradcam_pairs", samples)
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
    results = {
        "pairs": [
            {"kind": kind, "image": a, "partner": b, "similarity": s}
            for (kind, a, b), s in zip(kinds, explanation.info["similarity"], strict=True)
        ],
        "layer": explanation.info["layer"],
    }
    arrays = {
        "first_images": ctx.display(first), "second_images": ctx.display(second),
        "first_maps": explanation.importance.cpu().numpy(),
        "second_maps": explanation.components["reference"].cpu().numpy(),
    }
    return StageResult(results, arrays)


register_experiment(
    "tradeoff",
    title="Trade-off: representation quality versus explanation quality",
    reading_aid="One row per model; good models are high on accuracy, invariance and pointing game, low on deletion AUC (below the random order), and pass the sanity check.",
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
