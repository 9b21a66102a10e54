"""Samplers: grids, SDE/ODE steps, CFG gating and batching, per-sample RNG (the REPA reference's `samplers.py`,
https://github.com/sihyun-yu/REPA; docs/numerics.md points 13-15 and deviation 7)."""
from __future__ import annotations

import math

import pytest
import torch

from repa_pipe.models.samplers import (
    PerSampleRandn,
    guided_steps,
    model_evals,
    ode_time_grid,
    sample,
    sde_time_grid,
)
from repa_pipe.pipeline.errors import ConfigError

NULL = 10


class CountingModel:
    """velocity = a * x + b(y) (affine, so every step can be recomputed by hand); records each call."""

    def __init__(self, a: float = -0.5):
        self.a = a
        self.calls: list[tuple[int, float, list[int]]] = []

    def bias(self, y: torch.Tensor) -> torch.Tensor:
        return (0.1 * y.to(torch.float64) - 0.3).view(-1, 1, 1, 1)  # null label gives a different bias

    def __call__(self, x, t, y):
        assert t.shape == (x.shape[0],) and torch.all(t == t[0]) and x.dtype == t.dtype
        self.calls.append((x.shape[0], float(t[0]), y.tolist()))
        return (self.a * x.to(torch.float64) + self.bias(y)).to(x.dtype)


class ListRandn:
    """Returns pre-made noise tensors in order (then a fallback value), counting calls."""

    def __init__(self, noises, fallback=0.0):
        self.noises, self.fallback, self.n = noises, fallback, 0

    def __call__(self, shape):
        self.n += 1
        if self.n <= len(self.noises):
            return self.noises[self.n - 1]
        return torch.full((self.noises[0].shape[0], *shape), self.fallback)


def test_sde_grid_n250():
    g = sde_time_grid(250)
    assert g.dtype == torch.float64 and g.shape == (251,)
    torch.testing.assert_close(g[:3], torch.tensor([1.0, 0.99614458, 0.99228916], dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(g[-3:], torch.tensor([0.04385542, 0.04, 0.0], dtype=torch.float64), atol=1e-8, rtol=0)
    dt = g[1:] - g[:-1]
    assert dt[0].item() == pytest.approx(-0.96 / 249, abs=1e-12)
    assert dt[-1].item() == pytest.approx(-0.04, abs=1e-15)


def test_ode_grid():
    g = ode_time_grid(4)
    assert g.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_sde_steps_match_hand_computation():
    """Linear closed form: d = (2 - t) v + x, x += d dt + sqrt(2 t |dt|) eps; last step mean only."""
    N, B = 5, 3
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, 2, 2, 2, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 4, 7])
    noises = [torch.randn(B, 2, 2, 2, generator=g, dtype=torch.float64) for _ in range(N - 1)]
    m = CountingModel()
    rnd = ListRandn(noises, fallback=1e6)
    out = sample(m, z, y, mode="sde", num_steps=N, randn=rnd, null_class=NULL)
    assert rnd.n == N - 1  # no noise drawn on the last step
    ts = [1 - 0.96 * i / (N - 1) for i in range(N)] + [0.0]
    x = z.clone()
    for i in range(N):
        t, dt = ts[i], ts[i + 1] - ts[i]
        v = m.a * x + m.bias(y)
        d = (2 - t) * v + x
        x = x + d * dt + (math.sqrt(2 * t * abs(dt)) * noises[i] if i < N - 1 else 0)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)
    assert [c[1] for c in m.calls] == pytest.approx(ts[:-1])


def test_sde_first_step_noise_std_and_last_step_deterministic():
    N, B = 250, 2
    zero_model = lambda x, t, y: torch.zeros_like(x)  # v = 0 -> drift = x
    z = torch.zeros(B, 1, 1, 1, dtype=torch.float64)
    eps = torch.ones(B, 1, 1, 1, dtype=torch.float64)
    out = sample(zero_model, z, torch.zeros(B, dtype=torch.long), num_steps=1 + 1, randn=ListRandn([eps]))
    # two-step grid [1, 0.04, 0]: x1 = sqrt(2*1*0.96) * 1; x2 = x1 + x1 * (-0.04)
    torch.testing.assert_close(out, torch.full_like(out, math.sqrt(1.92) * 0.96))
    # N = 250: first-step std sqrt(2 * 1 * 0.96/249) = 0.0878
    stats = {}
    calls = []

    def model(x, t, y):
        calls.append(x.clone())
        return torch.zeros_like(x)

    sample(model, z, torch.zeros(B, dtype=torch.long), num_steps=N, randn=ListRandn([eps]), stats=stats)
    assert calls[1][0].item() == pytest.approx(math.sqrt(2 * 0.96 / 249), rel=1e-12)
    assert math.sqrt(2 * 0.96 / 249) == pytest.approx(0.0878, abs=1e-4)
    assert stats["evals"] == N
    # whatever the randn would return after the N-1 stochastic steps, the result is the same
    noises = [torch.randn(B, 1, 1, 1, dtype=torch.float64) for _ in range(N - 1)]
    a = sample(CountingModel(), z, torch.ones(B, dtype=torch.long), num_steps=N, randn=ListRandn(noises, 0.0))
    b = sample(CountingModel(), z, torch.ones(B, dtype=torch.long), num_steps=N, randn=ListRandn(noises, 1e9))
    assert torch.equal(a, b)


def test_guided_steps_172_of_250():
    t = [1 - 0.96 * i / 249 for i in range(250)]
    assert sum(1 for v in t if 0 <= v <= 0.7) == 172  # independent count on the reference grid
    assert guided_steps(250, "sde", (0.0, 0.7)) == 172
    m = CountingModel()
    stats = {}
    B = 2
    z = torch.zeros(B, 1, 2, 2)
    sample(m, z, torch.tensor([3, 5]), num_steps=250, cfg_scale=1.8, guidance_interval=(0.0, 0.7),
           null_class=NULL, randn=PerSampleRandn([0, 1]), stats=stats)
    assert stats["evals"] == 250 and stats["guided_evals"] == 172
    assert sum(1 for c in m.calls if c[0] == 2 * B) == 172
    assert sum(1 for c in m.calls if c[0] == B) == 78
    assert stats["rows"] == 172 * 2 * B + 78 * B
    assert all(c[0] == 2 * B for c in m.calls if c[1] <= 0.7) and all(c[0] == B for c in m.calls if c[1] > 0.7)
    guided = next(c for c in m.calls if c[0] == 2 * B)
    assert guided[2] == [3, 5, NULL, NULL]  # one forward on [cond, uncond]


def test_guidance_gate_inclusive_and_scale_one():
    # ODE N=4: t_cur = 1, .75, .5, .25; interval [0.5, 0.75] -> exactly .75 and .5 guided
    m = CountingModel()
    z = torch.zeros(1, 1, 1, 1)
    sample(m, z, torch.tensor([2]), mode="ode", num_steps=4, cfg_scale=2.0, guidance_interval=(0.5, 0.75), null_class=NULL)
    assert [c[0] for c in m.calls] == [1, 2, 2, 1]
    assert guided_steps(4, "ode", (0.5, 0.75)) == 2
    m = CountingModel()
    sample(m, z, torch.tensor([2]), mode="ode", num_steps=4, cfg_scale=1.0, null_class=NULL)
    assert [c[0] for c in m.calls] == [1, 1, 1, 1]  # w = 1: never guided


def test_cfg_combination_ode_euler():
    """One Euler step with guidance: x1 = x0 + dt * (u + w (c - u))."""
    m = CountingModel(a=0.3)
    z = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    y = torch.tensor([1, 6])
    w = 2.5
    out = sample(m, z, y, mode="ode", num_steps=1, cfg_scale=w, null_class=NULL)
    c = m.a * z + m.bias(y)
    u = m.a * z + m.bias(torch.full_like(y, NULL))
    torch.testing.assert_close(out, z - 1.0 * (u + w * (c - u)))


def test_heun_skips_last_correction_and_gates_on_t_cur():
    m = CountingModel()
    z = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1])
    # interval [0.3, 0.5]: step 2 has t_cur .5 (guided) and corrector t_next .25 (outside, still guided)
    stats = {}
    out = sample(m, z, y, mode="ode", num_steps=4, heun=True, cfg_scale=3.0, guidance_interval=(0.3, 0.5),
                 null_class=NULL, stats=stats)
    assert [(c[0], c[1]) for c in m.calls] == [(2, 1.0), (2, 0.75), (2, 0.75), (2, 0.5), (4, 0.5), (4, 0.25), (2, 0.25)]
    assert stats["evals"] == model_evals(4, "ode", heun=True) == 7
    assert stats["guided_evals"] == guided_steps(4, "ode", (0.3, 0.5), heun=True) == 2
    # hand computation
    def vel(x, gated):
        c = m.a * x + m.bias(y)
        if not gated:
            return c
        u = m.a * x + m.bias(torch.full_like(y, NULL))
        return u + 3.0 * (c - u)

    x, ts = z.clone(), [1.0, 0.75, 0.5, 0.25, 0.0]
    for i in range(4):
        dt, gated = ts[i + 1] - ts[i], 0.3 <= ts[i] <= 0.5
        d = vel(x, gated)
        xn = x + dt * d
        if i < 3:
            xn = x + dt * 0.5 * (d + vel(xn, gated))
        x = xn
    torch.testing.assert_close(out, x)


def test_model_called_in_model_dtype_state_float64():
    seen = []

    def model(x, t, y):
        seen.append((x.dtype, t.dtype))
        return torch.zeros_like(x)

    z = torch.zeros(1, 1, 1, 1)
    out = sample(model, z, torch.tensor([0]), mode="ode", num_steps=2, model_dtype=torch.bfloat16)
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2 and out.dtype == torch.float32


def test_per_sample_randn_independent_of_batch():
    a = PerSampleRandn([11, 22, 33])
    b = PerSampleRandn([22])
    xa, xb = a((2, 3)), b((2, 3))
    assert xa.shape == (3, 2, 3)
    torch.testing.assert_close(xa[1], xb[0], rtol=0, atol=0)
    torch.testing.assert_close(xa[1], torch.randn(2, 3, generator=torch.Generator().manual_seed(22)), rtol=0, atol=0)
    # the stream continues per sample
    torch.testing.assert_close(a((4,))[1], b((4,))[0], rtol=0, atol=0)
    labels = PerSampleRandn([5, 6]).randint(1000)
    assert labels.shape == (2,) and labels.dtype == torch.long


def test_sde_sample_depends_only_on_own_seed():
    m = CountingModel()
    def run(seeds, labels):
        rnd = PerSampleRandn(seeds)
        z = rnd((1, 2, 2))
        return sample(m, z, torch.tensor(labels), num_steps=10, randn=rnd, cfg_scale=1.5, null_class=NULL,
                      guidance_interval=(0.0, 0.7))
    big = run([7, 8, 9], [1, 2, 3])
    small = run([8], [2])
    torch.testing.assert_close(big[1:2], small, rtol=0, atol=1e-6)


def test_sampler_errors():
    m = CountingModel()
    z = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ConfigError):
        sample(m, z, torch.tensor([0]), mode="sde", num_steps=5)  # no randn
    with pytest.raises(ConfigError):
        sample(m, z, torch.tensor([0]), mode="ode", num_steps=5, cfg_scale=2.0)  # no null class
    with pytest.raises(ConfigError):
        sample(m, z, torch.tensor([0]), mode="ddim", num_steps=5)
