"""What a training run is at a step: model, EMA, optimizer, grad scaler and the step (the data position)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from repa_pipe.cache.manifest import TrainingView
from repa_pipe.models.registry import SIT_PRESETS
from repa_pipe.models.sit import SiT, build_sit
from repa_pipe.pipeline.errors import CacheMismatchError, ConfigError
from repa_pipe.run.checkpoint import Checkpoint, TrainingState, damaged
from repa_pipe.run.record import CacheIdentity
from repa_pipe.training.config import TrainConfig, encoder_depth_for

# Cache facts the model's shapes and the data stream depend on: a resumed run must see the same.
VIEW_FIXED = ("latent_channels", "latent_size", "scaling_factor", "feature_dims", "feature_tokens", "num_classes",
              "n")


@dataclass
class State:
    """Everything that changes during training, beside the data position (which is the step)."""

    model: SiT
    ema: SiT
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0

    def checkpoint(self, typed: dict[str, Any], resolved: dict[str, dict[str, Any]], view: TrainingView,
                   identity: CacheIdentity, path: Path) -> Checkpoint:
        """The checkpoint of this state, with the options as typed and what was derived from them (run/checkpoint.py
        says how it is written)."""
        return Checkpoint(path, "checkpoint", self.ema.state_dict(), self.step, typed, resolved, view,
                          identity, TrainingState(self.model.state_dict(), self.opt.state_dict(),
                                                  self.scaler.state_dict(), rng_state()))


def rng_state() -> dict[str, Any]:
    """Global RNG states. Training draws nothing from them (every draw comes from (seed, step)); saved so a
    resumed process starts in the same global state as the interrupted one."""
    out: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def build_model(cfg: TrainConfig, view: TrainingView, encoder_depth: int) -> SiT:
    """The SiT of `cfg.model` on the cache's latents, with one projector per aligned encoder."""
    patch = SIT_PRESETS[cfg.model].patch_size
    if view.latent_size % patch:
        raise ConfigError(f"--model {cfg.model} (patch {patch}) cannot tile the cache's latents ({view.latents}, "
                          f"{view.latent_size}x{view.latent_size}): pick another patch size, or a cache made at "
                          "another --resolution")
    model = build_sit(cfg.model, input_size=view.latent_size, in_channels=view.latent_channels,
                      num_classes=view.num_classes, encoder_depth=encoder_depth, z_dims=view.feature_dims,
                      projector_dim=cfg.projector_dim, attn_backend=cfg.attn_backend)
    check_model_fits(view, model.num_tokens, cfg.model)
    return model


def check_model_fits(view: TrainingView, model_tokens: int, model_desc: str) -> None:
    """Token grid of each feature array vs the model's tokens: one clear error naming both."""
    for name, t in zip(view.features, view.feature_tokens):
        if t != model_tokens:
            g, mg = int(round(t ** 0.5)), int(round(model_tokens ** 0.5))
            raise CacheMismatchError(
                f"{name} has a {g}x{g} token grid ({t} tokens) but {model_desc} on {view.latent_size}x"
                f"{view.latent_size} latents has {mg}x{mg} ({model_tokens}); re-encode features with --grid {mg} "
                "or pick a model with another patch size")


def adamw_impl(device: torch.device) -> dict[str, bool]:
    """Which AdamW kernels: on CUDA the fused one (one kernel for all parameters, torch's AdamW docs); elsewhere
    torch's default (a for-loop on a CPU), so CPU numbers are unchanged. Same update rule, different rounding."""
    return {"fused": True} if device.type == "cuda" else {}


def new_state(cfg: TrainConfig, view: TrainingView, device: torch.device,
              encoder_depth: Optional[int] = None) -> State:
    """A fresh state; `encoder_depth`: the aligned block as resolved (None: --encoder-depth or the model's
    default)."""
    depth = encoder_depth or encoder_depth_for(cfg)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = build_model(cfg, view, depth).to(device)
    ema = build_model(cfg, view, depth).to(device)
    ema.load_state_dict(model.state_dict())  # EMA starts as an exact copy (reference: update_ema(decay=0))
    ema.requires_grad_(False).eval()
    # Reference optimizer: AdamW(lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay); pos_embed is frozen.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.0, **adamw_impl(device))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return State(model, ema, opt, scaler)


def check_view(ck: Checkpoint, view: TrainingView) -> None:
    """The cache a run resumes on must have the facts its model and data stream were built on."""
    if ck.view is None:
        return
    saved, now = ck.view.to_json(), view.to_json()
    diff = [f"cache {k} {saved.get(k)!r} (now {now[k]!r})" for k in VIEW_FIXED if k in saved and saved[k] != now[k]]
    if diff:
        raise ConfigError(f"{ck.source} was trained on another cache: {', '.join(diff)}; use another --run-dir or "
                          "the run's own cache")


def load_into(state: State, ck: Checkpoint, cfg: TrainConfig) -> None:
    """Restore `state` from checkpoint `ck`; the command's --lr applies from here on. A part that does not fit
    (a checkpoint with the right format tag but a damaged entry) is one CheckpointError naming the file and the
    part (run/checkpoint.py: damaged), never a half-restored state that trains on."""
    t = ck.require_training("use another --run-dir")
    impl = [{k: g.get(k) for k in ("fused", "foreach")} for g in state.opt.param_groups]
    for part, restore in (("model", lambda: state.model.load_state_dict(t.model)),
                          ("ema", lambda: state.ema.load_state_dict(ck.ema)),
                          ("opt", lambda: state.opt.load_state_dict(t.opt)),
                          ("scaler", lambda: _load_scaler(state.scaler, t.scaler)),
                          ("rng", lambda: _set_rng_state(t.rng))):
        try:
            restore()
        except torch.OutOfMemoryError:  # a RuntimeError too, but the device's, not the file's
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            raise damaged(ck, part, e) from None
    for group, kernels in zip(state.opt.param_groups, impl):
        group["lr"] = cfg.lr
        group.update(kernels)  # this device's AdamW kernels, not those of the machine that saved the checkpoint
        if group.get("fused"):  # the fused kernel keeps `step` beside the parameter (torch places it per saved group)
            for p in group["params"]:
                if "step" in state.opt.state.get(p, {}):
                    state.opt.state[p]["step"] = state.opt.state[p]["step"].to(p.device, torch.float32)
    state.step = int(ck.step)


def _load_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any]) -> None:
    # A disabled scaler (bf16/fp32) saves {}; loading that into an enabled one (switch to fp16) would fail.
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
