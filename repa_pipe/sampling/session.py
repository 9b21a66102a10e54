"""A whole `sample-eval` command: sample from a trained SiT (SDE/ODE, guidance interval) and evaluate under ADM.

Shards of samples are written as they finish (resume skips them; see sampling/sampler.py for what a sample
depends on), then OUT/samples.npz (ADM format), OUT/grid.png, OUT/metrics.json and OUT/manifest.json.
The run's record says which codec made the latents and where its cache is; nothing walks back to the cache's
manifest or the image folder unless metrics need reference statistics that are not stored yet.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from repa_pipe import __version__
from repa_pipe.cache.layout import CachePaths
from repa_pipe.cache.lock import HolderLock
from repa_pipe.cache.manifest import TrainingView, is_cache
from repa_pipe.pipeline import dist, images
from repa_pipe.pipeline.config import to_dict
from repa_pipe.pipeline.errors import ConfigError, MissingWeightsError, OutputBusyError
from repa_pipe.pipeline.fileio import atomic_write_json
from repa_pipe.pipeline.hashing import hash_state_dict
from repa_pipe.pipeline.progress import log
from repa_pipe.run.record import locate_cache, read_record
from repa_pipe.sampling import shards
from repa_pipe.sampling.config import SampleEvalConfig
from repa_pipe.sampling.decode import choose_decoder, make_decoder
from repa_pipe.sampling.evaluation import Evaluator, ReferenceSource, check_sample_npz, prepare_eval, run_eval
from repa_pipe.sampling.sampler import Sampler, run_sampling, sampling_key
from repa_pipe.run.model import LoadedModel, load_model

GRID_N = 64
OUT_LOCK = ".sample-eval.lock"


def out_lock(out: Path) -> HolderLock:
    """The lock one sample-eval job holds on its --out for its whole run: a second job on the same folder would
    mix its shards into the first one's npz (with other seeds or settings), so it is refused, naming the holder."""
    return HolderLock(Path(out) / OUT_LOCK, lambda holder: OutputBusyError(
        f"--out {out}: another sample-eval is writing this folder ({holder}); wait for it to finish, or use "
        "another --out"))


def make_sampler(cfg: SampleEvalConfig, device: torch.device) -> tuple[Sampler, LoadedModel]:
    loaded = load_model(cfg.run_dir, cfg.ckpt, cfg.model, device)
    view = loaded.ck.view or _record_view(cfg.run_dir)
    if cfg.vae is None and view is None:
        raise ConfigError("cannot tell which VAE decodes these latents: pass --vae (e.g. sd-vae-ft-ema) "
                          "and --vae-weights DIR")
    name, weights = choose_decoder(view.codec if view is not None else None, cfg.vae, cfg.vae_weights)
    return Sampler(cfg, loaded.model, make_decoder(name, weights, device), device, (name, weights)), loaded


def _record_view(run_dir: Optional[Path]) -> Optional[TrainingView]:
    record = read_record(run_dir) if run_dir is not None else None
    return record.cache.view if record is not None else None


def reference_source(cfg: SampleEvalConfig, loaded: Optional[LoadedModel]) -> Optional[ReferenceSource]:
    """The cache's stats folder and source images for default reference statistics (None: not known)."""
    if cfg.ref_stats or not cfg.inception_weights:
        return None
    record = read_record(cfg.run_dir) if cfg.run_dir is not None else None
    if record is not None:
        cache = locate_cache(cfg.run_dir, record, cfg.cache)
        view = record.cache.view
    elif cfg.cache is not None and loaded is not None and loaded.ck.view is not None:
        cache, view = Path(cfg.cache), loaded.ck.view
    else:
        return None
    return ReferenceSource(CachePaths(cache).stats, view.dataset_root, view.resolution)


def eval_only(cfg: SampleEvalConfig) -> None:
    if not dist.is_main():
        return
    check_sample_npz(Path(cfg.eval_only))
    if not cfg.inception_weights:  # nothing else to do: exit 1 rather than a silent no-op
        raise MissingWeightsError("--eval-only computes metrics: pass --inception-weights FILE "
                                  "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
    metrics = run_eval(cfg, Path(cfg.eval_only), prepare_eval(cfg, reference_source(cfg, None)))
    if metrics is not None:
        atomic_write_json(Path(cfg.out) / "metrics.json", metrics)


@dataclass(frozen=True)
class Written:
    npz: Path
    grid: Path
    metrics: Optional[Path]

    def summary(self) -> str:
        return f"wrote {self.npz}, {self.grid}" + (f", {self.metrics}" if self.metrics is not None else "")


def sample_and_evaluate(cfg: SampleEvalConfig) -> Optional[Written]:
    """Sample (resuming finished shards), assemble the npz and grid, evaluate; what rank 0 wrote (None on other
    ranks and for --eval-only)."""
    if cfg.cache is not None and not is_cache(Path(cfg.cache)):  # refused even when no metric would read it
        raise ConfigError(f"--cache {cfg.cache}: not a repa-pipe cache (no manifest.json)")
    dist.init()
    if cfg.eval_only is not None:
        eval_only(cfg)
        return None
    out = Path(cfg.out)
    device = dist.device()
    s, loaded = make_sampler(cfg, device)
    # Metrics' inputs (weights, reference statistics, a moved cache) fail now, not after sampling. Rank 0 loads
    # the metric models and keeps them; its error, if any, stops every rank.
    kept: list = []
    dist.run_on_rank0(lambda: kept.append(prepare_eval(cfg, reference_source(cfg, loaded))))
    ev = kept[0] if kept else None
    log(f"sample-eval: {loaded.kind} {loaded.source} (step {loaded.step}), {cfg.num_samples} samples, "
        f"{cfg.mode} {cfg.num_steps} steps, cfg {cfg.cfg_scale} on t in [{cfg.guidance_interval}], "
        f"decoder {s.decoder_id[0]}")
    weights_hash = hash_state_dict(loaded.model.state_dict())
    lock = out_lock(out)
    dist.run_on_rank0(lambda: lock.acquire() and None)  # before anything in --out is read or written
    try:
        return _sample_and_write(cfg, s, loaded, ev, weights_hash)
    finally:
        lock.release()


def _sample_and_write(cfg: SampleEvalConfig, s: Sampler, loaded: LoadedModel, ev: Optional[Evaluator],
                      weights_hash: str) -> Optional[Written]:
    """The shards (checked against the folder's settings first), then rank 0: npz, grid, metrics, manifest."""
    out = Path(cfg.out)
    n_shards = run_sampling(cfg, s, sampling_key(cfg, s, weights_hash))
    if not dist.is_main():
        return None
    h, w = shards.read_shard(out, 0)[0].shape[1:3]
    npz = out / "samples.npz"
    shards.assemble_npz(out, npz, n_shards, cfg.num_samples, (h, w))
    images.save_grid(shards.first_images(out, n_shards, GRID_N), out / "grid.png")
    metrics = run_eval(cfg, npz, ev)
    if metrics is not None:
        atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "manifest.json", {
        "tool": f"repa-pipe {__version__}", "config": to_dict(cfg), "weights": loaded.source,
        "weights_kind": loaded.kind, "weights_state_sha256": weights_hash, "decoder": list(s.decoder_id),
        "step": loaded.step, "num_samples": cfg.num_samples, "image_size": [h, w],
        "uint8": "(x+1)/2, clamp(255x, 0, 255), truncated to uint8 (the reference's conversion)",
        "samples_npz": str(npz), "metrics": "metrics.json" if metrics is not None else None})
    return Written(npz, out / "grid.png", out / "metrics.json" if metrics is not None else None)
