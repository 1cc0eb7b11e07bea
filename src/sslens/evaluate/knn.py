"""Weighted k-nearest-neighbour classification of frozen features.

Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"
(https://arxiv.org/abs/1805.01978), Sec. 3.4: "we first compute its feature and compare it
against the embeddings of all the images in the memory bank, using cosine similarity
s_i = cos(v_i, f̂). The top k nearest neighbors, denoted by N_k, would then be used to make
the prediction via weighted voting. Specifically, class c would get a total weight
w_c = Σ_{i∈N_k} α_i · 1(c_i = c). Here, α_i is the contributing weight of neighbor x_i, which
depends on the similarity as α_i = exp(s_i/τ)." The lightly and solo-learn online monitors use
the same rule with k=200, τ=0.1, the defaults here.

>>> import torch
>>> train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
>>> knn_top1(train, torch.tensor([0, 1]), torch.tensor([[2.0, 0.1]]), torch.tensor([0]), k=2)
1.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslens.checks import positive_int, positive_number


def _check_feature_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Both (N, D) float feature matrices, with the same D."""
    _check_features(name_a, a)
    _check_features(name_b, b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same feature dimension; got {a.shape[1]} and {b.shape[1]}"
        )


def _check_features(name: str, features: torch.Tensor) -> None:
    if not torch.is_tensor(features) or features.ndim != 2 or len(features) == 0:
        shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
        raise ValueError(f"{name} must be a non-empty (N, D) tensor; got {shape}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be floating point; got {features.dtype}")


def _check_labels(name: str, labels: torch.Tensor, count: int, num_classes: int | None) -> None:
    if not torch.is_tensor(labels) or labels.shape != (count,):
        shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(f"{name} must be a ({count},) tensor, one label per feature row; got {shape}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must hold integer class indices; got {labels.dtype}")
    if num_classes is not None and count and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, num_classes={num_classes}); got values in "
            f"[{int(labels.min())}, {int(labels.max())}]. Pass the dataset's num_classes."
        )


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores of each query from its ``k`` most cosine-similar training features.

    Both feature sets are L2-normalised; each of the ``k`` nearest training features votes
    for its class with weight exp(s/τ). ``k`` is clipped to the number of training features,
    so a small training set votes with all of its members. The computation runs on
    ``train_features.device`` in float32, ``chunk_size`` queries at a time, so memory is
    (chunk_size, N) rather than (Q, N).

    The scores are the paper's class weights w_c divided by their sum over classes: a
    distribution per query with the same argmax as w_c. Exponents are taken relative to
    the most similar neighbour, so a small τ cannot overflow float32.

    Args:
        train_features: (N, D) features of the labelled set.
        train_labels: (N,) integer labels in [0, num_classes).
        query_features: (Q, D) features to classify.
        num_classes: number of classes C.
        k: neighbours that vote (>= 1).
        temperature: τ > 0; smaller gives the nearest neighbours more say.
        chunk_size: queries processed at once.

    Returns:
        (Q, C) float32 scores on ``train_features.device``; each row sums to 1.
    """
    _check_feature_pair("train_features", train_features, "query_features", query_features)
    positive_int("num_classes", num_classes)
    _check_labels("train_labels", train_labels, len(train_features), num_classes)
    positive_int("k", k, "200 is the usual choice")
    positive_number("temperature", temperature, "0.1 is usual")
    positive_int("chunk_size", chunk_size)

    device = train_features.device
    train = F.normalize(train_features.detach().float(), dim=1)
    labels = train_labels.detach().to(device=device, dtype=torch.long)
    k = min(k, len(train))
    scores = []
    for start in range(0, len(query_features), chunk_size):
        query = F.normalize(query_features[start : start + chunk_size].detach().to(device).float(), dim=1)
        similarity, index = (query @ train.T).topk(k, dim=1)  # (q, k), sorted, most similar first
        weights = torch.exp((similarity - similarity[:, :1]) / temperature)
        votes = torch.zeros(len(query), num_classes, device=device)
        votes.scatter_add_(1, labels[index], weights)
        scores.append(votes / votes.sum(dim=1, keepdim=True))
    return torch.cat(scores)


def nearest_neighbours(features: torch.Tensor, k: int, *, chunk_size: int = 1024) -> torch.Tensor:
    """(N, k) int64: each row's ``k`` most cosine-similar other rows, most similar first (the
    same similarity kNN votes with; a row is never its own neighbour). ``k`` is clipped to N − 1.

    >>> nearest_neighbours(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), 1).flatten().tolist()
    [1, 0, 1]
    """
    _check_features("features", features)
    positive_int("k", k)
    positive_int("chunk_size", chunk_size)
    unit = F.normalize(features.detach().float(), dim=1)
    k = min(k, len(unit) - 1)
    rows = []
    for start in range(0, len(unit), chunk_size):
        similarity = unit[start : start + chunk_size] @ unit.T
        own = torch.arange(start, start + len(similarity), device=unit.device)
        similarity[torch.arange(len(similarity)), own] = -torch.inf
        rows.append(similarity.topk(k, dim=1).indices)
    return torch.cat(rows).cpu()


def knn_correct(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """(N_test,) bool: whether each test feature's weighted-kNN class is its label (its mean is
    :func:`knn_top1`; per sample, it gives intervals and paired comparisons)."""
    _check_features("test_features", test_features)
    _check_labels("train_labels", train_labels, len(train_labels), None)
    _check_labels("test_labels", test_labels, len(test_features), num_classes)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(
        train_features, train_labels, test_features,
        num_classes=num_classes, k=k, temperature=temperature, chunk_size=chunk_size,
    )
    return scores.argmax(dim=1) == test_labels.to(scores.device)


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> float:
    """Fraction in [0, 1] of test features whose weighted-kNN class is their label.

    ``num_classes`` defaults to one more than the largest label seen. Ties between classes
    go to the lowest class index. See :func:`knn_predict` for the rule.
    """
    correct = knn_correct(
        train_features, train_labels, test_features, test_labels,
        k=k, temperature=temperature, num_classes=num_classes, chunk_size=chunk_size,
    )
    # Counting in integers keeps 13/50 exactly 0.26 rather than float32's 0.2599999.
    return int(correct.sum()) / len(correct)
