"""Reference statistics: ADM reference batches and our own stored npz (as ADM's evaluator reads
them: https://github.com/openai/guided-diffusion `evaluations/evaluator.py`).

ADM's ``VIRTUAL_imagenet256_labeled.npz`` holds ``arr_0`` (10,000 uint8 images, used only for precision/
recall), and precomputed ``mu`` (2048,), ``sigma`` (2048, 2048), ``mu_s`` (2023,), ``sigma_s`` (2023, 2023)
over the whole dataset. As in ADM, when ``mu`` is present FID/sFID use the stored statistics and ignore the
images; when it is absent (a plain image batch used as reference) they come from ``arr_0``'s features. The
reference pool features for precision/recall always come from ``arr_0`` through Inception.

Our stored format (``save``/``load``) keeps what evaluation needs, so the 10k images are read once:
``repa_pipe_reference`` (format tag), ``meta`` (JSON string), ``mu``, ``sigma``, and when available ``mu_s``,
``sigma_s``, ``pool`` (M, 2048) float32, ``mu_dinov2``, ``sigma_dinov2``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional

import numpy as np

from repa_pipe.metrics.dinov2 import ForwardCls, dinov2_batch_features
from repa_pipe.metrics.fd import compute_stats
from repa_pipe.metrics.inception import InceptionFeatures
from repa_pipe.metrics.npz_io import ImageBatches, iter_batches, iter_npz_images, npz_keys
from repa_pipe.pipeline.errors import BadInputError, MissingWeightsError
from repa_pipe.pipeline.fileio import atomic_write

FORMAT_TAG = "repa_pipe_reference_v1"
POOL_DIM, SPATIAL_DIM = 2048, 2023
ADM_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def _check_stat(mu: Optional[np.ndarray], sigma: Optional[np.ndarray], dim: Optional[int], where: str):
    if mu is None and sigma is None:
        return None, None
    if mu is None or sigma is None:
        raise BadInputError(f"{where}: a mean without covariance (or the reverse)")
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d) or (dim is not None and d != dim):
        want = f"({dim},) and ({dim}, {dim})" if dim else "(D,) and (D, D)"
        raise BadInputError(f"{where}: statistics have shapes {mu.shape} and {sigma.shape}; expected {want}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise BadInputError(f"{where}: statistics contain NaN or inf")
    return mu, sigma


@dataclasses.dataclass
class ReferenceStats:
    """Everything the metrics need from the reference side. Missing parts disable their metric."""

    mu: np.ndarray  # (2048,)
    sigma: np.ndarray  # (2048, 2048)
    mu_s: Optional[np.ndarray] = None  # (2023,)
    sigma_s: Optional[np.ndarray] = None  # (2023, 2023)
    pool: Optional[np.ndarray] = None  # (M, 2048) pool3 features of the P/R reference images
    mu_dinov2: Optional[np.ndarray] = None  # (D,)
    sigma_dinov2: Optional[np.ndarray] = None  # (D, D)
    meta: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        where = str(self.meta.get("source", "reference statistics"))
        self.mu, self.sigma = _check_stat(self.mu, self.sigma, POOL_DIM, f"{where}: mu/sigma")
        if self.mu is None:
            raise BadInputError(f"{where}: mu/sigma are required")
        self.mu_s, self.sigma_s = _check_stat(self.mu_s, self.sigma_s, SPATIAL_DIM, f"{where}: mu_s/sigma_s")
        self.mu_dinov2, self.sigma_dinov2 = _check_stat(self.mu_dinov2, self.sigma_dinov2, None,
                                                        f"{where}: mu_dinov2/sigma_dinov2")
        if self.pool is not None:
            self.pool = np.asarray(self.pool, np.float32)
            if self.pool.ndim != 2 or self.pool.shape[1] != POOL_DIM:
                raise BadInputError(f"{where}: pool features have shape {self.pool.shape}; "
                                    f"expected (M, {POOL_DIM})")

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_images(cls, images: ImageBatches, inception: InceptionFeatures, batch_size: int = 64,
                    dinov2_forward: Optional[ForwardCls] = None, meta: Optional[Dict[str, Any]] = None
                    ) -> "ReferenceStats":
        """All statistics and P/R features from uint8 images (N, H, W, 3) or an iterable of batches."""
        pools, spatials, dinos = [], [], []
        for batch in iter_batches(images, batch_size, where="reference images"):
            f = inception.extract_batch(batch)
            pools.append(f["pool"])
            spatials.append(f["spatial"])
            if dinov2_forward is not None:
                dinos.append(dinov2_batch_features(dinov2_forward, batch, inception.device))
        pool = np.concatenate(pools)  # (N, 2048)
        mu, sigma = compute_stats(pool)
        mu_s, sigma_s = compute_stats(np.concatenate(spatials))
        mu_d, sigma_d = compute_stats(np.concatenate(dinos)) if dinos else (None, None)
        meta = dict(meta or {}, num_images=int(pool.shape[0]), inception_sha256=inception.weights_sha256)
        return cls(mu, sigma, mu_s, sigma_s, pool, mu_d, sigma_d, meta)

    @classmethod
    def from_adm_npz(cls, path: str | os.PathLike, inception: Optional[InceptionFeatures] = None,
                     batch_size: int = 64, need_pool: bool = True) -> "ReferenceStats":
        """An ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz).

        Stored mu/sigma/mu_s/sigma_s are used as they are; ``arr_0`` goes through Inception for the P/R
        features (only if ``need_pool``) or, when the stats are absent, for everything.
        """
        keys = npz_keys(path)
        has_stats = "mu" in keys
        if has_stats:
            missing = [k for k in ADM_STAT_KEYS if k not in keys]
            if missing:
                raise BadInputError(f"{path}: has 'mu' but lacks {missing}; an ADM reference batch stores "
                                    f"{list(ADM_STAT_KEYS)}")
        if (need_pool or not has_stats) and "arr_0" not in keys:
            raise BadInputError(f"{path}: no 'arr_0' images (found {keys}); needed for "
                                f"{'precision/recall' if has_stats else 'reference statistics'}")
        if (need_pool or not has_stats) and inception is None:
            raise MissingWeightsError(f"{path}: computing reference features from arr_0 needs Inception; "
                                      "pass --inception-weights")
        meta = {"source": str(path), "format": "adm"}
        if not has_stats:
            return cls.from_images(iter_npz_images(path, batch_size), inception, batch_size, meta=meta)
        with np.load(path, allow_pickle=False) as z:
            stats = {k: z[k] for k in ADM_STAT_KEYS}
        pool = None
        if need_pool:
            pool = inception.extract(iter_npz_images(path, batch_size), batch_size)["pool"]
            meta.update(num_pr_images=int(pool.shape[0]), inception_sha256=inception.weights_sha256)
        return cls(pool=pool, meta=meta, **stats)

    # -- storage --------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write our npz format atomically (uncompressed: covariances barely compress)."""
        arrays = {"repa_pipe_reference": np.array(FORMAT_TAG),
                  "meta": np.array(json.dumps(self.meta, default=str)), "mu": self.mu, "sigma": self.sigma}
        for name in ("mu_s", "sigma_s", "pool", "mu_dinov2", "sigma_dinov2"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike, inception: Optional[InceptionFeatures] = None, batch_size: int = 64,
             need_pool: bool = True) -> "ReferenceStats":
        """Load our stored format, or an ADM reference batch (then ``inception`` computes arr_0's features).

        A stats-only file (``mu``/``sigma``, optionally ``mu_s``/``sigma_s``, e.g. MAR's adm_in256_stats.npz)
        loads when ``need_pool`` is False; metrics without their inputs are then skipped.
        """
        keys = npz_keys(path)
        if "repa_pipe_reference" in keys:
            with np.load(path, allow_pickle=False) as z:
                tag = str(z["repa_pipe_reference"])
                if tag != FORMAT_TAG:
                    raise BadInputError(f"{path}: reference format {tag!r}; this version reads {FORMAT_TAG!r}")
                meta = json.loads(str(z["meta"])) if "meta" in keys else {}
                meta["source"] = str(path)
                fields = {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "pool", "mu_dinov2", "sigma_dinov2")
                          if k in keys}
            ref = cls(meta=meta, **fields)
            if need_pool and ref.pool is None:
                raise BadInputError(f"{path}: stores no reference pool features, needed for precision/recall")
            return ref
        if "arr_0" in keys:
            return cls.from_adm_npz(path, inception, batch_size, need_pool)
        if "mu" in keys:
            if need_pool:
                raise BadInputError(f"{path}: holds statistics only (keys {keys}): no reference images or pool "
                                    "features for precision/recall; use an ADM reference batch with arr_0")
            with np.load(path, allow_pickle=False) as z:
                fields = {k: z[k] for k in ADM_STAT_KEYS if k in keys}
            return cls(meta={"source": str(path), "format": "stats-only"}, **fields)
        raise BadInputError(f"{path}: not a reference file (keys {keys}); expected an ADM reference batch "
                            "(arr_0 + mu/sigma/mu_s/sigma_s) or a file written by ReferenceStats.save")
