"""`repa-pipe export RUN OUT.safetensors`: the EMA weights of a run, as safetensors."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from repa_pipe.pipeline import checkpoint
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.progress import log


def resolve_checkpoint(run_or_file: Path) -> Path:
    p = Path(run_or_file)
    if p.is_file():
        return p
    found = checkpoint.latest(p)
    if found is None:
        raise ConfigError(f"{p}: no checkpoints (expected RUN/checkpoints/NNNNNNN.pt or a .pt file)")
    return found


def run(run_or_file: Path, out: Path) -> None:
    path = resolve_checkpoint(run_or_file)
    ck = checkpoint.load(path)
    if "ema" not in ck:
        raise ConfigError(f"{path}: not a repa-pipe training checkpoint (no 'ema' entry)")
    tensors = {k: v.contiguous() for k, v in ck["ema"].items()}
    meta = {"format": "repa-pipe-ema/1", "step": str(ck["step"]), "config": json.dumps(ck["config"])}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out)
    log(f"wrote {out}: EMA weights of {path} (step {ck['step']}, {len(tensors)} tensors)")
