"""Studies: config validation, a tiny study end to end, caching, atomic reports, the sanity flag."""

from __future__ import annotations

import base64
import copy
import dataclasses
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from sslens.cli import main
from sslens.errors import UserError
from sslens.explain.base import EXPLAINERS, Explainer, Explanation
from sslens.study import DEFAULT_EXPERIMENTS, EXPERIMENTS, load_study_config, run_study


@EXPLAINERS.register("test_brightness")
class _Brightness(Explainer):
    """A test-only explainer whose maps ignore the model: the image's mean over channels."""

    label = "brightness (test)"

    def __init__(self, encoder: torch.nn.Module, seed: int = 0):
        super().__init__(encoder)

    def explain(self, images: torch.Tensor) -> Explanation:
        return Explanation(importance=images.mean(dim=1))


COMMON = {
    "backbone": "resnet-tiny", "epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 2e-3,
    "warmup_epochs": 0, "max_steps": 2,
}
TINY = {
    "title": "Tiny <study>",
    "device": "cpu",
    "dataset": {"train_options": {"num_images": 96}, "test_options": {"num_images": 48}},
    "models": [
        {"name": "simclr", "method": "simclr", **COMMON},
        {"name": "moco", "method": "moco", "method_options": {"queue_size": 64}, **COMMON},
    ],
    "explainers": {"relax": {"num_masks": 16}, "perceptual": {"num_masks": 8}},
    "samples": {"tsne": 24, "invariance": 2, "faithfulness": 2, "localization": 2, "sanity": 2, "perceptual": 2},
    "settings": {"quality": {"linear_epochs": 2, "k": 10}, "tsne": {"n_iter": 30}, "faithfulness": {"steps": 4}},
}


def tiny(**changes) -> dict:
    config = copy.deepcopy(TINY)
    config.update(changes)
    return config


def study(out, config: dict | None = None):
    return run_study(load_study_config(None, config or tiny()), out, progress=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny study run once, shared by the tests that only read its output."""
    out = tmp_path_factory.mktemp("study")
    outcome = study(out)
    return out, outcome


# ----------------------------------------------------------------------------- configuration


def test_unknown_top_level_key_lists_the_valid_ones():
    with pytest.raises(UserError, match=r"Unknown key 'modles'.*Did you mean 'models'.*Valid keys: models, title"):
        load_study_config(None, {**tiny(), "modles": []})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"explainers": {"relax": {"num_mask": 5}}}, r"'num_mask' under explainers.relax.*num_masks"),
        ({"settings": {"sanity": {"stepz": 1}}}, r"'stepz' under settings.sanity.*Valid keys: explainers, steps"),
        ({"experiments": ["quality", "tnse"]}, r"'tnse' in experiments.*Did you mean 'tsne'"),
        ({"samples": {"quality": 3}}, r"'quality' under samples"),
        ({"dataset": {"nme": "synthetic"}}, r"'nme' in the dataset section.*Valid keys: name"),
        ({"settings": {"faithfulness": {"explainers": ["relax", "gradcan"]}}}, r"'gradcan'.*gradcam"),
        ({"title": ""}, r"title must be a non-empty string"),
    ],
)
def test_bad_sections_are_rejected_with_the_valid_keys(change, message):
    with pytest.raises(UserError, match=message):
        load_study_config(None, tiny(**change))


def test_model_entries_are_checked():
    with pytest.raises(UserError, match="Model 'x': Unknown config key 'epoch'"):
        load_study_config(None, tiny(models=[{"name": "x", "method": "simclr", "epoch": 3}]))
    with pytest.raises(UserError, match="sets data_options, which the study decides"):
        load_study_config(None, tiny(models=[{"name": "x", "method": "simclr", "data_options": {}}]))
    with pytest.raises(UserError, match="takes no training keys"):
        load_study_config(None, tiny(models=[{"name": "x", "checkpoint": "m", "epochs": 3}]))
    with pytest.raises(UserError, match="unique"):
        load_study_config(None, tiny(models=[{"name": "x", "method": "simclr"}] * 2))


FAMILIES = ["simclr", "moco", "swav", "byol", "dino", "barlow_twins", "vicreg"]


@pytest.mark.parametrize(("name", "methods"), [("study-demo", FAMILIES[:3]), ("study-cifar10", FAMILIES[:3]),
                                               ("study-families", FAMILIES), ("study-families-cifar10", FAMILIES)])
def test_packaged_studies_are_valid(name, methods):
    config = load_study_config(name, {"dataset.data_dir": "/data"} if "cifar" in name else {})
    assert [m.train.method for m in config.models] == methods
    assert config.experiments == list(DEFAULT_EXPERIMENTS)


def test_cli_study_with_an_unknown_key_exits_2(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text("models: [{name: a, method: simclr}]\nsamplez: {}\n")
    with pytest.raises(SystemExit) as caught:
        main(["study", "--config", str(path), "--out", str(tmp_path / "out")])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "Unknown key 'samplez'" in err and "Valid keys:" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the study end to end


def _section_titles(html: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", html)


def test_report_has_every_section_with_decodable_figures(finished):
    out, outcome = finished
    html = (out / "report.html").read_text()
    titles = _section_titles(html)
    for name in DEFAULT_EXPERIMENTS:
        assert EXPERIMENTS.get(name).title in titles
    assert titles[-1] == "Configuration and environment"
    assert "Tiny &lt;study&gt;" in html and "<study>" not in html  # user strings escaped
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) >= len(DEFAULT_EXPERIMENTS)
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 0 and "seed" in html
    for figure in results["figures"]:
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tradeoff_table_has_one_row_per_model_matching_results_json(finished):
    from sslens.report.html import format_cell

    out, outcome = finished
    html = (out / "report.html").read_text()
    results = json.loads((out / "results.json").read_text())
    rows = results["tradeoff"]
    # The trained models, the random-weight floor and the chance levels.
    assert [row["model"] for row in rows] == ["simclr", "moco", "random-init", "chance"]
    assert [row["principle"] for row in rows] == ["contrastive", "contrastive", "none (random weights)", None]
    assert results["models"]["moco"]["principle"] == "contrastive"
    assert rows == json.loads(json.dumps(outcome.tradeoff))
    section = html.split(f"<h2>{EXPERIMENTS.get('tradeoff').title}</h2>")[1].split("</table>")[0]
    html_rows = re.findall(r"<tr>(.*?)</tr>", section)[1:]
    assert len(html_rows) == 4
    for row, html_row in zip(rows, html_rows, strict=True):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", html_row)
        for key, cell in zip(outcome.tradeoff_columns, cells, strict=True):
            assert cell.removesuffix(" ▲") == format_cell(row[key]).replace("<", "&lt;"), key
    assert rows[0]["linear_top1"] == results["experiments"]["quality"]["simclr"]["linear_top1"]
    knn = rows[0]["knn_top1"]
    assert knn["n"] == 48 and knn["unit"] == "test samples" and knn["method"] == "wilson"
    assert knn["ci_low"] < knn["mean"] < knn["ci_high"]
    assert rows[-1]["knn_top1"]["mean"] == pytest.approx(1 / 8)  # eight shape classes


def test_faithfulness_compares_models_by_the_gap_to_their_own_random_order(finished):
    out, _ = finished
    results = json.loads((out / "results.json").read_text())
    for model, row in zip(["simclr", "moco"], results["tradeoff"][:2], strict=True):
        faith = results["experiments"]["faithfulness"][model]
        for curve in ("deletion", "insertion"):
            gap = faith["relax"][f"{curve}_gap"]
            # A mean of per-image differences is the difference of the means.
            assert gap["mean"] == pytest.approx(
                faith["relax"][f"{curve}_auc"]["mean"] - faith["chance"]["random order"][f"{curve}_auc"]["mean"])
            assert row[f"{curve}_gap_relax"] == gap
    # The raw AUCs are not compared across models: their scale is each model's own.
    assert not any(c["metric"].startswith(("deletion_auc", "insertion_auc")) for c in results["comparisons"])
    chance = results["tradeoff"][-1]["deletion_gap_relax"]
    assert chance["mean"] == 0 and chance["method"] == "exact"


def test_invariance_has_a_retest_column_left_out_of_the_tradeoff_mean(finished):
    out, outcome = finished
    results = json.loads((out / "results.json").read_text())
    augmentations = ["hflip", "vflip", "rot15", "grayscale"]
    for model, row in zip(["simclr", "moco"], results["tradeoff"][:2], strict=True):
        invariance = results["experiments"]["invariance"][model]
        assert list(invariance) == [*augmentations, "retest", "average", "chance", "num_images"]
        # Other masks give another map: RELAX's own noise keeps the retest below a perfect 1.
        assert 0 < invariance["retest"]["iou"]["mean"] < 1
        assert row["invariance_iou"]["mean"] == pytest.approx(
            np.mean([invariance[a]["iou"]["mean"] for a in augmentations]))
        # A constant map is trivially invariant; a random one scores about 1/3.
        assert invariance["chance"]["constant map"]["iou"]["mean"] in (None, 1.0)
        assert 0.2 < invariance["chance"]["random map"]["iou"]["mean"] < 0.45
    table = results["tables"]["invariance"][0]
    assert table["columns"] == ["model", *augmentations, "average", "retest"]
    assert "Retest" in table["caption"]


def test_results_json_validates_against_its_documented_schema(finished):
    import pathlib

    import jsonschema

    out, _ = finished
    schema = json.loads((pathlib.Path(__file__).parents[2] / "docs" / "results.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    results = json.loads((out / "results.json").read_text())
    validator.validate(results)
    # Every metric is an estimate: one without its interval breaks the schema.
    broken = copy.deepcopy(results)
    del broken["experiments"]["faithfulness"]["simclr"]["relax"]["deletion_auc"]["ci_low"]
    assert not validator.is_valid(broken)
    broken = copy.deepcopy(results)
    broken["experiments"]["localization"]["moco"]["explainers"]["relax"]["pointing_game"]["unit"] = "pixels"
    assert not validator.is_valid(broken)


def test_the_random_weight_floor_is_the_first_models_architecture_untrained(finished):
    from sslens.hashing import module_sha256
    from sslens.store import build_method, read_meta

    out, _ = finished
    results = json.loads((out / "results.json").read_text())
    floor = results["models"]["random-init"]
    assert floor["source"] == "random-init" and floor["model_file"] is None
    meta = read_meta(out / results["models"]["simclr"]["model_file"].rsplit("/", 1)[0])
    torch.manual_seed(results["seed"])
    assert floor["weights_sha256"] == module_sha256(build_method(meta))
    assert floor["weights_sha256"] != results["models"]["simclr"]["weights_sha256"]
    # Measured like every other model, on the same images.
    for name in ("quality", "invariance", "faithfulness", "localization", "sanity", "perceptual"):
        assert "random-init" in results["experiments"][name]


def test_rerun_recomputes_nothing_and_gives_the_same_results(finished, monkeypatch):
    out, _ = finished
    before = json.loads((out / "results.json").read_text())

    def explode(*args, **kwargs):
        raise AssertionError("a cached stage was recomputed")

    for name in DEFAULT_EXPERIMENTS:
        experiment = EXPERIMENTS.get(name)
        if experiment.run is not None:
            monkeypatch.setitem(EXPERIMENTS._entries, name, dataclasses.replace(experiment, run=explode))
    monkeypatch.setattr("sslens.train.loop.train", explode)
    study(out)
    after = json.loads((out / "results.json").read_text())
    assert after["experiments"] == before["experiments"]
    assert after["tradeoff"] == before["tradeoff"]
    assert {model["source"] for model in after["models"].values()} == {"reused", "random-init"}


def test_a_study_failing_midway_leaves_the_report_intact(finished, monkeypatch):
    out, _ = finished
    report, results = (out / "report.html").read_bytes(), (out / "results.json").read_bytes()

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    experiment = EXPERIMENTS.get("sanity")
    monkeypatch.setitem(EXPERIMENTS._entries, "sanity", dataclasses.replace(experiment, run=explode))
    changed = tiny(samples={**TINY["samples"], "sanity": 3})  # invalidates the sanity stage only
    with pytest.raises(RuntimeError, match="boom"):
        study(out, changed)
    assert (out / "report.html").read_bytes() == report
    assert (out / "results.json").read_bytes() == results


def test_a_report_that_fails_to_render_leaves_figures_and_results_intact(finished, monkeypatch):
    out, _ = finished
    paths = [out / "results.json", out / "report.html", *(out / "figures").iterdir()]
    before = {path: path.read_bytes() for path in paths}

    def explode(*args, **kwargs):
        raise RuntimeError("rendering failed")

    monkeypatch.setattr("sslens.report.html._render_configuration", explode)
    with pytest.raises(RuntimeError, match="rendering failed"):
        study(out, tiny(title="Another title"))  # every stage cached; results.json would change
    assert {path: path.read_bytes() for path in paths} == before


def test_a_cache_entry_interrupted_while_replaced_is_never_a_hit(tmp_path, monkeypatch):
    from sslens.study import cache as cache_module

    cache = cache_module.StageCache(tmp_path)
    cache.put("m", "e", "old", cache_module.StageResult({"v": 1}, {"x": np.zeros(2)}))

    def killed(*args, **kwargs):
        raise RuntimeError("killed between the two writes")

    # The new arrays are written, the new results are not.
    monkeypatch.setattr(cache_module, "write_json_atomic", killed)
    with pytest.raises(RuntimeError, match="killed"):
        cache.put("m", "e", "new", cache_module.StageResult({"v": 2}, {"x": np.ones(3)}))
    # The old results must not come back paired with the new arrays.
    assert cache.get("m", "e", "old") is None
    assert cache.get("m", "e", "new") is None


def test_stage_keys_follow_the_data_not_only_the_dataset_section():
    from sslens.data import load_dataset
    from sslens.study.context import StudyContext
    from sslens.study.experiments import stage_inputs

    config = load_study_config(None, tiny())
    train, test = (load_dataset("synthetic", split, num_images=8) for split in ("train", "test"))
    # The same dataset section over other contents, as when the files of a data_dir change.
    changed = test.subset(torch.arange(len(test) - 1, -1, -1))
    cpu = torch.device("cpu")
    for name in ("quality", "invariance"):
        key = stage_inputs(StudyContext(config, cpu, train, test), name)
        assert stage_inputs(StudyContext(config, cpu, train, test), name) == key
        assert stage_inputs(StudyContext(config, cpu, train, changed), name) != key
        assert stage_inputs(StudyContext(config, cpu, changed, test), name) != key


def test_captions_count_the_images_measured_not_the_samples_asked_for(tmp_path):
    # A test split smaller than the samples asked for: 5 images measured of 16.
    config = tiny(
        models=TINY["models"][:1], random_init=False,
        dataset={"train_options": {"num_images": 64}, "test_options": {"num_images": 5}},
        experiments=["faithfulness", "localization", "sanity", "tradeoff"],
        samples={"faithfulness": 16, "localization": 16, "sanity": 16},
    )
    outcome = study(tmp_path, config)
    tables = json.loads(outcome.results.read_text())["tables"]
    assert "Over 5 images" in tables["faithfulness"][0]["caption"]
    assert "Over 5 test images" in tables["localization"][0]["caption"]
    assert ", 5 images," in tables["sanity"][0]["caption"]


def test_changed_training_config_trains_into_a_fresh_folder(finished):
    out, _ = finished
    weights = (out / "models" / "simclr" / "model" / "model.safetensors").read_bytes()
    models = [{**TINY["models"][0], "lr": 1e-3}]
    outcome = study(out, tiny(models=models, experiments=["quality", "tradeoff"]))
    results = json.loads(outcome.results.read_text())
    assert results["models"]["simclr"]["source"] == "trained"
    assert results["models"]["simclr"]["model_file"].startswith("models/simclr-")
    assert (out / "models" / "simclr" / "model" / "model.safetensors").read_bytes() == weights


def test_an_explainer_that_ignores_the_model_is_flagged(tmp_path):
    config = tiny(
        models=TINY["models"][:1],
        experiments=["sanity", "tradeoff"],
        settings={"sanity": {"explainers": ["test_brightness"]}},
    )
    outcome = study(tmp_path, config)
    html = outcome.report.read_text()
    assert "FLAGGED: maps ignore the weights" in html
    assert "brightness (test): fails" in outcome.tradeoff[0]["sanity"]
    result = json.loads(outcome.results.read_text())["experiments"]["sanity"]["simclr"]["test_brightness"]
    assert result["verdict"] == "fails" and result["changed"] is False


# ------------------------------------------------------------- models expecting other inputs


def test_a_checkpoint_expecting_other_inputs_is_fed_through_an_input_adapter(tmp_path, imagenet_style_model):
    from sslens.data.base import denormalize, normalize
    from sslens.models.adapt import InputAdapter

    imagenet_style_model(tmp_path / "model")
    config = tiny(
        models=[{"name": "imagenet-style", "checkpoint": str(tmp_path / "model")}],
        experiments=["quality", "faithfulness", "sanity", "gradcam_pairs", "tradeoff"],
    )
    outcome = study(tmp_path / "study", config)
    results = json.loads(outcome.results.read_text())
    assert set(results["experiments"]["sanity"]["imagenet-style"]) == {"relax", "gradcam"}
    assert [row["model"] for row in outcome.tradeoff] == ["imagenet-style", "random-init", "chance"]

    # The adapter feeds the model exactly what it expects: the dataset's images, un-normalised,
    # resized to 40 px (bicubic) and normalised with ImageNet statistics.
    from sslens.data import load_dataset
    from sslens.store import load_model
    from sslens.study.models import StudyModel

    method, meta = load_model(tmp_path / "model")
    data = load_dataset("synthetic", "test", num_images=4)
    model = StudyModel("m", method, meta, tmp_path / "model", "", None, "checkpoint")
    encoder = model.encoder("pooled", data)
    assert isinstance(encoder, InputAdapter)
    x = normalize(data.images.permute(0, 3, 1, 2).float() / 255, data.mean, data.std)
    expected_input = normalize(
        torch.nn.functional.interpolate(
            denormalize(x, data.mean, data.std), size=(40, 40), mode="bicubic", align_corners=False
        ),
        meta["mean"], meta["std"],
    )
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), method.backbone(expected_input))
    # A model trained on the dataset itself is used as it is.
    trained_meta = {**meta, "image_size": list(data.image_size), "mean": list(data.mean), "std": list(data.std)}
    assert StudyModel("t", method, trained_meta, tmp_path, "", None, "trained").encoder("pooled", data) is method.backbone


def test_a_finished_model_is_reused_only_on_the_data_it_was_trained_on(tmp_path):
    from sslens.study.models import run_directory, training_data_fingerprint
    from sslens.train.config import save_config

    spec = load_study_config(None, tiny()).models[0]
    primary = tmp_path / spec.name
    primary.mkdir()
    save_config(spec.train, primary / "config.yaml")
    data = training_data_fingerprint(spec)
    assert len(data) == 64 and training_data_fingerprint(spec) == data
    # A first epoch cut short (no weights yet) is overwritten in place.
    assert run_directory(tmp_path, spec, lambda: data) == primary
    (primary / "model").mkdir()
    meta = primary / "model" / "meta.json"
    meta.write_text(json.dumps({"data_fingerprint": data}))
    assert run_directory(tmp_path, spec, lambda: data) == primary
    elsewhere = run_directory(tmp_path, spec, lambda: "0" * 64)  # the folder's files changed
    assert elsewhere.parent == tmp_path and elsewhere.name.startswith(f"{spec.name}-")
    meta.write_text(json.dumps({}))  # weights that record no data cannot be vouched for
    assert run_directory(tmp_path, spec, lambda: data) != primary
    # Fewer training images is other data, under the same dataset section's name.
    fewer = dataclasses.replace(spec, train=dataclasses.replace(
        spec.train, data_options={**spec.train.data_options, "num_images": 64}))
    assert training_data_fingerprint(fewer) != data


def test_every_experiment_draws_from_one_nested_order_of_the_test_images():
    """Smaller samples are the first images of larger ones (so per-image numbers from different
    experiments line up in the explorer); the masked sample keeps that order."""
    from sslens.data.base import load_split
    from sslens.study.config import load_study_config
    from sslens.study.context import StudyContext

    config = load_study_config(None, tiny(models=TINY["models"][:1]))
    test = load_split("synthetic", "test", data_dir=None, image_size=32, options={"num_images": 40}, device="cpu")
    ctx = StudyContext(config, torch.device("cpu"), test, test)
    assert ctx.sample(7).tolist() == ctx.sample(20)[:7].tolist()
    assert sorted(ctx.sample(40).tolist()) == list(range(40))
    test.masks[ctx.sample(1)] = False  # the first image loses its object
    masked = ctx.sample(5, with_masks=True).tolist()
    assert masked == [i for i in ctx.sample(40).tolist() if test.masks[i].any()][:5]
    assert ctx.sample(1).item() not in masked


def test_the_explorer_section_needs_no_masks_when_localisation_did_not_run():
    """A folder of images has no object masks; a study without the localisation experiment must
    still colour the explorer by the metrics that did run (this crashed once)."""
    from sslens.data.base import load_split
    from sslens.study.config import load_study_config
    from sslens.study.context import StudyContext
    from sslens.study.sections import _per_image

    config = load_study_config(None, tiny(models=TINY["models"][:1]))
    test = load_split("synthetic", "test", data_dir=None, image_size=32, options={"num_images": 40}, device="cpu")
    test = dataclasses.replace(test, masks=None)
    ctx = StudyContext(config, torch.device("cpu"), test, test)
    assert _per_image(ctx, "localization", "anything", {0: 0}, 1) == {}


def test_the_tradeoff_groups_models_by_learning_principle_in_order_of_appearance():
    from types import SimpleNamespace

    from sslens.methods.base import learning_principle
    from sslens.study.sections import grouped_units

    methods = {"simclr": "contrastive", "byol": "self-distillation", "barlow": "redundancy reduction",
               "random-init": "none (random weights)", "moco": "contrastive", "vicreg": "redundancy reduction"}
    ctx = SimpleNamespace(models={name: SimpleNamespace(group=None, principle=principle)
                                  for name, principle in methods.items()})
    assert list(grouped_units(ctx)) == ["simclr", "moco", "byol", "barlow", "vicreg", "random-init"]
    assert learning_principle({"method": "swav"}) == "clustering"
    assert learning_principle({"method": "imported", "source_format": "moco"}) == "contrastive"
    assert learning_principle({"method": "imported", "source_format": "barlowtwins"}) == "redundancy reduction"
    assert learning_principle({"method": "imported", "source_format": "timm"}) == "unknown"


def test_the_families_study_trains_seven_methods_of_four_principles():
    from sslens.methods.base import learning_principle

    config = load_study_config("study-families", {})
    methods = [m.train.method for m in config.models]
    assert methods == ["simclr", "moco", "swav", "byol", "dino", "barlow_twins", "vicreg"]
    assert {learning_principle({"method": m}) for m in methods} == {
        "contrastive", "clustering", "self-distillation", "redundancy reduction"}
    assert all(m.train.epochs == 4 for m in config.models)
    # Its ground-truth tests train one method of each principle.
    grounded = [learning_principle({"method": m}) for m in config.settings["groundtruth"]["methods"]]
    assert sorted(grounded) == sorted({learning_principle({"method": m}) for m in methods})
