"""Samplers shared by training previews and evaluation (reference samplers.py, repa_official.md section 5).

- 'sde': Euler-Maruyama on t = linspace(1, 0.04, N) (float64) + [0]: N-1 stochastic steps with diffusion
  g^2 = 2t, drift d = v - (g^2/2) score(v, x, t), x += d dt + sqrt(g^2 |dt|) eps; then one deterministic step
  0.04 -> 0 (returns the mean). N model evaluations.
- 'ode': Euler on t = linspace(1, 0, N+1); `heun=True` adds a second evaluation at t_next, skipped on the
  last step (2N-1 evaluations).
- CFG: when cfg_scale > 1 and lo <= t_cur <= hi (inclusive; Heun's corrector uses the same t_cur gate) the
  model sees ONE batch [x, x] with labels [y, null] and the drift becomes u + w (c - u) on all channels;
  otherwise only the conditional batch is evaluated.

Integration state is float64; the model is called in `model_dtype` (default: the dtype of z). All noise comes
from the caller's `randn` (e.g. PerSampleRandn), so sample i depends only on its own seed.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from repa_pipe.models.transport import interpolant
from repa_pipe.pipeline.errors import ConfigError

__all__ = ["PerSampleRandn", "sample", "sde_time_grid", "ode_time_grid", "guided_steps", "model_evals"]

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SDE_T_END = 0.04  # last noisy time of the reference SDE grid


class PerSampleRandn:
    """One torch.Generator per sample, so sample i's noise never depends on the batch it is drawn in.

    Generators live on `gen_device` (CPU by default, so the same seeds give the same noise on any device);
    draws are moved to `device`.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu", gen_device: str = "cpu"):
        self.device = torch.device(device)
        self.gen_device = gen_device
        self.generators = [torch.Generator(gen_device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def __call__(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal draws, (B, *shape)."""
        out = [torch.randn(tuple(shape), generator=g, device=self.gen_device, dtype=dtype) for g in self.generators]
        return torch.stack(out).to(self.device)

    def randint(self, high: int, shape: Sequence[int] = ()) -> torch.Tensor:
        """Integers in [0, high), (B, *shape) int64 (e.g. class labels)."""
        out = [torch.randint(high, tuple(shape), generator=g, device=self.gen_device) for g in self.generators]
        return torch.stack(out).to(self.device)


def sde_time_grid(num_steps: int) -> torch.Tensor:
    """(N+1,) float64: linspace(1, 0.04, N) then 0."""
    return torch.cat([torch.linspace(1.0, SDE_T_END, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def ode_time_grid(num_steps: int) -> torch.Tensor:
    """(N+1,) float64: linspace(1, 0, N+1)."""
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def _grid(mode: str, num_steps: int) -> torch.Tensor:
    if mode not in ("sde", "ode"):
        raise ConfigError(f"unknown sampler mode {mode!r}; choose 'sde' or 'ode'")
    if num_steps < 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
    return sde_time_grid(num_steps) if mode == "sde" else ode_time_grid(num_steps)


def _is_guided(t_cur: float, cfg_scale: float, interval: tuple[float, float]) -> bool:
    return cfg_scale > 1.0 and interval[0] <= t_cur <= interval[1]


def model_evals(num_steps: int, mode: str = "sde", heun: bool = False) -> int:
    """Model evaluations (calls of model_fn) per sample batch."""
    _grid(mode, num_steps)
    return 2 * num_steps - 1 if (mode == "ode" and heun) else num_steps


def guided_steps(
    num_steps: int, mode: str = "sde", interval: tuple[float, float] = (0.0, 1.0), heun: bool = False
) -> int:
    """How many model evaluations run guided (batch 2B) for cfg_scale > 1. SDE, N=250, [0, 0.7] -> 172."""
    t = _grid(mode, num_steps)[:-1].tolist()  # t_cur of every step
    n = 0
    for i, t_cur in enumerate(t):
        if _is_guided(t_cur, 2.0, interval):
            n += 2 if (mode == "ode" and heun and i < num_steps - 1) else 1
    return n


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    z: torch.Tensor,
    y: torch.Tensor,
    *,
    mode: str = "sde",
    num_steps: int = 250,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    null_class: int | None = None,
    randn: Callable[..., torch.Tensor] | None = None,
    path: str = "linear",
    model_dtype: torch.dtype | None = None,
    stats: dict | None = None,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Integrate from noise z = x_1 (B, C, H, W) to x_0; returns a tensor of z's dtype.

    model_fn(x, t, y) -> velocity (e.g. `model.forward_velocity`); `randn(shape) -> (B, *shape)` supplies the
    SDE noise (required for mode='sde'). If `stats` is a dict it receives evals, guided_evals and rows (total
    batch rows given to model_fn). `on_step()` is called after each of the num_steps steps (progress).
    """
    t_grid = _grid(mode, num_steps)
    if cfg_scale > 1.0 and null_class is None:
        raise ConfigError("cfg_scale > 1 needs null_class (the model's num_classes)")
    if mode == "sde" and randn is None:
        raise ConfigError("mode='sde' needs a randn callable (e.g. PerSampleRandn)")
    lo, hi = float(guidance_interval[0]), float(guidance_interval[1])
    dtype = model_dtype or z.dtype
    y_null = torch.full_like(y, null_class) if null_class is not None else None
    counts = {"evals": 0, "guided_evals": 0, "rows": 0}

    def velocity(x: torch.Tensor, t: float, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Model velocity at (x, t), float64. Guided: (2B, ...) for [cond, uncond], x doubled alike."""
        if guided:
            x, yy = torch.cat([x, x]), torch.cat([y, y_null])  # one forward on 2B rows
        else:
            yy = y
        tt = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
        counts["evals"] += 1
        counts["guided_evals"] += int(guided)
        counts["rows"] += x.shape[0]
        v = model_fn(x.to(dtype), tt.to(dtype), yy).to(torch.float64)
        return v, x

    def cfg(d: torch.Tensor, guided: bool) -> torch.Tensor:
        if not guided:
            return d
        cond, uncond = d.chunk(2)  # each (B, ...)
        return uncond + cfg_scale * (cond - uncond)

    def sde_drift(x: torch.Tensor, t: float, guided: bool) -> torch.Tensor:
        # score from velocity: s = ((a/a') v - x) / (s^2 - (a/a') s' s); drift = v - (g^2 / 2) s, g^2 = 2t.
        v, xin = velocity(x, t, guided)
        alpha, sigma, d_alpha, d_sigma = interpolant(torch.tensor(t, dtype=torch.float64), path)
        ratio = alpha / d_alpha
        score = (ratio * v - xin) / (sigma**2 - ratio * d_sigma * sigma)
        return cfg(v - t * score, guided)  # linear path: (2 - t) v + x

    x = z.to(torch.float64)
    ts = t_grid.tolist()
    n = len(ts) - 1
    for i in range(n):
        t_cur, t_next = ts[i], ts[i + 1]
        dt = t_next - t_cur
        guided = _is_guided(t_cur, cfg_scale, (lo, hi))
        if mode == "sde":
            d = sde_drift(x, t_cur, guided)
            x_mean = x + d * dt
            if i < n - 1:  # last step (0.04 -> 0) is deterministic: no noise drawn
                eps = randn(tuple(x.shape[1:])).to(device=x.device, dtype=torch.float64)  # (B, C, H, W)
                x = x_mean + (2 * t_cur * abs(dt)) ** 0.5 * eps
            else:
                x = x_mean
        else:
            d = cfg(velocity(x, t_cur, guided)[0], guided)
            x_next = x + dt * d
            if heun and i < n - 1:
                d2 = cfg(velocity(x_next, t_next, guided)[0], guided)  # gate from t_cur, as the reference
                x_next = x + dt * (0.5 * d + 0.5 * d2)
            x = x_next
        if on_step is not None:
            on_step()
    if stats is not None:
        stats.update(counts)
    return x.to(z.dtype)
