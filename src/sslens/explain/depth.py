"""Depth maps for the ``"depth"`` perceptual component.

A :data:`DepthEstimator` is any callable ``(B, 3, H, W) images in [0, 1] → (B, H, W) depth``.
:func:`midas_depth_estimator` builds one from MiDaS (Ranftl et al., TPAMI 2020,
https://arxiv.org/abs/1907.01341), the model the reference report uses: "a MiDaS depth
estimation model that computes relative inverse depth from a single image". It loads through
``torch.hub`` (online, or offline from the hub cache); when neither works it raises a
:class:`~sslens.errors.UserError` that says how to get the model. Precomputed depth (e.g. a
synthetic dataset's ground truth) can be passed to the explainer instead.

Where sslens differs from MiDaS's own transforms: images are resized to a square
``input_size × input_size`` (MiDaS keeps the aspect ratio, rounding to multiples of 32) with
bilinear interpolation, in torch, so the whole batch stays on its device; the prediction is
resized back to (H, W) bicubically, as in MiDaS's example code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslens.errors import UserError

DepthEstimator = Callable[[torch.Tensor], torch.Tensor]

#: MiDaS hub entry → (input size, normalisation mean, std), from MiDaS's ``transforms`` hub entry.
MIDAS_MODELS: dict[str, tuple[int, tuple[float, ...], tuple[float, ...]]] = {
    "MiDaS_small": (256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "MiDaS": (384, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "DPT_Hybrid": (384, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "DPT_Large": (384, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@dataclass
class MidasDepth:
    """A MiDaS network as a :data:`DepthEstimator`: (B, 3, H, W) in [0, 1] → (B, H, W) inverse depth."""

    model: nn.Module
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[2:]
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype)[:, None, None]
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype)[:, None, None]
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        # The model may live elsewhere than the images (e.g. on the CPU beside CUDA images).
        model_device = next(self.model.parameters()).device
        with torch.inference_mode():
            depth = self.model(((x - mean) / std).to(model_device)).to(images.device)  # (B, h, w)
        return F.interpolate(depth[:, None].float(), size=size, mode="bicubic", align_corners=False)[:, 0]


def midas_depth_estimator(model_type: str = "MiDaS_small", device: str | torch.device = "cpu") -> MidasDepth:
    """Load MiDaS ``model_type`` through ``torch.hub`` (``intel-isl/MiDaS``) as a depth estimator.

    Raises:
        UserError: when the model can be neither downloaded nor found in the hub cache.
    """
    if model_type not in MIDAS_MODELS:
        raise ValueError(f"Unknown MiDaS model {model_type!r}; choose one of {', '.join(MIDAS_MODELS)}.")
    try:
        model = torch.hub.load("intel-isl/MiDaS", model_type, trust_repo=True)
    except (OSError, ImportError, RuntimeError) as error:
        raise UserError(
            f"Could not load the MiDaS depth model {model_type!r} through torch.hub ({error}). "
            "Run once with internet access so that torch.hub caches it "
            f"(python -c \"import torch; torch.hub.load('intel-isl/MiDaS', '{model_type}')\"; it needs "
            f"the timm package), or copy a cached {torch.hub.get_dir()} from another machine, or pass "
            "precomputed depth maps to the explainer (depth=...)."
        ) from error
    size, mean, std = MIDAS_MODELS[model_type]
    return MidasDepth(model.to(device).eval(), size, mean, std)
