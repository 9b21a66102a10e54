"""Exporting a run's EMA weights as safetensors (`repa-pipe export`); run/checkpoint.py reads them back."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from safetensors.torch import save as safetensors_bytes

from repa_pipe.pipeline import checkpoint as files
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.fileio import atomic_write_bytes
from repa_pipe.run.checkpoint import EXPORT_FORMAT, Checkpoint, load, load_from
from repa_pipe.run.record import RECORD


def check_export_target(out: Path) -> None:
    """One line for a target that must not be written: inside a run's checkpoints folder (it would replace or sit
    among the run's checkpoints), an existing file that is not a regular file (a device, a FIFO, a folder: the
    temp-and-rename write would replace the node), or a file in a folder that does not exist."""
    out = Path(out)
    parent = out.parent.resolve()
    if not parent.is_dir():
        raise ConfigError(f"{out}: its folder {out.parent} does not exist; create it first or export elsewhere")
    if parent.name == "checkpoints" and (files.list_checkpoints(parent.parent) or
                                         (parent.parent / RECORD).is_file()):
        raise ConfigError(f"{out}: inside the checkpoints folder of run {parent.parent}, where it would replace or "
                          "sit among the run's checkpoints; export to a path outside RUN/checkpoints")
    if out.exists() or out.is_symlink():
        if out.is_dir() or not stat.S_ISREG(os.stat(out).st_mode):
            raise ConfigError(f"{out}: exists and is not a regular file; export to a new file path")


def export_ema(run_or_file: Path, out: Path) -> Checkpoint:
    """Write the EMA weights of a run's newest checkpoint (or of a checkpoint file) to `out` as safetensors, with
    the training config, what was derived from it and the cache's view in the metadata (str -> str, JSON)."""
    check_export_target(out)
    ck = load(run_or_file) if Path(run_or_file).is_file() else load_from(Path(run_or_file), None)
    ck.require_training("export reads a run or one of its checkpoints")
    tensors = {k: v.detach().cpu().contiguous() for k, v in ck.ema.items()}
    meta = {"format": EXPORT_FORMAT, "step": str(ck.step), "config": json.dumps(ck.config),
            "resolved": json.dumps(ck.resolved), "cache_spec": json.dumps(ck.view.to_json() if ck.view else {})}
    atomic_write_bytes(Path(out), safetensors_bytes(tensors, metadata=meta))  # never a torn file
    return ck
