"""One interface for every explainer: built with an encoder, called on a batch, returns raw maps.

Explainers are found by name in :data:`EXPLAINERS` (which imports the built-in explainer
modules on its first lookup) and built through one front door, :func:`create_explainer`: the
command line, the study and every experiment check options there, so an option is worded the
same wherever it is mistyped.

>>> from torch import nn
>>> encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
>>> relax = create_explainer("relax", encoder, {"num_masks": 20})
>>> relax(torch.randn(1, 3, 16, 16)).importance.shape
torch.Size([1, 16, 16])
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sslens.checks import suggestion
from sslens.errors import UserError
from sslens.registry import Registry

EXPLAINERS = Registry(
    "explainer",
    modules=(
        "sslens.explain.relax", "sslens.explain.gradcam", "sslens.explain.perceptual",
        "sslens.explain.attention", "sslens.explain.correspondence",
        "sslens.explain.labelfree", "sslens.explain.cocoa",
    ),
)


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


def explainer_names() -> list[str]:
    """Every registered explainer name."""
    return EXPLAINERS.names()


def explainer_label(name: str) -> str:
    """The name an explainer goes by in reports (its factory's ``label``, e.g. "Grad-CAM")."""
    return getattr(EXPLAINERS.get(name), "label", name)


def explainer_options(name: str) -> list[str]:
    """The options explainer ``name`` is built with: its factory's keyword arguments."""
    try:
        factory = EXPLAINERS.get(name)
    except ValueError as error:
        raise UserError(str(error)) from error
    return [p for p in inspect.signature(factory).parameters if p != "encoder"]


def check_explainer_options(
    name: str,
    options: Collection[str],
    *,
    where: str = "",
    flags: Mapping[str, str] | None = None,
    reserved: Collection[str] = (),
) -> None:
    """A :class:`~sslens.errors.UserError` for an unknown explainer, or an option it does not take.

    Args:
        name: the explainer.
        options: the option names a user set.
        where: where they were set, for the message (e.g. " under explainers.relax").
        flags: option → the command-line flag that sets it (``{"layer": "--layer"}``), so the
            message names what the user typed.
        reserved: options the caller sets itself (e.g. the study's seed); not the user's to set.
    """
    valid = [option for option in explainer_options(name) if option not in reserved]
    flags = flags or {}
    for option in options:
        if option not in valid:
            spelled = flags.get(option, f"Option {option!r}{where}")
            hint = "" if option in flags else suggestion(option, valid)
            raise UserError(
                f"{spelled} does not apply to the {name} explainer; leave it out.{hint} "
                f"Its options: {', '.join(valid) or 'none'}."
            )


def create_explainer(
    name: str,
    encoder: nn.Module,
    options: Mapping[str, Any] | None = None,
    *,
    context: Mapping[str, Any] | None = None,
    where: str = "",
    flags: Mapping[str, str] | None = None,
) -> Explainer:
    """Build explainer ``name`` for ``encoder``: the one way every caller builds one.

    Args:
        name: a registered explainer ("relax", "perceptual", "gradcam", "gradcam++", ...).
        encoder: maps (B, 3, H, W) normalised images to (B, D) embeddings.
        options: set by the user; each must be an option of the explainer
            (:func:`check_explainer_options`, which ``where`` and ``flags`` word).
        context: values the caller knows (``seed``, ``mean``, ``std``), passed only to
            explainers that take them; ``options`` win.

    Invalid option values are :class:`~sslens.errors.UserError`s naming the explainer.
    """
    options = dict(options or {})
    check_explainer_options(name, options, where=where, flags=flags)
    accepted = explainer_options(name)
    kwargs = {key: value for key, value in (context or {}).items() if key in accepted} | options
    try:
        return EXPLAINERS.get(name)(encoder, **kwargs)
    except UserError:
        raise
    except (ValueError, TypeError) as error:
        raise UserError(f"Invalid options for the {name} explainer: {error}") from error


def has_hooks(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` holds a forward or backward hook."""
    return any(_hook_counts(model).values())


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
