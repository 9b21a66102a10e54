"""A whole `bench` command: training throughput on this device (training/benchmark.py) and, through the function
the stage hands in (sampling/ measures sampling; training does not import it), sampling throughput, from a real
cache or a synthetic one in the real format, with MFU, the data-wait share, peak memory, the step's split and
projected wall times.

One process on `pipeline.dist.device()` (REPA_PIPE_DEVICE chooses).
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from repa_pipe.models.registry import SIT_PRESETS
from repa_pipe.models.sit import SiT
from repa_pipe.pipeline import dist, hardware
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.progress import log
from repa_pipe.training.bench_config import BenchConfig
from repa_pipe.training.benchmark import bench_train, cache_view, projected_train_hours, synthetic_cache
from repa_pipe.training.config import TrainConfig
from repa_pipe.training.state import build_model, encoder_depth_for

# (model on the device, options, device, its peak TFLOP/s or None) -> the report's sampling section
MeasureSampling = Callable[[SiT, BenchConfig, torch.device, Optional[float]], dict[str, Any]]


@dataclass
class BenchReport:
    device: str
    peak: str                                   # the peak's source, or why MFU is omitted
    train: list[dict[str, Any]] = field(default_factory=list)
    sampling: Optional[dict[str, Any]] = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        return f"bench on {self.device}; {self.peak}. Projections assume the measured per-GPU rate and linear scaling."


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


def bench(cfg: BenchConfig, measure_sampling: MeasureSampling) -> BenchReport:
    """Measure the training step (eager and/or compiled) and, with `cfg.sampling`, sampling on a freshly built
    model of the same shape; log one line per measurement and write `cfg.json` if given."""
    device = dist.device()
    name = hardware.device_name(device)
    peak, peak_note = hardware.peak_tflops(name) if device.type == "cuda" else (None, "CPU: MFU omitted")
    encoders = () if cfg.encoder == "none" else (cfg.encoder,)
    report = BenchReport(device=name, peak=peak_note)
    with ExitStack() as stack:
        cache = _cache(cfg, stack)
        view = cache_view(cache, encoders)
        train = TrainConfig(cache=cache, run_dir=cache.parent / "bench-run", model=cfg.model, encoder=encoders,
                            global_batch_size=cfg.batch_size, steps=cfg.warmup + cfg.steps,
                            precision=cfg.precision, loader_threads=cfg.loader_threads)
        for compiled in [c for c, on in ((False, cfg.eager), (True, cfg.compile)) if on]:
            f = bench_train(dataclasses.replace(train, compile=compiled), view, device, cfg.steps, cfg.warmup, peak)
            hours = projected_train_hours(f, cfg.train_steps, cfg.global_batch_size, cfg.gpus)
            report.train.append({**f.to_json(), "projected_hours": hours})
            log(f"train {f.model} batch {f.batch} {f.precision}{' compiled' if compiled else ''}: "
                f"{f.images_per_s:,.1f} img/s, step {1e3 * f.step_s:,.1f} ms (fwd+bwd {1e3 * f.fwd_bwd_s:,.1f}, "
                f"optimizer+EMA {1e3 * f.optimizer_s:,.1f}), data wait {100 * f.data_wait_frac:.1f}%, "
                f"{f.tflops_per_s:,.1f} TFLOP/s ({f.gflop_per_image:,.1f} GFLOP/img), "
                + (f"MFU {100 * f.mfu:.1f}%" if f.mfu is not None else "MFU n/a")
                + f", peak memory {f.peak_memory_gib:,.2f} GiB ({f.memory_kind}), warm-up {f.warmup_s:,.1f} s; "
                f"{cfg.train_steps:,} steps x {cfg.global_batch_size} on {cfg.gpus} GPU(s) ~ {hours:,.1f} h")
        if cfg.sampling:
            model = build_model(train, view, encoder_depth_for(train)).to(device)
            report.sampling = measure_sampling(model, cfg, device, peak)
    if cfg.json is not None:
        Path(cfg.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report
