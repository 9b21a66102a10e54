"""Watching a training run, one piece per job: `Meter` (the progress bar or lines and metrics.jsonl),
`TensorBoard` (optional), `Previews` (EMA sample grids, with their decoder), `LossCurve` (RUN/loss.png). `Watcher`
holds them for the loop: rank 0 shows and writes; other ranks only join the reductions."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from rich.markup import escape

from repa_pipe.cache.manifest import TrainingView
from repa_pipe.models.samplers import PerSampleRandn, sample
from repa_pipe.pipeline import dist, images, metrics_log
from repa_pipe.pipeline.errors import RepaError
from repa_pipe.pipeline.images import Decoder
from repa_pipe.pipeline.progress import Tracker, log
from repa_pipe.pipeline.seeding import preview_seeds
from repa_pipe.training.config import TrainConfig
from repa_pipe.training.state import State

MakeDecoder = Callable[[TrainingView, torch.device], Decoder]


class Meter:
    """The progress bar (or plain lines) and metrics.jsonl: per-step values summed on the device, averaged over
    steps and ranks at each log."""

    def __init__(self, cfg: TrainConfig, state: State, flops_per_step: float):
        self.cfg, self.state = cfg, state
        self.path = Path(cfg.run_dir) / "metrics.jsonl"
        self.flops_per_step = flops_per_step
        self.main = dist.is_main()
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0
        self.t_last = time.perf_counter()
        self.wait_last = 0.0
        self.bar = Tracker("train", cfg.steps, unit="step", every_s=None, done=state.step)
        if self.main:
            metrics_log.truncate_after(self.path, state.step)

    def step(self, sums: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        """Every step: accumulate on the device (no host sync) and advance the bar."""
        for k, v in {**sums, "grad_norm": grad_norm.float()}.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach()
        self.n += 1
        self.bar.update(1)

    def log(self, step: int, wait_total_s: float) -> Optional[dict[str, Any]]:
        """Average the accumulated values over steps and ranks; write one metrics line on rank 0 and return it
        (None on other ranks and when nothing was accumulated)."""
        if not self.n:
            return None
        keys = sorted(self.sums)
        vec = dist.all_reduce_sum(torch.stack([self.sums[k] for k in keys]).float())
        vals = (vec / (self.n * dist.get_world_size())).tolist()
        now = time.perf_counter()
        dt = now - self.t_last
        wait = wait_total_s - self.wait_last
        rec: dict[str, Any] = {"step": step, **dict(zip(keys, vals)), "lr": self.state.opt.param_groups[0]["lr"],
                               "images_per_s": self.n * self.cfg.global_batch_size / dt,
                               "step_time_s": dt / self.n, "data_wait_frac": min(1.0, wait / dt),
                               "tflops_per_s": self.n * self.flops_per_step / dt / 1e12 / dist.get_world_size()}
        self.sums, self.n, self.t_last, self.wait_last = {}, 0, now, wait_total_s
        if not self.main:
            return None
        metrics_log.append(self.path, rec)
        summary = (f"loss {rec['loss']:.4f}  denoise {rec['denoise']:.4f}  align {rec['align']:.4f}  "
                   f"{rec['images_per_s']:.0f} img/s")
        self.bar.update(0, fields=summary)
        if not self.bar.live:
            log(f"train: step {self.bar.status(count_unit=False)}  {summary}  grad {rec['grad_norm']:.3f}  "
                f"wait {100 * rec['data_wait_frac']:.1f}%")
        return rec


class TensorBoard:
    """RUN/tensorboard scalars (rank 0, --tensorboard; the package is checked at start)."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # optional dependency

        self.writer: Any = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def add(self, rec: dict[str, Any]) -> None:
        for k, v in rec.items():
            if k != "step":
                self.writer.add_scalar(f"train/{k}", v, rec["step"])

    def close(self) -> None:
        self.writer.close()


class Previews:
    """EMA preview grids at RUN/samples/<step>.png (rank 0): the reference's preview sampler (Euler ODE) with
    --preview-samples fixed noises and labels, --preview-steps steps and guidance --preview-cfg-scale.

    Noise comes from per-sample generators, never the global RNG, so previews do not change training. The decoder
    is built on first use; when it cannot be had (e.g. VAE weights not on this machine) previews are disabled with
    one warning: a missing preview must not stop a training run."""

    def __init__(self, cfg: TrainConfig, view: TrainingView, ema: torch.nn.Module, make_decoder: Callable[[], Decoder]):
        self.cfg, self.view, self.ema = cfg, view, ema
        self.out = Path(cfg.run_dir) / "samples"
        self._make_decoder = make_decoder
        self._decoder: Optional[Decoder] = None
        self.enabled = True

    def decoder(self) -> Optional[Decoder]:
        if self._decoder is None and self.enabled:
            try:
                self._decoder = self._make_decoder()
            except RepaError as e:
                log(f"[yellow]previews disabled: cannot build the decoder of {self.view.latents} "
                    f"({escape(str(e))})[/]")
                self.enabled = False
        return self._decoder

    @torch.no_grad()
    def write(self, step: int) -> None:
        decode = self.decoder()
        if decode is None:
            return
        n = self.cfg.preview_samples
        dev = next(self.ema.parameters()).device
        randn = PerSampleRandn(preview_seeds(self.cfg.seed, n), dev)
        c, s = self.view.latent_channels, self.view.latent_size
        z = randn((c, s, s))
        y = torch.arange(n, device=dev) % self.view.num_classes
        x = sample(self.ema.forward_velocity, z, y, mode="ode", num_steps=self.cfg.preview_steps,
                   cfg_scale=self.cfg.preview_cfg_scale, null_class=self.view.num_classes)
        images.save_grid(decode(x.float()), self.out / f"{step:07d}.png")


class LossCurve:
    """RUN/loss.png from metrics.jsonl, drawn on the way out."""

    def __init__(self, run_dir: Path):
        self.run = Path(run_dir)

    def write(self) -> None:
        """Never raises, so an error of the run is not replaced by one of the curve."""
        if not (self.run / "metrics.jsonl").is_file():
            return
        try:
            images.save_loss_curve(self.run / "metrics.jsonl", self.run / "loss.png")
        except Exception as e:  # noqa: BLE001
            log(f"[yellow]loss curve not written: {type(e).__name__}: {escape(str(e))}[/]")


class Watcher:
    """The pieces above, driven by the loop: `step` every step, `log`, `preview` at their boundaries."""

    def __init__(self, cfg: TrainConfig, view: TrainingView, state: State, flops_per_step: float,
                 make_decoder: Callable[[], Decoder]):
        self.main = dist.is_main()
        self.meter = Meter(cfg, state, flops_per_step)
        self.tb = TensorBoard(Path(cfg.run_dir)) if self.main and cfg.tensorboard else None
        self.previews = Previews(cfg, view, state.ema, make_decoder)
        self.curve = LossCurve(Path(cfg.run_dir))

    def __enter__(self) -> "Watcher":
        self.meter.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.meter.bar.__exit__(*exc)
        self.close()

    def step(self, sums: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        self.meter.step(sums, grad_norm)

    def log(self, step: int, wait_total_s: float) -> None:
        rec = self.meter.log(step, wait_total_s)
        if rec is not None and self.tb is not None:
            self.tb.add(rec)

    def preview(self, step: int) -> None:
        if self.main:
            self.previews.write(step)

    def close(self) -> None:
        """Called on the way out: never raises."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.main:
            self.curve.write()
