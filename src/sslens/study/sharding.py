"""A batch of images explained by every process of a ``torchrun`` launch together.

Under torchrun each rank explains its share of the batch (every ``size``-th image, the strided
split of :func:`sslens.distributed.shard`) and the results are all-gathered back into the batch's
order, so every rank ends with the maps one process computes and runs the experiment's metrics on
all of them. Without torchrun :func:`explain_rows` calls the explainer on the whole batch, unchanged.

The split gives the maps of one process because an image's map depends only on the image and
the seed, never on which other images share the call: RELAX and the perceptual components draw
one seeded set of masks per call, shared by all images, and the per-image inputs passed here
(e.g. a CAM's augmented reference views) are computed for the whole batch before it is split.
Only the float rounding of batched kernels can differ (around 1e-7 relative).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from sslens.distributed import gather_objects, shard, unshard, world
from sslens.explain.base import Explanation


def _each_rank(function: Callable[..., Explanation], images: torch.Tensor, per_image: dict) -> list[Explanation | None]:
    """Every rank's ``function(its rows, **its rows of per_image)``, in rank order (None for a
    rank left without images: fewer images than ranks)."""
    index = torch.tensor(shard(range(len(images))), dtype=torch.long)
    mine = None
    if len(index):
        rows = {name: None if value is None else value[index.to(value.device)] for name, value in per_image.items()}
        mine = _to_cpu(function(images[index.to(images.device)], **rows))
    return gather_objects(mine)


def _to_cpu(value: Explanation) -> Explanation:
    # Object collectives pickle their values; a CUDA tensor would be unpickled onto the sender's GPU.
    return dataclasses.replace(
        value,
        importance=value.importance.detach().cpu(),
        uncertainty=None if value.uncertainty is None else value.uncertainty.detach().cpu(),
        components={name: maps.detach().cpu() for name, maps in value.components.items()},
    )


def _merge(parts: Sequence[torch.Tensor | None], total: int) -> torch.Tensor:
    """Per-rank (n_r, ...) rows → (total, ...) in the batch's order."""
    return torch.stack(unshard([[] if part is None else list(part.unbind(0)) for part in parts], total))


def explain_rows(
    explainer: Callable[..., Explanation],
    images: torch.Tensor,
    *,
    per_image_info: Sequence[str] = (),
    **per_image: torch.Tensor | None,
) -> Explanation:
    """``explainer(images, **per_image)`` with the B images split across ranks.

    Every map of the :class:`~sslens.explain.base.Explanation` (``importance``, ``uncertainty``,
    ``components``) is gathered to (B, H, W), on the CPU under torchrun; ``info`` is rank 0's,
    except the keys in ``per_image_info``, lists with one entry per image (or dicts of such lists),
    which are gathered too.
    """
    if not world().distributed or len(images) == 0:
        return explainer(images, **per_image)
    parts = _each_rank(explainer, images, per_image)
    # Rank 0 always holds image 0, so its explanation exists.
    total, first = len(images), parts[0]

    def merged(get: Callable[[Explanation], torch.Tensor]) -> torch.Tensor:
        return _merge([None if part is None else get(part) for part in parts], total)

    info = dict(first.info)

    def gathered(get: Callable[[dict], list]) -> list:
        return unshard([[] if part is None else get(part.info) for part in parts], total)

    for key in per_image_info:
        if isinstance(first.info[key], dict):  # one per-image list per entry (e.g. per component)
            info[key] = {name: gathered(lambda i, key=key, name=name: i[key][name]) for name in first.info[key]}
        else:
            info[key] = gathered(lambda i, key=key: i[key])
    return Explanation(
        importance=merged(lambda part: part.importance),
        uncertainty=None if first.uncertainty is None else merged(lambda part: part.uncertainty),
        components={name: merged(lambda part, name=name: part.components[name]) for name in first.components},
        info=info,
    )
