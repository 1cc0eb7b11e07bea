"""One training step of each method under torchrun (gloo), for tests/test_distributed.py.

Run as ``torchrun --nproc_per_node=R tests/workers/distributed_step.py OUT``: every rank takes
its slice of the same global batch of views (:func:`global_views`), runs one step exactly as
``sslens.train.loop.train`` does (synchronised BatchNorm, DDP, ``train_step``), and rank 0 saves
the rank-averaged loss and the updated weights to ``OUT/<method>.pt``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from sslens.distributed import barrier, init_distributed, mean_over_ranks, world
from sslens.methods import create_method
from sslens.models import create_backbone
from sslens.train.loop import data_parallel, synchronise_batchnorm, train_step
from sslens.train.optim import create_optimizer

GLOBAL_BATCH = 8
#: Per-method options; ``key_bn_splits`` is per rank (one process needs ranks × this).
METHOD_OPTIONS = {
    "simclr": {},
    "moco": {"queue_size": 64, "key_bn_splits": 1},
    "swav": {"num_prototypes": 16, "freeze_prototypes_steps": 0},
    "barlow_twins": {"hidden_dim": 64, "out_dim": 64},
    "vicreg": {"hidden_dim": 64, "out_dim": 64},
    "byol": {"hidden_dim": 64, "out_dim": 32},
    "dino": {"hidden_dim": 64, "bottleneck_dim": 32, "out_dim": 64, "batch_norm": True, "freeze_last_layer_steps": 0},
}


def global_views(name: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    sizes = [16, 16] + ([8, 8] if name in ("swav", "dino") else [])
    return [torch.randn(GLOBAL_BATCH, 3, size, size, generator=generator) for size in sizes]


def build(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    method = create_method(name, create_backbone("resnet-tiny"), **{**METHOD_OPTIONS[name], **overrides})
    return method


def optimizer_for(method: torch.nn.Module) -> torch.optim.Optimizer:
    return create_optimizer("sgd", method, lr=0.5, weight_decay=5e-4, momentum=0.9)


def main(out: Path) -> None:
    device = init_distributed(torch.device("cpu"))
    current = world()
    for name in METHOD_OPTIONS:
        method = build(name)
        synchronise_batchnorm(method, device)
        optimizer = optimizer_for(method)
        model = data_parallel(method, device)
        views = [view.tensor_split(current.size)[current.rank] for view in global_views(name)]
        output = train_step(method, optimizer, views, 0, 10, autocast=contextlib.nullcontext(), model=model)
        loss = mean_over_ranks({"loss": output.loss.item()}, device)["loss"]
        if current.is_main:
            torch.save({"loss": loss, "state": method.state_dict()}, out / f"{name}.pt")
    # Leave together: a rank that exits while another is still finishing the last collective
    # resets its connection, and gloo aborts the other rank (seen on a loaded machine).
    barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
