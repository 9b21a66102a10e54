"""Compute precisions: the names the options take and the autocast context each one means."""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = tuple(DTYPES)


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast to `precision` on `device`'s type; fp32 is no context at all (exact)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])
