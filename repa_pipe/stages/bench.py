"""`repa-pipe bench`: training and sampling throughput on this device, from a real cache or a synthetic one in the
real format, with MFU, the data-wait share, peak memory, the step's split and projected wall times.

One process on `pipeline.dist.device()` (REPA_PIPE_DEVICE chooses). Every GPU figure in docs/benchmarks.md comes
from this command (bench/device_check.sh runs it).
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from repa_pipe.models.registry import SIT_PRESETS
from repa_pipe.pipeline import dist, hardware
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.precision import resolve
from repa_pipe.pipeline.progress import log
from repa_pipe.sampling.benchmark import bench_sampling, projected_sampling_minutes
from repa_pipe.training.bench_config import BenchConfig
from repa_pipe.training.benchmark import bench_train, cache_view, projected_train_hours, synthetic_cache
from repa_pipe.training.config import TrainConfig
from repa_pipe.training.state import build_model, encoder_depth_for


def _cache(cfg: BenchConfig, stack: ExitStack) -> Path:
    if cfg.cache is not None:
        return Path(cfg.cache)
    work = Path(cfg.work) if cfg.work is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
    patch = SIT_PRESETS[cfg.model].patch_size
    side = cfg.resolution // 8
    if cfg.resolution % 8 or side % patch:
        raise ConfigError(f"--resolution {cfg.resolution}: {cfg.model} (patch {patch}) needs latents (1/8 of the "
                          f"side) divisible by {patch}")
    n = max(2 * cfg.batch_size, 64)  # two batches per epoch: the reader's order changes between epochs
    log(f"bench: writing a synthetic {n}-row cache ({cfg.resolution} px) to {work / 'cache'}")
    return synthetic_cache(work / "cache", n, cfg.resolution, side // patch,
                           None if cfg.encoder == "none" else cfg.encoder)


def run(cfg: BenchConfig) -> dict[str, Any]:
    device = dist.device()
    name = hardware.device_name(device)
    peak, peak_note = hardware.peak_tflops(name) if device.type == "cuda" else (None, "CPU: MFU omitted")
    encoders = () if cfg.encoder == "none" else (cfg.encoder,)
    report: dict[str, Any] = {"device": name, "peak": peak_note, "train": [], "sampling": None}
    with ExitStack() as stack:
        cache = _cache(cfg, stack)
        view = cache_view(cache, encoders)
        train = TrainConfig(cache=cache, run_dir=cache.parent / "bench-run", model=cfg.model, encoder=encoders,
                            global_batch_size=cfg.batch_size, steps=cfg.warmup + cfg.steps,
                            precision=cfg.precision, loader_threads=cfg.loader_threads)
        for compiled in [c for c, on in ((False, cfg.eager), (True, cfg.compile)) if on]:
            f = bench_train(dataclasses.replace(train, compile=compiled), view, device, cfg.steps, cfg.warmup, peak)
            hours = projected_train_hours(f, cfg.train_steps, cfg.global_batch_size, cfg.gpus)
            report["train"].append({**f.to_json(), "projected_hours": hours})
            log(f"train {f.model} batch {f.batch} {f.precision}{' compiled' if compiled else ''}: "
                f"{f.images_per_s:,.1f} img/s, step {1e3 * f.step_s:,.1f} ms (fwd+bwd {1e3 * f.fwd_bwd_s:,.1f}, "
                f"optimizer+EMA {1e3 * f.optimizer_s:,.1f}), data wait {100 * f.data_wait_frac:.1f}%, "
                f"{f.tflops_per_s:,.1f} TFLOP/s ({f.gflop_per_image:,.1f} GFLOP/img), "
                + (f"MFU {100 * f.mfu:.1f}%" if f.mfu is not None else "MFU n/a")
                + f", peak memory {f.peak_memory_gib:,.2f} GiB ({f.memory_kind}), warm-up {f.warmup_s:,.1f} s; "
                f"{cfg.train_steps:,} steps x {cfg.global_batch_size} on {cfg.gpus} GPU(s) ~ {hours:,.1f} h")
        if cfg.sampling:
            model = build_model(train, view, encoder_depth_for(train)).to(device)
            prec = resolve(cfg.sample_precision, device, "sample")
            s = bench_sampling(model, device, prec, cfg.sample_batch_size, cfg.sample_measure_steps,
                               cfg.sample_steps, peak)
            minutes = projected_sampling_minutes(s, cfg.num_samples, cfg.gpus)
            report["sampling"] = {**s.to_json(), "projected_minutes": minutes}
            log(f"sample {cfg.model} batch {s.batch} {s.precision}: {s.rows_per_s:,.1f} rows/s, {s.schedule}: "
                f"{s.images_per_s:,.2f} img/s ({s.rows_per_image} rows per image), {s.tflops_per_s:,.1f} TFLOP/s, "
                + (f"MFU {100 * s.mfu:.1f}%" if s.mfu is not None else "MFU n/a")
                + f", peak memory {s.peak_memory_gib:,.2f} GiB; {cfg.num_samples:,} samples on {cfg.gpus} GPU(s) ~ "
                f"{minutes:,.1f} min")
    log(f"bench on {name}; {peak_note}. Projections assume the measured per-GPU rate and linear scaling.")
    if cfg.json is not None:
        Path(cfg.json).write_text(json.dumps(report, indent=2) + "\n")
    return report
