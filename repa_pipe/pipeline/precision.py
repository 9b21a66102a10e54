"""Compute precisions: the names the options take, what each means on each device, and the scoped context that
applies it (autocast and TF32 set for the duration only, restored after: nothing leaks into later work).

- `fp32`: float32; on CUDA strictly so (TF32 off for matmuls and cuDNN convolutions inside the scope, although
  torch's own default lets cuDNN use TF32).
- `tf32`: float32 storage, TF32 tensor-core matmuls and convolutions on CUDA (10-bit mantissa products, float32
  accumulation); on a CPU, where TF32 does not exist, exactly fp32.
- `bf16` / `fp16`: autocast to that dtype (fp16 only where a loss scaler or a fixed range makes it safe).
- `auto` (sample-eval, analyze and the encode stages): the stage's fast choice on CUDA, fp32 on a CPU (so CPU
  results are those of fp32). docs/numerics.md says what each stage picks and why.

Torch is imported only when a context is made: the config dataclasses (and so the CLI's --help) read the names.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:
    import torch

NAMES = ("fp32", "bf16", "fp16")                    # training (TF32 is its own --tf32 switch there)
EVAL_NAMES = ("auto", "fp32", "tf32", "bf16")       # sample-eval, analyze: fp16 without a loss scale not offered
ENCODE_NAMES = ("auto", "fp32", "tf32", "bf16", "fp16")
# What `auto` means on CUDA, per stage (docs/numerics.md): sampling and analysis in bf16 autocast (the model's
# training precision; ~2x TF32's tensor-core rate), encoding in TF32 (its outputs are stored and trained on for
# every epoch, so it keeps float32 storage and accumulation; torch already runs cuDNN convolutions in TF32 by
# default, as the reference's preprocessing did).
AUTO_CUDA = {"sample": "bf16", "analyze": "bf16", "encode": "tf32"}


def dtype(precision: str) -> "torch.dtype":
    import torch

    return {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve(precision: str, device: "torch.device | str", stage: str) -> str:
    """The precision that runs: `auto` -> the stage's CUDA choice (AUTO_CUDA) or fp32 off CUDA; `tf32` off CUDA ->
    fp32 (the same arithmetic, recorded as what it is)."""
    import torch

    on_cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        return AUTO_CUDA[stage] if on_cuda else "fp32"
    if precision == "tf32" and not on_cuda:
        return "fp32"
    return precision


def _tf32_flags() -> tuple[bool, bool]:
    import torch

    try:
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    except RuntimeError:  # the process set torch's newer fp32_precision API: read that one
        return (torch.backends.cuda.matmul.fp32_precision == "tf32",
                torch.backends.cudnn.conv.fp32_precision == "tf32")


def _set_tf32(matmul: bool, cudnn: bool) -> None:
    import torch

    try:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
    except RuntimeError:  # newer API in use in this process: keep to it (mixing the two raises)
        torch.backends.cuda.matmul.fp32_precision = "tf32" if matmul else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if cudnn else "ieee"


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN convolutions on (or off) inside the scope; the caller's flags after it."""
    saved = _tf32_flags()
    _set_tf32(enabled, enabled)
    try:
        yield
    finally:
        _set_tf32(*saved)


def autocast(precision: str, device: "torch.device | str") -> contextlib.AbstractContextManager:
    """Autocast to `precision` on `device`'s type; fp32 and tf32 are no context at all (exact float32 storage)."""
    if precision in ("fp32", "tf32"):
        return contextlib.nullcontext()
    import torch

    return torch.autocast(torch.device(device).type, dtype=dtype(precision))


@contextlib.contextmanager
def compute(precision: str, device: "torch.device | str", allow_tf32: Optional[bool] = None) -> Iterator[None]:
    """Run the body in `precision` on `device`: autocast for bf16/fp16; on CUDA, TF32 on for `tf32` and off for
    `fp32` (or as `allow_tf32` says, for training's --tf32), restored on exit. On a CPU, fp32 and tf32 are no
    context at all, so CPU numbers are those of plain float32."""
    import torch

    if allow_tf32 is None:
        allow_tf32 = {"tf32": True, "fp32": False}.get(precision)
    with contextlib.ExitStack() as stack:
        if torch.device(device).type == "cuda" and allow_tf32 is not None:
            stack.enter_context(tf32(allow_tf32))
        stack.enter_context(autocast(precision, device))
        yield
