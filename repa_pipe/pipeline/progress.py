"""Progress reporting: a live rich bar (done/total, rate, ETA, extra fields) on a terminal, plain periodic lines
with the same facts otherwise (CI logs, cluster log files).

Only rank 0 reports; other ranks get a silent tracker, so call sites never test the rank.
"""
from __future__ import annotations

import sys
import time
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from repa_pipe.pipeline import dist

# Not on a terminal (CI logs, files), rich would wrap at 80 columns; tables read better wider.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def log(msg: str) -> None:
    """One line on rank 0's console (stderr, so stdout stays clean for data)."""
    if dist.is_main():
        console.print(msg, highlight=False, soft_wrap=True)


def human_duration(seconds: float) -> str:
    """12.3 -> '12s', 754 -> '12m34s', 45296 -> '12h34m'."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Tracker:
    """Counts finished work towards a total; a context manager.

    `done` may start above 0 (a resumed job): rates and the ETA count only the work of this process.
    `every_s`: seconds between plain lines when not on a terminal (None: the caller prints its own lines,
    using `status()`). `fields` is free text shown after the rate (e.g. the loss).
    """

    def __init__(self, desc: str, total: float, unit: str = "img", every_s: Optional[float] = 10.0,
                 done: float = 0, enabled: Optional[bool] = None):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.enabled = dist.is_main() if enabled is None else enabled
        self.start = self.done = done
        self.fields = ""
        self._t0 = self._last = time.perf_counter()
        self._bar: Optional[Progress] = None
        self._task = None

    def __enter__(self) -> "Tracker":
        self._t0 = self._last = time.perf_counter()
        if self.enabled and console.is_terminal:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.completed:.0f}/{task.total:.0f} {task.fields[unit]}"),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), TextColumn("{task.fields[extra]}"), console=console,
                                 transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.desc, total=self.total, completed=self.done, unit=self.unit,
                                            rate="", extra="")
        return self

    def rate(self) -> float:
        """Work per second since this tracker started."""
        dt = time.perf_counter() - self._t0
        return (self.done - self.start) / dt if dt > 0 else 0.0

    def eta_s(self) -> float:
        r = self.rate()
        return (self.total - self.done) / r if r > 0 else float("nan")

    def status(self, count_unit: bool = True) -> str:
        """'1200/400000 img (3.1 img/s, eta 35h48m)'; without `count_unit` '1200/400000 (3.1 img/s, ...)'."""
        unit = f" {self.unit}" if count_unit else ""
        return (f"{self.done:.0f}/{self.total:.0f}{unit} ({self.rate():.1f} {self.unit}/s, "
                f"eta {human_duration(self.eta_s())})")

    def update(self, n: float = 1, fields: Optional[str] = None) -> None:
        self.done += n
        if fields is not None:
            self.fields = fields
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{self.rate():.1f} {self.unit}/s",
                             extra=self.fields)
            return
        now = time.perf_counter()
        if self.every_s is not None and (now - self._last >= self.every_s or self.done >= self.total):
            self._last = now
            print(f"{self.desc}: {self.status()}" + (f"  {self.fields}" if self.fields else ""), file=sys.stderr,
                  flush=True)

    @property
    def live(self) -> bool:
        """True when a live bar shows the progress (no need for plain lines)."""
        return self._bar is not None

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
