"""Explainers for any image encoder: RELAX, similarity Grad-CAM (and its CAM family) and
perceptual components, behind one interface and one front door (:func:`create_explainer`).
Each returns raw maps; display scaling is the separate :mod:`sslens.explain.display` step, and
explanation-quality metrics live in :mod:`sslens.explain.metrics`.

The explainer modules load on first use (PEP 562), so ``import sslens.explain`` does not pull in
pytorch-grad-cam, OpenCV, kornia or matplotlib.

>>> from sslens.explain import explainer_names
>>> [name for name in ("relax", "gradcam", "perceptual") if name in explainer_names()]
['relax', 'gradcam', 'perceptual']
"""

from sslens.lazy import lazy_exports

_EXPORTS = {
    "EXPLAINERS": "sslens.explain.base",
    "Explainer": "sslens.explain.base",
    "Explanation": "sslens.explain.base",
    "check_explainer_options": "sslens.explain.base",
    "create_explainer": "sslens.explain.base",
    "explainer_label": "sslens.explain.base",
    "explainer_names": "sslens.explain.base",
    "explainer_options": "sslens.explain.base",
    "preserved_state": "sslens.explain.base",
    "RELAX": "sslens.explain.relax",
    "STOPPING_RULES": "sslens.explain.relax",
    "u_relax": "sslens.explain.relax",
    "BASELINES": "sslens.explain.baselines",
    "make_baseline": "sslens.explain.baselines",
    "SimilarityCAM": "sslens.explain.gradcam",
    "CAM_METHODS": "sslens.explain.gradcam",
    "PerceptualComponents": "sslens.explain.perceptual",
    "LabelFree": "sslens.explain.labelfree",
    "integrated_gradients": "sslens.explain.labelfree",
    "CocoaGradients": "sslens.explain.cocoa",
    "CocoaMasking": "sslens.explain.cocoa",
    "AttentionRollout": "sslens.explain.attention",
    "CLSAttention": "sslens.explain.attention",
    "GradientAttention": "sslens.explain.attention",
    "Correspondence": "sslens.explain.correspondence",
    "COMPONENTS": "sslens.explain.perceptual",
    "zscore": "sslens.explain.perceptual",
    "RelaxMasks": "sslens.explain.masks",
    "PerceptualMasks": "sslens.explain.masks",
    "MASK_SAMPLERS": "sslens.explain.masks",
    "DepthEstimator": "sslens.explain.depth",
    "midas_depth_estimator": "sslens.explain.depth",
    "normalize_map": "sslens.explain.display",
    "overlay": "sslens.explain.display",
    "save_explanation_png": "sslens.explain.display",
    "to_display_image": "sslens.explain.display",
    "explain_images": "sslens.explain.run",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
