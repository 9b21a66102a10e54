"""Watching a training run: the progress bar or lines, metrics.jsonl, optional TensorBoard, EMA preview grids,
the loss curve."""
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
from repa_pipe.pipeline.progress import Tracker, log
from repa_pipe.pipeline.seeding import preview_seeds
from repa_pipe.training.config import TrainConfig
from repa_pipe.training.state import State

Decoder = Callable[[torch.Tensor], torch.Tensor]  # model-space latents -> (N, H, W, 3) uint8
PREVIEW_N, PREVIEW_STEPS, PREVIEW_CFG = 16, 50, 4.0  # the reference's preview sampler: Euler ODE, 50 steps, w=4


class Watcher:
    """Everything rank 0 shows and writes about a run while it trains; other ranks only join the reductions."""

    def __init__(self, cfg: TrainConfig, view: TrainingView, state: State, flops_per_step: float,
                 make_decoder: Callable[[], Decoder]):
        self.cfg, self.view, self.state = cfg, view, state
        self.run = Path(cfg.run_dir)
        self.flops_per_step = flops_per_step
        self.main = dist.is_main()
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0
        self.t_last = time.perf_counter()
        self.wait_last = 0.0
        self.tb = None
        if self.main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency, checked at start
            self.tb = SummaryWriter(str(self.run / "tensorboard"))
        self._make_decoder = make_decoder
        self._decoder: Optional[Decoder] = None
        self.preview_enabled = True
        self.bar = Tracker("train", cfg.steps, unit="step", every_s=None, done=state.step)
        if self.main:
            metrics_log.truncate_after(self.run / "metrics.jsonl", state.step)

    def __enter__(self) -> "Watcher":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)
        self.close()

    def step(self, sums: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        """Every step: accumulate on the device (no host sync) and advance the bar."""
        for k, v in {**sums, "grad_norm": grad_norm.float()}.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach()
        self.n += 1
        self.bar.update(1)

    def log(self, step: int, wait_total_s: float) -> None:
        """Average the accumulated values over steps and ranks; write one metrics line on rank 0."""
        if not self.n:
            return
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
            return
        metrics_log.append(self.run / "metrics.jsonl", rec)
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)
        summary = (f"loss {rec['loss']:.4f}  denoise {rec['denoise']:.4f}  align {rec['align']:.4f}  "
                   f"{rec['images_per_s']:.0f} img/s")
        self.bar.update(0, fields=summary)
        if not self.bar.live:
            log(f"train: step {self.bar.status(count_unit=False)}  {summary}  grad {rec['grad_norm']:.3f}  "
                f"wait {100 * rec['data_wait_frac']:.1f}%")

    def decoder(self) -> Optional[Decoder]:
        """The latent decoder, built on first use; None (with one warning) when it cannot be had, e.g. VAE
        weights not on this machine: a missing preview must not stop a training run."""
        if self._decoder is None and self.preview_enabled:
            try:
                self._decoder = self._make_decoder()
            except RepaError as e:
                log(f"[yellow]previews disabled: cannot build the decoder of {self.view.latents} "
                    f"({escape(str(e))})[/]")
                self.preview_enabled = False
        return self._decoder

    @torch.no_grad()
    def preview(self, step: int) -> None:
        """EMA model, eval mode, fixed noise and labels: a grid PNG at RUN/samples/<step>.png (rank 0).

        Noise comes from per-sample generators, never the global RNG, so previews do not change training."""
        if not self.main:
            return
        decode = self.decoder()
        if decode is None:
            return
        ema = self.state.ema
        dev = next(ema.parameters()).device
        randn = PerSampleRandn(preview_seeds(self.cfg.seed, PREVIEW_N), dev)
        c, s = self.view.latent_channels, self.view.latent_size
        z = randn((c, s, s))
        y = torch.arange(PREVIEW_N, device=dev) % self.view.num_classes
        x = sample(ema.forward_velocity, z, y, mode="ode", num_steps=PREVIEW_STEPS, cfg_scale=PREVIEW_CFG,
                   null_class=self.view.num_classes)
        images.save_grid(decode(x.float()), self.run / "samples" / f"{step:07d}.png")

    def close(self) -> None:
        """Called on the way out: never raise, so an error of the run is not replaced by one of the curve."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.main and (self.run / "metrics.jsonl").is_file():
            try:
                images.save_loss_curve(self.run / "metrics.jsonl", self.run / "loss.png")
            except Exception as e:  # noqa: BLE001
                log(f"[yellow]loss curve not written: {type(e).__name__}: {escape(str(e))}[/]")
