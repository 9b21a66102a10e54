"""Samplers shared by training previews and evaluation (the REPA reference's `samplers.py`,
https://github.com/sihyun-yu/REPA; docs/numerics.md points 13-15).

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

__all__ = ["PerSampleRandn", "GuidedVelocity", "sample", "euler_maruyama", "ode_euler", "ode_heun", "sde_time_grid",
           "ode_time_grid", "guided_steps", "model_evals"]

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
        return self._to_device(torch.stack(out))

    def randint(self, high: int, shape: Sequence[int] = ()) -> torch.Tensor:
        """Integers in [0, high), (B, *shape) int64 (e.g. class labels)."""
        out = [torch.randint(high, tuple(shape), generator=g, device=self.gen_device) for g in self.generators]
        return self._to_device(torch.stack(out))

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """CPU draws to a GPU through pinned memory, asynchronously: a copy from pageable memory would make the host
        wait for the GPU to drain its queue at every SDE step (CUDA docs, "Host-Device data transfers")."""
        if self.device.type == "cuda" and t.device.type == "cpu":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)


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


class GuidedVelocity:
    """The model's velocity with classifier-free guidance, the one function every integrator calls.

    A guided evaluation runs ONE forward on [x, x] with labels [y, null] (2B rows); `combine` turns a (2B, ...)
    quantity into u + w (c - u). State and outputs are float64; the model sees `dtype`. Counts evaluations."""

    def __init__(self, model_fn: ModelFn, y: torch.Tensor, *, cfg_scale: float, interval: tuple[float, float],
                 null_class: int | None, dtype: torch.dtype):
        self.model_fn, self.y, self.cfg_scale, self.dtype = model_fn, y, cfg_scale, dtype
        self.interval = (float(interval[0]), float(interval[1]))
        self.y_null = torch.full_like(y, null_class) if null_class is not None else None
        self.counts = {"evals": 0, "guided_evals": 0, "rows": 0}

    def guided(self, t_cur: float) -> bool:
        return _is_guided(t_cur, self.cfg_scale, self.interval)

    def raw(self, x: torch.Tensor, t: float, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(velocity, the x it was taken at), float64; guided: both (2B, ...) for [cond, uncond]."""
        if guided:
            x, yy = torch.cat([x, x]), torch.cat([self.y, self.y_null])  # one forward on 2B rows
        else:
            yy = self.y
        tt = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
        self.counts["evals"] += 1
        self.counts["guided_evals"] += int(guided)
        self.counts["rows"] += x.shape[0]
        v = self.model_fn(x.to(self.dtype), tt.to(self.dtype), yy).to(torch.float64)
        return v, x

    def combine(self, d: torch.Tensor, guided: bool) -> torch.Tensor:
        """(2B, ...) [cond, uncond] -> (B, ...) u + w (c - u); unguided d unchanged."""
        if not guided:
            return d
        cond, uncond = d.chunk(2)  # each (B, ...)
        return uncond + self.cfg_scale * (cond - uncond)

    def __call__(self, x: torch.Tensor, t: float, guided: bool) -> torch.Tensor:
        return self.combine(self.raw(x, t, guided)[0], guided)

    def sde_drift(self, x: torch.Tensor, t: float, guided: bool, path: str) -> torch.Tensor:
        """v - (g^2 / 2) score with g^2 = 2t, the score from the velocity: s = ((a/a') v - x) / (s^2 - (a/a') s' s)
        (linear path: drift = (2 - t) v + x); guidance combines the drifts."""
        v, xin = self.raw(x, t, guided)
        alpha, sigma, d_alpha, d_sigma = interpolant(torch.tensor(t, dtype=torch.float64), path)
        ratio = alpha / d_alpha
        score = (ratio * v - xin) / (sigma**2 - ratio * d_sigma * sigma)
        return self.combine(v - t * score, guided)


Tick = Callable[[], None] | None


def euler_maruyama(vel: GuidedVelocity, x: torch.Tensor, ts: list[float], randn: Callable[..., torch.Tensor],
                   path: str, on_step: Tick = None) -> torch.Tensor:
    """SDE: x += drift dt + sqrt(2 t |dt|) eps per step; the last step (0.04 -> 0) deterministic (its mean)."""
    n = len(ts) - 1
    for i in range(n):
        t_cur, dt = ts[i], ts[i + 1] - ts[i]
        x_mean = x + vel.sde_drift(x, t_cur, vel.guided(t_cur), path) * dt
        if i < n - 1:  # no noise drawn on the last step
            eps = randn(tuple(x.shape[1:])).to(device=x.device, dtype=torch.float64)  # (B, C, H, W)
            x = x_mean + (2 * t_cur * abs(dt)) ** 0.5 * eps
        else:
            x = x_mean
        if on_step is not None:
            on_step()
    return x


def ode_euler(vel: GuidedVelocity, x: torch.Tensor, ts: list[float], on_step: Tick = None) -> torch.Tensor:
    """ODE, Euler: x += dt v(x, t)."""
    for i in range(len(ts) - 1):
        t_cur = ts[i]
        x = x + (ts[i + 1] - t_cur) * vel(x, t_cur, vel.guided(t_cur))
        if on_step is not None:
            on_step()
    return x


def ode_heun(vel: GuidedVelocity, x: torch.Tensor, ts: list[float], on_step: Tick = None) -> torch.Tensor:
    """ODE, Heun: Euler predictor, then the mean of both slopes; no correction on the last step (to t=0). The
    corrector is gated by t_cur, as the reference."""
    n = len(ts) - 1
    for i in range(n):
        t_cur, t_next = ts[i], ts[i + 1]
        dt, guided = t_next - t_cur, vel.guided(t_cur)
        d = vel(x, t_cur, guided)
        x_next = x + dt * d
        if i < n - 1:
            x_next = x + dt * (0.5 * d + 0.5 * vel(x_next, t_next, guided))
        x = x_next
        if on_step is not None:
            on_step()
    return x


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
    ts = _grid(mode, num_steps).tolist()
    if cfg_scale > 1.0 and null_class is None:
        raise ConfigError("cfg_scale > 1 needs null_class (the model's num_classes)")
    if mode == "sde" and randn is None:
        raise ConfigError("mode='sde' needs a randn callable (e.g. PerSampleRandn)")
    vel = GuidedVelocity(model_fn, y, cfg_scale=cfg_scale, interval=guidance_interval, null_class=null_class,
                         dtype=model_dtype or z.dtype)
    x = z.to(torch.float64)
    if mode == "sde":
        x = euler_maruyama(vel, x, ts, randn, path, on_step)
    elif heun:
        x = ode_heun(vel, x, ts, on_step)
    else:
        x = ode_euler(vel, x, ts, on_step)
    if stats is not None:
        stats.update(vel.counts)
    return x.to(z.dtype)
