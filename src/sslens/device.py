"""The one device rule: ``"auto"`` means CUDA when available, else the CPU; anything asked for
that this machine lacks is a :class:`~sslens.errors.UserError` saying what to pass instead.

>>> resolve_device("cpu")
device(type='cpu')
"""

from __future__ import annotations

import torch

from sslens.errors import UserError

#: What ``--device`` accepts, for messages.
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str | torch.device) -> torch.device:
    """The ``torch.device`` for ``name`` ("auto", "cpu", "cuda", "cuda:N", "mps"), checked to exist."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise UserError(f"Unknown device {name!r} ({error}). Use {DEVICE_CHOICES}.") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"Device {name!r} was asked for but CUDA is not available here; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"Device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"Device {name!r} was asked for but MPS is not available here; use --device cpu.")
    elif device.type != "cpu":
        raise UserError(f"Device {name!r} is not supported; use {DEVICE_CHOICES}.")
    return device
