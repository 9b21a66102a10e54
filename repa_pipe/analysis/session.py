"""A whole `analyze` command: the paper's representation analysis of a run's EMA model against the cached encoder
features (CKNNA and linear probes per block and noise level; see analysis/alignment.py for the protocol).

Reads only the run and its cache, like training: no image, no encoder, no VAE.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from repa_pipe.analysis import report
from repa_pipe.analysis.alignment import Analysis, analyze_model
from repa_pipe.analysis.config import AnalyzeConfig, parse_times
from repa_pipe.cache.manifest import Manifest, TrainingView, read_manifest
from repa_pipe.cache.reader import CacheReader, check_ready
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.errors import CacheMismatchError, ConfigError
from repa_pipe.pipeline.precision import resolve
from repa_pipe.pipeline.progress import log
from repa_pipe.run.model import load_model
from repa_pipe.run.record import RECORD, locate_cache, read_record


def choose_features(asked: Optional[str], view: TrainingView, m: Manifest) -> str:
    """--encoder, else the run's first aligned encoder, else the cache's only features array."""
    if asked:
        name = f"features/{asked}"
        m.array(name, "--encoder")
        return name
    if view.features:
        return view.features[0]
    names = m.names("features")
    if len(names) != 1:
        raise ConfigError(f"this run aligned no encoder and the cache has {len(names)} features arrays "
                          f"({', '.join(names) or 'none'}); pass --encoder")
    return names[0]


def subset(valid: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n of the usable rows, a seeded random choice, in row order (all of them when there are fewer)."""
    if len(valid) <= n:
        return valid
    return np.sort(np.random.default_rng(seed).choice(valid, size=n, replace=False))


@dataclass(frozen=True)
class Analyzed:
    analysis: Analysis
    json: Path
    png: Path


def analyze_run(cfg: AnalyzeConfig) -> Analyzed:
    """Analyze the run's EMA model (its newest checkpoint or --ckpt) on rows of its cache; write
    RUN/analysis/step<N>.json and .png."""
    times = parse_times(cfg.times)
    run_dir = Path(cfg.run_dir)
    record = read_record(run_dir)
    if record is None:
        raise ConfigError(f"{run_dir}: not a training run (no {RECORD}); pass the --run-dir of `repa-pipe train`")
    device = dist.device()
    loaded = load_model(run_dir, cfg.ckpt, None, device)
    view = loaded.ck.view or record.cache.view
    cache = locate_cache(run_dir, record, cfg.cache)
    m = read_manifest(cache)
    features = choose_features(cfg.encoder, view, m)
    try:
        check_ready(cache, m, [view.latents, features])
        lat = m.array(view.latents).spec
    except CacheMismatchError as e:
        raise CacheMismatchError(f"{cache}: {e}") from None
    if lat.row_shape[1:] != tuple(loaded.model.input_size):
        raise CacheMismatchError(f"{cache}: {view.latents} is {lat.row_shape[1:]}, the model takes "
                                 f"{tuple(loaded.model.input_size)}: not this run's cache (--cache)")
    reader = CacheReader(cache, [view.latents, features], threads=4)
    try:
        rows = subset(reader.valid_indices(), cfg.num_samples, cfg.seed)
        log(f"analyze: {loaded.kind} {loaded.source} (step {loaded.step}), {len(rows)} rows of {cache}, "
            f"{features}, t in {list(times)}")
        a = analyze_model(loaded.model, reader, view.latents, features, rows, scaling_factor=view.scaling_factor,
                          path=loaded.ck.facts.path, times=times, topk=cfg.topk, holdout=cfg.probe_holdout,
                          batch_size=cfg.batch_size, precision=resolve(cfg.precision, device, "analyze"), seed=cfg.seed,
                          device=device,
                          aligned_block=loaded.model.encoder_depth if loaded.model.z_dims else None)
    finally:
        reader.close()
    a.meta.update(step=loaded.step, checkpoint=loaded.source)
    js, png = report.save(a, run_dir / "analysis", f"step{loaded.step or 0:07d}")
    return Analyzed(a, js, png)
