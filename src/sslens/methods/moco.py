"""MoCo v2 (He et al. 2020, https://arxiv.org/abs/1911.05722; Chen et al. 2020,
https://arxiv.org/abs/2003.04297).

"We maintain the dictionary as a queue of data samples: the encoded representations of the
current mini-batch are enqueued, and the oldest are dequeued", and the key encoder is "a
momentum-based moving average of the query encoder" (eq. 2). MoCo v2 adds an MLP head and
SimCLR's augmentations. The loss is InfoNCE (:func:`sslens.methods.losses.info_nce`).

>>> from sslens.models import create_backbone
>>> method = MoCo(create_backbone("resnet-tiny"), queue_size=64, key_bn_splits=2)
>>> views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
>>> out = method.training_step(views)
>>> int(method.queue_ptr)
8
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from sslens.checks import boolean, positive_int, positive_number
from sslens.distributed import gather_no_grad, world
from sslens.methods.base import METHODS, SSLMethod, StepOutput, check_views
from sslens.methods.losses import (
    MOMENTUM_SCHEDULES,
    check_momentum,
    info_nce_logits,
    momentum_update,
    positive_pair_top1,
)
from sslens.models.base import Backbone
from sslens.models.heads import ProjectionHead


@METHODS.register("moco")
class MoCo(SSLMethod):
    """MoCo v2 with a momentum key encoder, a FIFO queue of keys and InfoNCE.

    Args:
        backbone: the query encoder's backbone; the key encoder is a deep copy.
        hidden_dim: width of the head's hidden layer; None = ``backbone.feature_dim``
            (MoCo v2: 2048 for a ResNet-50, i.e. the representation width).
        out_dim: key/query dimension, 128 as in MoCo.
        queue_size: K, the number of negatives. 4096, as lightly's CIFAR-10 benchmark (the paper
            uses 65536 on ImageNet); a multiple of the batch size is not required.
        momentum: m of eq. (2). 0.99, as lightly's CIFAR-10 benchmark (the paper: 0.999 for
            ImageNet runs of many more steps).
        momentum_schedule: "constant" (MoCo) or "cosine" (BYOL-style rise from ``momentum`` to 1).
        temperature: τ = 0.2, MoCo v2's value.
        symmetric: also swap the roles of the two views and average the two losses (as the MoCo
            CIFAR-10 demo's option); both views' keys are then enqueued. MoCo v2 is asymmetric
            (default False).
        key_bn_splits: single-device stand-in for MoCo's shuffling BN (section 3.3). With one
            BatchNorm over the whole batch, "the intra-batch communication among samples (caused
            by BN) leaks information", letting the model cheat on the pretext task. As the
            official MoCo CIFAR-10 demo simulates several GPUs, the key batch is shuffled with a
            seeded permutation and sent through the key encoder in ``key_bn_splits`` chunks, so
            a key is normalised with the statistics of a different, random subset of the batch
            than its query. 1 disables it. Default 4: each chunk should keep >= 32 images at
            the usual CIFAR batch sizes (128-512) for stable statistics. Under torchrun the
            shuffle spans all ranks (see :meth:`encode_keys`) and this is the number of groups
            per rank.
        seed: seeds the initial random queue and the key-shuffling permutations (each step's
            permutation depends on (seed, step count), so resuming from a checkpoint repeats it).

    Buffers (all in ``state_dict()``): ``queue`` (K, out_dim) unit-norm keys, ``queue_ptr`` the next
    write position, ``num_steps`` training steps seen.
    """

    default_views = "moco-v2"
    principle = "contrastive"

    def __init__(
        self,
        backbone: Backbone,
        hidden_dim: int | None = None,
        out_dim: int = 128,
        queue_size: int = 4096,
        momentum: float = 0.99,
        momentum_schedule: str = "constant",
        temperature: float = 0.2,
        symmetric: bool = False,
        key_bn_splits: int = 4,
        seed: int = 0,
    ):
        super().__init__(backbone)
        positive_int("queue_size", queue_size)
        positive_number("temperature", temperature)
        positive_int("key_bn_splits", key_bn_splits)
        positive_int("out_dim", out_dim)
        check_momentum(momentum, momentum_schedule, "MoCo uses 0.99-0.999")
        boolean("symmetric", symmetric)
        # MoCo v2's head: "a 2-layer MLP head (hidden layer 2048-d, with ReLU)", no BatchNorm.
        self.projector = ProjectionHead(
            backbone.feature_dim, hidden_dim or backbone.feature_dim, out_dim, batch_norm=False
        )
        self.key_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        queue = F.normalize(torch.randn(queue_size, out_dim, generator=generator), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.momentum = float(momentum)
        self.momentum_schedule = momentum_schedule
        self.temperature = float(temperature)
        self.symmetric = symmetric
        self.key_bn_splits = key_bn_splits
        self.seed = seed

    def check_batch_size(self, batch_size: int, world_size: int) -> None:
        """Every step enqueues the keys of the global batch (both views' with ``symmetric``),
        which must fit in the queue; shuffled BN needs two images per BatchNorm group."""
        keys = batch_size * (2 if self.symmetric else 1)
        if keys > len(self.queue):
            raise ValueError(
                f"MoCo enqueues {keys} keys per step (batch_size {batch_size}"
                f"{', both views' if self.symmetric else ''}) but queue_size is {len(self.queue)}; "
                f"use queue_size >= {keys} or a smaller batch."
            )
        if (self.key_bn_splits > 1 or world_size > 1) and batch_size // world_size < 2 * self.key_bn_splits:
            raise ValueError(
                f"MoCo key_bn_splits={self.key_bn_splits} needs at least {2 * self.key_bn_splits} images "
                f"per process; batch_size {batch_size} over {world_size} process(es) gives "
                f"{batch_size // world_size}. Lower key_bn_splits or raise the batch size."
            )

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm keys from the momentum encoder with shuffled BN.

        Args:
            x: (b, 3, H, W) this process's key images.

        Returns:
            (b, out_dim) the keys of ``x``, and (N, out_dim) the keys of the global batch in its
            order (N = ranks · b; the same tensor on one process), which all go into the queue.

        Shuffled BN: the global batch is permuted with a permutation every rank computes
        alike from (seed, step); rank r encodes the r-th slice of it, in ``key_bn_splits``
        BatchNorm groups; the keys are gathered and un-permuted. With R ranks this is the
        official ``_batch_shuffle_ddp``, and it equals one process with ``key_bn_splits`` · R.
        """
        current = world()
        if self.key_bn_splits == 1 and not current.distributed:
            keys = F.normalize(self.key_projector(self.key_backbone(x)), dim=1)
            return keys, keys
        if len(x) < 2 * self.key_bn_splits:
            raise ValueError(
                f"MoCo key_bn_splits={self.key_bn_splits} needs a batch of at least "
                f"{2 * self.key_bn_splits} images per process; got {len(x)}. Lower key_bn_splits "
                f"or raise the batch size."
            )
        images = gather_no_grad(x)
        order = step_permutation(len(images), self.num_steps, self.seed)
        rows = slice(current.rank * len(x), (current.rank + 1) * len(x))
        # tensor_split, not chunk: chunk(4) of 10 rows gives 3, 3, 3, 1 (a BatchNorm group of one
        # image, and of 9 rows only three groups); tensor_split gives 3, 3, 2, 2.
        chunks = images[order[rows]].tensor_split(self.key_bn_splits)
        mine = torch.cat([self.key_projector(self.key_backbone(chunk)) for chunk in chunks])
        everyone = F.normalize(gather_no_grad(mine)[order.argsort()], dim=1)
        return everyone[rows], everyone

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write (n, out_dim) keys into the ring buffer at ``queue_ptr``, overwriting the oldest."""
        size = len(self.queue)
        if len(keys) > size:
            raise ValueError(
                f"Cannot enqueue {len(keys)} keys into a queue of {size}; use queue_size >= the "
                "number of keys per step (batch size, twice that with symmetric=True)."
            )
        # Pointer arithmetic stays on the device: no CPU-GPU sync.
        index = (self.queue_ptr + torch.arange(len(keys), device=self.queue.device)) % size
        self.queue.index_copy_(0, index, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)

    def _direction(
        self, query_images: torch.Tensor, keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        query = self.project(query_images)
        logits, targets = info_nce_logits(query, keys, self.queue.clone(), self.temperature)
        return logits, targets

    def training_step(self, views: list[torch.Tensor]) -> StepOutput:
        """views: two (B, 3, H, W) augmentations; view 0 gives queries, view 1 keys."""
        check_views(views, 2, "MoCo", self.default_views)
        pairs = [(views[0], views[1])] + ([(views[1], views[0])] if self.symmetric else [])
        keys = [self.encode_keys(key_images) for _, key_images in pairs]
        outputs = [self._direction(q, k) for (q, _), (k, _) in zip(pairs, keys, strict=True)]
        loss = sum(F.cross_entropy(lg, tg) for lg, tg in outputs) / len(outputs)
        top1 = sum(positive_pair_top1(lg, tg) for lg, tg in outputs) / len(outputs)
        if self.training:
            # After the loss: the current batch's keys must not be their own negatives.
            self.enqueue(torch.cat([global_keys for _, global_keys in keys]))
            self.num_steps += 1
        return StepOutput(loss, {"positive_pair_top1": top1})

    def global_batchnorm_children(self) -> list[str]:
        """The query encoder only: the key encoder's shuffled BN must stay per group."""
        return ["backbone", "projector"]

    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Momentum update of the key encoder (eq. 2) with this step's coefficient."""
        m = MOMENTUM_SCHEDULES[self.momentum_schedule](step, total_steps, self.momentum)
        momentum_update(self.backbone, self.key_backbone, m)
        momentum_update(self.projector, self.key_projector, m)


def step_permutation(n: int, step: torch.Tensor, seed: int) -> torch.Tensor:
    """A pseudo-random permutation of ``n`` for training step ``step`` (a 0-d long tensor).

    Computed on ``step``'s device from (seed, step) alone — argsort of a hash of (step, index) —
    so it needs no CPU-GPU sync (a ``torch.Generator`` seeded from the step would read it back
    every step) and a resumed run repeats it exactly. The hash is three rounds of a MINSTD
    multiplication (48271 modulo 2^31 - 1, whose products fit in int64) each followed by an
    xor-shift, which breaks the lattice structure a bare linear congruential step leaves.
    """
    modulus = 2**31 - 1
    state = (seed * 1_000_003 + step * n + torch.arange(n, device=step.device)) % modulus + 1
    for _ in range(3):
        state = state * 48271 % modulus
        state = state ^ (state >> 15)
    return torch.argsort(state, stable=True)
