"""Explanation quality: faithfulness (deletion and insertion), saliency invariance, localisation
against ground-truth objects, and the model-parameter randomisation sanity check.

Each metric takes maps or an explain function and the images, as pytorch-grad-cam keeps its
``metrics/`` beside its CAMs; representation quality is :mod:`sslens.evaluate`.
"""

from sslens.lazy import lazy_exports

_EXPORTS = {
    "deletion_insertion": "sslens.explain.metrics.faithfulness",
    "saliency_invariance": "sslens.explain.metrics.invariance",
    "INVARIANCE_AUGMENTATIONS": "sslens.explain.metrics.invariance",
    "localization_scores": "sslens.explain.metrics.localization",
    "LOCALIZATION_METRICS": "sslens.explain.metrics.localization",
    "model_randomization_test": "sslens.explain.metrics.sanity",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
