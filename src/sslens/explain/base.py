"""One interface for every explainer: built with an encoder, called on a batch, returns raw maps."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from sslens.registry import Registry

EXPLAINERS = Registry("explainer")


@dataclass
class Explanation:
    """Raw maps at input resolution, never rescaled.

    Attributes:
        importance: (B, H, W) float32.
        uncertainty: (B, H, W) float32 where the method has one, else None.
        components: per-component (B, H, W) maps for multi-map explainers (perceptual
            components), keyed by component name; empty otherwise.
        info: method details to record with the maps (masks used, seed, layer, skipped
            components and why, ...). JSON-serialisable values only.
    """

    importance: torch.Tensor
    uncertainty: torch.Tensor | None = None
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


class Explainer:
    """Base class: ``Explainer(encoder, **options)(images) -> Explanation``.

    ``encoder`` is any ``nn.Module`` mapping (B, 3, H, W) normalised images to (B, D)
    embeddings. Options are validated in ``__init__``. ``__call__`` runs :meth:`explain`
    inside :func:`preserved_state`, so the caller's model keeps its mode, hooks and
    ``requires_grad`` flags, also when an exception escapes.
    """

    def __init__(self, encoder: nn.Module):
        if not isinstance(encoder, nn.Module):
            raise TypeError(
                f"encoder must be a torch.nn.Module mapping images to embeddings; got {type(encoder).__name__}"
            )
        self.encoder = encoder

    def explain(self, images: torch.Tensor, **kwargs) -> Explanation:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, **kwargs) -> Explanation:
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, H, W) tensor; got {shape}")
        with preserved_state(self.encoder):
            return self.explain(images, **kwargs)


def _hook_counts(model: nn.Module) -> dict[str, int]:
    counts = {}
    for name, module in model.named_modules():
        counts[name] = (
            len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks)
            + len(getattr(module, "_backward_pre_hooks", {}))
        )
    return counts


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s train/eval mode of every submodule and every ``requires_grad`` flag on
    exit, and check that no hooks were left behind (raising if an explainer leaked one)."""
    modes = {name: module.training for name, module in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    hooks_before = _hook_counts(model)
    try:
        yield
    finally:
        for name, module in model.named_modules():
            if name in modes:
                module.training = modes[name]
        for name, p in model.named_parameters():
            if name in grads:
                p.requires_grad_(grads[name])
    if _hook_counts(model) != hooks_before:
        raise RuntimeError("An explainer left hooks on the model; this is a bug in sslens.")
