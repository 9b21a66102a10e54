"""Watching a training run: console lines, metrics.jsonl, optional TensorBoard, EMA preview grids, loss curve."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from repa_pipe.models.samplers import PerSampleRandn, sample
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.progress import log
from repa_pipe.stages import images

if TYPE_CHECKING:  # imported for types only: train imports this module
    from repa_pipe.stages.train import State, TrainConfig
    from repa_pipe.stages.train_data import CacheSpec

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
        self._decoder = None

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

    def decoder(self):
        if self._decoder is None:
            from repa_pipe.stages.decode import latent_decoder
            self._decoder = latent_decoder(Path(self.cfg.cache), self.spec.latents, dist.device())
        return self._decoder

    @torch.no_grad()
    def preview(self, step: int) -> None:
        """EMA model, eval mode, fixed noise and labels: a grid PNG at RUN/samples/<step>.png (rank 0)."""
        if not self.main:
            return
        ema = self.state.ema
        dev = next(ema.parameters()).device
        randn = PerSampleRandn([self.cfg.seed * 100_003 + i for i in range(PREVIEW_N)], dev)
        c, s = self.spec.latent_channels, self.spec.latent_size
        z = randn((c, s, s))
        y = torch.arange(PREVIEW_N, device=dev) % self.spec.num_classes
        x = sample(ema.forward_velocity, z, y, mode="ode", num_steps=PREVIEW_STEPS, cfg_scale=PREVIEW_CFG,
                   null_class=self.spec.num_classes)
        pixels = self.decoder()(x.float())  # (N, H, W, 3) uint8
        images.save_grid(pixels, self.run / "samples" / f"{step:07d}.png")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.main and (self.run / "metrics.jsonl").is_file():
            images.save_loss_curve(self.run / "metrics.jsonl", self.run / "loss.png")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def loss_series(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    recs = read_metrics(path)
    steps = np.array([r["step"] for r in recs])
    return steps, {k: np.array([r[k] for r in recs]) for k in ("loss", "denoise", "align")}
