"""Watching a training run: console lines, metrics.jsonl, optional TensorBoard, EMA preview grids, loss curve."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
from rich.markup import escape

from repa_pipe.models.samplers import PerSampleRandn, sample
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.errors import RepaError
from repa_pipe.pipeline.fileio import atomic_write_bytes
from repa_pipe.pipeline.progress import log
from repa_pipe.stages import images

if TYPE_CHECKING:  # imported for types only: train imports this module
    from repa_pipe.stages.train import State, TrainConfig
    from repa_pipe.stages.train_data import CacheSpec

Decoder = Callable[[torch.Tensor], torch.Tensor]  # model-space latents -> (N, H, W, 3) uint8
PREVIEW_N, PREVIEW_STEPS, PREVIEW_CFG = 16, 50, 4.0  # the reference's preview sampler: Euler ODE, 50 steps, w=4


class Watcher:
    def __init__(self, cfg: "TrainConfig", spec: "CacheSpec", state: "State", flops_per_step: float):
        self.cfg, self.spec, self.state = cfg, spec, state
        self.run = Path(cfg.run)
        self.flops_per_step = flops_per_step
        self.main = dist.is_main()
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0
        self.t_last = time.perf_counter()
        self.wait_last = 0.0
        self.tb = None
        if self.main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency
            self.tb = SummaryWriter(str(self.run / "tensorboard"))
        self._decoder: Optional[Decoder] = None
        self.preview_enabled = True
        if self.main:
            truncate_metrics(self.run / "metrics.jsonl", state.step)

    def accumulate(self, sums: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        for k, v in {**sums, "grad_norm": grad_norm.float()}.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach()
        self.n += 1

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
        with open(self.run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)
        log(f"step {step:>7d}  loss {rec['loss']:.4f}  denoise {rec['denoise']:.4f}  align {rec['align']:.4f}  "
            f"grad {rec['grad_norm']:.3f}  {rec['images_per_s']:.1f} img/s  wait {100 * rec['data_wait_frac']:.1f}%")

    def decoder(self) -> Optional[Decoder]:
        """The cache's latent decoder, built on first use; None (with one warning) when it cannot be had, e.g.
        VAE weights not on this machine: a missing preview must not stop a training run."""
        if self._decoder is None and self.preview_enabled:
            from repa_pipe.stages.decode import latent_decoder  # the VAE is only needed for previews
            try:
                self._decoder = latent_decoder(Path(self.cfg.cache), self.spec.latents, dist.device())
            except RepaError as e:
                log(f"[yellow]previews disabled: cannot build the decoder of {self.spec.latents} ({escape(str(e))})[/]")
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
        randn = PerSampleRandn([self.cfg.seed * 100_003 + i for i in range(PREVIEW_N)], dev)
        c, s = self.spec.latent_channels, self.spec.latent_size
        z = randn((c, s, s))
        y = torch.arange(PREVIEW_N, device=dev) % self.spec.num_classes
        x = sample(ema.forward_velocity, z, y, mode="ode", num_steps=PREVIEW_STEPS, cfg_scale=PREVIEW_CFG,
                   null_class=self.spec.num_classes)
        images.save_grid(decode(x.float()), self.run / "samples" / f"{step:07d}.png")

    def close(self) -> None:
        """Called in a `finally`: never raise, so an error of the run is not replaced by one of the curve."""
        if self.tb is not None:
            self.tb.close()
        if self.main and (self.run / "metrics.jsonl").is_file():
            try:
                images.save_loss_curve(self.run / "metrics.jsonl", self.run / "loss.png")
            except Exception as e:  # noqa: BLE001
                log(f"[yellow]loss curve not written: {type(e).__name__}: {escape(str(e))}[/]")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after `step`: a run that died past its last checkpoint and resumes from it logs those
    steps again, and each step must appear once."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line)["step"] <= step]
    if len(keep) != len(lines):
        atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def loss_series(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    recs = read_metrics(path)
    steps = np.array([r["step"] for r in recs])
    return steps, {k: np.array([r[k] for r in recs]) for k in ("loss", "denoise", "align")}
