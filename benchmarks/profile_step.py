"""Where the time of a training step goes: torch.profiler around steps of the training loop's body.

Builds the data, method, view recipe and optimiser from a training config exactly as
``sslens.train.train`` does (channels_last + bf16 autocast on CUDA, ``torch.compile`` of the
method's sub-modules when the config says so), runs ``--warmup`` steps (compilation happens
there), times ``--steps`` steps without the profiler, then profiles ``--steps`` more. Each step
is what the loop runs: a batch from ``iter_batches``, the view recipe, the learning rate set,
then ``sslens.train.loop.train_step`` (the loop's on-device metric sums and logging are left out).

    python benchmarks/profile_step.py --preset simclr-cifar10-fast --data-dir data/cifar10 --steps 20
    python benchmarks/profile_step.py --preset simclr-cifar10-fast --device cpu --set data=synthetic \\
        --set 'data_options={num_images: 512}' --set backbone=resnet-tiny --set batch_size=64 \\
        --set compile=false --warmup 2 --steps 5   # CPU smoke run

Printed: milliseconds per step in each phase, on the host (CPU) and on the device (the kernels
the phase launched), with the phase's share of the profiled step; the host time blocked in
device synchronisation and the number of ops per step that force one; how long the device sat
idle; graph compilations after warm-up (0 means no recompilation across learning-rate changes);
and the ten ops with the most self time. Phases:

- data: indexing the batch out of the on-device dataset (``iter_batches``);
- augmentation: the view recipe;
- forward: ``method.training_step`` (encoders, loss, MoCo's key encoder and queue);
- backward: the autograd engine's work (``loss.backward()``);
- optimizer: ``zero_grad`` and ``step``;
- method hooks: ``on_before_optimizer_step`` / ``on_after_optimizer_step`` (MoCo's momentum
  update, SwAV's prototype freezing);
- other: the rest of the step (learning-rate update, channels_last copies, Python).

The profiler slows the host side down, so the profiled step is longer than the unprofiled one;
both are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from train_throughput import synchronize

from sslens.data.augment import create_views
from sslens.device import resolve_device
from sslens.errors import UserError
from sslens.methods import create_method
from sslens.models import create_backbone
from sslens.train.config import TrainConfig, load_config, packaged_configs, parse_assignment
from sslens.train.loop import train_step
from sslens.train.optim import create_optimizer, lr_at, set_lr

# Labels of the phases the script marks itself; "backward" comes from the autograd engine.
PHASES = {
    "data": "sslens::data",
    "augmentation": "sslens::augment",
    "forward": "sslens::forward",
    "optimizer": "sslens::optimizer",
    "method hooks": "sslens::hooks",
}
BACKWARD_PREFIX = "autograd::engine::evaluate_function:"
# CUDA runtime calls in which the host waits for the device.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
# Ops that read a tensor's value on the host (.item(), int(t), bool(t); boolean indexing).
SYNCING_OPS = ("aten::_local_scalar_dense", "aten::nonzero")


def labelled(function: Callable, label: str) -> Callable:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return function(*args, **kwargs)

    return wrapper


def build(config: TrainConfig, device: torch.device):
    """Data, method, recipe and optimiser as ``train()`` builds them, with the phases labelled."""
    torch.manual_seed(config.seed)
    data = config.data_split("train", device)
    # train() also fills in a "seed" option from config.seed; it seeds only MoCo's initial queue
    # and key permutations, which change no timing.
    method = create_method(config.method, create_backbone(config.backbone, **config.backbone_options),
                           **config.method_options)
    method = method.to(device, memory_format=torch.channels_last) if device.type == "cuda" else method.to(device)
    recipe = create_views(config.views or method.default_views, image_size=config.image_size,
                          mean=data.mean, std=data.std, **config.views_options)
    optimizer = create_optimizer(config.optimizer, method, lr=config.lr, weight_decay=config.weight_decay,
                                 momentum=config.momentum, fused=device.type == "cuda")
    if config.compile:
        for module in method.children():
            module.compile()
    # train_step calls these through the instance, so instance attributes label them unchanged.
    method.training_step = labelled(method.training_step, PHASES["forward"])
    method.on_before_optimizer_step = labelled(method.on_before_optimizer_step, PHASES["method hooks"])
    method.on_after_optimizer_step = labelled(method.on_after_optimizer_step, PHASES["method hooks"])
    optimizer.zero_grad = labelled(optimizer.zero_grad, PHASES["optimizer"])
    optimizer.step = labelled(optimizer.step, PHASES["optimizer"])
    return data, method, recipe, optimizer


def endless_batches(data: Any, config: TrainConfig, device: torch.device) -> Iterator[torch.Tensor]:
    epoch = 0
    while True:
        for images, _ in data.iter_batches(config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                                           drop_last=True, device=device):
            yield images
        epoch += 1


def outermost(events: list, predicate: Callable[[Any], bool]) -> list:
    """Events matching ``predicate`` with no matching ancestor (so nothing is counted twice)."""
    def has_matching_ancestor(event: Any) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if predicate(parent):
                return True
            parent = parent.cpu_parent
        return False

    return [e for e in events if predicate(e) and not has_matching_ancestor(e)]


def phase_of(event: Any) -> str:
    """The phase whose range encloses ``event`` ("other" if none)."""
    labels = {label: name for name, label in PHASES.items()}
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in labels:
            return labels[parent.name]
        if parent.name.startswith(BACKWARD_PREFIX):
            return "backward"
        parent = parent.cpu_parent
    return "other"


def phase_times(events: list, steps: int) -> dict[str, tuple[float, float]]:
    """Phase → (host ms per step, device ms per step)."""
    matchers = {name: (lambda e, label=label: e.name == label) for name, label in PHASES.items()}
    matchers["backward"] = lambda e: e.name.startswith(BACKWARD_PREFIX)
    times = {}
    for name, matcher in matchers.items():
        found = outermost(events, matcher)
        times[name] = (
            sum(e.cpu_time_total for e in found) / 1e3 / steps,
            sum(e.device_time_total for e in found) / 1e3 / steps,
        )
    return times


def summarise(prof: Any, steps: int, wall_ms: float, profiled_wall_ms: float, on_cuda: bool) -> dict[str, Any]:
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    times = phase_times(events, steps)
    order = ["data", "augmentation", "forward", "backward", "optimizer", "method hooks"]
    accounted_host = sum(times[name][0] for name in order)
    accounted_device = sum(times[name][1] for name in order)
    # Every kernel hangs off the host op that launched it; their sum is the device's busy time.
    device_busy = sum(k.duration for e in events for k in e.kernels) / 1e3 / steps
    phases = {name: {"host_ms": times[name][0], "device_ms": times[name][1]} for name in order}
    phases["other"] = {"host_ms": max(profiled_wall_ms - accounted_host, 0.0),
                       "device_ms": max(device_busy - accounted_device, 0.0)}
    # On CUDA count the synchronising runtime calls themselves; on the CPU nothing synchronises,
    # so count the ops that read a tensor's value on the host (each a sync on a GPU unless the
    # tensor lives on the host, as torch.optim's step counters do).
    sync_names = SYNC_CALLS if on_cuda else SYNCING_OPS
    syncs: dict[str, float] = {}
    for event in events:
        if event.name in sync_names:
            phase = phase_of(event)
            syncs[phase] = syncs.get(phase, 0) + 1 / steps
    blocked_ms = sum(e.self_cpu_time_total for e in events if e.name in SYNC_CALLS) / 1e3 / steps
    return {
        "wall_ms_per_step": wall_ms,
        "profiled_wall_ms_per_step": profiled_wall_ms,
        "phases": phases,
        "sync_events": list(sync_names),
        "syncs_per_step_by_phase": syncs,
        "host_blocked_in_sync_ms_per_step": blocked_ms if on_cuda else None,
        "device_busy_ms_per_step": device_busy if on_cuda else None,
    }


def format_summary(summary: dict[str, Any], on_cuda: bool) -> str:
    wall = summary["profiled_wall_ms_per_step"]
    lines = [f"{'phase':<14} {'host ms/step':>13} {'device ms/step':>15} {'share of step':>14}"]
    for name, row in summary["phases"].items():
        # On the GPU a phase costs the step its kernels' time; on the CPU its host time.
        cost = row["device_ms"] if on_cuda else row["host_ms"]
        device = f"{row['device_ms']:15.2f}" if on_cuda else f"{'-':>15}"
        lines.append(f"{name:<14} {row['host_ms']:13.2f} {device} {cost / wall:14.1%}")
    by_phase = ", ".join(f"{phase} {count:g}" for phase, count in summary["syncs_per_step_by_phase"].items())
    if on_cuda:
        lines.append(f"host-device syncs per step ({', '.join(summary['sync_events'])}): {by_phase or 'none'}; "
                     f"host blocked {summary['host_blocked_in_sync_ms_per_step']:.2f} ms/step")
        idle = 1 - summary["device_busy_ms_per_step"] / wall
        lines.append(f"device busy {summary['device_busy_ms_per_step']:.2f} ms of {wall:.2f} ms per step "
                     f"(idle {idle:.0%})")
    else:
        lines.append(f"host-device syncs: none on the CPU; host reads of tensor values per step "
                     f"({', '.join(summary['sync_events'])}; syncs on a GPU unless the tensor lives on the "
                     f"host): {by_phase or 'none'}")
    lines.append(f"wall time per step: {summary['wall_ms_per_step']:.2f} ms unprofiled, {wall:.2f} ms profiled")
    return "\n".join(lines)


def parse_overrides(parser: argparse.ArgumentParser, assignments: list[str]) -> dict[str, Any]:
    overrides = {}
    for text in assignments:
        try:
            key, value = parse_assignment(text)
        except UserError as error:
            parser.error(str(error))
        overrides[key] = value
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help=f"a packaged config: {', '.join(packaged_configs())}")
    source.add_argument("--config", type=Path, help="a training config YAML file")
    parser.add_argument("--data-dir", help="the dataset folder (for CIFAR-10: the JPEG folder holding train/ and test/)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: the config's, normally auto)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set batch_size=256")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first; compilation happens here (default 10)")
    parser.add_argument("--steps", type=int, default=20, help="steps timed, then as many profiled (default 20)")
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace of the profiled steps here")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error(f"--warmup and --steps must be at least 1; got {args.warmup} and {args.steps}")
    if args.preset is not None and args.preset not in packaged_configs():
        parser.error(f"unknown --preset {args.preset!r}; packaged configs: {', '.join(packaged_configs())}")
    overrides = parse_overrides(parser, args.overrides)
    for key, value in (("data_dir", args.data_dir), ("device", args.device)):
        if value is not None:
            overrides[key] = value

    try:
        config = load_config(args.preset or args.config, overrides)
        device = resolve_device(config.device)
        on_cuda = device.type == "cuda"
        # As train(): every batch has one shape, so cuDNN autotuning pays for itself.
        torch.backends.cudnn.benchmark = on_cuda
        data, method, recipe, optimizer = build(config, device)
    except UserError as error:
        sys.exit(f"error: {error}")
    if data.num_batches(config.batch_size, drop_last=True) == 0:
        parser.error(f"batch_size {config.batch_size} exceeds the {len(data)} training images")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
    generator = torch.Generator(device=device).manual_seed(config.seed)
    batches = endless_batches(data, config, device)
    total_steps = args.warmup + 2 * args.steps
    method.train()

    def run_step(step: int) -> None:
        with record_function(PHASES["data"]):
            images = next(batches)
        with record_function(PHASES["augmentation"]):
            views = recipe(images, generator)
        # The learning rate changes every step, as in training: it must not recompile anything.
        set_lr(optimizer, lr_at(step, total_steps, 0, config.lr, config.min_lr))
        train_step(method, optimizer, views, step, total_steps, autocast=autocast)

    for step in range(args.warmup):
        run_step(step)
    compiled_before = counters["frames"]["ok"]
    synchronize(device)
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        run_step(step)
    synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / args.steps

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for step in range(args.warmup + args.steps, total_steps):
            run_step(step)
        synchronize(device)
        profiled_wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    recompiled = counters["frames"]["ok"] - compiled_before

    summary = summarise(prof, args.steps, wall_ms, profiled_wall_ms, on_cuda)
    name = args.preset or str(args.config)
    device_name = torch.cuda.get_device_name(device) if on_cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"{name}: {config.method}, {config.backbone}, batch {config.batch_size}, compile {config.compile}   "
          f"device {device_name}   torch {torch.__version__}   {args.steps} steps after {args.warmup} warm-up")
    print(format_summary(summary, on_cuda))
    print(f"graph compilations after warm-up: {recompiled}")
    sort_key = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    print(f"\nTop 10 ops by self {'device' if on_cuda else 'CPU'} time ({args.steps} profiled steps):")
    print(prof.key_averages().table(sort_by=sort_key, row_limit=10, max_name_column_width=50))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    if args.json:
        args.json.write_text(json.dumps({
            "config": name, "overrides": overrides, "device": device_name, "torch": torch.__version__,
            "command": " ".join(sys.argv), "warmup": args.warmup, "steps": args.steps,
            "compilations_after_warmup": recompiled, **summary,
        }, indent=2))


if __name__ == "__main__":
    main()
