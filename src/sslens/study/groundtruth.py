"""Explainers checked against answers known in advance: the study's ``groundtruth`` experiment.

No explainer library for embedding models checks its maps against a known answer. Here the
answer is planted by training: small models are trained on the shapes world under recipes that
fix what they must (or must not) depend on, and each explainer is asked whether it sees that.

* **Planted cue.** A model trained on images that carry a per-image code (a 4 x 4 black-and-white
  patch, :func:`sslens.data.synthetic.stamp_cues`), identical in both views, can tell its images
  apart by reading the code; a *control* trained on the same images without it cannot. Both are
  explained on marked test images. An explainer that works puts a much larger share of its
  offset-free importance (:func:`~sslens.explain.metrics.localization.relevance_mass`) on the
  marker for the cue model than for the control, and than a random map does (the marker's area).
  Views keep the marker whole and in frame: flips and colour jitter, no crop (black and white
  survive any hue or saturation change). A CAM compares each image with its mirror image.
* **Augmentation policy.** On shapes whose colour follows their class, a model trained with
  strong colour augmentation (jitter at every step, grayscale at p = 0.8) learns to ignore colour
  and one trained with none does not: the perceptual colour component's effect (the
  ``perceptual`` experiment's 1 − E[s]) must be smaller for the first. Likewise strong Gaussian
  blur against none: the low-pass component's effect (high frequencies removed) must be smaller
  for the blurred model, which cannot depend on them, and the high-pass component's (low
  frequencies removed) larger, since the low frequencies are all it has. Each contrast is also measured *directly* (the drop in
  similarity when the component is removed from the whole image), which tells a failing
  explainer (direct contrast holds, effect does not) from a ground truth that did not form.
* **Augmentation policy, for maps.** The same models answer a question every map explainer
  can take (the component effects above are the perceptual explainer's alone): the model taught
  to ignore colour must keep its map when the image turns grayscale, and the model taught to
  ignore blur its map when the image is blurred (σ = 2 px, inside the trained range), more than
  the unaugmented model does. Measured as the per-image Pearson correlation between the map of
  x and the map of T(x) (a constant map, which has none, counts as 0); the direct contrast is
  the same difference of cos(f(x), f(T(x))), which needs no explainer.
* **Grayscale floor.** An encoder that converts its input to grayscale first is blind to colour
  by construction: its colour effect must be zero up to float rounding.

Every test runs once per listed training method (``settings.groundtruth.methods``, a method's
name and its options): one method per learning principle asks whether the principle changes what
the explainers can see. All methods train on the same ``simclr`` view recipe with the test's
options, so the models of one test differ only in their loss. Rows carry their method and its
principle, grouped by principle in the order they first appear.

Verdicts come from intervals (bootstrap over test images, paired where two models see the
same images): *passes* when the whole interval clears the threshold, *fails* when it lies wholly
on the wrong side, *inconclusive* when it straddles it. The models train through the one
training loop into ``OUT/groundtruth/<method>/<name>/`` and are reused like the study's own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslens.checks import suggestion
from sslens.data.base import denormalize, load_split, normalize, to_float
from sslens.data.pixels import gaussian_blur, grayscale
from sslens.errors import UserError
from sslens.explain.base import Explainer
from sslens.explain.metrics.invariance import invariance_augmentation, masked_pearson
from sslens.explain.metrics.localization import relevance_mass
from sslens.explain.perceptual import COMPONENTS, Amounts
from sslens.methods.base import METHODS
from sslens.models import create_backbone
from sslens.stats import bootstrap_mean, paired_difference, paired_ratio
from sslens.study.cache import StageResult
from sslens.study.explainers import (
    CocoaSets,
    build_explainer,
    by_class,
    takes_corpus,
    takes_reference,
)
from sslens.study.measures import CHANCE_DRAWS, item_key, seed_for
from sslens.study.models import prepare_model
from sslens.study.sharding import explain_rows
from sslens.study.spec import ModelSpec
from sslens.train.config import TrainConfig

TESTS = ("planted_cue", "color_policy", "blur_policy", "color_policy_maps", "blur_policy_maps", "grayscale_floor")
#: The policy tests every listed explainer takes, by the transform the augmented model ignores.
MAP_POLICY_TESTS = ("color_policy_maps", "blur_policy_maps")

#: A working explainer's share on the cue model's marker must be at least this many times the
#: control's and the random map's (the marker's area), each ratio's whole interval above it.
CUE_RATIO = 1.5
#: |effect| an encoder that sees only grayscale may show for colour: float rounding, nothing more.
FLOOR_TOLERANCE = 1e-5

#: The data every ground-truth model trains and is tested on (options of the synthetic world).
CUE_DATA = {"distractors": 2, "color_correlation": 0.8}
#: Colour follows the class exactly, so colour is worth learning unless augmentation forbids it.
POLICY_DATA = {"distractors": 2, "color_correlation": 1.0}
#: Views that keep the marker whole and in frame (no crop; flips mirror it inside the image).
CUE_VIEWS = {"crop_scale": None, "hue": 0.02}
PLAIN_VIEWS = {"crop_scale": [0.3, 1.0], "jitter_p": 0.0, "grayscale_p": 0.0}
STRONG_COLOR_VIEWS = {**PLAIN_VIEWS, "jitter_p": 1.0, "brightness": 0.4, "contrast": 0.4, "saturation": 0.8,
                      "hue": 0.5, "grayscale_p": 0.8}
STRONG_BLUR_VIEWS = {**PLAIN_VIEWS, "blur_p": 1.0, "blur_kernel_size": 9, "blur_sigma": [1.0, 3.0]}
#: The blur of the map policy test: inside STRONG_BLUR_VIEWS's range, with its kernel.
TEST_BLUR = {"sigma": 2.0, "kernel_size": 9}

#: model name → (data options, view options, which tests need it).
MODELS: dict[str, tuple[dict, dict, tuple[str, ...]]] = {
    "cue": ({**CUE_DATA, "cue": True}, CUE_VIEWS, ("planted_cue",)),
    "cue-control": ({**CUE_DATA, "cue": False}, CUE_VIEWS, ("planted_cue",)),
    "no-augmentation": (POLICY_DATA, PLAIN_VIEWS, ("color_policy", "blur_policy", *MAP_POLICY_TESTS,
                                                   "grayscale_floor")),
    "strong-color": (POLICY_DATA, STRONG_COLOR_VIEWS, ("color_policy", "color_policy_maps")),
    "strong-blur": (POLICY_DATA, STRONG_BLUR_VIEWS, ("blur_policy", "blur_policy_maps")),
}

#: What each test expects and what failing it means, shown in the report.
EXPECTED = {
    "planted_cue": (
        f"the cue model's share of importance on the marker is at least {CUE_RATIO:g}x the control's and "
        f"{CUE_RATIO:g}x a random map's (the marker's area)",
        "the explainer does not show what the model depends on (here, a marker it must read)",
    ),
    "color_policy": (
        "the colour effect is smaller for the model trained with strong colour augmentation",
        "the colour component does not measure colour dependence (if the direct contrast holds) or the "
        "policy did not make the model ignore colour (if it does not)",
    ),
    "blur_policy": (
        "the low-pass effect is smaller and the high-pass effect larger for the model trained with strong blur",
        "the low- or high-pass component does not measure dependence on those frequencies (if the direct "
        "contrast holds) or the models here do not differ in them (if it does not)",
    ),
    "color_policy_maps": (
        "the map of the model trained with strong colour augmentation changes less when the image turns grayscale "
        "(its correlation with the colour image's map is higher) than the unaugmented model's",
        "the explainer's map moves with what the model ignores (if the direct contrast holds) or the policy did "
        "not make the model ignore colour (if it does not)",
    ),
    "blur_policy_maps": (
        f"the map of the model trained with strong blur changes less when the image is blurred (σ = "
        f"{TEST_BLUR['sigma']:g} px) than the unaugmented model's",
        "the explainer's map moves with what the model ignores (if the direct contrast holds) or the blur policy "
        "did not make the model ignore blur (if it does not)",
    ),
    "grayscale_floor": (
        f"an encoder that converts its input to grayscale first has a colour effect of 0 (|effect| <= "
        f"{FLOOR_TOLERANCE:g})",
        "the colour component changes more than colour (a bug in its images)",
    ),
}


def check_settings(settings: dict) -> None:
    """Raise a UserError for a test name or explainer list the experiment cannot run."""
    for test in settings["tests"]:
        if test not in TESTS:
            raise UserError(f"settings.groundtruth.tests: unknown test {test!r}.{suggestion(str(test), TESTS)} "
                            f"Valid tests: {', '.join(TESTS)}.")
    methods = settings["methods"]
    if not methods:
        raise UserError("settings.groundtruth.methods is empty: name at least one training method and its options, "
                        "e.g. {simclr: {temperature: 0.2}}.")
    for method, options in methods.items():
        if method not in METHODS:
            raise UserError(f"settings.groundtruth.methods: unknown method {method!r}."
                            f"{suggestion(str(method), METHODS.names())} Valid methods: {', '.join(METHODS.names())}.")
        if not isinstance(options, dict):
            raise UserError(f"settings.groundtruth.methods.{method} must be a mapping of the method's options "
                            f"({{}} for its defaults); got {options!r}.")
        try:  # the training configs check their own options; say where the bad one was written
            model_specs(settings, method, seed=0, device="cpu")
        except UserError as error:
            raise UserError(f"settings.groundtruth.methods.{method}: {error}") from None
    needing = [test for test in settings["tests"] if test in ("planted_cue", *MAP_POLICY_TESTS)]
    if needing and not settings["explainers"]:
        raise UserError(f"settings.groundtruth.explainers is empty: the {needing[0].replace('_', ' ')} test needs an "
                        "explainer to check (e.g. [relax, gradcam]).")
    if needing:
        _check_explainers_fit(settings)


def _check_explainers_fit(settings: dict) -> None:
    """A UserError, before any training, for a listed explainer that cannot explain the
    experiment's backbone (an attention map of a ResNet): each is built on an untrained one."""
    try:
        encoder = create_backbone(settings["backbone"], **settings["backbone_options"])
    except (ValueError, TypeError) as error:
        raise UserError(f"settings.groundtruth.backbone: {error}") from None
    for name in settings["explainers"]:
        try:
            build_explainer(name, encoder, {}, seed=0, mean=(0.5,) * 3, std=(0.25,) * 3)
        except UserError as error:
            raise UserError(
                f"settings.groundtruth.explainers: {name} cannot explain the {settings['backbone']} backbone: "
                f"{error}"
            ) from None


def verdict(low: float | None, high: float | None, threshold: float) -> str:
    """"passes" when [low, high] lies above ``threshold``, "fails" below, else "inconclusive"."""
    if low is None or high is None:
        return "inconclusive"
    if low > threshold:
        return "passes"
    return "fails" if high < threshold else "inconclusive"


def both(first: str, second: str) -> str:
    """The verdict of two conditions that must both hold: fails if either fails."""
    if "fails" in (first, second):
        return "fails"
    return "passes" if first == second == "passes" else "inconclusive"


def model_specs(settings: dict, method: str, seed: int, device: str) -> dict[str, ModelSpec]:
    """The training runs of ``method`` the listed tests need, all with the same recipe but data
    and views (the ``simclr`` view recipe for every method, so that only the loss differs)."""
    needed = [name for name, (_, _, tests) in MODELS.items() if set(tests) & set(settings["tests"])]
    specs = {}
    for name in needed:
        data_options, views, _ = MODELS[name]
        train = TrainConfig(
            method=method, backbone=settings["backbone"], backbone_options=settings["backbone_options"], data="synthetic",
            data_options={**data_options, "num_images": settings["num_images"]},
            image_size=settings["image_size"], views="simclr", views_options=views,
            method_options=settings["methods"][method],
            epochs=settings["epochs"], batch_size=settings["batch_size"], optimizer="adam", lr=settings["lr"],
            weight_decay=1e-6, warmup_epochs=1, seed=seed, device=device, knn_every=settings["epochs"],
            checkpoint_every=settings["epochs"], progress=False,
        )
        specs[name] = ModelSpec(name=name, train=train)
    return specs


class GrayscaleFirst(nn.Module):
    """``encoder`` behind a grayscale conversion (in pixel space, with the component's own
    luma weights), for the colour floor: normalised images in, ``encoder``'s embedding out."""

    def __init__(self, encoder: nn.Module, mean, std):
        super().__init__()
        self.encoder = encoder
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = denormalize(images, self.mean, self.std)
        return self.encoder(normalize(grayscale(pixels), self.mean, self.std))


def _test_images(name: str, settings: dict, count: int, device: torch.device):
    data_options = MODELS[name][0]
    data = load_split("synthetic", "test", data_dir=None, image_size=settings["image_size"],
                      options={**data_options, "cue": True, "num_images": count}, device=device)
    return data, normalize(to_float(data.images.to(device)), data.mean, data.std)


def mirrored(images: torch.Tensor) -> torch.Tensor:
    """The CAMs' reference in the planted-cue test: each image mirrored left to right.

    The marker stays whole, in frame and in its colours, and the cue models were trained to be
    mirror-invariant (flips are in their views). A view with colour jitter would not do: the
    similarity to it is then lowered mostly by the jittered colours, which is what a gradient
    of that similarity shows, not the marker the embedding rests on (measured: Grad-CAM's
    marker share fell to the control's).
    """
    return images.flip(-1)


def _cocoa_sets(ctx, settings: dict, data, world: str = "cue") -> CocoaSets:
    """COCOA's corpora and foil for the test ``data`` of model ``world``'s world: its training
    split (what that model was trained on, e.g. the marker included), drawn with seeds from the
    study seed."""
    train = load_split("synthetic", "train", data_dir=None, image_size=settings["image_size"],
                       options={**MODELS[world][0], "num_images": settings["num_images"]}, device=ctx.device)
    images = normalize(to_float(train.images.to(ctx.device)), train.mean, train.std)
    return CocoaSets(
        train_labels=torch.as_tensor(train.labels).cpu(),
        train_images=lambda indices: images[indices.to(images.device)],
        test_labels=torch.as_tensor(data.labels).cpu(),
        generator=lambda purpose: torch.Generator().manual_seed(seed_for(ctx.seed, f"groundtruth {purpose}")),
    )


def _maps(ctx, name: str, encoder: nn.Module, images: torch.Tensor, data, cocoa: CocoaSets) -> torch.Tensor:
    """(B, H, W) raw maps of explainer ``name`` (the study's options and seed) for ``encoder``;
    an explainer that compares with a reference compares each image with its :func:`mirrored`,
    one that explains against a corpus (COCOA) uses ``cocoa``'s, the test images in order."""
    explainer = build_explainer(name, encoder, ctx.config.explainers.get(name, {}), seed=ctx.seed, mean=data.mean,
                                std=data.std)
    if takes_corpus(explainer):
        return by_class(explainer, cocoa, torch.arange(len(images)))(images).importance.cpu()
    if not takes_reference(explainer):
        return explain_rows(explainer, images).importance.cpu()
    return explain_rows(explainer, images, reference=mirrored(images)).importance.cpu()


def _random_share(masks: torch.Tensor, seed: int) -> np.ndarray:
    """Per image, the marker share of uniform-noise maps, averaged over :data:`CHANCE_DRAWS` draws."""
    generator = torch.Generator().manual_seed(seed_for(seed, "groundtruth random maps"))
    shares = [relevance_mass(torch.rand(masks.shape, generator=generator), masks.cpu()) for _ in range(CHANCE_DRAWS)]
    return torch.stack(shares).mean(0).numpy()


def planted_cue(ctx, models: dict, settings: dict, count: int, method: str) -> tuple[list[dict], dict]:
    """One row per explainer: marker share of ``method``'s cue model, its control and a random map."""
    data, images = _test_images("cue", settings, count, ctx.device)
    masks = data.extras["cue_mask"]
    random = _random_share(masks, ctx.seed)
    # Every test image is kept: the report's drill-down shows the images behind each row.
    rows, arrays = [], {"cue_images": data.images.cpu().numpy()}
    random_estimate = bootstrap_mean(random, unit="images", seed=seed_for(ctx.seed, "cue random"))
    cocoa = _cocoa_sets(ctx, settings, data)
    for name in settings["explainers"]:
        shares = {}
        for model in ("cue", "cue-control"):
            maps = _maps(ctx, name, models[model].encoder("pooled", data), images, data, cocoa)
            shares[model] = relevance_mass(maps, masks.cpu()).numpy()
            arrays[item_key(method, name, model, "share")] = shares[model]
            arrays[f"maps__{method}__{name}__{model}"] = maps[:3].numpy()
        purpose = f"{method} {name}"
        ratio = paired_ratio(shares["cue"], shares["cue-control"], unit="images", seed=seed_for(ctx.seed, f"cue ratio {purpose}"))
        to_random = paired_ratio(shares["cue"], random, unit="images", seed=seed_for(ctx.seed, f"cue random ratio {purpose}"))
        share = bootstrap_mean(shares["cue"], unit="images", seed=seed_for(ctx.seed, f"cue share {purpose}"))
        result = both(verdict(ratio.ci_low, ratio.ci_high, CUE_RATIO),
                      verdict(to_random.ci_low, to_random.ci_high, CUE_RATIO))
        rows.append({
            "test": "planted_cue", "explainer": name, "measure": "share of offset-free importance on the marker",
            "value": share.to_dict(),
            "control": bootstrap_mean(shares["cue-control"], unit="images",
                                      seed=seed_for(ctx.seed, f"control share {purpose}")).to_dict(),
            "random_map": random_estimate.to_dict(),
            "ratio": ratio.to_dict(), "ratio_to_random": to_random.to_dict(), "threshold": CUE_RATIO,
            "verdict": result,
        })
    return rows, arrays


def _perceptual(ctx, encoder: nn.Module, data, components: list[str]) -> Explainer:
    """The perceptual explainer of ``components`` with the study's options and seed."""
    return build_explainer("perceptual", encoder, ctx.config.explainers.get("perceptual", {}), seed=ctx.seed,
                           mean=data.mean, std=data.std, fixed={"components": components})


def _effects(explainer: Explainer, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Per image, each of the perceptual ``explainer``'s components' effect 1 − E[s]."""
    explanation = explain_rows(explainer, images, per_image_info=("mean_similarity",))
    return {c: 1 - np.asarray(explanation.info["mean_similarity"][c], dtype=np.float64) for c in explainer.components}


@torch.no_grad()
def _similarity(encoder: nn.Module, first: torch.Tensor, second: torch.Tensor) -> np.ndarray:
    """Per image, cos(f(first), f(second)) in float64."""
    embed = lambda x: F.normalize(encoder(x).flatten(1).double(), dim=1)  # noqa: E731
    return (embed(first) * embed(second)).sum(1).cpu().numpy()


@torch.no_grad()
def _direct_drop(encoder: nn.Module, images: torch.Tensor, data, component: str, amounts: Amounts) -> np.ndarray:
    """Per image, 1 − cos(f(x), f(x without ``component`` everywhere)): the component's removal
    from the whole image (with the explainer's ``amounts``), which needs no explainer."""
    pixels = denormalize(images, data.mean, data.std)
    absent = COMPONENTS[component].build(pixels, None, amounts).absent
    return 1 - _similarity(encoder, images, normalize(absent, data.mean, data.std))


#: Per policy test: the augmented model and, per component, whether the augmentation should make
#: its effect smaller (it removes what the model could use) or larger (the model must use it).
POLICY_COMPONENTS = {
    "color_policy": ("strong-color", {"color": "smaller"}),
    "blur_policy": ("strong-blur", {"lowpass": "smaller", "highpass": "larger"}),
}
COMPONENT_EXPECTED = {
    "color": "the colour effect is smaller for the model trained with strong colour augmentation",
    "lowpass": "the low-pass effect (high frequencies removed) is smaller for the model trained with strong blur",
    "highpass": "the high-pass effect (low frequencies removed) is larger for the model trained with strong blur, "
                "which has only the low frequencies to rest on",
}


def policy_contrast(ctx, models: dict, settings: dict, count: int, method: str, test: str) -> tuple[list[dict], dict]:
    """Each listed component's effect for ``method``'s augmented model against its unaugmented
    one; the difference is oriented so that the expected answer is > 0."""
    strong, expected = POLICY_COMPONENTS[test]
    components = list(expected)
    data, images = _test_images("no-augmentation", settings, count, ctx.device)
    effects, direct = {}, {}
    for model in ("no-augmentation", strong):
        encoder = models[model].encoder("pooled", data)
        explainer = _perceptual(ctx, encoder, data, components)
        effects[model] = _effects(explainer, images)
        direct[model] = {c: _direct_drop(encoder, images, data, c, explainer.amounts) for c in components}
    rows, arrays = [], {"policy_images": data.images.cpu().numpy()}
    for component, direction in expected.items():
        first, second = ("no-augmentation", strong) if direction == "smaller" else (strong, "no-augmentation")
        seed = seed_for(ctx.seed, f"{method} {test} {component} contrast")
        difference = paired_difference(effects[first][component], effects[second][component], unit="images", seed=seed)
        direct_difference = paired_difference(direct[first][component], direct[second][component], unit="images",
                                              seed=seed + 1)
        rows.append({
            "test": test, "component": component, "measure": "effect 1 − E[s]", "augmented_model": strong,
            "expected": COMPONENT_EXPECTED[component],
            "value": bootstrap_mean(effects[strong][component], unit="images", seed=seed + 2).to_dict(),
            "control": bootstrap_mean(effects["no-augmentation"][component], unit="images", seed=seed + 3).to_dict(),
            "difference": difference.to_dict(), "difference_of": f"{first} − {second}",
            "direct_difference": direct_difference.to_dict(),
            "threshold": 0.0, "verdict": verdict(difference.ci_low, difference.ci_high, 0.0),
            "direct_verdict": verdict(direct_difference.ci_low, direct_difference.ci_high, 0.0),
        })
        arrays.update({item_key(method, test, model, component, "effect"): values[component]
                       for model, values in effects.items()})
    return rows, arrays


#: Per map policy test: the augmented model and the transform it was taught to ignore, on
#: normalised images (mean, std) → images.
MAP_POLICY = {
    "color_policy_maps": ("strong-color", "grayscale",
                          lambda x, mean, std: invariance_augmentation("grayscale", mean, std).apply(x)),
    "blur_policy_maps": ("strong-blur", f"blur σ = {TEST_BLUR['sigma']:g} px",
                         lambda x, mean, std: normalize(gaussian_blur(denormalize(x, mean, std), **TEST_BLUR), mean, std)),
}


def _map_correlation(first: torch.Tensor, second: torch.Tensor) -> np.ndarray:
    """Per image, the Pearson correlation of two (B, H, W) maps; 0 where either is constant."""
    valid = torch.ones(first.shape[-2:], dtype=torch.bool)
    return masked_pearson(first.float(), second.float(), valid).nan_to_num(0.0).double().numpy()


def map_policy(ctx, models: dict, settings: dict, count: int, method: str, test: str,
               cache: dict) -> tuple[list[dict], dict]:
    """One row per explainer: how much more its map of ``method``'s augmented model keeps under
    the transform the model was taught to ignore than its map of the unaugmented model.

    ``cache`` holds the maps of the untransformed images per (model, explainer), which the colour
    and blur tests share for the unaugmented model."""
    strong, transform_name, transform = MAP_POLICY[test]
    data, images = _test_images("no-augmentation", settings, count, ctx.device)
    changed = transform(images, data.mean, data.std)
    cocoa = _cocoa_sets(ctx, settings, data, world="no-augmentation")
    kept, direct = {}, {}
    arrays = {"policy_images": data.images.cpu().numpy()}
    for model in ("no-augmentation", strong):
        encoder = models[model].encoder("pooled", data)
        direct[model] = _similarity(encoder, images, changed)
        for name in settings["explainers"]:
            key = (model, name)
            if key not in cache:
                cache[key] = _maps(ctx, name, encoder, images, data, cocoa)
            kept[model, name] = _map_correlation(cache[key], _maps(ctx, name, encoder, changed, data, cocoa))
            arrays[item_key(method, test, model, name, "map_correlation")] = kept[model, name]
    rows = []
    seed = seed_for(ctx.seed, f"{method} {test} direct contrast")
    direct_difference = paired_difference(direct[strong], direct["no-augmentation"], unit="images", seed=seed)
    for name in settings["explainers"]:
        seed = seed_for(ctx.seed, f"{method} {test} {name} contrast")
        difference = paired_difference(kept[strong, name], kept["no-augmentation", name], unit="images", seed=seed)
        rows.append({
            "test": test, "explainer": name, "measure": f"correlation of the maps of x and T(x), T = {transform_name}",
            "augmented_model": strong,
            "value": bootstrap_mean(kept[strong, name], unit="images", seed=seed + 1).to_dict(),
            "control": bootstrap_mean(kept["no-augmentation", name], unit="images", seed=seed + 2).to_dict(),
            "difference": difference.to_dict(), "difference_of": f"{strong} − no-augmentation",
            "direct_difference": direct_difference.to_dict(),
            "threshold": 0.0, "verdict": verdict(difference.ci_low, difference.ci_high, 0.0),
            "direct_verdict": verdict(direct_difference.ci_low, direct_difference.ci_high, 0.0),
        })
    return rows, arrays


def grayscale_floor(ctx, models: dict, settings: dict, count: int, method: str) -> tuple[list[dict], dict]:
    """The colour effect of ``method``'s unaugmented model behind a grayscale conversion."""
    data, images = _test_images("no-augmentation", settings, count, ctx.device)
    encoder = GrayscaleFirst(models["no-augmentation"].encoder("pooled", data), data.mean, data.std).to(ctx.device)
    effect = _effects(_perceptual(ctx, encoder, data, ["color"]), images)["color"]
    largest = float(np.abs(effect).max())
    row = {
        "test": "grayscale_floor", "component": "color", "measure": "effect 1 − E[s]",
        "value": bootstrap_mean(effect, unit="images", seed=seed_for(ctx.seed, f"{method} grayscale floor")).to_dict(),
        "largest_abs_effect": largest, "threshold": FLOOR_TOLERANCE,
        "verdict": "passes" if largest <= FLOOR_TOLERANCE else "fails",
    }
    return [row], {item_key(method, "grayscale_floor", "effect"): effect, "policy_images": data.images.cpu().numpy()}


def run_groundtruth(ctx, settings: dict, samples: int) -> StageResult:
    """Train (or reuse) the models the listed tests need, for each listed method, then run each
    test on ``samples`` fresh test images of its world (the same images for every method)."""
    root = Path(ctx.out) / "groundtruth"
    rows, arrays, described = [], {}, {}
    for method in settings["methods"]:
        specs = model_specs(settings, method, ctx.seed, ctx.config.device)
        models = {
            name: prepare_model(spec, root / method, ctx.device, train_fn=ctx.train_fn, say=ctx.say)
            for name, spec in specs.items()
        }
        principle = next(iter(models.values())).principle
        unchanged_maps: dict = {}
        for test in settings["tests"]:
            if test == "planted_cue":
                found = planted_cue(ctx, models, settings, samples, method)
            elif test in MAP_POLICY_TESTS:
                found = map_policy(ctx, models, settings, samples, method, test, unchanged_maps)
            elif test == "grayscale_floor":
                found = grayscale_floor(ctx, models, settings, samples, method)
            else:
                found = policy_contrast(ctx, models, settings, samples, method, test)
            for row in found[0]:
                row.setdefault("expected", EXPECTED[test][0])
                row.update(method=method, principle=principle, failing_means=EXPECTED[test][1])
            rows += found[0]
            arrays.update(found[1])
        described.update({
            f"{method}/{name}": {**model.describe(Path(ctx.out)), "data_options": specs[name].train.data_options,
                                 "views_options": specs[name].train.views_options}
            for name, model in models.items()
        })
    # One learning principle's rows together, the principles in the order they first appear.
    order = list(dict.fromkeys(row["principle"] for row in rows))
    rows.sort(key=lambda row: order.index(row["principle"]))
    return StageResult({"tests": rows, "num_images": samples, "models": described}, arrays)
