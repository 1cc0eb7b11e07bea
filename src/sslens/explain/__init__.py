"""Explainers for any image encoder: RELAX, similarity Grad-CAM (and its CAM family) and
perceptual components. Each returns raw maps; display scaling is the separate
:mod:`sslens.explain.display` step.

The explainer modules load on first use (PEP 562), so ``import sslens.explain.relax`` does not
pull in pytorch-grad-cam, OpenCV, kornia or matplotlib.

>>> from sslens.explain import explainer_names
>>> [name for name in ("relax", "gradcam", "perceptual") if name in explainer_names()]
['relax', 'gradcam', 'perceptual']
"""

import importlib

from sslens.explain.base import EXPLAINERS, Explainer, Explanation, preserved_state

# Public name → the module that defines it.
_LAZY = {
    "RELAX": "relax", "BASELINES": "relax", "STOPPING_RULES": "relax", "u_relax": "relax",
    "SimilarityCAM": "gradcam", "CAM_METHODS": "gradcam",
    "PerceptualComponents": "perceptual", "COMPONENTS": "perceptual", "zscore": "perceptual",
    "RelaxMasks": "masks", "PerceptualMasks": "masks", "MASK_SAMPLERS": "masks",
    "DepthEstimator": "depth", "midas_depth_estimator": "depth",
    "normalize_map": "display", "overlay": "display", "save_explanation_png": "display",
    "to_display_image": "display",
    "explain_images": "run",
}
_EXPLAINER_MODULES = ("relax", "gradcam", "perceptual")


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'sslens.explain' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sslens.explain.{_LAZY[name]}"), name)


def explainer_names() -> list[str]:
    """Every registered explainer name (loads the explainer modules)."""
    for module in _EXPLAINER_MODULES:
        importlib.import_module(f"sslens.explain.{module}")
    return EXPLAINERS.names()


def create_explainer(name: str, encoder, **options) -> Explainer:
    """Build a registered explainer by name, e.g. ``create_explainer("relax", encoder)``."""
    explainer_names()
    return EXPLAINERS.create(name, encoder, **options)


__all__ = [
    "EXPLAINERS", "Explainer", "Explanation", "create_explainer", "explainer_names",
    "preserved_state", *_LAZY,
]
