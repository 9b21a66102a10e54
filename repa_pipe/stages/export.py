"""`repa-pipe export RUN OUT.safetensors`: the EMA weights of a run, as safetensors.

The metadata holds the training config and the cache facts that fix the architecture (latent size and
channels, classes, projector dims), so the file alone is enough to rebuild and sample the model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from repa_pipe.pipeline import checkpoint
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.fileio import atomic_write_bytes
from repa_pipe.pipeline.progress import log
from repa_pipe.sampling.config import ExportConfig

EXPORT_FORMAT = "repa-pipe-ema/1"


def resolve_checkpoint(run_or_file: Path) -> Path:
    p = Path(run_or_file)
    if p.is_file():
        return p
    found = checkpoint.latest(p)
    if found is None:
        raise ConfigError(f"{p}: no checkpoints (expected RUN/checkpoints/NNNNNNN.pt or a .pt file)")
    return found


def ema_tensors(ck: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(ck, dict) or not isinstance(ck.get("ema"), dict):
        raise ConfigError(f"{path}: not a repa-pipe training checkpoint (no 'ema' entry)")
    return {k: v.detach().cpu().contiguous() for k, v in ck["ema"].items()}


def metadata(ck: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata is str -> str: JSON for the nested parts."""
    return {"format": EXPORT_FORMAT, "step": str(ck["step"]), "config": json.dumps(ck.get("config", {})),
            "cache_spec": json.dumps(ck.get("cache_spec", {}))}


def run(cfg: ExportConfig) -> None:
    out = Path(cfg.out)
    path = resolve_checkpoint(cfg.run)
    ck = checkpoint.load(path)
    tensors = ema_tensors(ck, path)
    atomic_write_bytes(Path(out), safetensors_bytes(tensors, metadata=metadata(ck)))  # never a torn file
    log(f"wrote {out}: EMA weights of {path} (step {ck['step']}, {len(tensors)} tensors)")
