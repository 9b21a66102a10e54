"""`repa-pipe bench`: training and sampling throughput on this device, from a real cache or a synthetic one in the
real format, with MFU, the data-wait share, peak memory, the step's split and projected wall times
(training/bench_session.py; sampling's figures from sampling/benchmark.py).

Every GPU figure in docs/benchmarks.md comes from this command (bench/device_check.sh runs it).
"""
from __future__ import annotations

from typing import Any

from repa_pipe.pipeline.progress import log
from repa_pipe.sampling.benchmark import sampling_section
from repa_pipe.training.bench_config import BenchConfig
from repa_pipe.training.bench_session import bench


def run(cfg: BenchConfig) -> dict[str, Any]:
    report = bench(cfg, sampling_section)
    log(report.summary())
    return report.to_json()
