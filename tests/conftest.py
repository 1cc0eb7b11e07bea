"""Fixtures shared by several test files."""

import pytest
import torch

#: The tests that take minutes (they train models to a measured margin). They are run first, so
#: that under pytest-xdist the workers do not finish the short tests and then wait, one of them
#: idle, while another runs a long one left for the end.
LONG_TESTS = ("tests/train/test_learning.py", "tests/study/test_groundtruth.py::test_relax_and_gradcam",
              "tests/study/test_groundtruth.py::test_colour_augmentation")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not any(item.nodeid.startswith(prefix) for prefix in LONG_TESTS))


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory):
    """Point the user cache (imported checkpoints, read-only datasets' caches) at a temporary
    folder, so no test writes into the home directory of whoever runs it."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user-cache")))
    yield
    patch.undo()


@pytest.fixture
def imagenet_style_model():
    """Writes a model directory like an imported ImageNet model's: no training config, 40-px
    inputs, ImageNet statistics, bicubic resizing."""

    def write(directory) -> None:
        from sslens.data.base import IMAGENET_MEAN, IMAGENET_STD
        from sslens.methods import create_method
        from sslens.models import create_backbone
        from sslens.store import provenance, save_model

        torch.manual_seed(0)
        method = create_method("simclr", create_backbone("resnet-tiny"))
        save_model(directory, method, {
            "method": "simclr", "method_options": {}, "backbone": "resnet-tiny", "backbone_options": {},
            "image_size": [40, 40], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "class_names": [], "data": "test", "epoch": 0, "step": 0, "interpolation": "bicubic",
            **provenance(),
        })

    return write
