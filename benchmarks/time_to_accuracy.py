"""Wall time to a held-out kNN accuracy: train a preset and print its kNN curve against the clock.

Runs ``sslens.train.train`` on a config (a packaged preset or a YAML file, plus ``--set``
overrides) and reads the run's ``log.jsonl``: per epoch the epoch time, the wall time since the
clock started, images/s and, where the kNN monitor ran, kNN top-1. It reports the time to the
first epoch and the time to ``--target`` (the first kNN evaluation at or above it).

    # one GPU, the real CIFAR-10 JPEG folder (train/ and test/ inside):
    python benchmarks/time_to_accuracy.py --preset simclr-cifar10-fast --data-dir data/cifar10 \\
        --warm-data --json tta-simclr.json
    # CPU smoke run (shows the script works; says nothing about GPU figures):
    python benchmarks/time_to_accuracy.py --preset simclr-cifar10-fast --device cpu \\
        --set data=synthetic --set 'data_options={num_images: 512}' --set backbone=resnet-tiny \\
        --set batch_size=64 --set epochs=3 --set knn_every=1 --set compile=false --target 0.3

The run goes to ``--out`` (default ``runs/time-to-accuracy/NAME``, so a preset's own run
directory is never touched); ``--overwrite`` deletes an earlier run there first.

Clock: it starts just before ``train()`` is called, so it includes loading (and, without
``--warm-data``, decoding) the dataset, building the model, ``torch.compile``, every kNN
evaluation and checkpoint; it leaves out Python start-up and importing torch. ``train()``
writes no timestamps, so a watcher thread stamps each epoch record with the wall time at which
it appears in ``log.jsonl`` (polled every 20 ms). An epoch record is written after that
epoch's kNN evaluation, so a record's wall time is when its accuracy was known.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from sslens.device import resolve_device
from sslens.errors import UserError
from sslens.store import RunDir
from sslens.train.config import load_config, packaged_configs, parse_assignment
from sslens.train.loop import train

POLL_INTERVAL_S = 0.02


class LogWatcher(threading.Thread):
    """Stamps every complete line of ``RUN/log.jsonl`` with the wall time it was first seen.

    Also stamps the moment ``RUN/config.yaml`` appears: ``train()`` writes it once the data is
    loaded and the model and optimiser are built, just before compilation and the first step.
    """

    def __init__(self, run_dir: Path, start: float):
        super().__init__(daemon=True)
        self.log_path = run_dir / "log.jsonl"
        self.config_path = run_dir / "config.yaml"
        self.start_time = start
        self.records: list[tuple[float, dict[str, Any]]] = []
        self.setup_s: float | None = None
        self._offset = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(POLL_INTERVAL_S):
            self.poll()

    def stop(self) -> None:
        """Stop polling and read what is left (it is stamped with the current time)."""
        self._done.set()
        self.join()
        self.poll()

    def poll(self) -> None:
        now = time.perf_counter() - self.start_time
        if self.setup_s is None and self.config_path.exists():
            self.setup_s = now
        if not self.log_path.exists():
            return
        with open(self.log_path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        # Only whole lines: the loop may be half-way through writing the last one.
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            if line.strip():
                self.records.append((now, json.loads(line)))


def summarise(records: list[tuple[float, dict[str, Any]]], target: float) -> dict[str, Any]:
    """Per-epoch rows plus the headline numbers: time to first epoch, to ``target``, best kNN."""
    rows = [
        {
            "epoch": record["epoch"],
            "epoch_time_s": record.get("epoch_time_s"),
            "wall_s": wall,
            "images_per_s": record.get("images_per_s"),
            "loss": record.get("loss"),
            "knn_top1": record.get("knn_top1"),
        }
        for wall, record in records
        if record.get("kind") == "epoch"
    ]
    evaluated = [row for row in rows if row["knn_top1"] is not None]
    reached = next((row for row in evaluated if row["knn_top1"] >= target), None)
    later_epochs = [row["epoch_time_s"] for row in rows[1:] if row["epoch_time_s"] is not None]
    return {
        "epochs": rows,
        "time_to_first_epoch_s": rows[0]["wall_s"] if rows else None,
        "first_epoch_time_s": rows[0]["epoch_time_s"] if rows else None,
        # The first epoch includes compilation; the median of the others is the steady state.
        "median_epoch_time_s": statistics.median(later_epochs) if later_epochs else None,
        "target": target,
        "time_to_target_s": reached["wall_s"] if reached else None,
        "epoch_at_target": reached["epoch"] if reached else None,
        "best_knn_top1": max((row["knn_top1"] for row in evaluated), default=None),
        "final_knn_top1": evaluated[-1]["knn_top1"] if evaluated else None,
    }


def format_table(summary: dict[str, Any]) -> str:
    def cell(value: float | None, width: int, spec: str) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:{width}{spec}}"

    lines = [f"{'epoch':>5}  {'epoch s':>8}  {'wall s':>8}  {'images/s':>9}  {'loss':>7}  {'kNN top-1':>9}"]
    for row in summary["epochs"]:
        lines.append(
            f"{row['epoch']:>5}  {cell(row['epoch_time_s'], 8, '.2f')}  {row['wall_s']:>8.1f}  "
            f"{cell(row['images_per_s'], 9, ',.0f')}  {cell(row['loss'], 7, '.4f')}  "
            f"{cell(row['knn_top1'], 9, '.4f')}"
        )
    return "\n".join(lines)


def seconds(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else f"{value:{spec}} s"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


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
                        help="override a config key, e.g. --set epochs=3 --set method_options.temperature=0.5")
    parser.add_argument("--out", type=Path,
                        help="the run directory (default: runs/time-to-accuracy/NAME, apart from the preset's own runs)")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier run in --out first")
    parser.add_argument("--target", type=float, default=0.85, help="kNN top-1 to time, in [0, 1] (default 0.85)")
    parser.add_argument("--warm-data", action="store_true",
                        help="decode the dataset into its cache before the clock starts (a one-time cost per "
                             "machine: about 30 s for CIFAR-10's 60,000 JPEGs on 16 cores)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if not 0.0 <= args.target <= 1.0:
        parser.error(f"--target is a top-1 accuracy in [0, 1]; got {args.target}")
    if args.preset is not None and args.preset not in packaged_configs():
        parser.error(f"unknown --preset {args.preset!r}; packaged configs: {', '.join(packaged_configs())}")

    name = args.preset or args.config.stem
    overrides = parse_overrides(parser, args.overrides)
    out = args.out or Path(overrides.get("out", Path("runs/time-to-accuracy") / name))
    for key, value in (("data_dir", args.data_dir), ("device", args.device), ("out", out)):
        if value is not None:
            overrides[key] = str(value)
    try:
        config = load_config(args.preset or args.config, overrides)
        device = resolve_device(config.device)
    except UserError as error:
        parser.error(str(error))
    if config.knn_every == 0:
        parser.error("the config has knn_every=0, so there is no kNN curve to time; pass --set knn_every=N")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            parser.error(f"{out} is not empty; pass --overwrite to delete the earlier run, or another --out")
        if not RunDir(out).markers():
            parser.error(f"{out} holds files but no sslens run; refusing to delete it with --overwrite")
        # Deleted here, before the clock starts, so the watcher never sees the old log.
        shutil.rmtree(out)

    try:
        if args.warm_data:
            for split in ("train", "test"):
                config.data_split(split, torch.device("cpu"))
        start = time.perf_counter()
        watcher = LogWatcher(out, start)
        watcher.start()
        try:
            train(config)
        finally:
            watcher.stop()
        total_s = time.perf_counter() - start
    except UserError as error:
        sys.exit(f"error: {error}")

    summary = summarise(watcher.records, args.target)
    print(f"\n{name}: {config.method}, {config.backbone}, batch {config.batch_size}, {config.epochs} epochs, "
          f"compile {config.compile}   device {device_name(device)}   torch {torch.__version__}")
    print(format_table(summary))
    print(f"setup (data loaded, model built) {seconds(watcher.setup_s)}; first epoch done at "
          f"{seconds(summary['time_to_first_epoch_s'])} (the epoch itself {seconds(summary['first_epoch_time_s'])}"
          f"{', compilation included' if config.compile else ''}); "
          f"median later epoch {seconds(summary['median_epoch_time_s'], '.2f')}; "
          f"total {seconds(total_s)}")
    best, final = summary["best_knn_top1"], summary["final_knn_top1"]
    if summary["time_to_target_s"] is not None:
        print(f"kNN top-1 >= {args.target:.3f} first at epoch {summary['epoch_at_target']}, "
              f"{summary['time_to_target_s']:.1f} s after the start (best {best:.4f})")
    elif best is not None:
        print(f"kNN top-1 never reached {args.target:.3f} (best {best:.4f}, final {final:.4f})")
    else:
        print("no kNN evaluation ran (the run stopped before an epoch that evaluates)")
    if args.json:
        args.json.write_text(json.dumps({
            "config": name, "overrides": overrides, "device": device_name(device), "torch": torch.__version__,
            "command": " ".join(sys.argv), "warm_data": args.warm_data, "setup_s": watcher.setup_s,
            "total_s": total_s, **summary,
        }, indent=2))


if __name__ == "__main__":
    main()
