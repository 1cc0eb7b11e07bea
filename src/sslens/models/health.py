"""Is a model's representation usable at all? One cheap check before minutes of explaining or
evaluating: NaN weights, NaN embeddings, and embeddings that ignore the input.

>>> from torch import nn
>>> degenerate_encoder_warning(nn.Sequential(nn.Flatten(), nn.Linear(48, 4)), torch.randn(1, 3, 4, 4)) is None
True
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sslens.errors import UserError

#: Embeddings of different inputs with at least this cosine similarity count as one: a float32
#: map cannot resolve differences in similarity this small.
SAME_EMBEDDING = 1 - 1e-6


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode, restoring every submodule's own mode on exit (also on error)."""
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for submodule, training in modes:
            submodule.training = training


def degenerate_encoder_warning(encoder: nn.Module, images: torch.Tensor) -> str | None:
    """Why maps of ``encoder`` would be meaningless, or None; NaN ones are a UserError.

    A similarity map needs embeddings that move with the input. ``encoder`` maps (B, 3, H, W)
    normalised images to (B, D); ``images`` (B, 3, H, W), B ≥ 1, are some of the images to
    explain. One forward pass embeds them, the first with its left or its top half set to 0
    (the masking explainers' zero baseline), seeded noise and a blank image; the caller's
    train/eval modes are kept.

    Raises :class:`~sslens.errors.UserError` when a weight or buffer, or an embedding, is NaN or
    infinite (every map would be NaN). Returns a warning when every probe embeds as the zero
    vector, or all that are not zero point the same way (cosine ≥ :data:`SAME_EMBEDDING`: a
    collapsed or constant model, or one whose embedding only scales with the input, whose maps
    show rounding noise).

    """
    tensors = itertools.chain(encoder.named_parameters(), encoder.named_buffers())
    broken = [name for name, tensor in tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        raise UserError(
            f"The model's weights hold NaN or infinite values ({', '.join(broken[:3])}{more}), so every map "
            "would be NaN. The checkpoint is broken (a training run that diverged?): explain an earlier "
            "checkpoint, or retrain with a lower learning rate."
        )
    first = images[:1]
    left, top = first.clone(), first.clone()
    left[..., : first.shape[-1] // 2] = 0
    top[..., : first.shape[-2] // 2, :] = 0
    noise = torch.randn(first.shape, generator=torch.Generator().manual_seed(0)).to(first)
    probes = torch.cat([images, left, top, noise, torch.zeros_like(first)])
    with eval_mode(encoder), torch.inference_mode():
        embeddings = encoder(probes)
    if not torch.is_tensor(embeddings) or embeddings.shape[:1] != probes.shape[:1] or embeddings.ndim != 2:
        raise UserError("The model must map (B, 3, H, W) images to (B, D) embeddings; pass a pooled encoder.")
    embeddings = embeddings.double()
    if not torch.isfinite(embeddings).all():
        raise UserError(
            "The model's embeddings hold NaN or infinite values although its weights are finite, so every "
            "map would be NaN. Check the model (a layer that divides by zero or takes a log?)."
        )
    # A zero embedding has no direction (its cosine similarity with anything is 0): left out.
    unit = F.normalize(embeddings[embeddings.any(dim=1)], dim=1)
    if len(unit) == 0:
        zero_weights = not any(p.any() for p in encoder.parameters())
        why = "every input embeds as the zero vector" + (" (all its weights are zero)" if zero_weights else "")
    elif (unit @ unit[0] >= SAME_EMBEDDING).all():
        why = f"every input points the same way (cosine ≥ {SAME_EMBEDDING}: the images, masked ones, noise, a blank image)"
    else:
        return None
    return (
        f"The model ignores its input: {why}, so its maps show rounding noise, not what it looks at. "
        "Is it the right checkpoint (not an untrained, collapsed or zeroed one)?"
    )
