"""The embedding explainers in the study: COCOA against each image's own class, correspondence
maps in the Grad-CAM pairs experiment, and the ground truth's refusal of a misfit explainer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from sslens.errors import UserError
from sslens.explain.base import create_explainer
from sslens.study import load_study_config, run_study
from sslens.study.explainers import CORPUS_SIZE, CocoaSets, by_class, explanation_fn


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())


def _sets(num_train: int = 30) -> tuple[CocoaSets, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    train = torch.randn(num_train, 3, 12, 12, generator=generator)
    sets = CocoaSets(
        train_labels=torch.arange(num_train) % 3,
        train_images=lambda indices: train[indices],
        test_labels=torch.tensor([2, 0, 2, 1, 0]),
        generator=lambda purpose: torch.Generator().manual_seed(len(purpose)),
    )
    return sets, train


@pytest.mark.parametrize("name,options", [("cocoa-ig", {"steps": 4}), ("cocoa-masking", {"num_masks": 16})])
def test_each_image_is_explained_against_its_own_class_and_the_shared_foil(name, options):
    sets, train = _sets()
    explainer = create_explainer(name, _encoder(), options)
    images = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    indices = torch.tensor([4, 0, 2])  # test images 4, 0 and 2: classes 0, 2, 2
    explanation = by_class(explainer, sets, indices)(images[:3])
    for row, index in enumerate(indices.tolist()):
        label = int(sets.test_labels[index])
        corpus = sets.corpus(label)
        # The corpus is training images of the image's class, and nothing else.
        matches = (corpus[:, None] == train[None]).flatten(2).all(2)
        assert (sets.train_labels[matches.float().argmax(1)] == label).all() and len(corpus) == 10
        alone = explainer(images[row:row + 1], corpus=corpus, foil=sets.foil)
        torch.testing.assert_close(explanation.importance[row], alone.importance[0], rtol=1e-5, atol=1e-7)
    assert len(sets.foil) == len(train)  # fewer training images than FOIL_SIZE: all of them
    assert explanation.info["corpus_size"] == [10, 10, 10] and CORPUS_SIZE == 100
    assert explanation.info["target"][1] == pytest.approx(
        explainer(images[1:2], corpus=sets.corpus(2), foil=sets.foil).info["target"][0], rel=1e-5)


def test_a_class_without_training_images_and_a_missing_corpus_source_are_refused():
    sets, _ = _sets()
    lonely = CocoaSets(sets.train_labels, sets.train_images, torch.tensor([7]), sets.generator)
    explain = by_class(create_explainer("cocoa-ig", _encoder(), {"steps": 2}), lonely, torch.tensor([0]))
    with pytest.raises(UserError, match="no image of class 7"):
        explain(torch.randn(1, 3, 12, 12))
    with pytest.raises(UserError, match="against a corpus of its own class"):
        explanation_fn("cocoa-ig", _encoder(), {}, seed=0, mean=(0.5,) * 3, std=(0.2,) * 3)


def test_cocoa_and_label_free_maps_run_in_the_studys_experiments_and_gradcam_pairs_match_correspondence(tmp_path):
    from sslens.data import load_dataset
    from sslens.data.base import normalize, to_float
    from sslens.store import load_model

    config = {
        "title": "embedding explainers", "device": "cpu", "random_init": False,
        "dataset": {"train_options": {"num_images": 96}, "test_options": {"num_images": 48}},
        "models": [{"name": "simclr", "method": "simclr", "backbone": "resnet-tiny", "epochs": 1, "batch_size": 32,
                    "optimizer": "adam", "lr": 2e-3, "warmup_epochs": 0, "max_steps": 2}],
        "experiments": ["faithfulness", "localization", "sanity", "gradcam_pairs"],
        "explainers": {"cocoa-ig": {"steps": 4}, "labelfree-gxi": {}},
        "samples": {"faithfulness": 2, "localization": 2, "sanity": 3},
        "settings": {"faithfulness": {"steps": 4, "explainers": ["cocoa-ig", "labelfree-gxi"]},
                     "localization": {"explainers": ["cocoa-ig"]},
                     "sanity": {"explainers": ["labelfree-gxi", "cocoa-ig"], "steps": 2}},
    }
    outcome = run_study(load_study_config(None, config), tmp_path / "study", progress=False)
    results = json.loads(outcome.results.read_text())["experiments"]
    assert set(results["faithfulness"]["simclr"]) >= {"cocoa-ig", "labelfree-gxi"}
    assert "cocoa-ig" in results["localization"]["simclr"]["explainers"]
    sanity = results["sanity"]["simclr"]
    for name in ("labelfree-gxi", "cocoa-ig"):
        # Two cascading steps, three images each, every rank correlation a real number.
        assert len(sanity[name]["steps"]) == 2 and np.shape(sanity[name]["spearman_per_image"]) == (2, 3)
        assert all(-1 <= r <= 1 for row in sanity[name]["spearman_per_image"] for r in row)
        assert sanity[name]["verdict"] in ("passes", "fails", "inconclusive")
    pairs = results["gradcam_pairs"]["simclr"]
    found = pairs["correspondence"]
    assert [len(m) for m in found["matches"]] == [5, 5, 5]
    scores = [m["score"] for m in found["matches"][1]]
    assert scores == sorted(scores, reverse=True)
    # The same-class pair, recomputed from the test images by the explainer itself.
    same = next(i for i, pair in enumerate(pairs["pairs"]) if pair["kind"] == "same class")
    arrays = np.load(tmp_path / "study" / "cache" / "simclr" / "gradcam_pairs.npz")
    data = load_dataset("synthetic", "test", num_images=48)
    images = normalize(to_float(data.images), data.mean, data.std)
    first, second = (images[pairs["pairs"][same][key]][None] for key in ("image", "partner"))
    encoder = load_model(tmp_path / "study" / "models" / "simclr")[0].encoder("pooled")
    direct = create_explainer("correspondence", encoder, {})(first, reference=second)
    np.testing.assert_allclose(arrays["first_correspondence"][same], direct.importance[0].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(arrays["second_correspondence"][same], direct.components["reference"][0].numpy(),
                               rtol=1e-4, atol=1e-6)
    for stored, computed in zip(found["matches"][same], direct.info["matches"][0], strict=True):
        assert (stored["cell"], stored["reference_cell"]) == (computed["cell"], computed["reference_cell"])
        assert stored["score"] == pytest.approx(computed["score"], rel=1e-4)


def test_the_ground_truth_refuses_an_attention_map_of_a_resnet_before_training():
    from sslens.study.experiments import EXPERIMENTS
    from sslens.study.groundtruth import check_settings

    settings = {**EXPERIMENTS.get("groundtruth").defaults, "explainers": ["relax", "rollout"]}
    with pytest.raises(UserError, match="rollout cannot explain the resnet-tiny backbone.*timm VisionTransformer"):
        check_settings(settings)
    check_settings({**settings, "explainers": ["labelfree-ig", "cocoa-masking", "correspondence"]})
    check_settings({**settings, "explainers": ["rollout", "gradient-attention"], "backbone": "timm",
                    "backbone_options": {"model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8,
                                         "depth": 2}})
