"""Sampling throughput on this device: sample-eval's sampler (`models.samplers.sample`, per-sample generators,
the precision scope of `Sampler.batch`) timed over a few SDE steps, all guided, and projected onto a full schedule.

A guided evaluation runs 2B rows, an unguided one B; the SDE schedule of N steps with guidance on [lo, hi] needs
`model_evals + guided_steps` rows per image (422 for N = 250 on [0, 0.7]). The projection assumes the measured
rows/s at 2B rows for every row (unguided steps run B rows, a little less efficiently on a GPU). The VAE decode is
left out (about 0.3% of the model FLOPs of a 250-step SiT-XL/2 sample).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Optional, Protocol

import torch

from repa_pipe.models.samplers import PerSampleRandn, guided_steps, model_evals, sample
from repa_pipe.models.sit import SiT, flops_per_sample
from repa_pipe.pipeline import hardware
from repa_pipe.pipeline.precision import compute, resolve
from repa_pipe.pipeline.progress import log

CFG_SCALE, INTERVAL = 1.8, (0.0, 0.7)  # the paper's headline sampler


@dataclass
class SampleFigures:
    batch: int
    precision: str
    measured_steps: int
    rows_per_s: float            # model rows (one sample at one step) per second, at 2B rows per forward
    schedule: str
    rows_per_image: int
    images_per_s: float          # for the full schedule
    peak_memory_gib: float
    memory_kind: str
    tflops_per_s: float
    mfu: Optional[float]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def bench_sampling(model: SiT, device: torch.device, precision: str, batch: int, measure_steps: int,
                   schedule_steps: int, peak: Optional[float]) -> SampleFigures:
    model.eval()
    randn = PerSampleRandn(range(batch), device)
    h, w = model.input_size
    z = randn((model.in_channels, h, w))                      # (B, C, h, w)
    y = randn.randint(model.num_classes)

    def run(steps: int, stats: Optional[dict] = None) -> None:
        with compute(precision, device):
            sample(model.forward_velocity, z, y, mode="sde", num_steps=steps, cfg_scale=CFG_SCALE,
                   guidance_interval=(0.0, 1.0), null_class=model.null_class, randn=randn, stats=stats)

    run(2)  # warm-up: kernels chosen, memory allocated
    hardware.synchronize(device)
    hardware.reset_peak_memory(device)
    stats: dict = {}
    t0 = time.perf_counter()
    run(measure_steps, stats)
    hardware.synchronize(device)
    dt = time.perf_counter() - t0
    rows_per_s = stats["rows"] / dt
    per_image = model_evals(schedule_steps, "sde") + guided_steps(schedule_steps, "sde", INTERVAL)
    mem, kind = hardware.peak_memory(device)
    tflops = rows_per_s * flops_per_sample(model, with_projectors=False) / 1e12
    return SampleFigures(batch=batch, precision=precision, measured_steps=measure_steps, rows_per_s=rows_per_s,
                         schedule=f"SDE {schedule_steps} steps, cfg {CFG_SCALE} on {list(INTERVAL)}",
                         rows_per_image=per_image, images_per_s=rows_per_s / per_image, peak_memory_gib=mem,
                         memory_kind=kind, tflops_per_s=tflops, mfu=tflops / peak if peak else None)


def projected_sampling_minutes(f: SampleFigures, num_samples: int, gpus: int) -> float:
    return num_samples / (f.images_per_s * gpus) / 60


class SamplingOptions(Protocol):
    """The options `sampling_section` reads (`repa-pipe bench`'s config has them; it lives in training/)."""

    model: str
    sample_precision: str
    sample_batch_size: int
    sample_measure_steps: int
    sample_steps: int
    num_samples: int
    gpus: int


def sampling_section(model: SiT, opts: SamplingOptions, device: torch.device, peak: Optional[float]) -> dict[str, Any]:
    """`repa-pipe bench`'s sampling figures for `model` (already on `device`) with the projected sample-eval
    minutes, logged as one line."""
    s = bench_sampling(model, device, resolve(opts.sample_precision, device, "sample"), opts.sample_batch_size,
                       opts.sample_measure_steps, opts.sample_steps, peak)
    minutes = projected_sampling_minutes(s, opts.num_samples, opts.gpus)
    log(f"sample {opts.model} batch {s.batch} {s.precision}: {s.rows_per_s:,.1f} rows/s, {s.schedule}: "
        f"{s.images_per_s:,.2f} img/s ({s.rows_per_image} rows per image), {s.tflops_per_s:,.1f} TFLOP/s, "
        + (f"MFU {100 * s.mfu:.1f}%" if s.mfu is not None else "MFU n/a")
        + f", peak memory {s.peak_memory_gib:,.2f} GiB; {opts.num_samples:,} samples on {opts.gpus} GPU(s) ~ "
        f"{minutes:,.1f} min")
    return {**s.to_json(), "projected_minutes": minutes}
