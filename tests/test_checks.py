"""The shared checks: argument checks, name lookups, the device rule and the split loader."""

import pytest
import torch

from sslens.checks import (
    boolean,
    integer,
    non_negative_int,
    positive_int,
    positive_number,
    suggestion,
)
from sslens.data.base import load_split
from sslens.device import resolve_device
from sslens.errors import UserError
from sslens.registry import Registry, lookup


@pytest.mark.parametrize("value", [True, False, 0, -3, 2.0, "4", None])
def test_positive_int_refuses_bools_floats_and_non_positive_values(value):
    with pytest.raises(ValueError, match=f"num_masks must be a positive integer; got {value!r}"):
        positive_int("num_masks", value)


def test_the_checks_return_what_they_accept():
    assert positive_int("k", 3) == 3 and non_negative_int("k", 0) == 0 and integer("seed", -1) == -1
    assert positive_number("lr", 1) == 1.0 and boolean("linear", False) is False
    with pytest.raises(ValueError, match=r"k must be a positive integer \(200 is usual\)"):
        positive_int("k", 0, "200 is usual")
    with pytest.raises(TypeError, match="seed must be an int; got True"):
        integer("seed", True)
    with pytest.raises(TypeError):
        boolean("linear", 1)
    with pytest.raises(ValueError):
        positive_number("lr", float("nan"))


def test_an_unknown_name_suggests_the_closest():
    assert suggestion("relx", ["relax", "gradcam"]) == " Did you mean 'relax'?"
    assert suggestion("zzz", ["relax"]) == ""
    with pytest.raises(ValueError, match="Unknown optimizer 'lars2'. Did you mean 'lars'"):
        lookup("optimizer", {"lars": 1, "sgd": 2}, "lars2")


def test_a_registry_fills_itself_from_its_modules_on_the_first_lookup():
    registry = Registry("method", modules=("sslens.methods.simclr",))
    assert registry._entries == {}
    registry.register("mine")(object)
    # Registering does not fill it; any lookup does (the module is imported once, even if it
    # registered into another registry already).
    assert registry.names() == ["mine"]
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("mine")(object)


def test_the_device_rule():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(UserError, match="Unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(UserError, match="not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available here; use --device cpu"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(UserError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_load_split_names_a_mistyped_option_and_refuses_a_data_dir_for_generated_data():
    with pytest.raises(UserError, match="no option 'num_image'. Did you mean 'num_images'"):
        load_split("synthetic", "train", options={"num_image": 8})
    with pytest.raises(UserError, match="reads no files, so it takes no --data-dir"):
        load_split("synthetic", "train", data_dir="/data")
    with pytest.raises(UserError, match="Invalid data options for 'synthetic'"):
        load_split("synthetic", "train", options={"num_images": 0})
    data = load_split("synthetic", "test", image_size=16, options={"num_images": 4}, device="cpu")
    assert tuple(data.images.shape) == (4, 16, 16, 3)
