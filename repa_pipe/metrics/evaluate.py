"""The ADM evaluation in one call: FID, sFID, IS, precision, recall (+ FD_DINOv2 on request)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from repa_pipe.metrics.dinov2 import ForwardCls, dinov2_batch_features
from repa_pipe.metrics.fd import compute_stats, frechet_distance
from repa_pipe.metrics.inception import InceptionFeatures
from repa_pipe.metrics.inception_score import ADM_SPLIT_SIZE, inception_score
from repa_pipe.metrics.npz_io import ImageBatches, iter_batches
from repa_pipe.metrics.precision_recall import precision_recall
from repa_pipe.metrics.reference import ReferenceStats
from repa_pipe.pipeline.errors import BadInputError, ConfigError

ADM_NUM_SAMPLES = 50_000


def evaluate(sample_images: ImageBatches, reference: ReferenceStats, inception: InceptionFeatures,
             batch_size: int = 64, fd_dinov2: Optional[ForwardCls] = None, *,
             pr_distance_dtype: str = "float16", pr_batch_size: int = 10000, fd_method: str = "sqrtm",
             is_split_size: int = ADM_SPLIT_SIZE, return_features: bool = False) -> Dict[str, Any]:
    """Score uint8 samples (N, H, W, 3) (or an iterable of batches, read once) against ``reference``.

    Returns {fid, sfid, inception_score, precision, recall, [fd_dinov2], num_samples, num_reference_pr,
    skipped: {metric: reason}, notes: [...]}. Metrics whose reference inputs are missing are skipped, not
    guessed. ``fd_dinov2`` is a DINOv2 CLS forward callable; it needs ``reference.mu_dinov2``.
    ``return_features`` adds ``features``: {pool, logits, spatial[, dinov2]} arrays of the samples.
    Defaults follow ADM: fp16-first P/R distances, scipy sqrtm FD, IS splits of 5000.
    """
    if fd_dinov2 is not None and reference.mu_dinov2 is None:
        raise ConfigError("FD_DINOv2 requested but the reference statistics hold no mu_dinov2/sigma_dinov2; "
                          "build them with ReferenceStats.from_images(..., dinov2_forward=...)")
    parts: Dict[str, list] = {"pool": [], "logits": [], "spatial": [], "dinov2": []}
    for batch in iter_batches(sample_images, batch_size, where="sample images"):
        for key, value in inception.extract_batch(batch).items():
            parts[key].append(value)
        if fd_dinov2 is not None:
            parts["dinov2"].append(dinov2_batch_features(fd_dinov2, batch, inception.device))
    if not parts["pool"]:
        raise BadInputError("evaluate: no sample images")
    pool = np.concatenate(parts["pool"])  # (N, 2048)
    n = int(pool.shape[0])
    out: Dict[str, Any] = {"num_samples": n, "skipped": {}, "notes": []}

    out["fid"] = frechet_distance(*compute_stats(pool), reference.mu, reference.sigma, method=fd_method)
    if reference.mu_s is not None:
        spatial = np.concatenate(parts["spatial"])  # (N, 2023)
        out["sfid"] = frechet_distance(*compute_stats(spatial), reference.mu_s, reference.sigma_s,
                                       method=fd_method)
    else:
        out["skipped"]["sfid"] = "reference has no mu_s/sigma_s"
    out["inception_score"] = inception_score(np.concatenate(parts["logits"]), split_size=is_split_size)
    if reference.pool is not None:
        out["precision"], out["recall"] = precision_recall(
            reference.pool, pool, k=3, row_batch_size=pr_batch_size, col_batch_size=pr_batch_size,
            distance_dtype=pr_distance_dtype, device=inception.device)
        out["num_reference_pr"] = int(reference.pool.shape[0])
    else:
        out["skipped"]["precision"] = out["skipped"]["recall"] = "reference has no pool features"
    if fd_dinov2 is not None:
        out["fd_dinov2"] = frechet_distance(*compute_stats(np.concatenate(parts["dinov2"])),
                                            reference.mu_dinov2, reference.sigma_dinov2, method=fd_method)

    if n != ADM_NUM_SAMPLES:
        out["notes"].append(f"{n} samples: published numbers use {ADM_NUM_SAMPLES}; FID is biased by sample count")
    if not inception.official_weights:
        out["notes"].append("Inception weights are not the published file (sha256 prefix 6726825d): "
                            "numbers are not comparable to papers")
    out["pr_distance_dtype"] = pr_distance_dtype
    out["fd_method"] = fd_method
    out["inception_sha256"] = inception.weights_sha256
    if return_features:
        out["features"] = {k: np.concatenate(v) for k, v in parts.items() if v}
    return out
