"""The int8 feature form (`encode-features --feature-dtype int8`): each token quantized on its own absmax.

A token x (D values) is stored as D int8 values q = round(x / s) in [-127, 127] followed by its scale
s = max|x| / 127 as 4 little-endian float32 bytes: a row of T tokens is (T, D + 4) int8, checksummed whole by
the row's crc32c like any other row. The scale is float32 rather than float16 because it costs 2 bytes more per
token (0.1% of a D=768 row) and keeps s exact over any range (float16 would round it by up to 2^-11 and
overflow for tokens beyond 65504 * 127). Dequantization is q * s computed in float32 and rounded once to float16,
the dtype a float16 cache serves (docs/cache.md). A NaN row (a bad sample) stores scale NaN and reads back NaN.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported on first use (see dequantize_int8)
    import torch

SCALE_BYTES = 4  # float32 scale after each token's int8 values
QMAX = 127       # symmetric: -128 is never used, so q and -q are both representable


def quantize_int8(x: np.ndarray) -> np.ndarray:
    """(..., D) float -> (..., D + 4) int8: per-token absmax int8 values, then the float32 scale's bytes."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.abs(x).max(axis=-1, keepdims=True)                     # (..., 1); NaN for a NaN token
    scale = (amax / QMAX).astype("<f4")
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.nan_to_num(np.rint(x / scale), nan=0.0, posinf=0.0, neginf=0.0)  # 0/0 (all-zero token) -> 0
    out = np.empty((*x.shape[:-1], x.shape[-1] + SCALE_BYTES), dtype=np.int8)
    out[..., :-SCALE_BYTES] = np.clip(q, -QMAX, QMAX)
    out[..., -SCALE_BYTES:] = scale.view(np.int8)
    return out


def empty_int8(shape: tuple[int, ...]) -> np.ndarray:
    """Stored rows (shape = (..., D + 4)) that read back as NaN: what a never-encoded or bad row holds."""
    out = np.zeros(shape, dtype=np.int8)
    out[..., -SCALE_BYTES:] = np.full((*shape[:-1], 1), np.nan, dtype="<f4").view(np.int8)
    return out


_scratch = threading.local()  # per reader thread: a reused float32 buffer (a fresh one page-faults every call)


def scratch(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A per-thread reusable buffer of at least prod(shape) elements, viewed as `shape`."""
    need = int(np.prod(shape))
    buf = getattr(_scratch, name, None)
    if buf is None or buf.size < need or buf.dtype != dtype:
        buf = np.empty(need, dtype=dtype)
        setattr(_scratch, name, buf)
    return buf[:need].reshape(shape)


def _dequantize_into(r, f, out) -> None:
    """The one dequantization arithmetic, on torch tensors of any device: (..., D + 4) int8 r -> f (..., D) float32
    scratch -> out (..., D) float16. In-place ops only: autocast leaves them alone (torch's AMP notes), so a step
    under autocast computes the same bits as the reader."""
    import torch

    scale = r[..., -SCALE_BYTES:].contiguous().view(torch.float32)  # (..., 1)
    f.copy_(r[..., :-SCALE_BYTES])
    f.mul_(scale)
    out.copy_(f)


def dequantize_int8(raw: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(..., D + 4) int8 stored rows -> out (..., D) float16 = q * s (float32 product, one rounding).

    Three single-dtype passes (int8 -> float32, times the scale, float32 -> float16) through torch: 3-6x
    numpy's bit-identical `np.multiply(..., dtype=float32)` into float16 and 1.7-3x torch's one mixed-dtype
    multiply, whose casting loop is not vectorized (measured on bench/feature_dtype.py's machine). torch is
    imported on first use, so reading a float cache never loads it."""
    import torch

    f = torch.from_numpy(scratch("f32", out.shape, np.dtype(np.float32)))
    _dequantize_into(torch.from_numpy(raw), f, torch.from_numpy(out))
    return out


def dequantize_int8_tensor(raw: torch.Tensor) -> torch.Tensor:
    """(..., D + 4) int8 stored rows, on any device -> (..., D) float16 there, bit for bit `dequantize_int8`'s
    result (same passes, same dtypes; IEEE float32 multiply and round-to-nearest-even casts on CPU and CUDA).
    Training uses it to dequantize on the GPU inside the step: half the host-to-device bytes of float16."""
    import torch

    shape = (*raw.shape[:-1], raw.shape[-1] - SCALE_BYTES)
    out = torch.empty(shape, dtype=torch.float16, device=raw.device)
    _dequantize_into(raw, torch.empty(shape, dtype=torch.float32, device=raw.device), out)
    return out
