"""Loading SiT weights for sampling from any of the three places they come in.

- our training checkpoint (RUN/checkpoints/NNNNNNN.pt, its `ema` entry),
- our exported safetensors (`repa-pipe export`),
- the reference implementation's published checkpoint (`last.pt`: a bare EMA state dict, or a dict with `ema`).

The architecture is read off the weights (channels, patch, token grid, classes, projector dims) and checked
against the preset name, so a wrong `--model` is one clear error rather than a shape traceback.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from repa_pipe.models.sit import SIT_PRESETS, SiT, build_sit, load_reference_state_dict
from repa_pipe.pipeline import checkpoint
from repa_pipe.pipeline.config import check_choice
from repa_pipe.pipeline.errors import ConfigError


@dataclass
class LoadedModel:
    model: SiT
    source: str                      # file the weights came from
    kind: str                        # "checkpoint" | "safetensors" | "reference"
    step: Optional[int]
    train_config: dict[str, Any]     # the training config when known ({} for the reference checkpoint)
    view: Optional[dict[str, Any]]   # the cache's training view (cache.manifest.TrainingView) when known


def resolve_weights(run: Optional[Path], ckpt: Optional[str]) -> Path:
    """--ckpt FILE, --ckpt STEP (in RUN), or RUN's newest checkpoint."""
    if ckpt is not None and not ckpt.isdigit():
        p = Path(ckpt)
        if not p.is_file():
            raise ConfigError(f"--ckpt {ckpt}: no such file")
        return p
    if run is None:
        raise ConfigError("pass --run-dir RUN (a training run folder) or --ckpt FILE")
    if ckpt is not None:
        p = checkpoint.ckpt_path(run, int(ckpt))
        if not p.is_file():
            have = [s for s, _ in checkpoint.list_checkpoints(run)]
            raise ConfigError(f"--ckpt {ckpt}: {run} has no checkpoint at that step (have: {have or 'none'})")
        return p
    p = checkpoint.latest(run)
    if p is None:
        raise ConfigError(f"{run}: no checkpoints in {run}/checkpoints")
    return p


Weights = tuple[dict[str, torch.Tensor], str, Optional[int], dict[str, Any], Optional[dict[str, Any]]]


def read_weights(path: Path) -> Weights:
    """(EMA state dict, kind, step, train config, cache view) from a checkpoint, safetensors or reference file."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # truncated or foreign file: name it, no Rust traceback
            raise ConfigError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        cfg = json.loads(meta["config"]) if "config" in meta else {}
        step = int(meta["step"]) if "step" in meta else None
        view = json.loads(meta["cache_spec"]) if meta.get("cache_spec") else None
        return sd, "safetensors", step, cfg, view
    ck = _load_pt(path)
    if isinstance(ck, dict) and str(ck.get("format", "")).startswith("repa-pipe-train"):
        return ck["ema"], "checkpoint", int(ck["step"]), ck["config"], ck.get("cache_spec")
    if isinstance(ck, dict) and "ema" in ck and isinstance(ck["ema"], dict):
        return ck["ema"], "reference", ck.get("steps"), {}, None
    if isinstance(ck, dict) and all(isinstance(v, torch.Tensor) for v in ck.values()):
        return ck, "reference", None, {}, None
    raise ConfigError(f"{path}: neither a repa-pipe checkpoint nor a SiT state dict")


def _load_pt(path: Path) -> Any:
    """torch.load(weights_only=True), also for the reference's training checkpoints: they pickle `args`, an
    argparse.Namespace (a plain attribute bag), which the weights-only unpickler refuses unless allowlisted."""
    safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; 2.4 has only add_safe_globals
    if safe is None:
        torch.serialization.add_safe_globals([argparse.Namespace])
        return checkpoint.load(path)
    with safe([argparse.Namespace]):
        return checkpoint.load(path)


def _shape(sd: dict[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in sd:
        raise ConfigError(f"{path}: not a SiT state dict (no {key})")
    return tuple(sd[key].shape)


def build_from_weights(sd: dict[str, torch.Tensor], preset: str, encoder_depth: int, path: Path) -> SiT:
    """Build preset `preset` with the geometry the weights imply, then load them strictly."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    hidden, channels, p, _ = _shape(sd, "x_embedder.proj.weight", path)
    tokens = _shape(sd, "pos_embed", path)[1]
    grid = int(round(tokens ** 0.5))
    num_classes = _shape(sd, "y_embedder.embedding_table.weight", path)[0] - 1
    z_dims, i = [], 0
    while f"projectors.{i}.4.weight" in sd:
        z_dims.append(sd[f"projectors.{i}.4.weight"].shape[0])
        i += 1
    projector_dim = sd["projectors.0.0.weight"].shape[0] if z_dims else 2048
    pre = SIT_PRESETS[preset]
    if (pre.hidden_size, pre.patch_size) != (hidden, p):
        raise ConfigError(f"{path}: weights are width {hidden}, patch {p}; --model {preset} is width "
                          f"{pre.hidden_size}, patch {pre.patch_size}")
    model = build_sit(preset, input_size=grid * p, in_channels=channels, num_classes=num_classes,
                      encoder_depth=min(encoder_depth, pre.depth), z_dims=z_dims, projector_dim=projector_dim)
    load_reference_state_dict(model, sd)
    return model


def load_for_sampling(run: Optional[Path], ckpt: Optional[str], preset: Optional[str],
                      device: torch.device) -> LoadedModel:
    path = resolve_weights(run, ckpt)
    sd, kind, step, cfg, view = read_weights(path)
    name = preset or cfg.get("model")
    if name is None:
        raise ConfigError(f"{path}: a reference checkpoint does not say its model; pass --model (e.g. SiT-XL/2)")
    check_choice(name, SIT_PRESETS, "model")
    # The tap depth changes no sampling output (projectors are skipped); it must only be a valid block.
    depth = cfg.get("encoder_depth") or SIT_PRESETS[name].align_depth
    model = build_from_weights(sd, name, depth, path)
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model, str(path), kind, step, cfg, view)
