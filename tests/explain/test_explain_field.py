"""Field-test fixes of ``sslens explain``: progress, very long runs, unreadable files, output names,
reference figures, degenerate models and published checkpoints given without ``--format``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch import nn

import sslens.explain.run as run
import sslens.published
from sslens.cli import main
from sslens.errors import SslensWarning, UserError
from sslens.explain.display import save_explanation_png, to_display_image
from sslens.explain.perceptual import PerceptualComponents
from sslens.explain.relax import RELAX
from sslens.explain.run import (
    centre_crop_note,
    explain_images,
    long_run_warning,
    output_suffix,
)
from sslens.methods import create_method
from sslens.models import create_backbone
from sslens.models.health import degenerate_encoder_warning
from sslens.store import provenance, save_model

torch.set_num_threads(1)
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def write_model(directory: Path, fill: float | None = None) -> Path:
    """A resnet-tiny SimCLR model directory at 32 px; ``fill``: every weight set to this value."""
    torch.manual_seed(0)
    method = create_method("simclr", create_backbone("resnet-tiny"), out_dim=8)
    if fill is not None:
        with torch.no_grad():
            for parameter in method.parameters():
                parameter.fill_(fill)
    meta = {
        "method": "simclr", "method_options": {"out_dim": 8}, "backbone": "resnet-tiny", "backbone_options": {},
        "image_size": [32, 32], "mean": MEAN, "std": STD, "class_names": ["a"], "data": {"name": "synthetic"},
        "epoch": 1, "step": 1, **provenance(),
    }
    return save_model(directory, method, meta)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("run") / "model")


def noise_image(path: Path, size=(24, 24), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def read_npz(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def explain_messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, SslensWarning)]


# ----------------------------------------------------------------------------- 1. progress


@pytest.mark.parametrize(
    ("options", "call"),
    [
        ({"num_masks": 300}, {}),
        ({"num_masks": 700, "adaptive": True, "min_masks": 128, "tolerance": 10.0}, {}),  # stops early
        ({}, {"masks": torch.rand(50, 1, 16, 16, generator=torch.Generator().manual_seed(1))}),
    ],
)
def test_relax_progress_counts_masks_and_leaves_the_maps_bitwise_unchanged(options, call):
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    relax = RELAX(encoder, batch_size=64, **options)
    seen = []
    plain = relax(images, **call)
    reported = relax(images, **call, progress=lambda done, total: seen.append((done, total)))
    for key in ("importance", "uncertainty"):
        assert torch.equal(getattr(plain, key), getattr(reported, key))
    assert torch.equal(plain.components["u_relax"], reported.components["u_relax"])
    total = call["masks"].shape[0] if "masks" in call else options["num_masks"]
    dones = [done for done, _ in seen]
    assert {t for _, t in seen} == {total} and dones[0] == 0 and dones[-1] == total
    assert dones == sorted(dones) and len(dones) > 2
    if options.get("adaptive"):
        assert plain.info["num_masks_used"] == [256, 256]  # stopped at 256, reported done at 700


def test_perceptual_progress_counts_masks_and_leaves_the_maps_bitwise_unchanged():
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    images = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    explainer = PerceptualComponents(encoder, components=("color", "shape"), num_masks=40, batch_size=16)
    seen = []
    plain = explainer(images)
    reported = explainer(images, progress=lambda done, total: seen.append((done, total)))
    assert torch.equal(plain.importance, reported.importance)
    for name in ("color", "shape"):
        assert torch.equal(plain.components[name], reported.components[name])
    assert seen[0] == (0, 40) and seen[-1] == (40, 40) and len(seen) == 6  # 8 masks per pass of 16 rows
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    with pytest.raises(TypeError, match="progress must be a callable"):
        explainer(images, progress="yes")


def test_each_image_line_says_how_many_masks_took_how_long(model_dir, tmp_path, capsys):
    image = noise_image(tmp_path / "cat.png")
    explain_images(str(model_dir), [str(image)], out_dir=tmp_path / "out", num_masks=64)
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{image}: wrote {tmp_path / 'out' / 'cat_relax.npz'}")
    assert "(64 masks in " in line and " masks/s)" in line
    explain_images(str(model_dir), [str(image)], method="gradcam", reference="augmented", out_dir=tmp_path / "out")
    assert capsys.readouterr().out.strip().endswith(" s)")


def test_progress_bar_shows_masks_and_still_reports_each_image(model_dir, tmp_path, capsys):
    image = noise_image(tmp_path / "cat.png")
    explain_images(str(model_dir), [str(image)], out_dir=tmp_path / "out", num_masks=96, progress=True)
    out = capsys.readouterr().out
    assert "cat_relax.png" in out and "96 masks in" in out
    with pytest.raises(UserError, match="progress must be True, False or 'auto'"):
        explain_images(str(model_dir), [str(image)], out_dir=tmp_path / "out2", progress="always")


# ----------------------------------------------------------------------------- 2. huge --num-masks


def test_long_run_warning_gives_the_estimate_and_the_fix():
    text = long_run_warning(1_000_000_000, 73.0, 3, "cpu")
    assert "--num-masks 1,000,000,000 is far more than a map needs" in text
    assert "days per image at 73 masks/s" in text and "for the 3 images" in text
    assert "smaller --num-masks" in text and "--device cuda" in text
    assert long_run_warning(3000, 73.0, 10, "cpu") is None  # 7 minutes
    assert "This run is long: about 41 s per image" in long_run_warning(3000, 73.0, 1000, "cuda")
    assert "--device cuda" not in long_run_warning(3000, 73.0, 1000, "cuda")


def test_too_many_masks_warn_after_the_first_passes(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(run, "MANY_MASKS", 50)  # 1e9 masks would take days; the bound is what matters
    image = noise_image(tmp_path / "cat.png")
    with pytest.warns(SslensWarning, match=r"--num-masks 96 is far more than a map needs: about .* per image"):
        explain_images(str(model_dir), [str(image)], out_dir=tmp_path / "out", num_masks=96)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        explain_images(str(model_dir), [str(image)], out_dir=tmp_path / "out2", num_masks=40)
    assert explain_messages(record) == []


# ----------------------------------------------------------------------------- 3. unreadable files


@pytest.fixture
def bad_folder(tmp_path, monkeypatch):
    """Two good images and one of each bad kind; Pillow's bomb limit lowered to 1500 pixels (above
    the 32 × 32 crops of the model's inputs, which Pillow checks too)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    folder = tmp_path / "photos"
    folder.mkdir()
    noise_image(folder / "a_good.png", (20, 20))
    noise_image(folder / "b_good.jpg", (30, 20), seed=1)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("a text file named .png")
    png = (folder / "a_good.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    jpeg = (folder / "b_good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) * 3 // 4])  # its header is whole: passes the checks
    Image.new("RGB", (100, 100)).save(folder / "bomb.png")  # 10,000 pixels: Pillow raises
    Image.new("RGB", (40, 40)).save(folder / "bomb2.png")  # 1,600 pixels: Pillow only warns (and decodes)
    return folder


@pytest.fixture
def decoded(monkeypatch):
    """The names of the files whose pixels Pillow decodes."""
    names = []
    original = ImageFile.ImageFile.load

    def load(self):
        names.append(Path(self.filename).name)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return names


def test_a_folder_with_bad_files_explains_the_rest(model_dir, bad_folder, tmp_path, decoded, capsys):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        paths = explain_images(
            str(model_dir), [str(bad_folder)], method="gradcam", reference="augmented", out_dir=tmp_path / "out"
        )
    assert [p.name for p in paths] == ["a_good_gradcam.npz", "a_good_gradcam.png", "b_good_gradcam.npz", "b_good_gradcam.png"]
    first, truncated = explain_messages(record)
    assert first.startswith("Skipping 5 of the 8 images that cannot be read: ")
    assert f"{bad_folder / 'empty.jpg'} (0 bytes)" in first
    assert f"{bad_folder / 'notes.png'} (not an image file Pillow can identify)" in first
    assert f"{bad_folder / 'truncated.png'} (truncated or corrupt" in first
    assert f"{bad_folder / 'bomb.png'} (decompression bomb: 10,000 pixels" in first
    assert f"{bad_folder / 'bomb2.png'} (decompression bomb: 1,600 pixels" in first
    assert "--strict" in first
    assert truncated.startswith(f"Skipping {bad_folder / 'truncated.jpg'}: Cannot read") and "truncated" in truncated
    assert "bomb.png" not in decoded and "bomb2.png" not in decoded  # sized up, never decoded
    assert f"{bad_folder / 'truncated.jpg'}: skipped" in capsys.readouterr().out


def test_strict_stops_at_the_first_bad_file_before_writing(model_dir, bad_folder, tmp_path):
    with pytest.raises(UserError, match=r"Cannot read .*bomb.png as an image \(decompression bomb: 10,000 pixels"):
        explain_images(str(model_dir), [str(bad_folder)], out_dir=tmp_path / "out", strict=True)
    assert not (tmp_path / "out").exists()
    # A truncated JPEG passes the cheap checks and stops the run when it is decoded.
    with pytest.raises(UserError, match=r"truncated.jpg as an image \(truncated or corrupt"):
        explain_images(
            str(model_dir), [str(bad_folder / "truncated.jpg")], out_dir=tmp_path / "out", strict=True, num_masks=8
        )


def test_nothing_readable_is_an_error(model_dir, bad_folder, tmp_path, decoded):
    bad = [str(bad_folder / name) for name in ("empty.jpg", "bomb.png")]
    with pytest.raises(UserError, match=r"None of the 2 images is a readable image: .*empty.jpg \(0 bytes\)"):
        explain_images(str(model_dir), bad, out_dir=tmp_path / "out")
    # One file named alone is its own message; a bomb is never decoded.
    with pytest.raises(UserError, match=r"bomb2.png as an image \(decompression bomb: 1,600 pixels.*shrink it"):
        explain_images(str(model_dir), [str(bad_folder / "bomb2.png")], out_dir=tmp_path / "out")
    # Only decoding finds a truncated JPEG: the run then has nothing to show.
    with pytest.raises(UserError, match=r"None of the 1 images could be explained: .*truncated.jpg: skipped"):
        with pytest.warns(SslensWarning, match="Skipping .*truncated.jpg: Cannot read"):
            explain_images(str(model_dir), [str(bad_folder / "truncated.jpg")], out_dir=tmp_path / "out", num_masks=8)
    assert not decoded.count("bomb2.png") and not any((tmp_path / "out").iterdir())


def test_an_unreadable_file_named_next_to_good_ones_is_skipped(model_dir, bad_folder, tmp_path):
    files = [str(bad_folder / "a_good.png"), str(bad_folder / "notes.png")]
    with pytest.warns(SslensWarning, match=r"Skipping 1 of the 2 images .*notes.png"):
        paths = explain_images(str(model_dir), files, out_dir=tmp_path / "out", num_masks=8)
    assert [p.name for p in paths] == ["a_good_relax.npz", "a_good_relax.png"]


def test_a_reference_folder_with_bad_files_uses_the_rest(model_dir, bad_folder, tmp_path):
    image = noise_image(tmp_path / "cat.png", (20, 20), seed=5)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        paths = explain_images(str(model_dir), [str(image)], method="gradcam", reference=str(bad_folder),
                               out_dir=tmp_path / "out")
    header, decoding = explain_messages(record)
    assert header.startswith("Skipping 5 of the 8 reference images that cannot be read")
    assert decoding.startswith(f"Skipping the reference image {bad_folder / 'truncated.jpg'}: Cannot read")
    info = json.loads(str(read_npz(paths[0])["info"]))
    assert [Path(f).name for f in info["reference_set"]] == ["a_good.png", "b_good.jpg"]  # truncated.jpg skipped
    assert info["explainer"]["reference_set_size"] == 2
    with pytest.raises(UserError, match="Cannot read .*empty.jpg as an image \\(0 bytes\\)"):
        explain_images(str(model_dir), [str(image)], method="gradcam", reference=str(bad_folder / "empty.jpg"),
                       out_dir=tmp_path / "out3")
    with pytest.raises(UserError, match="Cannot read .*bomb.png"):  # the first in name order
        explain_images(str(model_dir), [str(image)], method="gradcam", reference=str(bad_folder), strict=True,
                       out_dir=tmp_path / "out4")


# ----------------------------------------------------------------------------- 4. output names


def test_output_names_say_the_options_that_change_the_map(tmp_path):
    (tmp_path / "dogs").mkdir()
    assert output_suffix(None, None, "pooled") == output_suffix(None, "augmented", "pooled") == ""
    assert output_suffix("layer3", "augmented", "pooled") == "_layer3"
    assert output_suffix("stem", str(tmp_path / "dog.jpg"), "projection") == "_layer-stem_ref-dog_projection"
    assert output_suffix("layer4.0.conv2", str(tmp_path / "dogs"), "pooled") == "_layer4.0.conv2_refset-dogs"
    assert output_suffix(None, str(tmp_path / "my dog!.jpg"), "pooled") == "_ref-my-dog-"


def test_runs_with_other_options_write_other_files_and_never_overwrite(model_dir, tmp_path, monkeypatch):
    image = noise_image(tmp_path / "cat.png")
    other = noise_image(tmp_path / "dog.png", seed=2)
    out = tmp_path / "out"
    common = {"method": "gradcam", "out_dir": out}
    explain_images(str(model_dir), [str(image)], reference="augmented", **common)
    explain_images(str(model_dir), [str(image)], reference=str(other), layer="layer3", **common)
    explain_images(str(model_dir), [str(image)], reference="augmented", output="projection", **common)
    explain_images(str(model_dir), [str(image)], method="relax", out_dir=out, num_masks=8)
    assert sorted(p.name for p in out.glob("*.npz")) == [
        "cat_gradcam.npz", "cat_gradcam_layer3_ref-dog.npz", "cat_gradcam_projection.npz", "cat_relax.npz"]
    before = (out / "cat_gradcam.npz").read_bytes()
    # Checked before any model is loaded, let alone any image explained.
    monkeypatch.setattr(run, "load_model", pytest.fail)
    with pytest.raises(UserError, match=r"cat_gradcam.npz already exists \(and 1 more .*\)\. Pass --overwrite"):
        explain_images(str(model_dir), [str(image)], reference="augmented", seed=4, **common)
    assert (out / "cat_gradcam.npz").read_bytes() == before
    monkeypatch.undo()
    explain_images(str(model_dir), [str(image)], reference="augmented", seed=4, overwrite=True, **common)
    assert (out / "cat_gradcam.npz").read_bytes() != before


def test_out_that_is_a_file_is_a_user_error(model_dir, tmp_path, monkeypatch):
    image = noise_image(tmp_path / "cat.png")
    (tmp_path / "taken").write_text("a file")
    monkeypatch.setattr(run, "load_model", pytest.fail)
    with pytest.raises(UserError, match=r"--out .*taken is a file; pass a folder"):
        explain_images(str(model_dir), [str(image)], out_dir=tmp_path / "taken")


# ----------------------------------------------------------------------------- 5. reference in figures


def test_cam_records_and_draws_its_reference_and_the_centre_crop(model_dir, tmp_path, monkeypatch):
    wide = noise_image(tmp_path / "wide.png", (40, 64))  # 64 × 40: the sides are cropped off
    dog = noise_image(tmp_path / "dog.png", (32, 32), seed=3)
    drawn = {}
    original = run.save_explanation_png

    def spy(path, image, maps, title=None, **kwargs):
        drawn[Path(path).name] = {"title": title, **kwargs}
        return original(path, image, maps, title, **kwargs)

    monkeypatch.setattr(run, "save_explanation_png", spy)
    paths = explain_images(str(model_dir), [str(wide)], method="gradcam", reference=str(dog), out_dir=tmp_path / "a")
    data = read_npz(paths[0])
    info = json.loads(str(data["info"]))
    dog_input = run.load_image_tensor(dog, (32, 32), MEAN, STD)[0]
    np.testing.assert_array_equal(data["reference_image"], to_display_image(dog_input[None], MEAN, STD)[0])
    assert info["centre_crop"] == "centre-cropped 64×40 → 40×40 before resizing to 32×32"
    figure = drawn["wide_gradcam_ref-dog.png"]
    assert figure["reference_label"] == "reference: dog.png"
    np.testing.assert_array_equal(figure["reference"], data["reference_image"])
    similarity = info["explainer"]["similarity"][0]
    assert f"reference: dog.png · cosine similarity {similarity:.3f}" in figure["title"]
    assert "centre-cropped 64×40 → 40×40" in figure["title"]

    # The augmented view shown is the one explained: its similarity is the one recorded.
    square = noise_image(tmp_path / "square.png", (32, 32), seed=4)
    paths = explain_images(str(model_dir), [str(square)], method="gradcam", reference="augmented",
                           out_dir=tmp_path / "b", seed=7)
    data = read_npz(paths[0])
    info = json.loads(str(data["info"]))
    assert "centre_crop" not in info and "centre-cropped" not in drawn["square_gradcam.png"]["title"]
    encoder = run.load_encoder(str(model_dir), output="pooled", device=torch.device("cpu"))[0]
    view = run._augmented_view(run.create_explainer("gradcam", encoder, {}, context={"seed": 7}),
                               torch.from_numpy(data["input"])[None])
    np.testing.assert_array_equal(data["reference_image"], to_display_image(view, MEAN, STD)[0])
    with torch.no_grad():
        similarity = torch.cosine_similarity(encoder(torch.from_numpy(data["input"])[None]), encoder(view)).item()
    assert similarity == pytest.approx(info["explainer"]["similarity"][0], abs=1e-6)

    # A folder's mean embedding is a note, not an image.
    folder = tmp_path / "refs"
    folder.mkdir()
    noise_image(folder / "one.png", seed=5)
    noise_image(folder / "two.png", seed=6)
    paths = explain_images(str(model_dir), [str(square)], method="gradcam", reference=str(folder), out_dir=tmp_path / "c")
    assert "reference_image" not in read_npz(paths[0])
    figure = drawn["square_gradcam_refset-refs.png"]
    assert figure["reference"] is None
    assert figure["reference_label"] == f"reference: mean embedding of 2 images in {folder}"


def test_centre_crop_note_uses_the_original_pixels():
    from sslens.data.images import preprocess

    def note(size, input_size=(224, 224), crop_pct=1.0):
        return centre_crop_note(preprocess(Image.new("RGB", size), input_size, MEAN, STD, crop_pct=crop_pct)[1] |
                                {"original_size": [size[1], size[0]]})

    assert note((640, 480)) == "centre-cropped 640×480 → 480×480 before resizing to 224×224"
    assert note((480, 640)) == "centre-cropped 480×640 → 480×480 before resizing to 224×224"
    assert note((640, 480), crop_pct=0.875) == "centre-cropped 640×480 → 420×420 before resizing to 224×224"
    assert note((333, 500), (32, 48)) == "centre-cropped 333×500 → 333×222 before resizing to 48×32"
    assert note((50, 50), (32, 32)) is None and note((20, 10), (32, 64)) is None


def test_figure_with_a_reference_panel_or_note(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    maps = {"gradcam": rng.random((16, 16))}
    sizes = {}
    for name, kwargs in {
        "plain": {},
        "image": {"reference": image[::-1], "reference_label": "reference: dog.png"},
        "note": {"reference_label": "reference: mean embedding of 12 images in refs"},
    }.items():
        path = save_explanation_png(tmp_path / f"{name}.png", image, maps, title="gradcam\ncosine 0.5", **kwargs)
        with Image.open(path) as written:
            sizes[name] = written.size
    assert sizes["image"][0] > sizes["plain"][0] and sizes["image"] == sizes["note"]
    with pytest.raises(ValueError, match="reference_label"):
        save_explanation_png(tmp_path / "x.png", image, maps, reference=image)


# ----------------------------------------------------------------------------- 6. degenerate models


class Constant(nn.Module):
    """Ignores its input: the same embedding for every image (plus a parameter it never uses)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.ones(x.shape[0], 4) * (1 + 0 * x.mean())


class Scaled(Constant):
    """One direction for every image, scaled by its mean absolute value (a blank image: zero)."""

    def forward(self, x):
        return x.abs().mean(dim=(1, 2, 3))[:, None] * torch.tensor([1.0, 2.0, 3.0, 4.0])


class Log(Constant):
    def forward(self, x):
        return torch.log(x.flatten(1)[:, :4])


def test_degenerate_encoder_warning():
    images = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert degenerate_encoder_warning(conv, images) is None
    assert "every input points the same way" in degenerate_encoder_warning(Constant(), images)
    zero = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    nn.init.zeros_(zero[0].weight), nn.init.zeros_(zero[0].bias)
    assert "zero vector (all its weights are zero)" in degenerate_encoder_warning(zero, images)
    # An embedding that only scales with the input does not pass: cosine similarity sees directions.
    assert "same way" in degenerate_encoder_warning(Scaled(), images)
    conv.train()
    broken = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    broken[1].running_var.fill_(float("nan"))
    with pytest.raises(UserError, match=r"weights hold NaN or infinite values \(1.running_var\)"):
        degenerate_encoder_warning(broken, images)
    with pytest.raises(UserError, match="embeddings hold NaN"):
        degenerate_encoder_warning(Log(), images)  # finite weights, the log of negative pixels
    assert conv.training  # the caller's mode is kept


def test_explain_warns_of_a_zeroed_model_and_refuses_a_nan_one(tmp_path):
    image = noise_image(tmp_path / "cat.png")
    zeroed = write_model(tmp_path / "zeroed", fill=0.0)
    with pytest.warns(SslensWarning, match="The model ignores its input: every input embeds as the zero vector"):
        explain_images(str(zeroed), [str(image)], out_dir=tmp_path / "out", num_masks=8)
    nan = write_model(tmp_path / "nan", fill=float("nan"))
    with pytest.raises(UserError, match="NaN or infinite values .* every map would be NaN"):
        explain_images(str(nan), [str(image)], out_dir=tmp_path / "out2", num_masks=8)
    assert not any((tmp_path / "out2").iterdir())


# ----------------------------------------------------------------------------- 7. published checkpoints


def test_a_published_checkpoint_without_format_suggests_one(model_dir, tmp_path, monkeypatch):
    image = noise_image(tmp_path / "cat.png")
    checkpoint = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    checkpoint.write_bytes(b"weights")
    seen = []

    def guess(path):
        seen.append(Path(path))
        return "moco"

    monkeypatch.setattr(sslens.published, "guess_format_of_file", guess, raising=False)
    with pytest.raises(UserError) as raised:
        explain_images(str(checkpoint), [str(image)], out_dir=tmp_path / "out")
    assert seen == [checkpoint]
    assert f"{checkpoint} looks like a published moco checkpoint, not an sslens model" in str(raised.value)
    assert f"`sslens explain {checkpoint} --format moco --image IMAGE ...`" in str(raised.value)
    monkeypatch.setattr(sslens.published, "guess_format_of_file", lambda path: None, raising=False)
    with pytest.raises(UserError, match=r"not an sslens model .* --format \(barlowtwins, byol, dino, moco, simclr, swav, timm, torchvision, vicreg\)"):
        explain_images(str(checkpoint), [str(image)], out_dir=tmp_path / "out")
    # An sslens model is never second-guessed.
    monkeypatch.setattr(sslens.published, "guess_format_of_file", pytest.fail, raising=False)
    explain_images(str(model_dir / "model.safetensors"), [str(image)], out_dir=tmp_path / "out", num_masks=8)


# ----------------------------------------------------------------------------- the command line


def call(*args: str) -> int:
    with pytest.raises(SystemExit) as caught:
        main(list(args))
    return caught.value.code


def test_cli_warns_in_one_line_and_fails_only_when_nothing_is_explained(model_dir, bad_folder, tmp_path, capsys):
    out = tmp_path / "out"
    common = ("explain", str(model_dir), "--out", str(out), "--device", "cpu", "--num-masks", "8")
    assert call(*common, "--image", str(bad_folder / "a_good.png"), "--image", str(bad_folder / "empty.jpg")) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"sslens: warning: Skipping 1 of the 2 images that cannot be read: {bad_folder}")
    assert "Traceback" not in captured.err and "a_good_relax.npz" in captured.out
    assert call(*common, "--image", str(bad_folder / "a_good.png")) == 2
    assert "already exists" in (err := capsys.readouterr().err) and "--overwrite" in err
    assert call(*common, "--image", str(bad_folder / "a_good.png"), "--overwrite") == 0
    assert call(*common, "--image", str(bad_folder), "--strict", "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.startswith("sslens: error: Cannot read") and err.count("\n") == 1
    assert call(*common, "--image", str(bad_folder / "bomb.png")) == 2
    err = capsys.readouterr().err
    assert "decompression bomb: 10,000 pixels" in err and "Traceback" not in err
