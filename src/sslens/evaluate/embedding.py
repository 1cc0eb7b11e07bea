"""Two-dimensional t-SNE embeddings of representations, for the report's scatter plots.

van der Maaten & Hinton 2008, "Visualizing Data using t-SNE"
(https://www.jmlr.org/papers/v9/vandermaaten08a.html), computed with openTSNE
(Poličar et al. 2024, https://opentsne.readthedocs.io).

Reproducibility: the seed is passed to openTSNE as ``random_state``, the initialisation is PCA
(deterministic up to sign, which openTSNE fixes) and ``n_jobs=1``, because multi-threaded
gradient accumulation sums in a varying order. The same inputs and seed therefore give
bit-identical coordinates on one machine.

Where we differ from openTSNE's defaults: the perplexity is clipped to (N - 1) / 3, since the
Gaussian kernel of each point needs about 3 × perplexity neighbours and openTSNE refuses a larger
one. Record :func:`effective_perplexity` next to the figure when N is small.

>>> import numpy as np
>>> coords = tsne_embedding(np.random.default_rng(0).normal(size=(20, 5)), n_iter=50)
>>> coords.shape
(20, 2)
"""

from __future__ import annotations

import numpy as np
import torch

# t-SNE of fewer points is not meaningful, and openTSNE's neighbour search needs a few.
MIN_POINTS = 4


def effective_perplexity(num_points: int, perplexity: float) -> float:
    """The perplexity actually used for ``num_points`` points: ``min(perplexity, (N - 1) / 3)``."""
    return float(min(perplexity, (num_points - 1) / 3))


def tsne_embedding(
    features: torch.Tensor | np.ndarray,
    *,
    seed: int = 0,
    perplexity: float = 30.0,
    n_iter: int = 500,
) -> np.ndarray:
    """(N, D) features → (N, 2) float64 t-SNE coordinates.

    Args:
        features: (N, D) tensor (any device) or array; N >= 4.
        seed: openTSNE's ``random_state``.
        perplexity: clipped to (N - 1) / 3 (see :func:`effective_perplexity`).
        n_iter: optimisation iterations after the early-exaggeration phase.
    """
    from openTSNE import TSNE  # imported lazily: only the report needs t-SNE

    if torch.is_tensor(features):
        features = features.detach().float().cpu().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must be a (N, D) matrix; got shape {array.shape}")
    if len(array) < MIN_POINTS:
        raise ValueError(f"t-SNE needs at least {MIN_POINTS} points; got {len(array)}. Embed more images.")
    if not np.isfinite(array).all():
        raise ValueError("features contain NaN or infinite values; check the encoder's output.")
    if perplexity <= 0 or n_iter < 1:
        raise ValueError(f"perplexity must be > 0 and n_iter >= 1; got {perplexity!r}, {n_iter!r}")
    tsne = TSNE(
        n_components=2,
        perplexity=effective_perplexity(len(array), perplexity),
        n_iter=n_iter,
        initialization="pca",
        random_state=seed,
        n_jobs=1,
    )
    return np.asarray(tsne.fit(array), dtype=np.float64)
