"""`repa-pipe train`: SiT + REPA from the cache alone (no encoder, no VAE encoder), exactly resumable.

Order of one step (as EDM2 keeps a fixed order): get batch -> forward/backward per micro-batch (DDP sync only on
the last) -> unscale, clip 1.0 -> AdamW -> EMA -> at a boundary: non-finite check, log, preview, checkpoint.
Running the same command again resumes from the newest checkpoint in RUN/checkpoints.

Everything random in a step is drawn per sample from (seed, step) (see `train_data`), so the state of a run is
just model, EMA, optimizer (+ grad scaler) and the step: resuming repeats the draws of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
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
CKPT_FORMAT = "repa-pipe-train/1"
# Changing these on resume would silently train a different model: refuse.
_RESUME_FIXED = ("model", "encoder", "latents", "encoder_depth", "projector_dim", "global_batch_size", "seed",
                 "path", "weighting", "align_loss", "label_dropout")
# Cache facts the model's shapes and the data stream depend on: a resumed run must see the same.
_RESUME_CACHE = ("latent_channels", "latent_size", "scaling_factor", "feature_dims", "feature_tokens",
                 "num_classes", "n")


class NonFiniteLossError(RepaError):
    """The loss became NaN/inf; the run stopped and the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    cache: Path
    run: Path
    model: str = "SiT-XL/2"
    encoder: tuple[str, ...] = ("dinov2-b",)   # one projector per encoder; () trains the SiT baseline
    latents: Optional[str] = None               # latents codec / array; None: the cache's only one
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


# ------------------------------------------------------------------------------------------------ checks
def validate(cfg: TrainConfig) -> None:
    if cfg.model not in SIT_PRESETS:
        raise ConfigError(f"--model must be one of {', '.join(SIT_PRESETS)}; got {cfg.model!r}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be bf16, fp16 or fp32; got {cfg.precision!r}")
    for name in ("steps", "global_batch_size", "ckpt_every", "log_every", "projector_dim", "loader_threads"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("sample_every", "keep_ckpts"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.micro_batch_size is not None and cfg.micro_batch_size < 1:
        raise ConfigError(f"--micro-batch-size must be positive, got {cfg.micro_batch_size}")
    if not cfg.lr > 0 or not cfg.grad_clip > 0:
        raise ConfigError(f"--lr and --grad-clip must be positive; got {cfg.lr}, {cfg.grad_clip}")
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
        raise ConfigError(f"a rank's share {share} (--global-batch-size {cfg.global_batch_size} / {world} "
                          f"processes) is not divisible by --micro-batch-size {micro}")
    return micro, share // micro


def check_resume(cfg: TrainConfig, spec: CacheSpec, saved: dict[str, Any], path: Path) -> None:
    """One error naming every option (and cache fact) that differs from the run being resumed."""
    now = to_dict(cfg)
    saved_cfg = saved["config"]
    diff = [f"--{k.replace('_', '-')} {saved_cfg.get(k)!r} (now {now.get(k)!r})"
            for k in _RESUME_FIXED if saved_cfg.get(k) != now.get(k)]
    saved_spec, spec_now = saved.get("cache_spec", {}), dataclasses.asdict(spec)
    diff += [f"cache {k} {saved_spec.get(k)!r} (now {spec_now[k]!r})"
             for k in _RESUME_CACHE if k in saved_spec and saved_spec[k] != spec_now[k]]
    if diff:
        raise ConfigError(f"{path} was trained with other settings: {', '.join(diff)}; "
                          "use another --run folder or the same options")


# ------------------------------------------------------------------------------------------------ state
@dataclass
class State:
    """Everything that changes during training, beside the data position (which is the step)."""

    model: SiT
    ema: SiT
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def state_dict(self, cfg: TrainConfig, spec: CacheSpec) -> dict[str, Any]:
        """Tensors and plain values only, so the file loads with torch.load(weights_only=True)."""
        return {"format": CKPT_FORMAT, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "rng": rng_state(), "sampler": {"seed": cfg.seed, "step": self.step},
                "config": to_dict(cfg), "cache_spec": dataclasses.asdict(spec)}


def rng_state() -> dict[str, Any]:
    """Global RNG states. Training draws nothing from them (every draw comes from (seed, step)); saved so a
    resumed process starts in the same global state as the interrupted one."""
    out: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


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
    # Reference optimizer: AdamW(lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay); pos_embed is frozen.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return State(model, ema, opt, scaler)


def resume(cfg: TrainConfig, spec: CacheSpec, state: State) -> None:
    path = checkpoint.latest(cfg.run)
    if path is None:
        return
    ck = checkpoint.load(path)
    if ck.get("format") != CKPT_FORMAT:
        raise ConfigError(f"{path}: not a repa-pipe training checkpoint; use another --run folder")
    check_resume(cfg, spec, ck, path)
    state.model.load_state_dict(ck["model"])
    state.ema.load_state_dict(ck["ema"])
    state.opt.load_state_dict(ck["opt"])
    for group in state.opt.param_groups:  # the command's --lr wins over the saved one (lowering it after a NaN)
        group["lr"] = cfg.lr
    # A disabled scaler (bf16/fp32) saves {}; loading that into an enabled one (switch to fp16) would fail.
    if ck["scaler"] and state.scaler.is_enabled():
        state.scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(ck["rng"]["torch"])
    if "cuda" in ck["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(ck["rng"]["cuda"])
    state.step = int(ck["step"])
    log(f"resumed from {path} at step {state.step}")


# ------------------------------------------------------------------------------------------------ one step
@dataclass
class Runtime:
    """How a step runs, beside the state: the (maybe DDP-wrapped, compiled) network and the batch split."""

    net: torch.nn.Module          # what forward calls: the model, DDP(model) or torch.compile of either
    ddp: Optional[DDP]            # kept apart from `net`: a compiled DDP no longer isinstance-checks as DDP
    micro: int                    # rows per forward
    device: torch.device


def no_sync(ddp: Optional[DDP], last: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on every micro-batch but the last (accumulate locally first)."""
    return ddp.no_sync() if (ddp is not None and not last) else contextlib.nullcontext()


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[cfg.precision])


@torch.no_grad()
def update_ema(ema: SiT, model: SiT, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param over all parameters (incl. frozen pos_embed), as the reference."""
    e = list(ema.parameters())
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - decay)  # lerp(e, m, w) = e + w (m - e) = decay e + (1 - decay) m


def micro_loss(cfg: TrainConfig, spec: CacheSpec, net: torch.nn.Module, batch: Batch, sl: slice,
               device: torch.device) -> dict[str, torch.Tensor]:
    """REPA loss of rows `sl` of the rank's batch, from the rows' own pre-drawn randomness."""
    d = {k: v[sl].to(device, non_blocking=True) for k, v in batch.draws.items()}
    x0 = transport.sample_posterior(batch.moments[sl].to(device, non_blocking=True), d["eps"], spec.scaling_factor)
    y = drop_labels(batch.labels[sl].to(device, non_blocking=True), d["drop"], spec.num_classes)
    t = transport.time_from_base(d["t_uniform"] if cfg.weighting == "uniform" else d["t_normal"],
                                 cfg.weighting, cfg.path)
    feats = [f[sl].to(device, non_blocking=True) for f in batch.features]
    return transport.repa_loss(net, x0, y, feats, d["noise"], t, cfg.proj_coeff, cfg.align_loss, cfg.path)


def forward_backward(cfg: TrainConfig, spec: CacheSpec, state: State, net: torch.nn.Module, batch: Batch,
                     micro: int, device: torch.device, ddp: Optional[DDP] = None) -> dict[str, torch.Tensor]:
    """Loss over the rank's rows in micro-batches; gradients summed so they equal the rank-share mean (and DDP's
    average over ranks makes them the global-batch mean). Returns the rank-share mean of each loss term."""
    share = batch.labels.shape[0]
    w = micro / share
    sums = {k: torch.zeros((), device=device) for k in ("loss", "denoise", "align")}
    for lo in range(0, share, micro):
        with no_sync(ddp, last=lo + micro >= share):
            with autocast(cfg, device):
                out = micro_loss(cfg, spec, net, batch, slice(lo, lo + micro), device)
            state.scaler.scale(out["loss"] * w).backward()
        for k in sums:
            sums[k] += out[k].detach().float() * w
    return sums


def optimizer_step(cfg: TrainConfig, state: State) -> torch.Tensor:
    """Unscale, clip, AdamW, EMA. Returns the pre-clip gradient norm (the value the reference logs)."""
    state.scaler.unscale_(state.opt)
    params = [p for p in state.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    state.scaler.step(state.opt)
    state.scaler.update()
    state.opt.zero_grad(set_to_none=True)
    update_ema(state.ema, state.model, cfg.ema_decay)
    return grad_norm.detach()


# ------------------------------------------------------------------------------------------------ the loop
class NonFiniteGuard:
    """Remembers the first step whose loss (or, without a grad scaler, gradient norm) was NaN/inf.

    Updated on the device every step without a host sync; `check` syncs once per boundary, before anything is
    logged, previewed or saved. The gradient norm counts too: a NaN gradient with a finite loss already poisons
    the weights, and the checkpoint of that step must not be written. With fp16 the scaler skips such steps.
    """

    NONE = -1

    def __init__(self, device: torch.device, check_grad: bool):
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.check_grad = check_grad

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss)
        if self.check_grad:
            bad |= ~torch.isfinite(grad_norm)
        self.first = torch.where(bad & (self.first == self.NONE), torch.full_like(self.first, step), self.first)

    def check(self, last_good: Optional[Path]) -> None:
        flagged = dist.all_reduce_sum((self.first != self.NONE).float())
        if not flagged.item():
            return
        step = min(s for s in dist.all_gather_object(int(self.first.item())) if s != self.NONE)
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step}; stopped. Last good checkpoint: {last_good or 'none'} "
            "(run the same command to resume from it; try --precision fp32 or a lower --lr)")


def due(cfg: TrainConfig, step: int) -> set[str]:
    """What happens after `step`: log (every --log-every and at the end), sample, ckpt (every --ckpt-every and at
    the end)."""
    end = step == cfg.steps
    events = set()
    if step % cfg.log_every == 0 or end:
        events.add("log")
    if cfg.sample_every and step % cfg.sample_every == 0:
        events.add("sample")
    if step % cfg.ckpt_every == 0 or end:
        events.add("ckpt")
    return events


def save_checkpoint(cfg: TrainConfig, spec: CacheSpec, state: State) -> Path:
    path = checkpoint.ckpt_path(cfg.run, state.step)
    if dist.is_main():
        checkpoint.save(path, state.state_dict(cfg, spec))  # atomic: temp file, fsync, rename
        checkpoint.prune(cfg.run, cfg.keep_ckpts)
    dist.barrier()
    return path


def loop(cfg: TrainConfig, spec: CacheSpec, state: State, rt: Runtime, stream: train_data.BatchStream,
         watch: train_watch.Watcher) -> None:
    state.model.train()
    guard = NonFiniteGuard(rt.device, check_grad=not state.scaler.is_enabled())
    last_good = checkpoint.latest(cfg.run)
    while state.step < cfg.steps:
        batch = next(stream)
        sums = forward_backward(cfg, spec, state, rt.net, batch, rt.micro, rt.device, rt.ddp)
        grad_norm = optimizer_step(cfg, state)
        state.step += 1
        guard.update(state.step, sums["loss"], grad_norm)
        watch.accumulate(sums, grad_norm)
        events = due(cfg, state.step)
        if not events:
            continue
        guard.check(last_good)
        if "log" in events:
            watch.log(state.step, stream.wait_s)
        if "sample" in events:
            watch.preview(state.step)
        if "ckpt" in events:
            last_good = save_checkpoint(cfg, spec, state)
    log(f"done: step {state.step}, checkpoint {checkpoint.ckpt_path(cfg.run, state.step)}")


# ------------------------------------------------------------------------------------------------ entry
def setup_device(cfg: TrainConfig) -> torch.device:
    device = dist.device()
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def wrap(cfg: TrainConfig, model: SiT, micro: int, device: torch.device) -> Runtime:
    ddp = None
    if dist.get_world_size() > 1:
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    net: torch.nn.Module = ddp if ddp is not None else model
    if cfg.compile:
        net = torch.compile(net)
    return Runtime(net, ddp, micro, device)


def run(cfg: TrainConfig) -> None:
    validate(cfg)
    # Checks that need no process group come first: a bad split or cache fails on every rank at once, before
    # anyone waits at the rendezvous.
    world = dist.env_info().world_size
    micro, accum = micro_batches(cfg, world)
    spec = train_data.check_cache(Path(cfg.cache), list(cfg.encoder), cfg.latents)
    train_data.check_batch_fits(spec, cfg.global_batch_size, Path(cfg.cache))
    cfg = dataclasses.replace(cfg, latents=spec.latents.removeprefix("latents/"))  # resolved, for resume checks
    info = dist.init()
    device = setup_device(cfg)
    state = new_state(cfg, spec, device)
    resume(cfg, spec, state)
    if state.step >= cfg.steps:
        log(f"{cfg.run}: already trained to step {state.step} (--steps {cfg.steps}); nothing to do")
        dist.shutdown()
        return
    if dist.is_main():
        Path(cfg.run).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(cfg.run) / "config.json", {**to_dict(cfg), "cache_spec": dataclasses.asdict(spec)})
    dist.barrier()
    rt = wrap(cfg, state.model, micro, device)
    log(f"train {cfg.model}: {sum(p.numel() for p in state.model.parameters()):,} parameters, "
        f"{info.world_size} process(es), global batch {cfg.global_batch_size} = {info.world_size} x {accum} x {micro}")
    stream = train_data.BatchStream(Path(cfg.cache), spec, cfg.global_batch_size, cfg.seed, info.rank,
                                    info.world_size, cfg.label_dropout, state.step, cfg.steps,
                                    threads=cfg.loader_threads)
    watch = train_watch.Watcher(cfg, spec, state, flops_per_sample(state.model) * 3 * cfg.global_batch_size)
    try:
        loop(cfg, spec, state, rt, stream, watch)
    finally:
        stream.close()
        watch.close()
    dist.shutdown()  # only after a clean finish: after an error another rank may still be inside a collective
