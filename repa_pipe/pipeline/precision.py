"""Compute precisions: the names the options take and the autocast context each one means.

Torch is imported only when a context is made: the config dataclasses (and so the CLI's --help) read `NAMES`.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NAMES = ("fp32", "bf16", "fp16")
NAMES_NO_FP16 = ("fp32", "bf16")  # sampling and analysis: fp16 without a loss scale is not offered there


def dtype(precision: str) -> "torch.dtype":
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(precision: str, device: "torch.device | str") -> contextlib.AbstractContextManager:
    """Autocast to `precision` on `device`'s type; fp32 is no context at all (exact)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(torch.device(device).type, dtype=dtype(precision))
