"""Fixtures shared by the test modules."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: the numerics of a torchrun rank (OMP_NUM_THREADS=1), and polite on a
    shared 2-core box, where a second spinning OpenMP thread only slows things down."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
