"""A published encoder brought into sslens: backbone, optional projection head and prototypes.

:mod:`sslens.published` converts the authors' checkpoint files into a model directory whose
``meta.json`` names the method ``"imported"``; :class:`ImportedMethod` is what
:func:`sslens.store.load_model` rebuilds from it. The head is described in the meta as a list of
``[kind, *args]`` layers (:data:`HEAD_LAYERS`), so it can be rebuilt from JSON alone, and
:func:`head_spec` reads that description off an ``nn.Sequential``-keyed state dict.

>>> from sslens.models import create_backbone
>>> spec = [["linear", 512, 64, True], ["relu"], ["linear", 64, 16, True]]
>>> method = ImportedMethod(create_backbone("resnet18"), head=spec)
>>> method.encoder("projection")(torch.randn(2, 3, 64, 64)).shape
torch.Size([2, 16])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sslens.checks import non_negative_int
from sslens.errors import UserError
from sslens.methods.base import METHODS, SSLMethod, StepOutput
from sslens.models.base import Backbone

#: Head layer kind → module factory; a head is described in meta as a list of
#: ``[kind, *args]`` so :class:`ImportedMethod` can rebuild it from JSON.
HEAD_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "linear": lambda in_dim, out_dim, bias: nn.Linear(in_dim, out_dim, bias=bias),
    "batchnorm": lambda dim: nn.BatchNorm1d(dim),
    "relu": lambda: nn.ReLU(),
    # DINO's head (facebookresearch/dino vision_transformer.py DINOHead) uses nn.GELU().
    "gelu": lambda: nn.GELU(),
}


@METHODS.register("imported")
class ImportedMethod(SSLMethod):
    """A published encoder: backbone, optional projection head, optional SwAV prototypes.

    Args:
        backbone: the encoder (its pooled output is the representation).
        head: the projection head as ``[[kind, *args], ...]`` with kinds from
            :data:`HEAD_LAYERS`, e.g. MoCo v2's ``[["linear", 2048, 2048, True], ["relu"],
            ["linear", 2048, 128, True]]``; None = no head.
        num_prototypes: K of SwAV's prototypes (a bias-free Linear out_dim → K), or of DINO's
            last layer (the same computation: its weight-normalised Linear reads the
            L2-normalised bottleneck output); 0 = none.

    Outputs for explainers (:meth:`encoder`): "pooled" (B, feature_dim), "projection"
    (B, out_dim), "prototypes" (B, K): scores of the L2-normalised projection against the
    prototypes, as SwAV computes them (for DINO: the head's K logits, before centring and
    temperature). It cannot be trained: :meth:`training_step` raises.
    """

    def __init__(self, backbone: Backbone, head: list | None = None, num_prototypes: int = 0):
        super().__init__(backbone)
        non_negative_int("num_prototypes", num_prototypes, "0 = none")
        self.projector = build_head(head) if head else None
        out_dim = head_out_dim(head) if head else backbone.feature_dim
        self.prototypes = nn.Linear(out_dim, num_prototypes, bias=False) if num_prototypes else None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, out_dim) projection-head output."""
        return self._projector()(self.backbone(x))

    def _projector(self) -> nn.Module:
        if self.projector is None:
            raise ValueError(
                "This imported model has no projection head (its checkpoint held none); "
                "use output 'pooled'."
            )
        return self.projector

    def training_step(self, views: list[torch.Tensor]) -> StepOutput:
        raise UserError(
            "This model was imported from a published checkpoint; sslens does not train imported "
            "models (their loss state, e.g. MoCo's queue, is not kept). Explain or evaluate it, or "
            "train a new model with `sslens train`."
        )

    def encoder(self, output: str = "pooled") -> nn.Module:
        """images (B, 3, H, W) → (B, D) for ``output`` "pooled", "projection" or "prototypes"."""
        if output == "prototypes":
            if self.prototypes is None:
                raise ValueError("This imported model has no prototypes; use output 'pooled' or 'projection'.")
            return nn.Sequential(self.backbone, self.projector or nn.Identity(), L2Normalize(), self.prototypes)
        if output == "projection":
            return nn.Sequential(self.backbone, self._projector())
        if output == "pooled":
            return self.backbone
        raise ValueError(f"output must be 'pooled', 'projection' or 'prototypes'; got {output!r}")


class L2Normalize(nn.Module):
    """(B, D) → (B, D) unit rows, as SwAV normalises projections before the prototypes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


def build_head(spec: list) -> nn.Sequential:
    """The ``nn.Sequential`` that a ``[[kind, *args], ...]`` head description names."""
    layers = []
    for entry in spec:
        if not isinstance(entry, list | tuple) or not entry or entry[0] not in HEAD_LAYERS:
            raise ValueError(
                f"Each head layer must be [kind, *args] with kind in {', '.join(HEAD_LAYERS)}; got {entry!r}"
            )
        layers.append(HEAD_LAYERS[entry[0]](*entry[1:]))
    return nn.Sequential(*layers)


def head_out_dim(spec: list) -> int:
    """The output width of a head description: its last Linear's ``out_dim``."""
    return next(int(entry[2]) for entry in reversed(spec) if entry[0] == "linear")


def head_spec(head: Mapping[str, torch.Tensor], activation: str = "relu") -> list[list]:
    """``[kind, *args]`` per index of an ``nn.Sequential``-keyed head state dict.

    Linear = a 2-D ``weight``; BatchNorm1d = ``running_mean``; an index without parameters is
    the ``activation`` (a parameter-free kind of :data:`HEAD_LAYERS`): a ReLU in MoCo v2, SwAV,
    SimCLRv2, Barlow Twins, VICReg and BYOL heads, a GELU in DINO's.
    """
    if activation not in ("relu", "gelu"):
        raise ValueError(f"activation must be 'relu' or 'gelu'; got {activation!r}")
    indices = {int(key.split(".", 1)[0]) for key in head if key.split(".", 1)[0].isdigit()}
    if len(indices) != len({key.split(".", 1)[0] for key in head}):
        raise UserError(f"Cannot read the projection head: keys {', '.join(sorted(head))} are not index.param.")
    spec: list[list] = []
    for index in range(max(indices) + 1):
        weight = head.get(f"{index}.weight")
        if f"{index}.running_mean" in head:
            spec.append(["batchnorm", int(head[f"{index}.running_mean"].shape[0])])
        elif weight is not None and weight.ndim == 2:
            spec.append(["linear", int(weight.shape[1]), int(weight.shape[0]), f"{index}.bias" in head])
        elif index not in indices:
            spec.append([activation])
        else:
            params = sorted(key for key in head if key.startswith(f"{index}."))
            raise UserError(f"Cannot read projection-head layer {index} ({', '.join(params)}): not a Linear or BatchNorm1d.")
    return spec
