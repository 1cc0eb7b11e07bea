"""Two processes; rank 1 stops itself (SIGSTOP) after joining, rank 0 then runs ``sslens train``
(for tests/test_cli_field.py): rank 0's first collective must end with a message naming rank 1."""

from __future__ import annotations

import os
import signal
import sys

import torch

from sslens.cli import main
from sslens.distributed import init_distributed, world

init_distributed(torch.device("cpu"))
if world().rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)
main(["train", "--method", "simclr", "--backbone", "resnet-tiny", "--epochs", "1", "--batch-size", "16",
      "--device", "cpu", "--out", sys.argv[1], "--set", "data_options.num_images=32", "--set", "knn_every=0",
      "--set", "progress=false"])
