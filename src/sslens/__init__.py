"""sslens: train self-supervised image models and explain what their representations look at.

The names notebooks and scripts use are importable from here (loaded on first use, so
``import sslens`` stays fast); docs/API.md lists them.

>>> import sslens
>>> method, meta = sslens.load_model("runs/simclr-synthetic")  # doctest: +SKIP
>>> relax = sslens.create_explainer("relax", method.encoder("pooled"), {"num_masks": 500})  # doctest: +SKIP
"""

from sslens.lazy import lazy_exports
from sslens.version import __version__

_EXPORTS = {
    # Errors the library raises for input a user can fix.
    "UserError": "sslens.errors",
    "DatasetError": "sslens.errors",
    "SslensWarning": "sslens.errors",
    # Data.
    "ImageData": "sslens.data.base",
    "load_dataset": "sslens.data.base",
    "load_split": "sslens.data.base",
    "load_image_tensor": "sslens.data.images",
    # Models and methods.
    "create_backbone": "sslens.models.base",
    "create_method": "sslens.methods.base",
    # The model store.
    "RunDir": "sslens.store",
    "load_model": "sslens.store",
    "save_model": "sslens.store",
    "import_checkpoint": "sslens.published",
    # Training.
    "TrainConfig": "sslens.train.config",
    "load_config": "sslens.train.config",
    "train": "sslens.train.loop",
    # Representation quality.
    "evaluate_encoder": "sslens.evaluate.quality",
    "extract_features": "sslens.evaluate.features",
    "knn_top1": "sslens.evaluate.knn",
    "linear_probe": "sslens.evaluate.linear",
    # Explainers.
    "Explanation": "sslens.explain.base",
    "create_explainer": "sslens.explain.base",
    "explainer_names": "sslens.explain.base",
    "RELAX": "sslens.explain.relax",
    "SimilarityCAM": "sslens.explain.gradcam",
    "PerceptualComponents": "sslens.explain.perceptual",
    "normalize_map": "sslens.explain.display",
    "overlay": "sslens.explain.display",
    # Explanation quality.
    "deletion_insertion": "sslens.explain.metrics.faithfulness",
    "saliency_invariance": "sslens.explain.metrics.invariance",
    "localization_scores": "sslens.explain.metrics.localization",
    "model_randomization_test": "sslens.explain.metrics.sanity",
    # Studies.
    "load_study_config": "sslens.study.config",
    "run_study": "sslens.study.run",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["__version__", *sorted(_EXPORTS)]
