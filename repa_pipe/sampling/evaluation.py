"""Metrics of a sample npz under the ADM protocol, and the reference statistics they compare against."""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from numpy.lib import format as npy_format

from repa_pipe.cache.sources import load_preprocessed, open_source
from repa_pipe.metrics.evaluate import evaluate
from repa_pipe.metrics.inception import load_inception
from repa_pipe.metrics.npz_io import iter_npz_images, npz_image_count
from repa_pipe.metrics.reference import ReferenceStats
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.progress import log
from repa_pipe.sampling.config import SampleEvalConfig


class ReferenceSource:
    """Where default reference statistics come from: a cache's source images, stored in CACHE/stats."""

    def __init__(self, stats_dir: Path, images_root: str, resolution: int):
        self.stats_dir, self.images_root, self.resolution = Path(stats_dir), images_root, resolution


@dataclass
class Evaluator:
    """What the metrics need, loaded and checked before any sample is drawn (see `prepare_eval`)."""

    inception: Any
    dinov2: Optional[Callable]
    ref: Optional[ReferenceSource]


def prepare_eval(cfg: SampleEvalConfig, ref: Optional[ReferenceSource]) -> Optional[Evaluator]:
    """Load Inception (and DINOv2-L for FD_DINOv2) and check that reference statistics can be had, so that a
    missing file fails in seconds, before sampling, not after hours of it. None without --inception-weights."""
    if not cfg.inception_weights:
        return None
    device = dist.device()
    inception = load_inception(cfg.inception_weights, device)
    dinov2 = _dinov2_forward(cfg, device) if cfg.fd_dinov2 else None
    if cfg.ref_stats:
        if not Path(cfg.ref_stats).is_file():
            raise ConfigError(f"--ref-stats {cfg.ref_stats}: no such file")
    elif ref is None:
        raise ConfigError("no reference statistics: pass --ref-stats (an ADM reference npz such as "
                          "VIRTUAL_imagenet256_labeled.npz), or evaluate a run whose cache can be found (--cache)")
    elif not _stored_stats(cfg, inception, ref, dinov2).is_file() and not Path(ref.images_root).exists():
        raise ConfigError(f"no reference statistics: the cache's source images {ref.images_root} are gone and none "
                          f"are stored in {ref.stats_dir}; pass --ref-stats FILE")
    return Evaluator(inception, dinov2, ref)


def _stored_stats(cfg: SampleEvalConfig, inception, ref: ReferenceSource, dinov2: Optional[Callable]) -> Path:
    tag = f"inception-ref-{inception.weights_sha256[:8]}-{cfg.ref_images}" + ("-dinov2" if dinov2 else "")
    return ref.stats_dir / f"{tag}.npz"


def reference_stats(cfg: SampleEvalConfig, ev: Evaluator) -> ReferenceStats:
    """--ref-stats file, else statistics of the cache's source images (computed once, stored in CACHE/stats).

    `ev.dinov2` (a DINOv2-L CLS forward) adds the FD_DINOv2 reference statistics to those computed here."""
    inception, ref, dinov2 = ev.inception, ev.ref, ev.dinov2
    if cfg.ref_stats:
        return ReferenceStats.load(cfg.ref_stats, inception, cfg.eval_batch_size)
    path = _stored_stats(cfg, inception, ref, dinov2)
    if path.is_file():
        return ReferenceStats.load(path, inception, cfg.eval_batch_size)
    source = open_source(ref.images_root)
    n = min(cfg.ref_images, len(source))
    idx = np.sort(np.random.default_rng(0).permutation(len(source))[:n])

    def batches():
        for b in range(0, n, cfg.eval_batch_size):
            yield np.stack([load_preprocessed(source, int(i), ref.resolution)
                            for i in idx[b:b + cfg.eval_batch_size]])

    log(f"reference statistics from {n} source images of {ref.images_root} (stored in {path} for reuse)")
    stats = ReferenceStats.from_images(batches(), inception, cfg.eval_batch_size, dinov2_forward=dinov2,
                                       meta={"source": ref.images_root, "num_images": n,
                                             "resolution": ref.resolution})
    stats.save(path)
    return stats


def check_sample_npz(npz: Path) -> int:
    """Header (dtype, shape) and, unless the array is uint8, every value: a bad file fails before any model
    loads rather than after Inception (and the reference statistics) have run. Returns N."""
    n = npz_image_count(npz)
    if _arr0_dtype(npz) != np.uint8:
        for _ in iter_npz_images(npz, 1024):  # raises on the first value outside 0..255
            pass
    return n


def _arr0_dtype(npz: Path) -> Optional[np.dtype]:
    """dtype of arr_0 from its .npy header (None when the header version is not 1.0/2.0: check the values)."""
    with zipfile.ZipFile(npz) as zf, zf.open("arr_0.npy") as f:
        version = npy_format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return None
        read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        return np.dtype(read(f)[2])


def run_eval(cfg: SampleEvalConfig, npz: Path, ev: Optional[Evaluator]) -> Optional[dict[str, Any]]:
    """Metrics of an ADM-format npz; None (and one line saying why) without Inception weights."""
    if ev is None:
        log("metrics skipped: pass --inception-weights FILE (torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth) to compute FID, sFID, IS, precision and recall")
        return None
    n = check_sample_npz(npz)
    log(f"evaluating {n} samples from {npz}")
    stats = reference_stats(cfg, ev)
    metrics = evaluate(iter_npz_images(npz, cfg.eval_batch_size), stats, ev.inception, cfg.eval_batch_size,
                       ev.dinov2)
    log("  ".join(f"{k} {metrics[k]:.4f}" for k in ("fid", "sfid", "inception_score", "precision", "recall",
                                                      "fd_dinov2") if k in metrics))
    for note in metrics.get("notes", []):
        log(f"[yellow]note:[/] {note}")
    return jsonable(metrics)


def _dinov2_forward(cfg: SampleEvalConfig, device: torch.device):
    from repa_pipe.models.feature_encoders import load_encoder
    enc = load_encoder("dinov2-l", cfg.dinov2_weights, grid=16, device=device)
    return enc.cls_from_input


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (np.floating, np.integer)) else v) for k, v in d.items()
            if k != "features"}
