"""Stopping on a non-finite loss or gradient, and saying why: bad cached rows, or the optimisation itself."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from repa_pipe.pipeline import dist
from repa_pipe.pipeline.errors import RepaError


class NonFiniteLossError(RepaError):
    """The loss became NaN/inf; the run stopped and the last good checkpoint is kept."""


class NonFiniteGuard:
    """Remembers the first step whose loss (or, without a grad scaler, gradient norm) was NaN/inf.

    Updated on the device every step without a host sync; `check` syncs once per boundary, before anything is
    logged, previewed or saved. The gradient norm counts too: a NaN gradient with a finite loss already poisons
    the weights, and the checkpoint of that step must not be written. With fp16 the scaler skips such steps.
    `bad_rows(step)` names the cached rows of a step that hold NaN/Inf (empty when the inputs are fine).
    """

    NONE = -1

    def __init__(self, device: torch.device, check_grad: bool, bad_rows: Callable[[int], list[str]]):
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.check_grad = check_grad
        self.bad_rows = bad_rows

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss)
        if self.check_grad:
            bad |= ~torch.isfinite(grad_norm)
        self.first = torch.where(bad & (self.first == self.NONE), torch.full_like(self.first, step), self.first)

    def check(self, last_good: Optional[Path], cache: Path) -> None:
        flagged = dist.all_reduce_sum((self.first != self.NONE).float())
        if not flagged.item():
            return
        step = min(s for s in dist.all_gather_object(int(self.first.item())) if s != self.NONE)
        rows = [r for rank_rows in dist.all_gather_object(self.bad_rows(step)) for r in rank_rows]
        resume = f"Last good checkpoint: {last_good or 'none'}"
        if rows:
            raise NonFiniteLossError(
                f"non-finite loss at step {step}: the cache holds NaN/Inf in rows it fed that step "
                f"({', '.join(rows[:5])}{' ...' if len(rows) > 5 else ''}); run `repa-pipe cache verify {cache}`. "
                f"{resume}")
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step} (the cached inputs of that step are finite); stopped. "
            f"{resume} (run the same command to resume from it; try --precision fp32, a lower --lr or a lower "
            "--proj-coeff)")
