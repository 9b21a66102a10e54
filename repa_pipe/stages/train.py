"""`repa-pipe train`: SiT + REPA from the cache alone (no encoder, no VAE encoder), exactly resumable.

Order of one step (as EDM2 keeps a fixed order): get batch -> forward/backward per micro-batch (DDP sync only on
the last) -> unscale, clip 1.0 -> AdamW -> EMA -> log / preview / checkpoint. Running the same command again
resumes from the newest checkpoint in RUN/checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from repa_pipe.models import transport
from repa_pipe.models.sit import SIT_PRESETS, SiT, build_sit, drop_labels, flops_per_sample
from repa_pipe.pipeline import checkpoint, dist
from repa_pipe.pipeline.config import to_dict
from repa_pipe.pipeline.errors import ConfigError, RepaError
from repa_pipe.pipeline.fileio import atomic_write_json
from repa_pipe.pipeline.progress import log
from repa_pipe.stages import train_data, train_watch
from repa_pipe.stages.train_data import Batch, CacheSpec

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Changing these on resume would silently train a different model: refuse.
_RESUME_FIXED = ("model", "encoder", "latents", "encoder_depth", "projector_dim", "global_batch_size", "seed",
                 "path", "weighting", "align_loss", "label_dropout")


class NonFiniteLossError(RepaError):
    """The loss became NaN/inf; the run stopped and the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    cache: Path
    run: Path
    model: str = "SiT-XL/2"
    encoder: tuple[str, ...] = ("dinov2-b",)   # one projector per encoder; () trains the SiT baseline
    latents: Optional[str] = None               # latents array; None: the cache's only one
    steps: int = 400_000
    global_batch_size: int = 256
    micro_batch_size: Optional[int] = None      # rows per forward on a rank; None: the rank's whole share
    lr: float = 1e-4
    grad_clip: float = 1.0
    proj_coeff: float = 0.5
    encoder_depth: int = 8
    projector_dim: int = 2048
    align_loss: str = "cosine"                  # cosine or ntxent
    path: str = "linear"                        # linear or cosine interpolant
    weighting: str = "uniform"                  # time sampling: uniform or lognormal
    label_dropout: float = 0.1
    ema_decay: float = 0.9999
    precision: str = "bf16"                     # bf16, fp16 (with grad scaler) or fp32
    compile: bool = False
    tf32: bool = True
    seed: int = 0
    ckpt_every: int = 50_000
    keep_ckpts: int = 0                         # keep the newest K checkpoints; 0 keeps all
    log_every: int = 100
    sample_every: int = 10_000                  # EMA preview grid; 0 disables
    tensorboard: bool = False
    attn_backend: str = "sdpa"
    loader_threads: int = 8


def validate(cfg: TrainConfig) -> None:
    if cfg.model not in SIT_PRESETS:
        raise ConfigError(f"--model must be one of {', '.join(SIT_PRESETS)}; got {cfg.model!r}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be bf16, fp16 or fp32; got {cfg.precision!r}")
    for name in ("steps", "global_batch_size", "ckpt_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if not 0.0 <= cfg.label_dropout < 1.0 or not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError("--label-dropout and --ema-decay must be in [0, 1)")
    transport._check(cfg.path, transport.PATHS, "--path")
    transport._check(cfg.weighting, transport.TIME_SAMPLERS, "--weighting")
    transport._check(cfg.align_loss, transport.ALIGN_LOSSES, "--align-loss")


def micro_batches(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per step) for this world size."""
    if cfg.global_batch_size % world:
        raise ConfigError(f"--global-batch-size {cfg.global_batch_size} is not divisible by {world} processes")
    share = cfg.global_batch_size // world
    micro = min(cfg.micro_batch_size or share, share)
    if share % micro:
        raise ConfigError(f"a rank's share {share} is not divisible by --micro-batch-size {micro}")
    return micro, share // micro


@dataclass
class State:
    """Everything that changes during training, beside the data position (which is the step)."""

    model: SiT
    ema: SiT
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def state_dict(self, cfg: TrainConfig) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "config": to_dict(cfg),
                "rng": {"torch": torch.get_rng_state()}, "sampler": {"seed": cfg.seed, "step": self.step},
                "format": "repa-pipe-train/1"}


def build_model(cfg: TrainConfig, spec: CacheSpec) -> SiT:
    model = build_sit(cfg.model, input_size=spec.latent_size, in_channels=spec.latent_channels,
                      num_classes=spec.num_classes, encoder_depth=cfg.encoder_depth, z_dims=spec.feature_dims,
                      projector_dim=cfg.projector_dim, attn_backend=cfg.attn_backend)
    train_data.check_model_fits(spec, model.num_tokens, cfg.model)
    return model


def new_state(cfg: TrainConfig, spec: CacheSpec, device: torch.device) -> State:
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = build_model(cfg, spec).to(device)
    ema = build_model(cfg, spec).to(device)
    ema.load_state_dict(model.state_dict())  # EMA starts as an exact copy (reference: update_ema(decay=0))
    ema.requires_grad_(False).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return State(model, ema, opt, scaler)


def check_resume(cfg: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    now = to_dict(cfg)
    diff = [k for k in _RESUME_FIXED if saved.get(k) != now.get(k)]
    if diff:
        raise ConfigError(f"{path} was trained with other settings: " + ", ".join(
            f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now.get(k)!r})" for k in diff)
            + "; use another --run folder or the same options")


def resume(cfg: TrainConfig, state: State) -> None:
    path = checkpoint.latest(cfg.run)
    if path is None:
        return
    ck = checkpoint.load(path)
    check_resume(cfg, ck["config"], path)
    state.model.load_state_dict(ck["model"])
    state.ema.load_state_dict(ck["ema"])
    state.opt.load_state_dict(ck["opt"])
    state.scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(ck["rng"]["torch"])
    state.step = int(ck["step"])
    log(f"resumed from {path} at step {state.step}")


@torch.no_grad()
def update_ema(ema: SiT, model: SiT, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param over all parameters (incl. frozen pos_embed), as the reference."""
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - decay)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device, non_blocking=True)


def forward_backward(cfg: TrainConfig, spec: CacheSpec, state: State, net: torch.nn.Module, batch: Batch,
                     micro: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Loss over the rank's rows in micro-batches; gradients summed so they equal the rank-share mean."""
    share = batch.labels.shape[0]
    amp = (torch.autocast(device.type, dtype=PRECISIONS[cfg.precision]) if cfg.precision != "fp32"
           else contextlib.nullcontext())
    sums = {k: torch.zeros((), device=device) for k in ("loss", "denoise", "align")}
    for i, lo in enumerate(range(0, share, micro)):
        sl = slice(lo, lo + micro)
        d = {k: _to(v[sl], device) for k, v in batch.draws.items()}
        x0 = transport.sample_posterior(_to(batch.moments[sl], device), d["eps"], spec.scaling_factor)
        y = drop_labels(_to(batch.labels[sl], device), d["drop"], spec.num_classes)
        t = transport.time_from_base(d["t_uniform"] if cfg.weighting == "uniform" else d["t_normal"],
                                     cfg.weighting, cfg.path)
        feats = [_to(f[sl], device) for f in batch.features]
        last = lo + micro >= share
        sync = contextlib.nullcontext() if (last or not isinstance(net, DDP)) else net.no_sync()
        with sync:
            with amp:
                out = transport.repa_loss(net, x0, y, feats, d["noise"], t, cfg.proj_coeff, cfg.align_loss, cfg.path)
            state.scaler.scale(out["loss"] * (micro / share)).backward()
        for k in sums:
            sums[k] += out[k].detach().float() * (micro / share)
    return sums


def optimizer_step(cfg: TrainConfig, state: State) -> torch.Tensor:
    state.scaler.unscale_(state.opt)
    params = [p for p in state.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # pre-clip norm, logged
    state.scaler.step(state.opt)
    state.scaler.update()
    state.opt.zero_grad(set_to_none=True)
    update_ema(state.ema, state.model, cfg.ema_decay)
    return grad_norm.detach()


def save_checkpoint(cfg: TrainConfig, state: State) -> None:
    if dist.is_main():
        checkpoint.save(checkpoint.ckpt_path(cfg.run, state.step), state.state_dict(cfg))
        checkpoint.prune(cfg.run, cfg.keep_ckpts)
    dist.barrier()


def setup_device(cfg: TrainConfig) -> torch.device:
    device = dist.device()
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def run(cfg: TrainConfig) -> None:
    validate(cfg)
    info = dist.init()
    device = setup_device(cfg)
    spec = train_data.check_cache(Path(cfg.cache), list(cfg.encoder), cfg.latents)
    micro, accum = micro_batches(cfg, info.world_size)
    state = new_state(cfg, spec, device)
    resume(cfg, state)
    if state.step >= cfg.steps:
        log(f"{cfg.run}: already trained to step {state.step} (--steps {cfg.steps}); nothing to do")
        return
    if dist.is_main():
        Path(cfg.run).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(cfg.run) / "config.json", {**to_dict(cfg), "cache_spec": spec.__dict__})
    dist.barrier()
    net: torch.nn.Module = state.model
    if info.world_size > 1:
        net = DDP(state.model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    log(f"train {cfg.model}: {sum(p.numel() for p in state.model.parameters()):,} parameters, "
        f"{info.world_size} process(es), global batch {cfg.global_batch_size} = {info.world_size} x {accum} x {micro}")
    stream = train_data.BatchStream(Path(cfg.cache), spec, cfg.global_batch_size, cfg.seed, info.rank,
                                    info.world_size, cfg.label_dropout, state.step, cfg.steps,
                                    threads=cfg.loader_threads)
    watch = train_watch.Watcher(cfg, spec, state, flops_per_sample(state.model) * 3 * cfg.global_batch_size)
    try:
        loop(cfg, spec, state, net, stream, watch, micro, device)
    finally:
        stream.close()
        watch.close()


def loop(cfg: TrainConfig, spec: CacheSpec, state: State, net: torch.nn.Module, stream: train_data.BatchStream,
         watch: "train_watch.Watcher", micro: int, device: torch.device) -> None:
    state.model.train()
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    last_good = checkpoint.latest(cfg.run)
    while state.step < cfg.steps:
        batch = next(stream)
        sums = forward_backward(cfg, spec, state, net, batch, micro, device)
        nonfinite |= ~torch.isfinite(sums["loss"])
        grad_norm = optimizer_step(cfg, state)
        state.step += 1
        watch.accumulate(sums, grad_norm)
        boundary = (state.step % cfg.log_every == 0 or state.step % cfg.ckpt_every == 0
                    or state.step == cfg.steps)
        if boundary:
            # one host sync per boundary: a non-finite loss is caught before anything is saved
            if bool(dist.all_reduce_sum(nonfinite.float().clone()).item()):
                raise NonFiniteLossError(
                    f"loss became non-finite at or before step {state.step}; stopped. Last good checkpoint: "
                    f"{last_good or 'none'}. Try --precision bf16/fp32 or a lower --lr.")
            watch.log(state.step, stream.wait_s)
        if cfg.sample_every and state.step % cfg.sample_every == 0:
            watch.preview(state.step)
        if state.step % cfg.ckpt_every == 0 or state.step == cfg.steps:
            save_checkpoint(cfg, state)
            last_good = checkpoint.ckpt_path(cfg.run, state.step)
    log(f"done: step {state.step}, checkpoint {checkpoint.ckpt_path(cfg.run, state.step)}")
