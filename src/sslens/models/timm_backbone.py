"""Any timm model as an sslens backbone: CNNs and Vision Transformers (ViTs).

timm (https://github.com/huggingface/pytorch-image-models) builds every model by name with
``timm.create_model(name, num_classes=0)``, which leaves the pooled representation as output.
:class:`TimmBackbone` wraps such a model, registered in ``BACKBONES`` as ``"timm"`` with the
model name as an option, so a model directory records ``backbone: "timm"`` and
``backbone_options: {"model_name": "vit_small_patch16_224", ...}``. Weights are never
downloaded (``pretrained=False``); published files come in through
:func:`sslens.published.import_checkpoint`.

Layers for Grad-CAM are the modules of timm's ``feature_info`` (``"layer1"`` ... ``"layer4"`` of a
ResNet, ``"stages.0"`` ... of a ConvNeXt, ``"blocks.0"`` ... ``"blocks.N-1"`` of a ViT). A ViT
layer outputs tokens (B, N, C); :meth:`TimmBackbone.cam_reshape` gives the transform that drops
the ``num_prefix_tokens`` class/register tokens and lays the patch tokens out as a (B, C, h, w)
grid, which pytorch-grad-cam applies to activations and gradients alike.

A ViT that pools its class token (``global_pool="token"``, the usual case) reads nothing from
the *patch* tokens after the last block, so a CAM of the last block's output is exactly zero.
For such models the default layer is ``"blocks.N-1.norm1"``: the normalised input of the last
block, whose patch tokens reach the class token through the last attention (the layer
pytorch-grad-cam's ViT tutorial uses).

>>> backbone = TimmBackbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
>>> backbone(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 192])
>>> backbone.layer_names, backbone.default_layer
(('blocks.0', 'blocks.1', 'blocks.1.norm1'), 'blocks.1.norm1')
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from sslens.models.base import BACKBONES, Backbone, state_dict_problems
from sslens.models.resnet import ImportReport


def _timm():
    # timm is an optional dependency (``pip install sslens[timm]``); only this backbone needs it.
    try:
        import timm
    except ImportError as error:
        raise ImportError(
            "The 'timm' backbone needs the timm package: pip install 'sslens[timm]' (or pip install timm)."
        ) from error
    return timm


@BACKBONES.register("timm")
class TimmBackbone(Backbone):
    """A timm model without classifier: (B, 3, H, W) → (B, feature_dim) with timm's own pooling.

    Args:
        model_name: any name of ``timm.list_models()``, e.g. "vit_small_patch16_224", "resnet50".
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``img_size=32, patch_size=8,
            depth=2`` for a test-sized ViT); must be JSON values so the model directory can
            rebuild the backbone.

    ``forward`` is timm's ``forward_features`` + ``forward_head(pre_logits=True)``: the class token
    (or the average of the patch tokens, per the model's ``global_pool``) for a ViT, global average
    pooling for a CNN. Departure from :class:`~sslens.models.base.Backbone`: for token models
    ``forward`` is *not* the spatial mean of :meth:`forward_features`.
    """

    def __init__(self, model_name: str, **model_kwargs):
        super().__init__()
        timm = _timm()
        if not isinstance(model_name, str) or not timm.is_model(model_name):
            close = timm.list_models(f"*{model_name}*")[:5] if isinstance(model_name, str) else []
            hint = f" Similar names: {', '.join(close)}." if close else ""
            raise ValueError(
                f"Unknown timm model {model_name!r}.{hint} List them with timm.list_models('vit_*')."
            )
        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
        self.model_name = model_name
        self.feature_dim = int(self.model.num_features)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        info = list(self.model.feature_info)
        names = [entry["module"] for entry in info]
        self._channels = {entry["module"]: int(entry["num_chs"]) for entry in info}
        last = self.model.get_submodule(names[-1])
        if getattr(self.model, "global_pool", None) == "token" and hasattr(last, "norm1"):
            names.append(f"{names[-1]}.norm1")
            self._channels[names[-1]] = self._channels[names[-2]]
        self.layer_names = tuple(names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, feature_dim), pooled the way the timm model pools."""
        return self.model(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, feature_dim, h, w): the last feature map, tokens laid out as a grid."""
        return _to_map(self.model.forward_features(x), self.feature_dim, self.num_prefix_tokens, self._grid)

    def get_layer(self, name: str) -> nn.Module:
        """The module ``name`` of the wrapped timm model (one of ``layer_names``)."""
        if name not in self.layer_names:
            raise ValueError(
                f"This backbone has no layer {name!r}. Valid layer names: {', '.join(self.layer_names)}."
            )
        return self.model.get_submodule(name)

    def cam_reshape(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The pytorch-grad-cam ``reshape_transform`` for layer ``name``: its output → (B, C, h, w).

        Tokens (B, N, C) lose their ``num_prefix_tokens`` leading class/register tokens and the
        N - prefix patch tokens become a (B, C, h, w) grid (row-major, as timm's patch embedding
        flattens them); channels-last maps (B, h, w, C), e.g. Swin's, are permuted; (B, C, h, w)
        maps pass unchanged.
        """
        self.get_layer(name)  # a ValueError listing the valid names for an unknown one
        channels = self._channels[name]
        prefix, grid = self.num_prefix_tokens, self._grid

        def reshape(activation: torch.Tensor) -> torch.Tensor:
            return _to_map(activation, channels, prefix, grid)

        return reshape

    def _grid(self, num_patches: int) -> tuple[int, int]:
        """(h, w) of ``num_patches`` patch tokens: the patch embedding's grid, else a square."""
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if grid is not None and grid[0] * grid[1] == num_patches:
            return int(grid[0]), int(grid[1])
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(
                f"Cannot lay {num_patches} patch tokens out as a grid: they fit neither the patch "
                f"embedding's grid {grid} nor a square. Use the input size the model was built for."
            )
        return side, side

    def load_timm_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> ImportReport:
        """Load a state dict of the timm model (keys as ``timm.create_model(name)`` names them).

        The classifier (timm's ``pretrained_cfg["classifier"]``, e.g. ``head.*`` or ``fc.*``) is
        dropped and listed; any other missing, unexpected or misshapen key is a ValueError
        listing them. The backbone changes only if every check passes.
        """
        classifiers = self.model.pretrained_cfg.get("classifier") or ()
        classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
        prefixes = tuple(f"{name}." for name in classifiers)
        kept = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
        dropped = sorted(set(state_dict) - set(kept))
        problems = state_dict_problems(self.model.state_dict(), kept)
        if problems:
            raise ValueError(f"The state dict does not fit timm model {self.model_name!r}: {problems}")
        self.model.load_state_dict(kept, strict=True)
        return ImportReport(loaded=sorted(f"model.{k}" for k in kept), dropped=dropped)


def _to_map(
    x: torch.Tensor, channels: int, prefix: int, grid: Callable[[int], tuple[int, int]]
) -> torch.Tensor:
    """A layer output → (B, C, h, w); see :meth:`TimmBackbone.cam_reshape`."""
    if x.ndim == 3 and x.shape[-1] == channels:
        patches = x[:, prefix:]
        height, width = grid(patches.shape[1])
        return patches.transpose(1, 2).reshape(len(x), channels, height, width)
    if x.ndim == 4 and x.shape[1] == channels:
        return x
    if x.ndim == 4 and x.shape[-1] == channels:
        return x.permute(0, 3, 1, 2)
    raise ValueError(
        f"Cannot read a (B, {channels}, h, w) map from a layer output of shape {tuple(x.shape)}; "
        "explain a layer listed in the backbone's layer_names."
    )
