"""DINO: the loss, the centre and the head against closed forms and against lightly's
implementations on the same inputs (lightly is test-only); the teacher-temperature and EMA
schedules step by step; multi-crop on ResNet and timm ViT backbones; resuming; and a collapse
(no centring) that the training health check reports."""

from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch
from lightly.loss import DINOLoss
from lightly.models.modules.heads import DINOProjectionHead

from sslens.evaluate.health import TEACHER_INFORMATION_FLOOR, health_warnings
from sslens.methods import METHODS, create_method
from sslens.methods.dino import (
    DINO,
    DINOHead,
    WeightNormalizedLinear,
    dino_loss,
    teacher_probabilities,
    teacher_temperature,
    updated_center,
)
from sslens.models import create_backbone
from sslens.train.loop import train_step

BATCH = 8
SMALL = {"hidden_dim": 64, "bottleneck_dim": 32, "out_dim": 48, "freeze_last_layer_steps": 0}


def _views(sizes=(16, 16, 8, 8), seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, 3, size, size, generator=generator) for size in sizes]


def _method(backbone: str = "resnet-tiny", backbone_options: dict | None = None, **options) -> DINO:
    torch.manual_seed(0)
    return create_method("dino", create_backbone(backbone, **(backbone_options or {})), **(SMALL | options))


def _step(method: DINO, optimizer: torch.optim.Optimizer, views, step: int, total: int):
    return train_step(method, optimizer, views, step, total, autocast=contextlib.nullcontext())


# --- The loss and the centre -------------------------------------------------------------------


@pytest.mark.parametrize("seed, num_local", [(0, 0), (1, 2), (2, 4)])
def test_loss_and_center_update_match_lightly(seed, num_local):
    generator = torch.Generator().manual_seed(seed)
    k, views = 32, 2 + num_local
    student = [torch.randn(BATCH, k, generator=generator) for _ in range(views)]
    teacher = [torch.randn(BATCH, k, generator=generator) for _ in range(2)]
    center = 0.3 * torch.randn(1, k, generator=generator)
    reference = DINOLoss(output_dim=k, teacher_temp=0.07, student_temp=0.1, center_momentum=0.9)
    reference.center.copy_(center.view(1, 1, k))
    for temperature in (0.04, 0.07):
        lightly_center = center.view(1, 1, k).clone()
        reference.center.copy_(lightly_center)
        expected = reference(teacher, student, teacher_temp=temperature)
        ours = dino_loss(student, teacher_probabilities(teacher, center, temperature), 0.1)
        torch.testing.assert_close(ours, expected)
        # lightly updates its centre inside forward, from the same uncentred teacher logits.
        torch.testing.assert_close(updated_center(center, teacher, 0.9), reference.center.view(1, k))


def test_center_update_is_the_closed_form():
    teacher = [torch.tensor([[0.0, 2.0], [2.0, 4.0]]), torch.tensor([[4.0, 6.0], [6.0, 8.0]])]
    # The mean over both crops of both images is (3, 5): c ← 0.9 c + 0.1 (3, 5).
    center = torch.tensor([1.0, 1.0])
    torch.testing.assert_close(updated_center(center, teacher, 0.9), torch.tensor([1.2, 1.4]))
    torch.testing.assert_close(updated_center(center, teacher, 0.0), torch.tensor([3.0, 5.0]))
    assert center.tolist() == [1.0, 1.0]  # a new tensor; the old centre is left alone
    # Under torchrun the sum and the count are summed over the ranks: two identical ranks, same mean.
    doubled = updated_center(center, teacher, 0.9, all_reduce=lambda t: 2 * t)
    torch.testing.assert_close(doubled, torch.tensor([1.2, 1.4]))


def test_loss_closed_forms_and_the_pairs_it_skips():
    k = 5
    uniform = [torch.full((3, k), 1.0 / k)] * 2
    # Uniform targets against uniform student outputs: log K, whatever the temperatures.
    assert dino_loss([torch.zeros(3, k)] * 4, uniform).item() == pytest.approx(math.log(k))
    # One-hot targets: −log_softmax(s / τs) at the target's dimension, averaged over the pairs
    # (teacher 0, student 1) and (teacher 1, student 0) only; a crop is never its own target.
    targets = [torch.eye(k)[:1], torch.eye(k)[1:2]]
    s0, s1 = torch.randn(1, k), torch.randn(1, k)
    expected = -(torch.log_softmax(s1 / 0.1, 1)[0, 0] + torch.log_softmax(s0 / 0.1, 1)[0, 1]) / 2
    torch.testing.assert_close(dino_loss([s0, s1], targets), expected)
    # A student crop that matches its *own* teacher crop perfectly lowers nothing.
    matched = dino_loss([1e3 * targets[0], s1], targets)
    torch.testing.assert_close(matched, -(torch.log_softmax(s1 / 0.1, 1)[0, 0] + torch.log_softmax(1e4 * targets[0], 1)[0, 1]) / 2)


def test_teacher_probabilities_centre_and_sharpen():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    (probs,) = teacher_probabilities([logits], torch.tensor([0.0, 1.0, 2.0]), 0.05)
    torch.testing.assert_close(probs, torch.full((1, 3), 1 / 3))  # centring removed the signal
    (sharp,) = teacher_probabilities([logits], torch.zeros(3), 0.04)
    (soft,) = teacher_probabilities([logits], torch.zeros(3), 1.0)
    torch.testing.assert_close(soft, torch.softmax(logits, 1))
    assert sharp[0, 2] > 0.999 and not sharp.requires_grad


def test_loss_rejects_mismatched_views():
    with pytest.raises(ValueError, match=">= 2 student views"):
        dino_loss([torch.zeros(2, 3)], [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="one shape"):
        dino_loss([torch.zeros(2, 3), torch.zeros(2, 4)], [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="student_temperature"):
        dino_loss([torch.zeros(2, 3)] * 2, [torch.zeros(2, 3)], student_temperature=0)


# --- The head ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")  # lightly's
@pytest.mark.parametrize("batch_norm, norm_last_layer", [(False, True), (True, True), (False, False)])
def test_head_matches_lightlys_dino_projection_head(batch_norm, norm_last_layer):
    torch.manual_seed(0)
    reference = DINOProjectionHead(24, 40, 16, 64, batch_norm=batch_norm, norm_last_layer=norm_last_layer)
    head = DINOHead(24, 40, 16, batch_norm=batch_norm)
    last = WeightNormalizedLinear(16, 64, norm_last_layer)
    with torch.no_grad():
        reference.last_layer.weight_g.mul_(torch.rand(64, 1) + 0.5)  # a norm other than 1
    state = {key.replace("layers.", "mlp."): value for key, value in reference.state_dict().items()
             if not key.startswith("last_layer")}
    head.load_state_dict(state)
    last.weight.data.copy_(reference.last_layer.weight_v)
    if not norm_last_layer:
        last.norm.data.copy_(reference.last_layer.weight_g)
    else:
        reference.last_layer.weight_g.data.fill_(1)
    x = torch.randn(10, 24)
    torch.testing.assert_close(last(head(x)), reference(x))
    assert [p.requires_grad for p in last.parameters()] == [True] * (1 if norm_last_layer else 2)


def test_head_initialisation_follows_the_official_code():
    head = DINOHead(512, 2048, 256)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(2048, 512), (2048, 2048), (256, 2048)]
    assert all(m.weight.std().item() == pytest.approx(0.02, rel=0.15) and m.weight.abs().max() <= 2 for m in linears)
    assert all(not m.bias.any() for m in linears)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]


# --- Schedules ---------------------------------------------------------------------------------


def test_teacher_temperature_warms_up_linearly_then_stays():
    values = [teacher_temperature(step, 10, 0.04, 0.07).item() for step in (0, 1, 5, 9, 10, 11, 1000)]
    assert values == pytest.approx([0.04, 0.043, 0.055, 0.067, 0.07, 0.07, 0.07])
    assert teacher_temperature(torch.tensor(3), 0, 0.04, 0.07).item() == pytest.approx(0.07)
    # The method reads it from its step counter, which travels in the state dict.
    method = _method(warmup_teacher_temperature_steps=4, warmup_teacher_temperature=0.04, teacher_temperature=0.08)
    seen = []
    for _ in range(6):
        seen.append(method.current_teacher_temperature().item())
        method.training_step(_views())
    assert seen == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.08, 0.08])
    assert int(method.num_steps) == 6


def test_the_teacher_follows_the_cosine_ema_exactly():
    method = _method(momentum=0.9, clip_grad=0.0)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    total = 4
    pairs = [("backbone", "teacher_backbone"), ("projector", "teacher_projector"), ("last_layer", "teacher_last_layer")]
    for step in range(3):
        before = {t: copy.deepcopy(dict(getattr(method, t).named_parameters())) for _, t in pairs}
        _step(method, optimizer, _views(seed=step), step, total)
        # BYOL's cosine schedule, written out: λ = 1 − (1 − 0.9) (cos(π k / K) + 1) / 2.
        m = 1 - (1 - 0.9) * (math.cos(math.pi * step / total) + 1) / 2
        for student, teacher in pairs:
            for name, value in getattr(method, teacher).named_parameters():
                # θt ← λ θt + (1 − λ) θs in float32, with the rounding of the in-place update.
                online = dict(getattr(method, student).named_parameters())[name]
                expected = before[teacher][name].detach().clone().mul_(m).add_(online.detach(), alpha=1 - m)
                assert torch.equal(value, expected), (name, (value - expected).abs().max())
                assert not value.requires_grad


def test_gradients_reach_the_student_only_and_the_last_layer_is_frozen_then_released():
    method = _method(freeze_last_layer_steps=2, clip_grad=0.5)
    out = method.training_step(_views())
    assert set(out.metrics) == {"teacher_entropy", "teacher_mutual_information", "teacher_student_kl",
                                "positive_pair_top1"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.metrics.values())
    out.loss.backward()
    for name, parameter in method.named_parameters():
        assert (parameter.grad is None) == name.startswith("teacher_"), name
    method.on_before_optimizer_step(1)
    assert method.last_layer.weight.grad is None
    assert all(p.grad.norm() <= 0.5 + 1e-5 for p in method.parameters() if p.grad is not None)
    method.zero_grad()
    method.training_step(_views()).loss.backward()
    method.on_before_optimizer_step(2)
    assert method.last_layer.weight.grad is not None


def test_entropy_and_kl_metrics_decompose_the_loss():
    method = _method()
    out = method.training_step(_views())
    k = method.center.shape[1]
    # H(P_t, P_s) = h(P_t) + KL(P_t ‖ P_s), with h reported over log K.
    entropy = out.metrics["teacher_entropy"] * math.log(k)
    torch.testing.assert_close(out.metrics["teacher_student_kl"] + entropy, out.loss.detach())
    assert 0 <= out.metrics["teacher_entropy"] <= 1 and out.metrics["teacher_student_kl"] >= 0
    assert 0 <= out.metrics["teacher_mutual_information"] <= 1


def test_the_teacher_information_is_zero_for_constant_outputs_and_log_b_for_distinct_one_hots():
    method = _method(out_dim=16)
    views = _views()
    with torch.no_grad():
        # A teacher whose last layer maps every input to the same logits: no information.
        method.teacher_last_layer.weight.zero_()
        method.teacher_last_layer.weight[:, 0] = 1.0
    metrics = method.training_step(views).metrics
    assert metrics["teacher_mutual_information"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["teacher_entropy"].item() == pytest.approx(1.0, abs=1e-6)  # uniform
    # Distinct one-hot targets for the 8 images (same for both crops): I = log 8, over log K.
    targets = [torch.eye(16)[:BATCH]] * 2
    bottlenecks = [torch.randn(BATCH, 4)] * 2
    information = method._metrics(torch.tensor(1.0), targets, bottlenecks)["teacher_mutual_information"]
    assert information.item() == pytest.approx(math.log(BATCH) / math.log(16))


def test_centring_follows_the_teacher_and_can_be_switched_off():
    method = _method(center_momentum=0.5)
    views = _views()
    with torch.no_grad():
        _, teacher = method._logits(views[:2], method.teacher_backbone, method.teacher_projector,
                                    method.teacher_last_layer)
    expected = updated_center(method.center, teacher, 0.5)
    method.training_step(views)
    torch.testing.assert_close(method.center, expected)
    off = _method(centering=False)
    off.training_step(views)
    assert not off.center.any()
    method.eval()
    frozen = method.center.clone()
    method.training_step(views)  # evaluation: no state changes
    assert torch.equal(method.center, frozen) and int(method.num_steps) == 1


# --- Views and backbones -----------------------------------------------------------------------


def test_view_checks():
    method = _method()
    with pytest.raises(ValueError, match="2 global crops"):
        method.training_step(_views((16,)))
    with pytest.raises(ValueError, match="global crops must share one shape"):
        method.training_step(_views((16, 8, 8)))
    with pytest.raises(ValueError, match="one batch size"):
        method.training_step([*_views((16, 16)), torch.randn(4, 3, 8, 8)])
    assert method.default_views == "swav" and "dino" in METHODS.names()


def test_a_vit_trains_on_global_and_local_crops():
    options = {"model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2,
               "dynamic_img_size": True}
    method = _method("timm", options)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    views = _views((32, 32, 16, 16))
    before = copy.deepcopy(method.teacher_backbone.state_dict())
    out = _step(method, optimizer, views, 0, 10)
    assert torch.isfinite(out.loss)
    moved = [k for k, v in method.teacher_backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.pos_embed" in moved and "model.blocks.1.attn.qkv.weight" in moved
    assert method.encoder("projection")(views[0]).shape == (BATCH, SMALL["bottleneck_dim"])
    with pytest.raises(ValueError, match="multiple of 8"):
        method.training_step(_views((32, 32, 12)))


def test_a_fixed_size_vit_refuses_local_crops_with_the_fix():
    method = _method("timm", {"model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 1})
    with pytest.raises(ValueError, match="dynamic_img_size: true"):
        method.training_step(_views((32, 32, 16)))
    assert torch.isfinite(method.training_step(_views((32, 32))).loss)  # global crops alone are fine


@pytest.mark.parametrize(
    "options, message",
    [
        ({"out_dim": 0}, "out_dim must be a positive integer"),
        ({"student_temperature": 0}, "student_temperature must be a positive number"),
        ({"teacher_temperature": -0.04}, "0.04 → 0.07"),
        ({"momentum": 1.5}, "0.996"),
        ({"momentum_schedule": "linear"}, "constant, cosine"),
        ({"center_momentum": 2}, "center_momentum"),
        ({"warmup_teacher_temperature_steps": -1}, "0 = no warm-up"),
        ({"freeze_last_layer_steps": 1.5}, "freeze_last_layer_steps"),
        ({"clip_grad": -1}, "0 = off"),
        ({"num_layers": 0}, "3 is the paper's"),
    ],
)
def test_bad_arguments_say_what_to_use(options, message):
    with pytest.raises(ValueError, match=message):
        DINO(create_backbone("resnet-tiny"), **(SMALL | options))
    with pytest.raises(TypeError, match="centering"):
        DINO(create_backbone("resnet-tiny"), centering="yes")


# --- Resuming ----------------------------------------------------------------------------------


def test_a_state_dict_round_trip_resumes_identically():
    total = 6

    def fresh():
        method = _method(warmup_teacher_temperature_steps=4, freeze_last_layer_steps=1)
        return method, torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-3)

    method, optimizer = fresh()
    for step in range(3):
        _step(method, optimizer, _views(seed=step), step, total)
    # Through bytes, as a checkpoint: loading a live optimizer's state dict would share its step
    # counters between the two optimisers.
    saved = io.BytesIO()
    torch.save({"method": method.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    resumed, resumed_optimizer = fresh()
    resumed.load_state_dict(checkpoint["method"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    assert int(resumed.num_steps) == 3 and torch.equal(resumed.center, method.center) and method.center.any()
    for step in range(3, total):
        a = _step(method, optimizer, _views(seed=step), step, total)
        b = _step(resumed, resumed_optimizer, _views(seed=step), step, total)
        assert a.loss.item() == b.loss.item()
    for key, value in method.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


# --- Collapse ----------------------------------------------------------------------------------


def _epoch_records(centering: bool, epochs: int = 3, steps_per_epoch: int = 4) -> list[dict]:
    """Epoch records as the training loop logs them (means of the step metrics) for a few Adam
    steps on the shapes world at 16 px with the ``swav`` multi-crop recipe, with a fast teacher
    (momentum 0.9) and a high learning rate so that a collapse comes within seconds."""
    from sslens.data import load_dataset
    from sslens.data.augment import create_views

    data = load_dataset("synthetic", "train", image_size=16, num_images=64)
    recipe = create_views("swav", image_size=16, mean=data.mean, std=data.std, num_local=2, local_size=8,
                          global_scale=(0.3, 1.0), hue=0.02)
    method = _method(centering=centering, momentum=0.9, batch_norm=True, out_dim=256, hidden_dim=256,
                     bottleneck_dim=256, teacher_temperature=0.04)
    optimizer = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    records = []
    for epoch in range(epochs):
        sums: dict[str, float] = {}
        for i in range(steps_per_epoch):
            batch = data.images[torch.randperm(len(data.images), generator=generator)[:32]]
            out = _step(method, optimizer, recipe(batch, generator), epoch * steps_per_epoch + i, epochs * steps_per_epoch)
            for key, value in out.metrics.items():
                sums[key] = sums.get(key, 0.0) + value.item() / steps_per_epoch
        records.append({"kind": "epoch", "epoch": epoch + 1, **sums})
    return records


def test_the_health_check_reports_dino_without_centring_and_not_with_it():
    broken = _epoch_records(centering=False)
    # Without centring, sharpening alone puts every image on one output dimension (Fig. 7).
    assert broken[-1]["teacher_mutual_information"] < TEACHER_INFORMATION_FLOOR / 2, broken
    assert broken[-1]["teacher_entropy"] < 0.1, broken
    warnings = health_warnings(broken)
    assert any("no longer depends on the input" in w and "onto one dimension" in w for w in warnings), warnings
    healthy = _epoch_records(centering=True)
    assert healthy[-1]["teacher_mutual_information"] > 3 * TEACHER_INFORMATION_FLOOR, healthy
    assert not [w for w in health_warnings(healthy) if "depends on the input" in w], healthy


def test_the_health_check_names_a_uniform_collapse():
    records = [{"kind": "epoch", "epoch": 1, "teacher_mutual_information": 0.2, "teacher_entropy": 0.6},
               {"kind": "epoch", "epoch": 2, "teacher_mutual_information": 0.0004, "teacher_entropy": 0.9994}]
    (warning,) = health_warnings(records)
    assert "epoch 2" in warning and "uniform outputs" in warning
