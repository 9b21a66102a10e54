"""Training throughput on this device: the real step (`BatchStream` -> `forward_backward` -> `optimizer_step`)
timed phase by phase, from a real cache or a synthetic one in the real format.

FLOPs are the model's own analytic count (`models.sit.flops_per_sample`: matmuls and attention, 2 per
multiply-add), times 3 for forward + backward, the count training's metrics use; MFU is that rate over the
device's peak dense bf16 rate (`pipeline.hardware`), whatever precision ran.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from repa_pipe.cache import writer
from repa_pipe.cache.manifest import Dataset, TrainingView, features_spec, latents_spec, read_manifest, training_view
from repa_pipe.cache.reader import check_labels, check_ready
from repa_pipe.models.registry import ENCODERS
from repa_pipe.models.sit import flops_per_sample
from repa_pipe.pipeline import hardware
from repa_pipe.pipeline.hashing import hash_lines, sha256_int64
from repa_pipe.training.config import TrainConfig
from repa_pipe.training.state import new_state
from repa_pipe.training.step import forward_backward, optimizer_step, wrap
from repa_pipe.training.stream import BatchStream

SD_VAE = {"name": "sd-vae-ft-mse", "latent_channels": 4, "downsample": 8, "scaling_factor": 0.18215}


def synthetic_cache(root: Path, n: int, resolution: int, grid: int, encoder: Optional[str], num_classes: int = 1000,
                    shard_size: int = 256, seed: int = 0) -> Path:
    """A cache of n rows through the project's writer: SD-VAE posterior moments (n, 8, r/8, r/8) float32 (mean
    ~ N(0, 25), std in [0.01, 0.11]) and, with an encoder, its patch tokens (n, grid^2, D) float16 ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    keys = [f"synthetic/{i:08d}" for i in range(n)]
    labels = np.arange(n, dtype=np.int64) % num_classes
    ds = Dataset(kind="synthetic", root="repa-pipe bench", n=n, num_classes=num_classes,
                 file_list_sha256=hash_lines(keys), labels_sha256=sha256_int64(labels))
    writer.open_or_create(root, ds, keys, labels, resolution, min(shard_size, n))
    side = resolution // SD_VAE["downsample"]
    codec = {**SD_VAE, "weights_id": "synthetic", "weights_hash": "none", "is_random_init": True}
    specs = [latents_spec(codec, n, resolution, "float32", "fp32")]
    if encoder is not None:
        enc = {"name": encoder, "grid": grid, "embed_dim": ENCODERS[encoder].embed_dim, "weights_id": "synthetic",
               "weights_hash": "none", "is_random_init": True, "tokens": "synthetic N(0, 1)"}
        specs.append(features_spec(enc, n, resolution, "float16", "fp32"))
    for spec in specs:
        m = writer.ensure_array(root, spec)
        w = writer.ShardWriter(root, m, spec.name)
        for k in w.pending(range(m.num_shards)):
            lo, hi = m.shard_range(k)
            if spec.kind == "latents":  # (rows, 2C, s, s): mean, then std
                data = np.concatenate([rng.standard_normal((hi - lo, 4, side, side), dtype=np.float32) * 5,
                                       rng.random((hi - lo, 4, side, side), dtype=np.float32) * 0.1 + 0.01], axis=1)
            else:  # (rows, T, D)
                data = rng.standard_normal((hi - lo, *spec.row_shape), dtype=np.float32).astype(np.float16)
            w.write(k, data, [])
        writer.finalize(root, spec.name)
    return root


def cache_view(cache: Path, encoders: tuple[str, ...]) -> TrainingView:
    """The training view of a cache, every array it names checked on disk (as train does)."""
    m = read_manifest(cache)
    view = training_view(m, check_labels(cache, m), None, encoders)
    check_ready(cache, m, [view.latents, *view.features])
    return view


@dataclass
class TrainFigures:
    """One measured configuration of the training step on one device (times are per step, medians not used:
    `steps` consecutive steps, each phase ended by a device synchronisation)."""

    model: str
    batch: int
    precision: str
    compiled: bool
    steps: int
    images_per_s: float
    step_s: float
    fwd_bwd_s: float           # forward + backward of the step's micro-batches
    optimizer_s: float         # unscale, clip, AdamW, EMA
    data_wait_frac: float      # share of the wall time spent waiting for the loader's next batch
    warmup_s: float            # the first --warmup steps (with compile: the compilation)
    peak_memory_gib: float
    memory_kind: str
    gflop_per_image: float     # forward + backward, analytic
    tflops_per_s: float
    mfu: Optional[float]       # None: the device's peak is not known

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def bench_train(cfg: TrainConfig, view: TrainingView, device: torch.device, steps: int, warmup: int,
                peak: Optional[float]) -> TrainFigures:
    """Time `steps` training steps of `cfg` (one process, `cfg.global_batch_size` rows) after `warmup` steps."""
    state = new_state(cfg, view, device)
    state.model.train()
    rt = wrap(cfg, state.model, cfg.global_batch_size, device)
    stream = BatchStream(Path(cfg.cache), view, cfg.global_batch_size, cfg.seed, 0, 1, cfg.label_dropout, 0,
                         warmup + steps, threads=cfg.loader_threads)
    try:
        t0 = time.perf_counter()
        for _ in range(warmup):
            forward_backward(cfg, view, state, rt, next(stream))
            optimizer_step(cfg, state)
        hardware.synchronize(device)
        warmup_s = time.perf_counter() - t0
        hardware.reset_peak_memory(device)
        wait0, fb, opt = stream.wait_s, 0.0, 0.0
        start = time.perf_counter()
        for _ in range(steps):
            batch = next(stream)
            a = time.perf_counter()
            forward_backward(cfg, view, state, rt, batch)
            hardware.synchronize(device)
            b = time.perf_counter()
            optimizer_step(cfg, state)
            hardware.synchronize(device)
            fb, opt = fb + b - a, opt + time.perf_counter() - b
        wall = time.perf_counter() - start
        wait = stream.wait_s - wait0
    finally:
        stream.close()
    mem, kind = hardware.peak_memory(device)
    flops = 3 * flops_per_sample(state.model)  # forward + backward per image
    ips = steps * cfg.global_batch_size / wall
    tflops = ips * flops / 1e12
    return TrainFigures(model=cfg.model, batch=cfg.global_batch_size, precision=cfg.precision, compiled=cfg.compile,
                        steps=steps, images_per_s=ips, step_s=wall / steps, fwd_bwd_s=fb / steps,
                        optimizer_s=opt / steps, data_wait_frac=min(1.0, max(0.0, wait / wall)), warmup_s=warmup_s,
                        peak_memory_gib=mem, memory_kind=kind, gflop_per_image=flops / 1e9, tflops_per_s=tflops,
                        mfu=tflops / peak if peak else None)


def projected_train_hours(f: TrainFigures, train_steps: int, global_batch: int, gpus: int) -> float:
    """Wall hours for `train_steps` steps of `global_batch` on `gpus` GPUs at the measured per-GPU rate (linear
    scaling: DDP's all-reduce overlapped with the backward; the per-GPU batch there is global_batch / gpus)."""
    return train_steps * global_batch / (f.images_per_s * gpus) / 3600
