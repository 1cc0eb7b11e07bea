"""Representation quality of a frozen encoder: features (cached), weighted kNN, a linear probe
and t-SNE. Explanation quality lives beside the explainers, in :mod:`sslens.explain.metrics`.

Every accuracy is a fraction in [0, 1] named ``*_top1`` (``knn_top1``, ``linear_top1``); the
training statistic ``positive_pair_top1`` is a different quantity and never appears here.
"""

from sslens.lazy import lazy_exports

_EXPORTS = {
    "FeatureCache": "sslens.evaluate.features",
    "extract_features": "sslens.evaluate.features",
    "feature_cache_key": "sslens.evaluate.features",
    "knn_predict": "sslens.evaluate.knn",
    "knn_top1": "sslens.evaluate.knn",
    "LinearProbeResult": "sslens.evaluate.linear",
    "linear_probe": "sslens.evaluate.linear",
    "tsne_embedding": "sslens.evaluate.embedding",
    "format_results_table": "sslens.evaluate.table",
    "evaluate_encoder": "sslens.evaluate.quality",
    "evaluate_run": "sslens.evaluate.run",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
