"""One optimizer step: forward/backward per micro-batch (DDP sync only on the last), unscale, clip, AdamW, EMA."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from repa_pipe.cache.manifest import TrainingView
from repa_pipe.models import transport
from repa_pipe.models.sit import SiT, drop_labels
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.precision import autocast, compute
from repa_pipe.training.config import TrainConfig
from repa_pipe.training.state import State
from repa_pipe.training.stream import Batch, features_to


@dataclass
class Runtime:
    """How a step runs, beside the state: the (maybe DDP-wrapped, compiled) network and the batch split."""

    net: torch.nn.Module          # what forward calls: the model, DDP(model) or torch.compile of either
    ddp: Optional[DDP]            # kept apart from `net`: a compiled DDP no longer isinstance-checks as DDP
    micro: int                    # rows per forward
    device: torch.device


def setup_device(cfg: TrainConfig) -> torch.device:
    """The device training runs on. TF32 (--tf32) is not set here for the whole process: each step turns it on
    for its own forward/backward only (`forward_backward`), so nothing leaks into later work in the process."""
    return dist.device()


def ddp_options(device: torch.device) -> dict[str, object]:
    """DDP settings: gradients are views into the all-reduce buckets (no second copy of every gradient, one
    memcpy less per step: torch's DDP notes). static_graph stays off: the step skips the all-reduce with
    no_sync() on all but the last micro-batch, and `--compile` splits the graph at bucket boundaries."""
    return {"device_ids": [device.index] if device.type == "cuda" else None, "gradient_as_bucket_view": True}


def wrap(cfg: TrainConfig, model: SiT, micro: int, device: torch.device) -> Runtime:
    ddp = None
    if dist.get_world_size() > 1:
        ddp = DDP(model, **ddp_options(device))
    net: torch.nn.Module = ddp if ddp is not None else model
    if cfg.compile:
        net = torch.compile(net)
    return Runtime(net, ddp, micro, device)


def no_sync(ddp: Optional[DDP], last: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on every micro-batch but the last (accumulate locally first)."""
    return ddp.no_sync() if (ddp is not None and not last) else contextlib.nullcontext()


@torch.no_grad()
def update_ema(ema: SiT, model: SiT, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param over all parameters (incl. frozen pos_embed), as the reference."""
    e = list(ema.parameters())
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - decay)  # lerp(e, m, w) = e + w (m - e) = decay e + (1 - decay) m


def micro_loss(cfg: TrainConfig, view: TrainingView, net: torch.nn.Module, batch: Batch, sl: slice,
               device: torch.device) -> dict[str, torch.Tensor]:
    """REPA loss of rows `sl` of the rank's batch, from the rows' own pre-drawn randomness."""
    d = {k: v[sl].to(device, non_blocking=True) for k, v in batch.draws.items()}
    x0 = transport.sample_posterior(batch.moments[sl].to(device, non_blocking=True), d["eps"], view.scaling_factor)
    y = drop_labels(batch.labels[sl].to(device, non_blocking=True), d["drop"], view.num_classes)
    t = transport.time_from_base(d["t_uniform"] if cfg.weighting == "uniform" else d["t_normal"],
                                 cfg.weighting, cfg.path)
    feats = [features_to(f[sl], device) for f in batch.features]  # int8 as stored: dequantized on the device
    return transport.repa_loss(net, x0, y, feats, d["noise"], t, cfg.proj_coeff, cfg.align_loss, cfg.path)


def forward_backward(cfg: TrainConfig, view: TrainingView, state: State, rt: Runtime,
                     batch: Batch) -> dict[str, torch.Tensor]:
    """Loss over the rank's rows in micro-batches; gradients summed so they equal the rank-share mean (and DDP's
    average over ranks makes them the global-batch mean). Returns the rank-share mean of each loss term."""
    share = batch.labels.shape[0]
    w = rt.micro / share
    sums = {k: torch.zeros((), device=rt.device) for k in ("loss", "denoise", "align")}
    # TF32 (--tf32, CUDA only) for this step's forward and backward only; autocast around the forward alone, as
    # torch's AMP notes ask (backward ops run in the dtypes autocast chose for their forward ops).
    with compute("fp32", rt.device, allow_tf32=cfg.tf32):
        for lo in range(0, share, rt.micro):
            with no_sync(rt.ddp, last=lo + rt.micro >= share):
                with autocast(cfg.precision, rt.device):
                    out = micro_loss(cfg, view, rt.net, batch, slice(lo, lo + rt.micro), rt.device)
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
