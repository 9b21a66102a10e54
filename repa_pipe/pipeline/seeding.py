"""Every seed the pipeline derives, in one place.

Randomness belongs to a sample or a step, never to a process: a draw is seeded by (run seed, what it is for),
so the same run draws the same numbers at any world size, batch size or after a resume.
"""
from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, via numpy's SeedSequence (well mixed: nearby inputs do not collide)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def step_seed(seed: int, step: int) -> int:
    """Seed of training step `step`'s draws (posterior eps, noise, time, label dropout) for the global batch."""
    return derive_seed(seed, step)


def sample_seed(seed: int, i: int) -> int:
    """Seed of sample i's own generator in sample-eval: its noise, its label, every SDE step's noise."""
    return derive_seed(seed, i)


def preview_seeds(seed: int, n: int) -> list[int]:
    """Seeds of the n fixed noises of the training preview grids (the same grid at every preview)."""
    return [(seed * 100_003 + i) % 2 ** 64 for i in range(n)]  # torch generators take 64-bit seeds


def order_rng(seed: int, epoch: int) -> np.random.Generator:
    """Generator of epoch `epoch`'s permutation of the training rows."""
    return np.random.default_rng([seed, epoch])
