"""Linear probe: a logistic-regression layer trained on frozen features.

The standard protocol, in the words of Chen et al. 2020 (SimCLR,
https://arxiv.org/abs/2002.05709): "a linear classifier is trained on top of the frozen base
network, and test accuracy is used as a proxy for representation quality". As in Kornblith et
al. 2019 (https://arxiv.org/abs/1805.08974), the regularisation strength is chosen on a
validation split held out from the training set, never on the test set. Departures: features are standardised with training-set statistics, and the
layer is trained with SGD + Nesterov momentum and a cosine schedule from zero weights, for
speed; the weight-decay grid members are trained side by side as one batched layer.

>>> import torch
>>> x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
>>> y = (x[:, 0] > 0).long()
>>> linear_probe(x, y, x, y, num_classes=2, epochs=20).top1 > 0.95
True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from sslens.checks import positive_int, positive_number
from sslens.evaluate.knn import _check_feature_pair, _check_labels


@dataclass
class LinearProbeResult:
    """What :func:`linear_probe` measured; every ``*top1`` is a fraction in [0, 1].

    Attributes:
        top1: test accuracy of the layer refit on all training features with ``weight_decay``.
        val_top1: validation accuracy of the chosen ``weight_decay`` (train split only).
        weight_decay: the grid value with the best ``val_top1`` (the first, on ties).
        val_top1_by_weight_decay: validation accuracy of every grid value, as
            ``[(weight_decay, val_top1), ...]`` in grid order.
        train_top1: accuracy of the refit layer on the training features it was fit on.
        num_val: training features held out for validation.
        epochs, batch_size, lr: the optimisation settings used.
    """

    top1: float
    val_top1: float
    weight_decay: float
    val_top1_by_weight_decay: list[tuple[float, float]]
    train_top1: float
    num_val: int
    epochs: int
    batch_size: int
    lr: float
    #: (N_test,) bool: which test features the probe classifies right (for intervals and paired
    #: comparisons); not part of :meth:`to_dict`.
    test_correct: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """JSON-serialisable copy (without ``test_correct``)."""
        result = asdict(self)
        result.pop("test_correct")
        result["val_top1_by_weight_decay"] = [list(pair) for pair in self.val_top1_by_weight_decay]
        return result


@dataclass
class _LinearLayers:
    """G standardised linear classifiers: logits_g = ((x - mean) / std) @ weight[:, g] + bias[g]."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight: torch.Tensor  # (D, G, C)
    bias: torch.Tensor  # (G, C)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) → (G, N) predicted classes."""
        x = (features - self.mean) / self.std
        logits = torch.einsum("nd,dgc->gnc", x, self.weight) + self.bias[:, None, :]
        return logits.argmax(dim=2)


def _standardisation(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = features.mean(dim=0)
    std = features.std(dim=0, correction=0)
    # A constant feature carries no information; dividing by 1 keeps it at zero instead of
    # turning float noise (or a shifted test value) into a huge input.
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def _fit(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    weight_decays: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> _LinearLayers:
    """Train one softmax-regression layer per weight decay (G = len(weight_decays)) on the same batches.

    The objective of member g is mean cross-entropy + wd_g/2 · ||W_g||² (coupled L2, as
    ``torch.optim.SGD(weight_decay=wd_g)``; the bias is not decayed). Its gradient is written
    out, ∂/∂logits = softmax - one_hot, because autograd and ``F.cross_entropy`` cost several
    times more than the two matmuls on a CPU with so few classes, and this loop is the whole
    cost of the probe. All members share one (D, G·C) matrix, so a step is one matmul each way.
    """
    mean, std = _standardisation(features)
    x = (features - mean) / std
    groups, count, dim = len(weight_decays), len(x), x.shape[1]
    device = x.device
    one_hot = torch.nn.functional.one_hot(labels, num_classes).float()
    # Zero initialisation: the problem is convex, so no random start is needed.
    weight = torch.zeros(dim, groups * num_classes, device=device)
    bias = torch.zeros(groups * num_classes, device=device)
    decay = weight_decays.to(device).repeat_interleave(num_classes)  # (G·C,), one per column
    optimizer = torch.optim.SGD([weight, bias], lr=lr, momentum=0.9, nesterov=True)
    batch_size = min(batch_size, count)
    total_steps = epochs * -(-count // batch_size)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        # One gather per epoch, then contiguous slices: cheaper than indexing every step.
        order = torch.randperm(count, generator=generator).to(device)
        x_epoch, target_epoch = x.index_select(0, order), one_hot.index_select(0, order)
        for start in range(0, count, batch_size):
            x_batch = x_epoch[start : start + batch_size]  # (B, D)
            target = target_epoch[start : start + batch_size, None, :]  # (B, 1, C)
            logits = torch.addmm(bias, x_batch, weight).view(len(x_batch), groups, num_classes)
            # Softmax by hand: torch.softmax is slow on a CPU for a last dimension this small.
            exp = (logits - logits.amax(dim=2, keepdim=True)).exp_()
            error = (exp / exp.sum(dim=2, keepdim=True) - target).view(len(x_batch), -1)
            error /= len(x_batch)
            weight.grad = torch.addmm(weight * decay, x_batch.T, error)
            bias.grad = error.sum(dim=0)
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            optimizer.step()
            step += 1
    return _LinearLayers(mean, std, weight.view(dim, groups, num_classes), bias.view(groups, num_classes))


def _top1(predictions: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """(G, N) predictions, (N,) labels → accuracy of each of the G rows."""
    # Counting in integers keeps 13/50 exactly 0.26 rather than float32's 0.2599999.
    return [correct / len(labels) for correct in (predictions == labels).sum(dim=1).tolist()]


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 512,
    lr: float = 0.1,
    weight_decays: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3),
    val_fraction: float = 0.1,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> LinearProbeResult:
    """Test accuracy of a linear classifier on frozen features, regularisation chosen on validation.

    1. A random ``val_fraction`` of the training features (fixed by ``seed``) is held out.
    2. One layer per ``weight_decays`` value is trained on the rest and scored on it.
    3. The best weight decay is refit on all training features and scored on the test set.
    The test features and labels are used only in step 3.

    Args:
        train_features: (N, D) frozen features; test_features: (M, D).
        train_labels: (N,), test_labels: (M,) integer labels in [0, num_classes).
        num_classes: number of classes C.
        epochs: passes over the training features per fit.
        batch_size: features per SGD step (clipped to the number available).
        lr: peak learning rate of the cosine schedule (features are standardised).
        weight_decays: the L2 grid searched on validation.
        val_fraction: share of training features held out, in (0, 1).
        seed: fixes the validation split and the batch order.
        device: where to train; defaults to ``train_features.device``. All features are
            moved there once (they are small next to the images they came from).
    """
    _check_feature_pair("train_features", train_features, "test_features", test_features)
    if positive_int("num_classes", num_classes) < 2:
        raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")
    _check_labels("train_labels", train_labels, len(train_features), num_classes)
    _check_labels("test_labels", test_labels, len(test_features), num_classes)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        positive_int(name, value)
    positive_number("lr", lr)
    decays = tuple(weight_decays)
    if not decays or any(not isinstance(wd, (int, float)) or not wd >= 0 for wd in decays):
        raise ValueError(
            f"weight_decays must be a non-empty sequence of numbers >= 0, e.g. (0, 1e-4); got {weight_decays!r}"
        )
    if not isinstance(val_fraction, float) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a float in (0, 1), e.g. 0.1; got {val_fraction!r}")
    num_val = max(1, round(val_fraction * len(train_features)))
    if num_val >= len(train_features):
        raise ValueError(
            f"{len(train_features)} training features leave none to fit on after holding out "
            f"val_fraction={val_fraction}; pass more features or a smaller val_fraction."
        )

    device = train_features.device if device is None else torch.device(device)
    train_x = train_features.detach().to(device=device, dtype=torch.float32)
    train_y = train_labels.detach().to(device=device, dtype=torch.long)
    settings = dict(num_classes=num_classes, epochs=epochs, batch_size=batch_size, lr=float(lr))

    split = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed)).to(device)
    val_index, fit_index = split[:num_val], split[num_val:]
    grid = _fit(
        train_x[fit_index], train_y[fit_index],
        weight_decays=torch.tensor(decays, dtype=torch.float32), seed=seed, **settings,
    )
    val_top1 = _top1(grid.predict(train_x[val_index]), train_y[val_index])
    best = max(range(len(decays)), key=lambda g: (val_top1[g], -g))

    final = _fit(
        train_x, train_y,
        weight_decays=torch.tensor([decays[best]], dtype=torch.float32), seed=seed, **settings,
    )
    test_x = test_features.detach().to(device=device, dtype=torch.float32)
    test_y = test_labels.detach().to(device=device, dtype=torch.long)
    test_predictions = final.predict(test_x)
    return LinearProbeResult(
        top1=_top1(test_predictions, test_y)[0],
        val_top1=val_top1[best],
        weight_decay=float(decays[best]),
        val_top1_by_weight_decay=[(float(wd), acc) for wd, acc in zip(decays, val_top1, strict=True)],
        train_top1=_top1(final.predict(train_x), train_y)[0],
        num_val=num_val,
        epochs=epochs,
        batch_size=batch_size,
        lr=float(lr),
        test_correct=(test_predictions[0] == test_y).cpu(),
    )
