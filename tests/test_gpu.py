"""CUDA checks, marker `gpu` (deselected by default; `python -m pytest -m gpu` on a GPU machine, as
bench/device_check.sh does). Each skips cleanly without a GPU (or without 2 for the NCCL test).

What holds on CUDA, and the tolerance each test states (docs/numerics.md, "Per device"): bitwise equality is a CPU
promise. On CUDA, SDPA's flash / memory-efficient backward accumulates with atomics (run-to-run order), GEMM
kernels are chosen by shape (a rank's 4 rows vs one process's 8), TF32 and bf16 round differently, and NCCL sums
in its own order; so resume and world-size equality hold within tolerances:
- losses: relative 1e-3 in fp32 with TF32 off;
- weights: 2 * lr * steps absolute (Adam moves an element by about lr per step whatever the gradient's size, so a
  rounding difference in a near-zero gradient element can move it by up to 2 lr per step);
- bf16 autocast vs fp32: per-step loss within 2% relative over 10 SiT-S/2 steps.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import VENV_BIN
from repa_pipe.pipeline import checkpoint, dist
from repa_pipe.stages import sample_eval, train
from repa_pipe.training.benchmark import cache_view, synthetic_cache
from repa_pipe.training.config import TrainConfig
from repa_pipe.training.stream import BatchStream
from test_sample_eval import config as se_config, setup  # noqa: F401 (fixture)

pytestmark = pytest.mark.gpu

LR = 1e-3
LOSS_RTOL_FP32 = 1e-3
BF16_LOSS_RTOL = 2e-2


@pytest.fixture(scope="module")
def s2_cache(tmp_path_factory) -> Path:
    """64 rows at 256 px: SD-VAE latents 8x32x32 and dinov2-b tokens 16x16x768, for SiT-S/2."""
    return synthetic_cache(tmp_path_factory.mktemp("gpu") / "c", 64, 256, 16, "dinov2-b")


def cfg(cache: Path, run: Path, **kw) -> TrainConfig:
    base = dict(model="SiT-S/2", encoder=("dinov2-b",), global_batch_size=8, steps=4, lr=LR, log_every=1,
                ckpt_every=1000, sample_every=0, loader_threads=2, precision="fp32", tf32=False)
    return TrainConfig(cache=cache, run_dir=run, **{**base, **kw})


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def ck(run: Path, step: int) -> dict:
    return torch.load(checkpoint.ckpt_path(run, step), weights_only=True, map_location="cpu")


def assert_within(a: Path, b: Path, steps: int) -> None:
    np.testing.assert_allclose(losses(a), losses(b), rtol=LOSS_RTOL_FP32)
    x, y = ck(a, steps), ck(b, steps)
    for part in ("model", "ema"):
        for k in y[part]:
            torch.testing.assert_close(x[part][k], y[part][k], rtol=0, atol=2 * LR * steps, msg=f"{part} {k}")


def test_bf16_loss_matches_fp32_on_sit_s2_and_leaves_tf32_alone(cuda, s2_cache, tmp_path):
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    train.run(cfg(s2_cache, tmp_path / "bf16", steps=10, precision="bf16", tf32=True))
    train.run(cfg(s2_cache, tmp_path / "fp32", steps=10))
    np.testing.assert_allclose(losses(tmp_path / "bf16"), losses(tmp_path / "fp32"), rtol=BF16_LOSS_RTOL)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    assert ck(tmp_path / "bf16", 10)["opt"]["param_groups"][0]["fused"] is True


def test_resume_on_cuda_within_tolerance(cuda, s2_cache, tmp_path):
    train.run(cfg(s2_cache, tmp_path / "whole"))
    train.run(cfg(s2_cache, tmp_path / "split", steps=2))
    train.run(cfg(s2_cache, tmp_path / "split"))
    assert_within(tmp_path / "split", tmp_path / "whole", 4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_nccl_ranks_match_one_process_within_tolerance(cuda, s2_cache, tmp_path):
    env = {**os.environ, dist.DEVICE_ENV: "cuda", "PYTHONPATH": str(Path(__file__).parents[1])}
    c = cfg(s2_cache, tmp_path / "ddp")
    args = ["--cache", s2_cache, "--run-dir", c.run_dir, "--model", c.model, "--global-batch-size", 8, "--steps", 4,
            "--lr", LR, "--log-every", 1, "--sample-every", 0, "--precision", "fp32", "--no-tf32"]
    p = subprocess.run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "repa_pipe.cli",
                        "train", *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    train.run(cfg(s2_cache, tmp_path / "one"))
    assert_within(tmp_path / "ddp", tmp_path / "one", 4)


def test_batches_and_draws_are_pinned_on_a_gpu(cuda, s2_cache):
    view = cache_view(s2_cache, ("dinov2-b",))
    s = BatchStream(s2_cache, view, 8, 0, 0, 1, 0.1, 0, 1, threads=1)
    try:
        b = next(s)
    finally:
        s.close()
    assert b.moments.is_pinned() and b.labels.is_pinned() and all(f.is_pinned() for f in b.features)
    assert all(v.is_pinned() for v in b.draws.values())


def test_int8_features_dequantized_on_the_gpu_give_the_cpu_bits(cuda):
    """Training on CUDA dequantizes stored int8 rows on the GPU (training/stream.py); the bits must equal the
    reader's CPU dequantization for every finite token, tiny scales (subnormal products) included."""
    from repa_pipe.cache.quant import dequantize_int8, dequantize_int8_tensor, quantize_int8
    from repa_pipe.training.stream import default_dequantize

    assert default_dequantize() == "device"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16, 768)).astype(np.float32) * (10.0 ** rng.uniform(-42, 4, (64, 16, 1)))
    q = quantize_int8(x.astype(np.float32))
    cpu = dequantize_int8(q, np.empty(x.shape, dtype=np.float16))
    gpu = dequantize_int8_tensor(torch.from_numpy(q).pin_memory().to("cuda", non_blocking=True)).cpu().numpy()
    np.testing.assert_array_equal(gpu.view(np.uint16), cpu.view(np.uint16))


def test_sample_eval_on_cuda_defaults_to_bf16_and_fp32_matches_the_cpu(cuda, setup, tmp_path, monkeypatch):  # noqa: F811
    sample_eval.run(se_config(setup, tmp_path / "auto"))
    key = json.loads((tmp_path / "auto" / "shards" / "sampling.json").read_text())
    assert key["precision"] == "bf16"
    with np.load(tmp_path / "auto" / "samples.npz") as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape[0] == 12
    sample_eval.run(se_config(setup, tmp_path / "gpu32", precision="fp32"))
    monkeypatch.setenv(dist.DEVICE_ENV, "cpu")
    sample_eval.run(se_config(setup, tmp_path / "cpu32", precision="fp32"))
    with np.load(tmp_path / "gpu32" / "samples.npz") as g, np.load(tmp_path / "cpu32" / "samples.npz") as c:
        assert np.array_equal(g["arr_1"], c["arr_1"])  # labels: the same per-sample generators
        diff = np.abs(g["arr_0"].astype(int) - c["arr_0"].astype(int))
        assert diff.max() <= 1  # strict fp32 on both: within 1 of 255 (summation order, truncation)


READER_UNDER_LOW_ULIMIT = r"""
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from repa_pipe.training.benchmark import cache_view, synthetic_cache
from repa_pipe.training.stream import BatchStream
cache = synthetic_cache(Path(sys.argv[1]), 400, 64, 4, "dinov2-b", shard_size=1)  # 800 shard files
view = cache_view(cache, ("dinov2-b",))
s = BatchStream(cache, view, 8, 0, 0, 1, 0.1, 0, 60, threads=4)  # 60 steps of 8: every shard read
try:
    for _ in range(60):
        next(s)
finally:
    s.close()
print("read", 60 * 8, "rows")
"""


def test_reader_runs_under_ulimit_n_256(cuda, tmp_path):
    """One descriptor per shard per array, kept open, ran out of files at ImageNet scale."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    p = subprocess.run([sys.executable, "-c", READER_UNDER_LOW_ULIMIT, str(tmp_path / "c")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "read 480 rows" in p.stdout, p.stderr[-3000:]
