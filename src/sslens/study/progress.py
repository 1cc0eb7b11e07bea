"""The study's progress display: a rich bar over every stage, plain lines when not on a terminal.

Training draws its own bar (:class:`sslens.train.progress.Progress`); rich allows one live
display at a time, so the study's bar is paused while a model trains (:meth:`paused`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO


class StudyProgress:
    """``with StudyProgress(total) as progress: with progress.stage("..."): ...``.

    Args:
        total: number of stages (models to prepare plus experiment × model stages).
        bar: True for a rich bar, False for plain lines, "auto" for a bar on a terminal only.
        stream: where the display goes (stdout by default).
        quiet: show nothing (the ranks other than 0 of a torchrun launch).
    """

    def __init__(
        self, total: int, *, bar: bool | str = "auto", stream: TextIO | None = None, quiet: bool = False
    ):
        self.stream = stream if stream is not None else sys.stdout
        self.quiet = quiet
        self.use_bar = not quiet and (self.stream.isatty() if bar == "auto" else bool(bar))
        self.total = total
        self.done = 0
        self.started = time.perf_counter()
        self._bar = None
        self._task = None

    def __enter__(self) -> StudyProgress:
        if self.use_bar:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(
                SpinnerColumn(), TextColumn("[bold]study"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.description}"), TimeElapsedColumn(), console=Console(file=self.stream),
            )
            self._bar.start()
            self._task = self._bar.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, description: str, *, cached: bool = False) -> Iterator[None]:
        """One stage: shown while it runs, counted when it ends."""
        if self._bar is not None:
            self._bar.update(self._task, description=description)
        elif not (cached or self.quiet):
            print(f"[{self.done + 1}/{self.total}] {description} ...", file=self.stream, flush=True)
        started = time.perf_counter()
        yield
        self.done += 1
        note = "cached" if cached else f"{time.perf_counter() - started:.1f} s"
        if self._bar is not None:
            self._bar.advance(self._task)
        elif not self.quiet:
            print(f"[{self.done}/{self.total}] {description}: {note}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hide the bar while something else (training) draws its own."""
        if self._bar is not None:
            self._bar.stop()
        try:
            yield
        finally:
            if self._bar is not None:
                self._bar.start()
