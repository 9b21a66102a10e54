"""Stopping on SIGINT / SIGTERM at a safe point (Ctrl-C, a cluster's preemption notice).

A stage runs its work inside `StopOnSignal()` and asks `stop.requested` at its safe points (a step boundary,
a batch boundary); on a request it saves what it must and raises `Stopped`, which the CLI prints as one line
and turns into exit code 128 + signal number (130 for Ctrl-C, 143 for SIGTERM), as a shell would report.
A second signal while stopping restores the default handler's behaviour at once.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Optional

from repa_pipe.pipeline.errors import RepaError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(RepaError):
    """The stage stopped cleanly on a signal; the message says what was kept and how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __reduce__(self):  # crosses ranks through all_gather_object
        return (type(self), (str(self), self.signum))


class StopOnSignal:
    """Context manager: SIGINT/SIGTERM set `signum` instead of killing the process (main thread only)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: stop now, the way the default handler would
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def _restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()


def ignore_in_worker() -> None:
    """For loader worker processes: leave SIGINT/SIGTERM to the parent, which stops cleanly and reaps them."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (even by SIGKILL), so a killed stage
    leaves no orphaned loader workers holding memory. Elsewhere a no-op."""
    import ctypes
    import multiprocessing
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl took effect
        os._exit(1)


def loader_worker_init(worker_id: int) -> None:
    """`worker_init_fn` for every DataLoader of the pipeline."""
    ignore_in_worker()
    die_with_parent()
