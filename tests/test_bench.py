"""`repa-pipe bench` on a CPU with a tiny model: every figure present and sane, from a synthetic cache in the real
format (written through the cache writer) or a given cache; the device peak table behind MFU."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from fixtures import invoke
from repa_pipe.cache.manifest import read_manifest
from repa_pipe.pipeline import hardware
from repa_pipe.stages import bench
from repa_pipe.training.bench_config import BenchConfig
from repa_pipe.training.benchmark import bench_train, cache_view, synthetic_cache
from repa_pipe.training.config import TrainConfig

TINY = dict(model="SiT-T/2", resolution=64, batch_size=8, steps=2, warmup=1, sample_batch_size=2,
            sample_measure_steps=2, loader_threads=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    yield


def check_train(t: dict, compiled: bool, steps: int = 2) -> None:
    assert t["model"] == "SiT-T/2" and t["batch"] == 8 and t["compiled"] is compiled and t["steps"] == steps
    for k in ("images_per_s", "step_s", "fwd_bwd_s", "optimizer_s", "peak_memory_gib", "gflop_per_image",
              "tflops_per_s", "projected_hours", "warmup_s"):
        assert t[k] > 0 and math.isfinite(t[k]), k
    assert 0.0 <= t["data_wait_frac"] <= 1.0
    assert t["fwd_bwd_s"] + t["optimizer_s"] <= t["step_s"] * 1.0001  # phases inside the step
    assert t["mfu"] is None  # a CPU has no peak in the table


def test_bench_reports_every_figure_from_a_synthetic_cache(tmp_path):
    out = tmp_path / "bench.json"
    r = invoke(["bench", *[a for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", v)],
                "--work", tmp_path / "w", "--json", out, "--gpus", 4, "--train-steps", 1000])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["device"].startswith("CPU") and "MFU omitted" in rep["peak"]
    [t] = rep["train"]
    check_train(t, compiled=False)
    # projection: steps x global batch / (per-GPU rate x GPUs)
    assert t["projected_hours"] == pytest.approx(1000 * 256 / (t["images_per_s"] * 4) / 3600)
    s = rep["sampling"]
    assert s["rows_per_image"] == 250 + 172 and s["precision"] == "fp32"  # auto on a CPU
    for k in ("rows_per_s", "images_per_s", "tflops_per_s", "peak_memory_gib", "projected_minutes"):
        assert s[k] > 0 and math.isfinite(s[k]), k
    assert s["images_per_s"] == pytest.approx(s["rows_per_s"] / 422)
    assert s["projected_minutes"] == pytest.approx(50_000 / (s["images_per_s"] * 4) / 60)
    # the synthetic cache is a real one: latents of the SD-VAE layout and dinov2-b tokens for patch 2
    m = read_manifest(tmp_path / "w" / "cache")
    assert m.arrays["latents/sd-vae-ft-mse"].spec.row_shape == (8, 8, 8)
    assert m.arrays["features/dinov2-b"].spec.row_shape == (16, 768)
    assert "train SiT-T/2 batch 8 bf16:" in r.output and "img/s" in r.output


def test_bench_reads_a_given_cache_and_can_skip_sampling(tmp_path):
    cache = synthetic_cache(tmp_path / "c", 16, 64, 4, None)
    before = sorted(p.name for p in cache.rglob("*"))
    rep = bench.run(BenchConfig(**{**TINY, "batch_size": 8}, cache=cache, encoder="none", sampling=False))
    check_train(rep["train"][0], compiled=False)
    assert rep["sampling"] is None
    assert sorted(p.name for p in cache.rglob("*")) == before  # read only


def test_bench_refuses_a_resolution_the_model_cannot_tile(tmp_path):
    r = invoke(["bench", "--model", "SiT-T/2", "--resolution", 72, "--work", tmp_path])
    assert r.exit_code == 1 and "--resolution 72: SiT-T/2 (patch 2) needs latents" in r.output


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H100 PCIe", None),
                                        ("Tesla T4", None)])
def test_peak_table(name, peak):
    got, note = hardware.peak_tflops(name)
    assert got == peak
    assert ("MFU omitted" in note) == (peak is None)


def test_mfu_is_the_analytic_rate_over_the_peak(tmp_path):
    cache = synthetic_cache(tmp_path / "c", 16, 64, 4, "dinov2-b")
    view = cache_view(cache, ("dinov2-b",))
    cfg = TrainConfig(cache=cache, run_dir=tmp_path / "r", model="SiT-T/2", global_batch_size=8, loader_threads=1)
    f = bench_train(cfg, view, torch.device("cpu"), steps=1, warmup=0, peak=100.0)
    assert f.mfu == pytest.approx(f.tflops_per_s / 100.0) and f.tflops_per_s == pytest.approx(
        f.images_per_s * f.gflop_per_image / 1e3)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_bench_compiled_step_on_cpu(tmp_path):
    rep = bench.run(BenchConfig(**{**TINY, "steps": 1}, work=tmp_path, compile=True, sampling=False))
    assert [t["compiled"] for t in rep["train"]] == [False, True]
    check_train(rep["train"][1], compiled=True, steps=1)
