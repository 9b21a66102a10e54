"""CKNNA representation alignment (Huh et al. 2024), as platonic-rep's `metrics.py`
computes it (https://github.com/minyoungg/platonic-rep).

K = A A^T, L = B B^T on row-normalised features. For a kernel pair (X, Y), M[i, j] = 1 when j is among the
top-k neighbours of i (self excluded) in *both* X and Y (row-wise, not symmetrised); sim(X, Y) is the
unbiased HSIC of M*X and M*Y; CKNNA = sim(K, L) / (sqrt(sim(K, K) sim(L, L)) + 1e-6).
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from repa_pipe.pipeline.errors import BadInputError

ArrayLike = Union[np.ndarray, torch.Tensor]


def clamp_outliers(x: torch.Tensor, q: float = 0.95) -> torch.Tensor:
    """Clamp to +-(mean over rows of each row's q-quantile of |x|): platonic-rep's default (non-exact) clamp."""
    bound = torch.quantile(x.abs(), q, dim=1).mean()
    return x.clamp(-bound, bound)


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al. 2012 unbiased HSIC of two (n, n) kernels (diagonals are ignored). Needs n >= 4."""
    m = k.shape[0]
    kt = k - torch.diag_embed(torch.diagonal(k))
    lt = l - torch.diag_embed(torch.diagonal(l))
    # sum_ij K_ij L_ji: L is transposed, which matters because the masked kernels are not symmetric.
    term1 = (kt * lt.T).sum()
    term2 = kt.sum() * lt.sum() / ((m - 1) * (m - 2))
    # sum_ij (K L)_ij = (column sums of K) . (row sums of L): O(n^2) instead of the n x n product's O(n^3)
    # (at the paper's n = 10,000 that product is 2e12 FLOPs per HSIC; three per CKNNA, per block and t).
    term3 = 2 * (kt.sum(0) @ lt.sum(1)) / (m - 2)
    return (term1 + term2 - term3) / (m * (m - 3))


def _knn_mask(x: torch.Tensor, topk: int) -> torch.Tensor:
    """(n, n) kernel -> (n, n) 0/1 mask of each row's top-k entries, self excluded."""
    xh = x.clone()
    xh.fill_diagonal_(float("-inf"))
    idx = torch.topk(xh, topk, dim=1).indices
    return torch.zeros_like(x).scatter_(1, idx, 1.0)


def _mutual_knn_sim(x: torch.Tensor, y: torch.Tensor, topk: int) -> torch.Tensor:
    mask = _knn_mask(x, topk) * _knn_mask(y, topk)
    return hsic_unbiased(mask * x, mask * y)


def cknna(feats_a: ArrayLike, feats_b: ArrayLike, topk: int = 10, normalize: bool = True,
          outlier_quantile: Optional[float] = None) -> float:
    """CKNNA of paired features (n, d1), (n, d2); float64 throughout."""
    if topk < 2:
        raise BadInputError(f"CKNNA needs topk >= 2; got {topk}")
    a = torch.as_tensor(np.asarray(feats_a) if not isinstance(feats_a, torch.Tensor) else feats_a).double()
    b = torch.as_tensor(np.asarray(feats_b) if not isinstance(feats_b, torch.Tensor) else feats_b).double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise BadInputError(f"CKNNA needs paired (n, d) features; got {tuple(a.shape)} and {tuple(b.shape)}")
    n = a.shape[0]
    if n <= topk or n < 4:
        raise BadInputError(f"CKNNA needs more samples than topk (and >= 4); got n={n}, topk={topk}")
    if outlier_quantile is not None:
        a, b = clamp_outliers(a, outlier_quantile), clamp_outliers(b, outlier_quantile)
    if normalize:
        a = torch.nn.functional.normalize(a, dim=1)
        b = torch.nn.functional.normalize(b, dim=1)
    k, l = a @ a.T, b @ b.T  # (n, n)
    sim_kl = _mutual_knn_sim(k, l, topk)
    sim_kk = _mutual_knn_sim(k, k, topk)
    sim_ll = _mutual_knn_sim(l, l, topk)
    return float(sim_kl / (torch.sqrt(sim_kk * sim_ll) + 1e-6))
