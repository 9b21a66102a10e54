"""Fixtures shared by the test modules, and the device every test runs on.

The default suite runs on the CPU everywhere: REPA_PIPE_DEVICE=cpu (read by `pipeline.dist.device`) is set here,
before any test runs, and inherited by every subprocess (the CLI, torchrun ranks), so a GPU in the box changes no
test's device, process-group backend (gloo) or numbers. Tests marked `gpu` (tests/test_gpu.py, deselected by
default) ask for CUDA through the `cuda` fixture.
"""
from __future__ import annotations

import os

import pytest
import torch

from repa_pipe.pipeline import dist

os.environ[dist.DEVICE_ENV] = "cpu"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: the numerics of a torchrun rank (OMP_NUM_THREADS=1), and polite on a
    shared 2-core box, where a second spinning OpenMP thread only slows things down."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cuda(monkeypatch) -> torch.device:
    """For `gpu` tests: the stages run on cuda:0 (skipped cleanly without a GPU)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setenv(dist.DEVICE_ENV, "cuda")
    return torch.device("cuda", 0)
