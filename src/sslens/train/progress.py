"""Training progress: a rich progress bar on a terminal, plain log lines anywhere else.

The bar advances every step without reading anything from the device; loss and images/s are
shown only when the loop hands over a log record (every ``log_every`` steps), because reading
the loss is a CPU-GPU sync point.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def format_record(record: dict[str, Any]) -> str:
    """One human-readable line for a log record (keys as written to ``log.jsonl``)."""
    parts = [f"epoch {record['epoch']}", f"step {record['step']}"]
    for key, label, spec in (
        ("loss", "loss", ".4f"),
        ("lr", "lr", ".4g"),
        ("positive_pair_top1", "positive_pair_top1", ".3f"),
        ("knn_top1", "knn_top1", ".3f"),
        ("images_per_s", "images/s", ".0f"),
        ("epoch_time_s", "epoch_time_s", ".1f"),
    ):
        if record.get(key) is not None:
            parts.append(f"{label} {record[key]:{spec}}")
    return "  ".join(parts)


class Progress:
    """Shows training progress; use as a context manager around the loop.

    Args:
        total_steps: optimiser steps of the whole run.
        initial_step: steps already done (on resume).
        bar: True for a rich bar, False for plain lines, "auto" for a bar only on a terminal.
        stream: where plain lines go.
        silent: show nothing (every rank but the first under torchrun).
    """

    def __init__(self, total_steps: int, *, initial_step: int = 0, bar: bool | str = "auto",
                 stream: TextIO | None = None, silent: bool = False):
        if bar not in (True, False, "auto"):
            raise ValueError(f"bar must be True, False or 'auto'; got {bar!r}")
        self.stream = stream if stream is not None else sys.stdout
        self.total_steps = total_steps
        self.initial_step = initial_step
        self.silent = silent
        self.use_bar = not silent and (self.stream.isatty() if bar == "auto" else bool(bar))
        self._started = time.perf_counter()
        self._bar = None
        self._task = None

    def __enter__(self) -> Progress:
        if self.use_bar:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._bar.start()
            self._task = self._bar.add_task(
                "train", total=self.total_steps, completed=self.initial_step, status=""
            )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self) -> None:
        """One optimiser step done."""
        if self._bar is not None:
            self._bar.advance(self._task)

    def report(self, record: dict[str, Any]) -> None:
        """Show a log record: in the bar's status, or as a plain line with an ETA."""
        if self.silent:
            return
        if self._bar is not None:
            status = f"loss {record['loss']:.4f}"
            if record.get("images_per_s") is not None:
                status += f"  {record['images_per_s']:.0f} img/s"
            self._bar.update(self._task, status=status)
            if record.get("kind") == "epoch":
                self._bar.console.print(format_record(record))
            return
        done = record["step"] - self.initial_step
        line = format_record(record)
        if done > 0 and record["step"] < self.total_steps:
            elapsed = time.perf_counter() - self._started
            line += f"  eta {_format_duration(elapsed / done * (self.total_steps - record['step']))}"
        print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.silent:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=self.stream, flush=True)
