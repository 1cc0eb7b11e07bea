"""SimCLR, MoCo v2, SwAV, Barlow Twins and VICReg on the tiny backbone: gradients, learning, queues, state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sslens.methods import METHODS, BarlowTwins, MoCo, SimCLR, SwAV, VICReg, create_method
from sslens.models import create_backbone

BATCH, SIZE = 16, 16
SMALL = {"moco": {"queue_size": 64}, "swav": {"num_prototypes": 16, "freeze_prototypes_steps": 0},
         "barlow_twins": {"hidden_dim": 128, "out_dim": 128}, "vicreg": {"hidden_dim": 128, "out_dim": 128},
         "byol": {"hidden_dim": 128, "out_dim": 128}}
TRAINABLE = ["simclr", "moco", "swav", "barlow_twins", "vicreg", "byol"]


def _views(count: int = 2, size: int = SIZE, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, 3, size, size, generator=generator) for _ in range(count)]


def _method(name: str, **options):
    torch.manual_seed(0)
    return create_method(name, create_backbone("resnet-tiny"), **(SMALL.get(name, {}) | options))


def test_registered_methods_and_default_views():
    # "imported" wraps published checkpoints (sslens.published, sslens.methods.imported); it is not trainable.
    assert METHODS.names() == ["barlow_twins", "byol", "dino", "imported", "moco", "simclr", "swav", "vicreg"]
    assert [_method(n).default_views for n in TRAINABLE] == ["simclr", "moco-v2", "swav", "simclr", "simclr", "byol"]


@pytest.mark.parametrize("name", TRAINABLE)
def test_step_gives_finite_loss_and_grads_on_the_online_encoder_only(name: str):
    method = _method(name)
    out = method.training_step(_views())
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.metrics.values())
    out.loss.backward()
    for param_name, param in method.named_parameters():
        if param_name.startswith(("key_", "target_")):
            assert not param.requires_grad and param.grad is None, param_name
        else:
            assert param.grad is not None, param_name
    x = _views()[0]
    assert method.embed(x).shape == (BATCH, 128)
    assert method.project(x).shape == (BATCH, 128)
    assert method.encoder("projection")(x).shape == (BATCH, 128)
    assert method.encoder("pooled") is method.backbone


def test_metrics_per_method():
    assert set(_method("simclr").training_step(_views()).metrics) == {"positive_pair_top1"}
    assert set(_method("moco").training_step(_views()).metrics) == {"positive_pair_top1"}
    assert set(_method("barlow_twins").training_step(_views()).metrics) == {"positive_pair_top1"}
    assert set(_method("vicreg").training_step(_views()).metrics) == {
        "positive_pair_top1", "invariance", "variance", "covariance"}
    usage = _method("swav").training_step(_views()).metrics
    assert set(usage) == {"prototype_usage"} and 0 <= float(usage["prototype_usage"]) <= 1


@pytest.mark.parametrize("name", TRAINABLE)
def test_a_few_sgd_steps_lower_the_loss_on_a_fixed_batch(name: str):
    method = _method(name)
    views = _views(seed=1)
    optimizer = torch.optim.SGD(
        [p for p in method.parameters() if p.requires_grad], lr=0.05, momentum=0.9
    )
    # Re-feeding one batch would fill MoCo's queue with copies of its own positives, so the
    # queue of random negatives is restored before each step.
    initial_queue = method.queue.clone() if name == "moco" else None
    losses = []
    for step in range(8):
        if initial_queue is not None:
            method.queue.copy_(initial_queue)
        out = method.training_step(views)
        losses.append(out.loss.item())
        optimizer.zero_grad()
        out.loss.backward()
        method.on_before_optimizer_step(step)
        optimizer.step()
        method.on_after_optimizer_step(step, 8)
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("name", ["simclr", "moco", "barlow_twins", "vicreg"])
def test_two_view_methods_reject_wrong_views(name: str):
    method = _method(name)
    with pytest.raises(ValueError, match="exactly 2 views"):
        method.training_step(_views(3))
    with pytest.raises(ValueError, match="share one shape"):
        method.training_step([_views()[0], _views(size=8)[0]])


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (SimCLR, {"temperature": 0}, "temperature"),
        (MoCo, {"queue_size": 0}, "queue_size"),
        (MoCo, {"momentum": 1.5}, "momentum"),
        (MoCo, {"momentum_schedule": "linear"}, "constant, cosine"),
        (SwAV, {"num_prototypes": 0}, "num_prototypes"),
        (SwAV, {"queue_length": -1}, "queue_length"),
        (BarlowTwins, {"lambd": 0}, "lambd"),
        (BarlowTwins, {"num_layers": 0}, "num_layers"),
        (VICReg, {"variance_weight": -1}, "variance_weight"),
    ],
)
def test_constructors_validate_arguments(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(create_backbone("resnet-tiny"), **kwargs)


# --- MoCo --------------------------------------------------------------------------------------


def test_moco_queue_is_a_fifo_ring_buffer_with_wrap_around():
    method = _method("moco", queue_size=5, out_dim=2)
    batches = [torch.full((2, 2), float(i)) for i in (1, 2, 3)]
    for batch in batches:
        method.enqueue(batch)
    # 1 1 2 2 3 | 3 wraps to slot 0, overwriting the oldest entry.
    assert method.queue[:, 0].tolist() == [3.0, 1.0, 2.0, 2.0, 3.0]
    assert int(method.queue_ptr) == 1
    with pytest.raises(ValueError, match="queue_size >="):
        method.enqueue(torch.zeros(6, 2))


def test_moco_enqueues_this_steps_keys_after_the_loss():
    method = _method("moco", key_bn_splits=2)
    views = _views()
    initial_queue = method.queue.clone()
    expected_keys, global_keys = method.encode_keys(views[1])
    assert torch.equal(expected_keys, global_keys)  # one process: its batch is the global batch
    out = method.training_step(views)
    torch.testing.assert_close(method.queue[:BATCH], expected_keys)
    assert torch.equal(method.queue[BATCH:], initial_queue[BATCH:])
    assert int(method.queue_ptr) == BATCH and int(method.num_steps) == 1
    # The loss used the old queue: recomputing with it reproduces the loss.
    query = method.project(views[0])
    from sslens.methods.losses import info_nce

    torch.testing.assert_close(out.loss, info_nce(query, expected_keys, initial_queue, 0.2))


def test_moco_symmetric_enqueues_both_views():
    method = _method("moco", symmetric=True)
    method.training_step(_views())
    assert int(method.queue_ptr) == 2 * BATCH


def test_moco_key_encoder_uses_shuffled_split_batch_norm():
    method = _method("moco", key_bn_splits=1)
    x = _views()[1]
    plain = F.normalize(method.key_projector(method.key_backbone(x)), dim=1)
    torch.testing.assert_close(method.encode_keys(x)[0], plain)
    method.key_bn_splits = 4
    split = method.encode_keys(x)[0]
    # Each key is normalised with other samples' statistics, so the keys change...
    assert not torch.allclose(split, plain, atol=1e-3)
    # ...but evaluation-mode BatchNorm does not depend on the batch, so there they agree.
    method.eval()
    torch.testing.assert_close(
        method.encode_keys(x)[0], F.normalize(method.key_projector(method.key_backbone(x)), dim=1)
    )
    with pytest.raises(ValueError, match="key_bn_splits"):
        method.encode_keys(x[:6])


def test_moco_key_bn_groups_are_balanced_when_the_batch_does_not_divide():
    method = _method("moco", key_bn_splits=4)
    sizes = []
    method.key_backbone.register_forward_hook(lambda module, args, output: sizes.append(len(args[0])))
    method.encode_keys(_views()[1][:10])
    # Every one of the 4 groups keeps the >= 2 images the batch-size check promises.
    assert sizes == [3, 3, 2, 2]


def test_moco_momentum_update_is_exact():
    method = _method("moco", momentum=0.9)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    key_before = copy.deepcopy(method.key_backbone.state_dict())
    method.on_after_optimizer_step(0, 10)
    online = method.backbone.state_dict()
    for name, value in method.key_backbone.state_dict().items():
        if name in dict(method.backbone.named_parameters()):
            expected = 0.9 * key_before[name] + (1 - 0.9) * online[name]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value, online[name])  # buffers are copied


def test_moco_cosine_momentum_reaches_one_at_the_end():
    method = _method("moco", momentum_schedule="cosine")
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    frozen = copy.deepcopy(method.key_backbone.state_dict())
    method.on_after_optimizer_step(10, 10)  # m = 1: the key encoder keeps its weights
    for name, _ in method.key_backbone.named_parameters():
        assert torch.equal(method.key_backbone.state_dict()[name], frozen[name])


def test_moco_state_dict_round_trip_includes_queue_and_key_encoder():
    method = _method("moco")
    method.training_step(_views())
    method.training_step(_views(seed=2))
    restored = MoCo(create_backbone("resnet-tiny"), queue_size=64)
    restored.load_state_dict(method.state_dict())
    for name in ("queue", "queue_ptr", "num_steps"):
        assert torch.equal(getattr(restored, name), getattr(method, name))
    assert restored.queue_ptr.dtype == torch.long
    views = _views(seed=3)
    torch.testing.assert_close(restored.training_step(views).loss, method.training_step(views).loss)


# --- SwAV --------------------------------------------------------------------------------------


def test_swav_freezes_prototypes_for_the_first_steps():
    method = _method("swav", freeze_prototypes_steps=3)
    method.training_step(_views()).loss.backward()
    method.on_before_optimizer_step(2)
    assert method.prototypes.weight.grad is None
    assert method.projector[0].weight.grad is not None
    method.training_step(_views()).loss.backward()
    method.on_before_optimizer_step(3)
    assert method.prototypes.weight.grad is not None


def test_swav_normalises_prototypes_each_step():
    method = _method("swav")
    with torch.no_grad():
        method.prototypes.weight.mul_(5.0)
    method.training_step(_views())
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(16))


def test_swav_multi_crop_views():
    method = _method("swav")
    views = _views() + _views(count=3, size=8, seed=4)
    assert torch.isfinite(method.training_step(views).loss)
    with pytest.raises(ValueError, match="global crops must share one shape"):
        method.training_step([_views()[0], _views(size=8)[0]])
    with pytest.raises(ValueError, match="at least 2 views"):
        method.training_step(_views(1))


def test_swav_queue_fills_first_in_first_out_and_is_used_once_full():
    method = _method("swav", queue_length=2 * BATCH, queue_start_step=1)
    first, second, third = _views(seed=5), _views(seed=6), _views(seed=7)
    method.training_step(first)
    with torch.no_grad():
        # Both global crops go through one forward pass (one BatchNorm batch), as in training.
        z_first = F.normalize(method.project(torch.cat(first)), dim=1).view(2, BATCH, -1)
    torch.testing.assert_close(method.queue[:, :BATCH], z_first, rtol=1e-4, atol=1e-5)
    assert int(method.queue_count) == BATCH
    method.training_step(second)
    # Newest first: the first batch moved back by one batch.
    torch.testing.assert_close(method.queue[:, BATCH:], z_first, rtol=1e-4, atol=1e-5)
    assert int(method.queue_count) == 2 * BATCH

    # Full and past queue_start_step: codes now depend on the queue.
    with torch.no_grad():
        projections = list(F.normalize(method.project(torch.cat(third)), dim=1).chunk(2))
        scores = [method.prototypes(z) for z in projections]
        with_queue = method._codes(projections, scores)
        method.queue.zero_()
        method.queue_count.zero_()
        without_queue = method._codes(projections, scores)
    assert not torch.allclose(with_queue[0], without_queue[0], atol=1e-4)
    torch.testing.assert_close(without_queue[0].sum(dim=1), torch.ones(BATCH))


def test_swav_queue_must_hold_a_batch():
    method = _method("swav", queue_length=4)
    with pytest.raises(ValueError, match="queue_length=4 is smaller than the batch"):
        method.training_step(_views())


def test_swav_state_dict_round_trip():
    method = _method("swav", queue_length=2 * BATCH)
    method.training_step(_views())
    restored = SwAV(create_backbone("resnet-tiny"), num_prototypes=16, queue_length=2 * BATCH)
    restored.load_state_dict(method.state_dict())
    for name in ("queue", "queue_count", "num_steps"):
        assert torch.equal(getattr(restored, name), getattr(method, name))
    assert torch.equal(restored.prototypes.weight, method.prototypes.weight)


def test_key_shuffle_is_a_seeded_permutation_computed_from_the_step_alone():
    from sslens.methods.moco import step_permutation

    first = step_permutation(256, torch.tensor(7), seed=0)
    assert sorted(first.tolist()) == list(range(256))
    assert torch.equal(first, step_permutation(256, torch.tensor(7), seed=0))  # a resume repeats it
    assert not torch.equal(first, step_permutation(256, torch.tensor(8), seed=0))
    assert not torch.equal(first, step_permutation(256, torch.tensor(7), seed=1))
    # Each of four BN chunks draws from all four quarters of the batch.
    quarters = first.view(4, 64) // 64
    assert all(torch.bincount(chunk, minlength=4).min() >= 8 for chunk in quarters)
