"""Inception Score as ADM's evaluator computes it
(https://github.com/openai/guided-diffusion `evaluations/evaluator.py`).

p = softmax(pool3 @ W) over 1008 classes with no bias ("logits_unbiased"). Samples are split in file order
into contiguous chunks of ``split_size`` (5000), without shuffling: chunk k is rows [5000k, 5000k + 5000).
When N is not a multiple of 5000 the last, shorter chunk is a split of its own, and the score is the plain
(unweighted) mean over chunks, as ADM's ``range(0, N, 5000)`` loop does; N = 50,000 gives 10 splits of 5,000.
Per split: exp(mean_i KL(p_i || mean_j p_j)). The std over splits is not reported (ADM does not).
"""
from __future__ import annotations

import numpy as np

from repa_pipe.pipeline.errors import BadInputError

ADM_SPLIT_SIZE = 5000


def split_bounds(n: int, split_size: int = ADM_SPLIT_SIZE) -> list[tuple[int, int]]:
    """[start, end) of each IS split for n samples: contiguous, last one possibly shorter."""
    return [(s, min(s + split_size, n)) for s in range(0, n, split_size)]


def _score(p: np.ndarray, logp: np.ndarray, split_size: int) -> float:
    scores = []
    for start, end in split_bounds(p.shape[0], split_size):
        part, logpart = p[start:end], logp[start:end]  # (S, C)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_mean = np.log(part.mean(axis=0, keepdims=True))  # (1, C)
            # 0 * log 0 = 0 here; ADM would give NaN, which never happens with real logits.
            kl = np.where(part > 0, part * (logpart - log_mean), 0.0).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def inception_score(logits: np.ndarray, split_size: int = ADM_SPLIT_SIZE) -> float:
    """IS from unbiased logits (N, C); softmax and logs in float64 (ADM: float32, same value to ~1e-6)."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise BadInputError(f"inception score needs logits of shape (N, C); got {logits.shape}")
    logp = logits - logits.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))  # log_softmax, (N, C)
    return _score(np.exp(logp), logp, split_size)


def inception_score_from_probs(probs: np.ndarray, split_size: int = ADM_SPLIT_SIZE) -> float:
    """IS from class probabilities (N, C) (rows sum to 1)."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or p.shape[0] < 1:
        raise BadInputError(f"inception score needs probabilities of shape (N, C); got {p.shape}")
    with np.errstate(divide="ignore"):
        logp = np.log(p)
    return _score(p, logp, split_size)
