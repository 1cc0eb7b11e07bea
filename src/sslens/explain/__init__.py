"""Explainers for any image encoder: RELAX, similarity Grad-CAM (and its CAM family) and
perceptual components. Each returns raw maps; display scaling is the separate
:mod:`sslens.explain.display` step.

>>> from sslens.explain import EXPLAINERS
>>> "relax" in EXPLAINERS and "gradcam" in EXPLAINERS and "perceptual" in EXPLAINERS
True
"""

from sslens.explain.base import EXPLAINERS, Explainer, Explanation, preserved_state
from sslens.explain.depth import DepthEstimator, midas_depth_estimator
from sslens.explain.display import normalize_map, overlay, save_explanation_png, to_display_image
from sslens.explain.gradcam import CAM_METHODS, SimilarityCAM
from sslens.explain.masks import MASK_SAMPLERS, PerceptualMasks, RelaxMasks
from sslens.explain.perceptual import COMPONENTS, PerceptualComponents, zscore
from sslens.explain.relax import BASELINES, RELAX, STOPPING_RULES, u_relax
from sslens.explain.run import explain_images


def create_explainer(name: str, encoder, **options) -> Explainer:
    """Build a registered explainer by name, e.g. ``create_explainer("relax", encoder)``."""
    return EXPLAINERS.create(name, encoder, **options)


__all__ = [
    "BASELINES",
    "CAM_METHODS",
    "COMPONENTS",
    "EXPLAINERS",
    "MASK_SAMPLERS",
    "RELAX",
    "STOPPING_RULES",
    "DepthEstimator",
    "Explainer",
    "Explanation",
    "PerceptualComponents",
    "PerceptualMasks",
    "RelaxMasks",
    "SimilarityCAM",
    "create_explainer",
    "explain_images",
    "midas_depth_estimator",
    "normalize_map",
    "overlay",
    "preserved_state",
    "save_explanation_png",
    "to_display_image",
    "u_relax",
    "zscore",
]
