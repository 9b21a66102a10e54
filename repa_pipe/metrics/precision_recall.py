"""Improved precision / recall (Kynkaanniemi et al. 2019) as ADM's evaluator computes
it (https://github.com/openai/guided-diffusion `evaluations/evaluator.py`).

- Features: Inception pool3. Reference = ADM's 10k reference images, samples = all samples.
- Squared Euclidean distances D = max(|u|^2 - 2 u.v + |v|^2, 0).
- Radius of a point = the (k+1)-th smallest squared distance in its own set *counting itself*, i.e. the
  k-th nearest other point (k = 3), exactly ADM's ``np.partition(row, k)[k]``.
- Precision = share of samples within (``<=``) some reference ball; recall = share of references within
  some sample ball.
- ``distance_dtype="float16"`` reproduces ADM: each block is computed in fp16 and used (cast to fp32) when
  every entry is finite, else recomputed in fp32. "float32" / "float64" compute only in that dtype.

Distances are computed in row x column blocks so 50k x 50k never materialises; radii keep a running
top-(k+1) per row across column blocks instead of ADM's full (rows x N) buffer. Same values either way.
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import torch

from repa_pipe.pipeline.errors import BadInputError

DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
ArrayLike = Union[np.ndarray, torch.Tensor]


def _sq_dists(u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, D), (C, D) -> (R, C) squared distances computed entirely in ``dtype``."""
    u, v = u.to(dtype), v.to(dtype)
    nu = (u * u).sum(dim=1, keepdim=True)  # (R, 1)
    nv = (v * v).sum(dim=1).unsqueeze(0)  # (1, C)
    return torch.clamp_min(nu - 2 * (u @ v.T) + nv, 0)


def distance_block(u: torch.Tensor, v: torch.Tensor, distance_dtype: str = "float16") -> torch.Tensor:
    """ADM's DistanceBlock: (R, D), (C, D) -> (R, C) squared distances (float32, or float64 in float64 mode)."""
    if distance_dtype not in DTYPES:
        raise ValueError(f"distance_dtype must be one of {sorted(DTYPES)}; got {distance_dtype!r}")
    if distance_dtype == "float16":
        d = _sq_dists(u, v, torch.float16)
        if bool(torch.isfinite(d).all()):
            return d.float()
        return _sq_dists(u, v, torch.float32)  # fp16 overflowed in this block: ADM's fallback
    return _sq_dists(u, v, DTYPES[distance_dtype])


def _as_tensor(x: ArrayLike, device: torch.device | str, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise BadInputError(f"precision/recall: {name} features must be (N, D); got {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    if t.dtype == torch.float16:
        t = t.float()
    return t.to(device)


def manifold_radii(feats: ArrayLike, k: int = 3, row_batch_size: int = 10000, col_batch_size: int = 10000,
                   distance_dtype: str = "float16", device: torch.device | str = "cpu") -> torch.Tensor:
    """Squared k-NN radius of every point within its own set: (N, D) -> (N,) on ``device``."""
    f = _as_tensor(feats, device, "manifold")
    n = f.shape[0]
    if n < k + 1:
        raise BadInputError(f"precision/recall: need at least k + 1 = {k + 1} points per set; got {n}")
    radii = []
    for r0 in range(0, n, row_batch_size):
        rows = f[r0:r0 + row_batch_size]
        best = None  # (R, <= k+1) smallest distances seen so far, self included
        for c0 in range(0, n, col_batch_size):
            d = distance_block(rows, f[c0:c0 + col_batch_size], distance_dtype)  # (R, C)
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii.append(best.max(dim=1).values)  # (k+1)-th smallest = kth NN other than self
    return torch.cat(radii)


def precision_recall(ref_feats: ArrayLike, sample_feats: ArrayLike, k: int = 3, row_batch_size: int = 10000,
                     col_batch_size: int = 10000, distance_dtype: str = "float16",
                     device: torch.device | str = "cpu") -> Tuple[float, float]:
    """ADM precision and recall of samples (M, D) against references (N, D). Returns (precision, recall)."""
    ref = _as_tensor(ref_feats, device, "reference")
    smp = _as_tensor(sample_feats, device, "sample")
    if ref.shape[1] != smp.shape[1]:
        raise BadInputError(f"precision/recall: feature dims differ: reference {ref.shape[1]}, "
                            f"sample {smp.shape[1]}")
    kw = dict(k=k, row_batch_size=row_batch_size, col_batch_size=col_batch_size,
              distance_dtype=distance_dtype, device=device)
    r_ref = manifold_radii(ref, **kw)  # (N,)
    r_smp = manifold_radii(smp, **kw)  # (M,)
    ref_in = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)  # ref inside some sample ball
    smp_in = torch.zeros(smp.shape[0], dtype=torch.bool, device=ref.device)  # sample inside some ref ball
    for r0 in range(0, ref.shape[0], row_batch_size):
        r1 = r0 + row_batch_size
        for c0 in range(0, smp.shape[0], col_batch_size):
            c1 = c0 + col_batch_size
            d = distance_block(ref[r0:r1], smp[c0:c1], distance_dtype)  # (R, C)
            smp_in[c0:c1] |= (d <= r_ref[r0:r1, None].to(d.dtype)).any(dim=0)
            ref_in[r0:r1] |= (d <= r_smp[None, c0:c1].to(d.dtype)).any(dim=1)
    return float(smp_in.double().mean()), float(ref_in.double().mean())
