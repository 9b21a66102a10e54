"""Progress reporting: a rich bar (items/s, ETA) on a terminal, plain periodic lines otherwise.

Only rank 0 reports; other ranks get a silent tracker, so call sites never test the rank.
"""
from __future__ import annotations

import sys
import time
from typing import Optional

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from repa_pipe.pipeline import dist

# Not on a terminal (CI logs, files), rich would wrap at 80 columns; tables read better wider.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def log(msg: str) -> None:
    """One line on rank 0's console (stderr, so stdout stays clean for data)."""
    if dist.is_main():
        console.print(msg, highlight=False, soft_wrap=True)


class Tracker:
    """Counts finished items of one task; a context manager."""

    def __init__(self, desc: str, total: int, unit: str = "img", every_s: float = 10.0,
                 enabled: Optional[bool] = None):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.enabled = dist.is_main() if enabled is None else enabled
        self.done = 0
        self._t0 = time.perf_counter()
        self._last = self._t0
        self._bar: Optional[Progress] = None
        self._task = None

    def __enter__(self) -> "Tracker":
        self._t0 = self._last = time.perf_counter()
        if self.enabled and console.is_terminal:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.desc, total=self.total, rate="")
        return self

    def rate(self) -> float:
        dt = time.perf_counter() - self._t0
        return self.done / dt if dt > 0 else 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        rate = f"{self.rate():.1f} {self.unit}/s"
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=rate)
            return
        now = time.perf_counter()
        if now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            left = self.total - self.done
            eta = left / self.rate() if self.rate() > 0 else float("nan")
            print(f"{self.desc}: {self.done}/{self.total} ({rate}, eta {eta:.0f}s)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
