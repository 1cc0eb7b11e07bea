"""Projection heads: the small MLP between the representation and the self-supervised loss.

SimCLR (https://arxiv.org/abs/2002.05709, section 2.1): "We use a MLP with one hidden layer to
obtain z_i = g(h_i) = W(2) σ(W(1) h_i) where σ is a ReLU non-linearity." The representation h
(before the head) is what downstream tasks use.

>>> head = ProjectionHead(512, 512, 128)
>>> head(torch.zeros(4, 512)).shape
torch.Size([4, 128])
"""

from __future__ import annotations

import torch
from torch import nn

from sslens.checks import positive_int, suggestion

#: The hidden layers' non-linearity: ReLU in SimCLR, MoCo, SwAV and BYOL; GELU in DINO.
ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


class ProjectionHead(nn.Sequential):
    """Linear-BN-activation-...-Linear: (B, in_dim) → (B, out_dim).

    Args:
        in_dim: input (representation) dimension.
        hidden_dim: width of every hidden layer.
        out_dim: output (projection) dimension.
        num_layers: number of Linear layers (2 = one hidden layer, as SimCLR and MoCo v2).
            ``num_layers=1`` is a single linear map.
        batch_norm: BatchNorm1d after each hidden Linear (SimCLR's and SwAV's heads have it;
            MoCo v2's does not). A Linear followed by BatchNorm has no bias, as the bias would
            be removed by the normalisation.
        last_bn: BatchNorm1d after the output Linear too (SimCLR v2 / MoCo v3 style).
        activation: the hidden layers' non-linearity, a name in :data:`ACTIVATIONS`.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_bn: bool = False,
        activation: str = "relu",
    ):
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            positive_int(f"ProjectionHead {name}", value)
        positive_int("ProjectionHead num_layers", num_layers, "2 = one hidden layer")
        if activation not in ACTIVATIONS:
            raise ValueError(f"ProjectionHead activation must be one of {', '.join(ACTIVATIONS)}; got "
                             f"{activation!r}.{suggestion(activation, ACTIVATIONS)}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            layers.append(nn.Linear(d_in, d_out, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(dims[-1], out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim))
        super().__init__(*layers)
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) → (B, out_dim)."""
        return super().forward(x)
