"""The ``sslens explain`` glue: files in, npz + png out, and clear errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from sslens.cli import main
from sslens.data.base import IMAGENET_MEAN, IMAGENET_STD
from sslens.data.images import load_image_tensor, load_rgb, preprocess
from sslens.errors import UserError
from sslens.explain.base import create_explainer
from sslens.explain.cocoa import CocoaMasking
from sslens.explain.correspondence import Correspondence
from sslens.explain.gradcam import SimilarityCAM
from sslens.explain.run import explain_images
from sslens.methods import create_method
from sslens.models import create_backbone
from sslens.store import load_model, provenance, save_model

torch.set_num_threads(1)
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    method = create_method("simclr", create_backbone("resnet-tiny"), out_dim=8)
    meta = {
        "method": "simclr", "method_options": {"out_dim": 8}, "backbone": "resnet-tiny",
        "backbone_options": {}, "image_size": [32, 32], "mean": MEAN, "std": STD,
        "class_names": ["a", "b"], "data": {"name": "synthetic"}, "epoch": 1, "step": 10,
        **provenance(),
    }
    return save_model(tmp_path_factory.mktemp("run") / "model", method, meta)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / "colour.png")
    Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8), mode="L").save(folder / "grey.jpg")
    (folder / "notes.txt").write_text("not an image, and not picked up from the folder")
    return folder


def read_npz(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def assert_png(path):
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.size[0] > 300


def test_gradcam_on_a_folder_writes_raw_maps_matching_the_explainer(model_dir, image_dir, tmp_path, capsys):
    paths = explain_images(
        str(model_dir), [str(image_dir)], method="gradcam", out_dir=tmp_path, reference="augmented", seed=3
    )
    assert [p.name for p in paths] == ["colour_gradcam.npz", "colour_gradcam.png", "grey_gradcam.npz", "grey_gradcam.png"]
    assert "grey_gradcam.png" in capsys.readouterr().out
    data = read_npz(tmp_path / "grey_gradcam.npz")
    # The augmented view the map compares with is recorded (and drawn) with it.
    assert set(data) == {"importance", "image", "input", "info", "reference_image"}
    assert data["reference_image"].shape == (32, 32, 3) and data["reference_image"].dtype == np.uint8
    assert data["importance"].shape == (32, 32) and data["importance"].dtype == np.float32
    assert data["image"].shape == (32, 32, 3) and data["image"].dtype == np.uint8
    assert data["input"].shape == (3, 32, 32)
    info = json.loads(str(data["info"]))
    assert info["preprocessing"]["original_mode"] == "L"
    assert info["preprocessing"]["original_size"] == [30, 20]
    assert info["preprocessing"]["mean"] == MEAN
    assert info["explainer"]["layer"] == "layer4" and info["reference"] == "augmented"
    # The glue hands the explainer exactly the preprocessed input and options.
    method, _ = load_model(model_dir)
    expected = SimilarityCAM(method.encoder("pooled"), seed=3)(torch.from_numpy(data["input"])[None], reference="augmented")
    np.testing.assert_allclose(data["importance"], expected.importance[0].numpy(), rtol=1e-5, atol=1e-9)
    expected_input, _ = load_image_tensor(image_dir / "grey.jpg", (32, 32), MEAN, STD)
    np.testing.assert_array_equal(data["input"], expected_input.numpy())
    for path in paths[1::2]:
        assert_png(path)


class FakeMidas(torch.nn.Module):
    """Stands in for torch.hub's MiDaS: (B, 3, h, w) → (B, h, w), recording its inputs."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.shape)
        return self.scale * x[:, 0] - x[:, 2]


def test_depth_model_feeds_the_depth_component(model_dir, image_dir, tmp_path, monkeypatch, capsys):
    from sslens.explain.depth import midas_depth_estimator
    from sslens.explain.perceptual import PerceptualComponents

    fake = FakeMidas()
    monkeypatch.setattr(torch.hub, "load", lambda repo, name, **kwargs: fake)
    paths = explain_images(
        str(model_dir), [str(image_dir / "colour.png")], method="perceptual", out_dir=tmp_path,
        components=["depth"], num_masks=8, depth_model="MiDaS_small",
    )
    assert "skipped" not in capsys.readouterr().out
    assert fake.inputs == [torch.Size([1, 3, 256, 256])]  # MiDaS_small's input size
    data = read_npz(paths[0])
    assert json.loads(str(data["info"]))["options"]["depth_model"] == "MiDaS_small"
    # The depth map is the estimator's, on exactly the preprocessed input.
    method, _ = load_model(model_dir)
    explainer = PerceptualComponents(
        method.encoder("pooled"), components=["depth"], num_masks=8, seed=0, mean=MEAN, std=STD,
        depth_estimator=midas_depth_estimator("MiDaS_small"),
    )
    expected = explainer(torch.from_numpy(data["input"])[None]).components["depth"][0]
    np.testing.assert_allclose(data["component_depth"], expected.numpy(), rtol=1e-5, atol=1e-7)


def test_depth_model_errors_are_user_errors(model_dir, image_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "load", pytest.fail)  # never reached: checked before loading
    image = [str(image_dir / "colour.png")]
    with pytest.raises(UserError, match="--depth-model does not apply to the relax explainer"):
        explain_images(str(model_dir), image, method="relax", out_dir=tmp_path, depth_model="MiDaS_small")
    with pytest.raises(UserError, match="--depth-model: Unknown MiDaS model 'midas'.*MiDaS_small"):
        explain_images(str(model_dir), image, method="perceptual", out_dir=tmp_path, depth_model="midas")


def test_gradcam_with_a_reference_image_and_layer(model_dir, image_dir, tmp_path):
    paths = explain_images(
        str(model_dir), [str(image_dir / "colour.png")], method="gradcam++", out_dir=tmp_path,
        reference=str(image_dir / "grey.jpg"), layer="layer3", output="projection",
    )
    info = json.loads(str(read_npz(paths[0])["info"]))
    assert info["explainer"]["layer"] == "layer3" and info["explainer"]["method"] == "gradcam++"
    assert info["reference"].endswith("grey.jpg") and info["source"]["output"] == "projection"


def test_reference_folder_gives_a_reference_set(model_dir, image_dir, tmp_path):
    paths = explain_images(
        str(model_dir), [str(image_dir / "colour.png")], method="gradcam", out_dir=tmp_path, reference=str(image_dir)
    )
    info = json.loads(str(read_npz(paths[0])["info"]))
    assert info["explainer"]["mode"] == "reference_set" and info["explainer"]["reference_set_size"] == 2


def test_torchvision_weights(image_dir, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    paths = explain_images(
        None, [str(image_dir / "grey.jpg")], method="gradcam", out_dir=tmp_path / "out",
        reference="augmented", weights=str(weights), arch="resnet18",
    )
    data = read_npz(paths[0])
    assert data["importance"].shape == (224, 224)
    info = json.loads(str(data["info"]))
    assert info["preprocessing"]["mean"] == pytest.approx(list(IMAGENET_MEAN))
    assert info["preprocessing"]["std"] == pytest.approx(list(IMAGENET_STD))
    assert info["source"]["arch"] == "resnet18"


def test_duplicate_stems_do_not_overwrite(model_dir, image_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(other / "colour.png")
    paths = explain_images(
        str(model_dir), [str(image_dir / "colour.png"), str(other / "colour.png")], method="gradcam",
        out_dir=tmp_path / "out", reference="augmented",
    )
    assert [p.name for p in paths[::2]] == ["colour_gradcam.npz", "colour-2_gradcam.npz"]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"images": ["missing.png"]}, ["missing.png", "does not exist"]),
        ({"images": ["BROKEN"]}, ["broken.png", "Cannot read"]),
        ({"layer": "layer9"}, ["layer9", "Valid layer names: stem, layer1, layer2, layer3, layer4"]),
        ({"reference": None}, ["--reference IMAGE", "--reference augmented"]),
        ({"method": "gradcamm"}, ["Unknown explainer 'gradcamm'", "gradcam", "relax", "perceptual"]),
        ({"method": "relax", "layer": "layer4", "reference": None}, ["--layer does not apply to the relax explainer"]),
        ({"method": "relax"}, ["--reference does not apply to the relax explainer"]),
        ({"weights": "w.pth"}, ["either an sslens model", "--weights"]),
        ({"model": None, "weights": "w.pth"}, ["w.pth", "does not exist"]),
        ({"output": "logits"}, ["'pooled' or 'projection'"]),
        ({"reference": "nowhere.png"}, ["nowhere.png", "does not exist"]),
        ({"method": "cocoa-ig", "reference": None}, ["--corpus FOLDER_OR_IMAGE and --foil FOLDER_OR_IMAGE"]),
        ({"method": "cocoa-masking", "reference": None, "corpus": "COLOUR"}, ["pass --foil FOLDER_OR_IMAGE"]),
        ({"method": "relax", "reference": None, "corpus": "COLOUR"}, ["--corpus does not apply to the relax explainer"]),
        ({"method": "relax", "reference": None, "foil": "COLOUR"}, ["--foil does not apply to the relax explainer"]),
        ({"method": "cocoa-ig", "reference": None, "corpus": "nowhere", "foil": "COLOUR"}, ["nowhere does not exist"]),
        ({"method": "labelfree-ig"}, ["--reference does not apply to the labelfree-ig explainer"]),
        ({"method": "correspondence", "reference": None}, ["--reference IMAGE, or --reference augmented"]),
    ],
)
def test_bad_input_raises_user_error(model_dir, image_dir, tmp_path, kwargs, words):
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    args = {"model": str(model_dir), "images": [str(image_dir / "colour.png")], "method": "gradcam",
            "reference": "augmented", "out_dir": tmp_path / "out", **kwargs}
    if args["images"] == ["BROKEN"]:
        args["images"] = [str(tmp_path / "broken.png")]
    for name in ("corpus", "foil"):
        if args.get(name) == "COLOUR":
            args[name] = [str(image_dir / "colour.png")]
    with pytest.raises(UserError) as raised:
        explain_images(args.pop("model"), args.pop("images"), **args)
    for word in words:
        assert word in str(raised.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_image_modes_are_converted_and_recorded(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 0  # transparent: must show the white background, not the hidden red
    rgba[1:, :, 3] = 255
    rgba[0, 1:, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    image, record = load_rgb(tmp_path / "alpha.png")
    assert np.asarray(image)[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(image)[1, 1].tolist() == [200, 0, 0]
    assert record["original_mode"] == "RGBA" and "white" in record["conversion"]

    deep = np.array([[0, 65535], [32896, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    image, record = load_rgb(tmp_path / "deep.png")
    assert record["original_mode"].startswith("I")
    assert np.asarray(image)[..., 0].tolist() == [[0, 255], [128, 255]]

    palette = Image.new("P", (3, 3))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.save(tmp_path / "palette.gif")
    image, _ = load_rgb(tmp_path / "palette.gif")
    assert image.mode == "RGB" and np.asarray(image)[1, 1].tolist() == [10, 20, 30]

    # EXIF orientation 6 (stored pixels need a 90° clockwise turn): applied and recorded.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (6, 4)).save(tmp_path / "rotated.jpg", exif=exif)
    image, record = load_rgb(tmp_path / "rotated.jpg")
    assert image.size == (4, 6) and record["original_size"] == [6, 4] and record["exif_orientation"] == 6
    assert load_rgb(tmp_path / "alpha.png")[1]["exif_orientation"] == 1


def test_preprocess_resizes_shorter_side_and_centre_crops():
    # A 2:1 image whose left and right quarters are black, middle white: after the resize to
    # cover 8x8 and the centre crop, only the white middle remains.
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, 8:24] = 255
    tensor, record = preprocess(Image.fromarray(pixels), (8, 8), (0.0,) * 3, (1.0,) * 3)
    assert record["resized_to"] == [8, 16] and record["crop_box"] == [0, 4, 8, 12]
    assert tensor.shape == (3, 8, 8)
    assert torch.allclose(tensor[:, :, 1:-1], torch.ones(3, 8, 6), atol=0.02)


def test_relax_writes_importance_and_uncertainty(model_dir, image_dir, tmp_path):
    paths = explain_images(
        str(model_dir), [str(image_dir / "grey.jpg")], method="relax", out_dir=tmp_path, num_masks=16
    )
    data = read_npz(paths[0])
    assert {"importance", "uncertainty", "image", "input", "info"} <= set(data)
    assert data["importance"].shape == data["uncertainty"].shape == (32, 32)
    assert np.isfinite(data["importance"]).all()
    assert json.loads(str(data["info"]))["options"]["num_masks"] == 16
    assert_png(paths[1])


def test_perceptual_writes_one_map_per_component(model_dir, image_dir, tmp_path, capsys):
    paths = explain_images(
        str(model_dir), [str(image_dir / "colour.png")], method="perceptual", out_dir=tmp_path,
        components=["color", "brightness", "depth"], num_masks=8,
    )
    data = read_npz(paths[0])
    assert {"component_color", "component_brightness"} <= set(data)
    # depth has no source here: skipped, and said so on the terminal, not only in the npz.
    assert "component_depth" not in data and "depth" in json.loads(str(data["info"]))["explainer"]["skipped"]
    assert "skipped depth: no depth maps" in (printed := capsys.readouterr().out)
    assert "pass --depth-model MiDaS_small" in printed
    assert data["component_color"].shape == (32, 32)
    assert_png(paths[1])


# ----------------------------------------------------------------------------- the embedding explainers


@pytest.fixture(scope="module")
def vit_model_dir(tmp_path_factory):
    """A SimCLR model directory of a 2-block timm ViT at 32 px (8-px patches: a 4 x 4 token grid)."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    options = {"model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2,
               "embed_dim": 32, "num_heads": 2}
    method = create_method("simclr", create_backbone("timm", **options), out_dim=8)
    meta = {
        "method": "simclr", "method_options": {"out_dim": 8}, "backbone": "timm", "backbone_options": options,
        "image_size": [32, 32], "mean": MEAN, "std": STD, "class_names": ["a", "b"],
        "data": {"name": "synthetic"}, "epoch": 1, "step": 10, **provenance(),
    }
    return save_model(tmp_path_factory.mktemp("vit") / "model", method, meta)


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """COCOA's sets: a folder "dogs" of two images and one image "random.png"."""
    folder = tmp_path_factory.mktemp("sets")
    (folder / "dogs").mkdir()
    rng = np.random.default_rng(7)
    for name in ("dogs/a.png", "dogs/b.jpg", "random.png"):
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(folder / name)
    return folder / "dogs", folder / "random.png"


def assert_same_map(actual, expected) -> None:
    """The maps agree to float32 rounding: gradients summed in another order differ by ~1e-6 of
    the map's largest value."""
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def encoder_of(model_dir):
    method, _ = load_model(model_dir)
    return method.encoder("pooled")


def preprocessed(*paths) -> torch.Tensor:
    """(N, 3, 32, 32) the inputs explain_images makes of these image files."""
    return torch.stack([load_image_tensor(path, (32, 32), MEAN, STD)[0] for path in paths])


@pytest.mark.parametrize("method", ["labelfree-ig", "labelfree-gxi"])
def test_labelfree_maps_are_the_explainers_on_the_preprocessed_image(model_dir, image_dir, tmp_path, method):
    paths = explain_images(str(model_dir), [str(image_dir / "colour.png")], method=method, out_dir=tmp_path)
    assert [p.name for p in paths] == [f"colour_{method}.npz", f"colour_{method}.png"]
    data = read_npz(paths[0])
    assert set(data) == {"importance", "image", "input", "info"}
    info = json.loads(str(data["info"]))
    assert info["explainer"]["method"] == method and "seed" not in info["options"]  # deterministic
    expected = create_explainer(method, encoder_of(model_dir))(torch.from_numpy(data["input"])[None])
    assert_same_map(data["importance"], expected.importance[0].numpy())
    assert_png(paths[1])


def test_cocoa_compares_with_the_corpus_and_foil_files(model_dir, image_dir, image_sets, tmp_path, capsys):
    corpus, foil = image_sets
    paths = explain_images(
        str(model_dir), [str(image_dir / "colour.png")], method="cocoa-masking", out_dir=tmp_path,
        corpus=[str(corpus)], foil=str(foil), num_masks=16, seed=2,
    )
    assert paths[0].name == "colour_cocoa-masking_corpus-dogs_foil-random.npz"
    assert "16 masks in" in capsys.readouterr().out
    data = read_npz(paths[0])
    info = json.loads(str(data["info"]))
    assert info["corpus"] == [str(corpus / "a.png"), str(corpus / "b.jpg")] and info["foil"] == [str(foil)]
    assert info["explainer"]["corpus_size"] == 2 and info["explainer"]["foil_size"] == 1
    assert info["options"] == {"num_masks": 16, "seed": 2}
    # The sets are the files preprocessed as the explained images are.
    expected = CocoaMasking(encoder_of(model_dir), num_masks=16, seed=2)(
        torch.from_numpy(data["input"])[None], corpus=preprocessed(corpus / "a.png", corpus / "b.jpg"),
        foil=preprocessed(foil),
    )
    assert_same_map(data["importance"], expected.importance[0].numpy())
    assert_same_map(data["uncertainty"], expected.uncertainty[0].numpy())
    assert_png(paths[1])

    # Repeated paths, and IG: a corpus of one image, a foil of a folder and an image.
    paths = explain_images(
        str(model_dir), [str(image_dir / "grey.jpg")], method="cocoa-ig", out_dir=tmp_path,
        corpus=[str(corpus / "a.png")], foil=[str(corpus), str(foil)],
    )
    assert paths[0].name == "grey_cocoa-ig_corpus-a_foil-dogs+1.npz"
    data = read_npz(paths[0])
    assert len(json.loads(str(data["info"]))["foil"]) == 3
    expected = create_explainer("cocoa-ig", encoder_of(model_dir))(
        torch.from_numpy(data["input"])[None], corpus=preprocessed(corpus / "a.png"),
        foil=preprocessed(corpus / "a.png", corpus / "b.jpg", foil),
    )
    assert_same_map(data["importance"], expected.importance[0].numpy())


def test_correspondence_writes_both_maps_and_the_matches(model_dir, image_dir, tmp_path, monkeypatch):
    import sslens.explain.run as run

    drawn = {}
    original = run.save_explanation_png

    def spy(path, image, maps, title=None, **kwargs):
        drawn.update(image=image, maps=maps, title=title, **kwargs)
        return original(path, image, maps, title, **kwargs)

    monkeypatch.setattr(run, "save_explanation_png", spy)
    reference = image_dir / "grey.jpg"
    paths = explain_images(
        str(model_dir), [str(image_dir / "colour.png")], method="correspondence", out_dir=tmp_path,
        reference=str(reference), layer="layer3",
    )
    assert paths[0].name == "colour_correspondence_layer3_ref-grey.npz"
    data = read_npz(paths[0])
    assert set(data) == {"importance", "reference_importance", "reference_image", "image", "input", "info"}
    info = json.loads(str(data["info"]))
    expected = Correspondence(encoder_of(model_dir), layer="layer3")(
        torch.from_numpy(data["input"])[None], reference=preprocessed(reference)
    )
    assert_same_map(data["importance"], expected.importance[0].numpy())
    assert_same_map(data["reference_importance"], expected.components["reference"][0].numpy())
    matches = info["explainer"]["matches"][0]
    assert len(matches) == 5 and info["explainer"]["grid"] == info["explainer"]["reference_grid"] == [8, 8]
    for got, want in zip(matches, expected.info["matches"][0], strict=True):
        assert got["cell"] == want["cell"] and got["reference_cell"] == want["reference_cell"]
        assert got["score"] == pytest.approx(want["score"], rel=1e-5)
    # The figure: A's map, and B overlaid with its own map; match k outlined on both as box k
    # (cells of the 8 x 8 grid are 4 x 4 px of the 32-px images).
    assert list(drawn["maps"]) == ["correspondence"]
    assert drawn["reference_label"] == "reference: grey.jpg, overlaid with its correspondence map (minmax)"
    assert "outlined: the 5 best matched cell pairs" in drawn["title"]
    np.testing.assert_array_equal(drawn["image"], data["image"])
    assert not np.array_equal(drawn["reference"], data["reference_image"])
    for match, box, reference_box in zip(matches, drawn["boxes"], drawn["reference_boxes"], strict=True):
        (row, col), (ref_row, ref_col) = match["cell"], match["reference_cell"]
        assert box == (row * 4, col * 4, row * 4 + 4, col * 4 + 4)
        assert reference_box == (ref_row * 4, ref_col * 4, ref_row * 4 + 4, ref_col * 4 + 4)
    assert_png(paths[1])

    with pytest.raises(UserError, match=r"is a folder, and correspondence pairs the feature map .*--reference IMAGE"):
        explain_images(str(model_dir), [str(image_dir / "colour.png")], method="correspondence",
                       out_dir=tmp_path / "folder", reference=str(image_dir))
    assert not (tmp_path / "folder").exists()


@pytest.mark.parametrize("method", ["rollout", "cls-attention", "gradient-attention"])
def test_attention_explainers_of_a_resnet_say_they_need_a_vit(model_dir, image_dir, tmp_path, method):
    reference = {"reference": "augmented"} if method == "gradient-attention" else {}
    with pytest.raises(UserError) as raised:
        explain_images(str(model_dir), [str(image_dir / "colour.png")], method=method, out_dir=tmp_path / "out",
                       **reference)
    message = str(raised.value)
    assert f"The {method} explainer needs a Vision Transformer" in message and "resnet-tiny backbone" in message
    assert "--format timm --timm-name vit_" in message
    assert not (tmp_path / "out").exists()


def test_the_cli_says_an_attention_explainer_needs_a_vit_without_a_traceback(model_dir, image_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["explain", str(model_dir), "--image", str(image_dir / "colour.png"), "--method", "rollout",
              "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "rollout explainer needs a Vision Transformer" in err and "Traceback" not in err


def test_attention_explainers_of_a_vit_write_their_maps(vit_model_dir, image_dir, tmp_path):
    image = [str(image_dir / "colour.png")]
    encoder = encoder_of(vit_model_dir)

    paths = explain_images(str(vit_model_dir), image, method="rollout", out_dir=tmp_path)
    data = read_npz(paths[0])
    assert "seed" not in json.loads(str(data["info"]))["options"]
    expected = create_explainer("rollout", encoder)(torch.from_numpy(data["input"])[None])
    assert_same_map(data["importance"], expected.importance[0].numpy())
    assert_png(paths[1])

    # CLS attention's per-head maps are saved (and drawn) as components.
    paths = explain_images(str(vit_model_dir), image, method="cls-attention", out_dir=tmp_path)
    data = read_npz(paths[0])
    assert {"component_head0", "component_head1"} <= set(data)
    expected = create_explainer("cls-attention", encoder)(torch.from_numpy(data["input"])[None])
    for head in ("head0", "head1"):
        assert_same_map(data[f"component_{head}"], expected.components[head][0].numpy())
    assert_same_map(data["importance"], expected.importance[0].numpy())

    # Gradient-weighted attention takes --reference as the CAMs do: here a folder's mean embedding.
    paths = explain_images(str(vit_model_dir), image, method="gradient-attention", out_dir=tmp_path,
                           reference=str(image_dir), seed=5)
    assert paths[0].name.startswith("colour_gradient-attention_refset-")
    data = read_npz(paths[0])
    info = json.loads(str(data["info"]))
    assert info["explainer"]["mode"] == "reference_set" and len(info["reference_set"]) == 2
    expected = create_explainer("gradient-attention", encoder, context={"seed": 5})(
        torch.from_numpy(data["input"])[None], reference_set=preprocessed(image_dir / "colour.png", image_dir / "grey.jpg")
    )
    assert_same_map(data["importance"], expected.importance[0].numpy())
    assert_png(paths[1])
