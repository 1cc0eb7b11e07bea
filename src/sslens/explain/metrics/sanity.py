"""Model-parameter randomisation test: do the maps depend on what the model learned?

Adebayo et al. 2018, "Sanity Checks for Saliency Maps" (https://arxiv.org/abs/1810.03292),
Section 3.1: "we randomize the weights of a model starting from the top layer, successively, all
the way to the bottom layer. [...] If the saliency method depends on the learned parameters of
the model, we should expect its output to differ substantially" — measured with the Spearman
rank correlation (and SSIM) between the original map and the map of each randomised model.

How we run it:

* The caller's encoder is never touched: a deep copy is made once and randomised in place, one
  block after another (cascading: after step k the k top blocks are random).
* A block is re-initialised module by module with ``reset_parameters()`` where the module has
  one (this also resets batch-norm running statistics), else every parameter the module owns
  directly is drawn from N(0, 0.02²). Each step runs under its own seed (``seed + step``) in a
  forked RNG, so the global random state is left as it was.
* Maps come from ``explain_fn_factory(encoder)``, called once per model, so explainers that hold
  hooks or caches are built fresh for each randomised copy.
* Where we differ: Adebayo et al. also report rank correlation of absolute values; we correlate
  the raw maps (sslens explainers return signed importance with meaningful sign). SSIM is taken
  on maps min-max scaled to [0, 1] per image (a constant map scales to 0).
* Verdict, from the 95% interval of the mean Spearman correlation at the fully randomised step
  (a bootstrap over images, :mod:`sslens.stats`), never from the mean alone: "passes" when the
  whole interval lies below ``threshold`` (the maps changed), "fails" when it lies at or above
  it (they barely depend on the weights), "inconclusive" when it straddles it (too few images
  to tell). ``changed`` is True for "passes". Constant maps have no rank correlation (NaN) and
  are left out; if every map of the last step is constant the check fails, since a flat map
  explains nothing.

>>> import torch
>>> from torch import nn
>>> encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten())
>>> brightness = lambda model: (lambda x: x.mean(1))   # ignores the model entirely
>>> result = model_randomization_test(encoder, ["2", "0"], brightness, torch.randn(2, 3, 8, 8))
>>> result["spearman_mean"], result["verdict"]
([1.0, 1.0], 'fails')
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import kornia.metrics
import torch
from torch import nn

from sslens.stats import Estimate, bootstrap_mean

ExplainFn = Callable[[torch.Tensor], torch.Tensor]

# The std used for modules without reset_parameters: the common transformer/ViT init scale.
FALLBACK_INIT_STD = 0.02


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """(N, P) → (N, P) float64 ranks 1..P along dim 1, ties given their average rank."""
    ranks = torch.empty(values.shape, dtype=torch.float64, device=values.device)
    for row, vector in enumerate(values):
        sorted_values, order = torch.sort(vector, stable=True)
        _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
        # The group of tied values at sorted positions [s, s + c) shares the rank s + (c + 1) / 2.
        starts = torch.cumsum(counts, 0) - counts
        group_rank = starts.double() + (counts.double() + 1) / 2
        ranks[row, order] = group_rank[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of (N, H, W) maps per image → (N,); NaN where a map is constant."""
    x, y = average_ranks(a.flatten(1)), average_ranks(b.flatten(1))
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    denominator = (x.square().sum(1) * y.square().sum(1)).sqrt()
    corr = (x * y).sum(1) / denominator
    return torch.where(denominator > 0, corr, torch.full_like(corr, float("nan"))).float()


def _unit_scale(maps: torch.Tensor) -> torch.Tensor:
    low = maps.flatten(1).min(1).values.view(-1, 1, 1)
    high = maps.flatten(1).max(1).values.view(-1, 1, 1)
    return (maps - low) / (high - low).clamp_min(1e-12)


def map_ssim(a: torch.Tensor, b: torch.Tensor, window_size: int = 7) -> torch.Tensor:
    """Mean SSIM of (N, H, W) maps min-max scaled to [0, 1] per image → (N,)."""
    # The Gaussian window must fit in the map and be odd.
    size = min(window_size, min(a.shape[-2:]) - (1 - min(a.shape[-2:]) % 2))
    score = kornia.metrics.ssim(_unit_scale(a).unsqueeze(1), _unit_scale(b).unsqueeze(1), max(size, 1))
    return score.flatten(1).mean(1)


def _resolve_blocks(
    model: nn.Module, original: nn.Module, layers: Sequence[str | tuple[str, nn.Module]]
) -> list[tuple[str, nn.Module]]:
    """The blocks of the deep copy ``model`` matching ``layers`` given against ``original``."""
    paths = {id(module): path for path, module in original.named_modules()}
    blocks = []
    for layer in layers:
        if isinstance(layer, str):
            label, path = layer, layer
        elif isinstance(layer, tuple) and len(layer) == 2 and isinstance(layer[1], nn.Module):
            label, path = str(layer[0]), paths.get(id(layer[1]))
            if path is None:
                raise ValueError(
                    f"The module given for layer {label!r} is not a submodule of the encoder; pass "
                    "modules taken from the encoder itself, or their names."
                )
        else:
            raise TypeError(f"layers must hold names or (name, module) pairs; got {layer!r}")
        try:
            blocks.append((label, model.get_submodule(path)))
        except AttributeError as error:
            names = [name for name, _ in original.named_children()]
            raise ValueError(
                f"The encoder has no submodule {path!r}; its top-level children are {names}."
            ) from error
    return blocks


def randomize_block(block: nn.Module, seed: int) -> None:
    """Re-initialise every parameter (and batch-norm statistic) of ``block`` in place, seeded."""
    cuda_devices = sorted({p.device.index or 0 for p in block.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        for module in block.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                for parameter in module.parameters(recurse=False):
                    nn.init.normal_(parameter, std=FALLBACK_INIT_STD)


def _check_maps(maps: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    expected = (images.shape[0], *images.shape[2:])
    if not torch.is_tensor(maps) or tuple(maps.shape) != expected:
        got = tuple(maps.shape) if torch.is_tensor(maps) else type(maps).__name__
        raise ValueError(f"explain_fn must return (B, H, W) = {expected} maps; got {got}")
    return maps.detach().float()


def model_randomization_test(
    encoder: nn.Module,
    layers: Sequence[str | tuple[str, nn.Module]],
    explain_fn_factory: Callable[[nn.Module], ExplainFn],
    images: torch.Tensor,
    *,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict:
    """Cascading randomisation from ``layers[0]`` (top) down; similarity of maps at each step.

    Args:
        encoder: (B, 3, H, W) → (B, D); left unchanged (a deep copy is randomised).
        layers: blocks top first, as submodule names (``"layer4"``, ``"backbone.layer3"``) or
            (label, module) pairs whose modules belong to ``encoder``.
        explain_fn_factory: ``encoder -> explain_fn``, where explain_fn maps (B, 3, H, W)
            normalised images to (B, H, W) raw maps.
        images: (B, 3, H, W) normalised images.
        seed: step k re-initialises with seed ``seed + k``.
        threshold: the mean Spearman correlation at the last step must fall below this.

    Returns:
        ``steps`` (the block randomised at each step, cumulative), ``spearman_mean``,
        ``ssim_mean`` (one per step), ``spearman_interval`` (one :class:`~sslens.stats.Estimate`
        dict per step), ``spearman_per_image``, ``ssim_per_image`` (steps × B), ``changed``
        (bool) and ``verdict`` ("passes", "fails" or "inconclusive").
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be a torch.nn.Module; got {type(encoder).__name__}")
    if isinstance(layers, str) or len(layers) == 0:
        raise ValueError(f"layers must be a non-empty list of block names, top first; got {layers!r}")
    if not callable(explain_fn_factory):
        raise TypeError("explain_fn_factory must be callable: encoder -> (images -> maps)")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1]; got {threshold!r}")

    model = copy.deepcopy(encoder)
    blocks = _resolve_blocks(model, encoder, layers)
    original = _check_maps(explain_fn_factory(model)(images), images)
    spearman_rows, ssim_rows = [], []
    for step, (_, block) in enumerate(blocks, start=1):
        with torch.no_grad():
            randomize_block(block, seed + step)
        maps = _check_maps(explain_fn_factory(model)(images), images)
        with torch.no_grad():
            spearman_rows.append(spearman(original, maps))
            ssim_rows.append(map_ssim(original, maps))
    spearman_table, ssim_table = torch.stack(spearman_rows), torch.stack(ssim_rows)
    # NaN (a constant map) is left out of the per-step means.
    spearman_mean = spearman_table.nanmean(1)
    intervals = [bootstrap_mean(row.numpy(), unit="images", seed=seed) for row in spearman_table]
    verdict = sanity_verdict(intervals[-1], threshold)
    return {
        "steps": [label for label, _ in blocks],
        "spearman_mean": spearman_mean.tolist(),
        "spearman_interval": [interval.to_dict() for interval in intervals],
        "ssim_mean": ssim_table.nanmean(1).tolist(),
        "spearman_per_image": spearman_table.tolist(),
        "ssim_per_image": ssim_table.tolist(),
        "threshold": threshold,
        "seed": seed,
        "changed": verdict == "passes",
        "verdict": verdict,
    }


def sanity_verdict(last_step: Estimate, threshold: float) -> str:
    """"passes", "fails" or "inconclusive" from the last step's interval (see the module docstring)."""
    if last_step.n == 0:
        return "fails"  # every map constant: nothing to correlate, nothing explained
    if last_step.ci_high < threshold:
        return "passes"
    if last_step.ci_low >= threshold:
        return "fails"
    return "inconclusive"
