"""Exporting a run's EMA weights as safetensors (`repa-pipe export`); run/checkpoint.py reads them back."""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save as safetensors_bytes

from repa_pipe.cache.manifest import is_cache
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.fileio import atomic_write_bytes, not_regular
from repa_pipe.run.checkpoint import EXPORT_FORMAT, Checkpoint, is_export, load, load_from, resolve
from repa_pipe.run.record import is_run_dir


def check_export_target(out: Path, source: Path) -> None:
    """One line for a target `export` must not write, before anything is read or written:
    - a broken symbolic link;
    - a path inside a run folder or a cache (it would replace or sit among their files: `export RUN
      RUN/config.json`, `export RUN CACHE/manifest.json`);
    - a name not ending in .safetensors (`export ck.pt ck.pt`), or a file in a folder that does not exist;
    - an existing file that is not a regular file (a device, a FIFO, a folder: the temp-and-rename write would
      replace the node), or the input itself;
    - an existing file that is not an earlier `repa-pipe export` (only those are replaced)."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"{out}: a broken symbolic link (to {os.readlink(out)}); remove it or export elsewhere")
    parent = out.parent.resolve()
    for folder in (parent, *parent.parents):
        if is_cache(folder):
            raise ConfigError(f"{out}: inside the cache {folder}, where it would replace or sit among the cache's "
                              "files; export to a path outside it")
        if is_run_dir(folder):
            where = "the checkpoints folder of run" if folder != parent and parent.name == "checkpoints" else "run"
            raise ConfigError(f"{out}: inside {where} {folder}, where it would replace or sit among the run's "
                              "files; export to a path outside RUN")
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: not a .safetensors file name; export writes safetensors: name the target "
                          "NAME.safetensors")
    if not parent.is_dir():
        raise ConfigError(f"{out}: its folder {out.parent} does not exist; create it first or export elsewhere")
    if out.exists():
        why = not_regular(os.stat(out).st_mode)
        if why:
            raise ConfigError(f"{out}: exists and is {why}; export to a new file path")
        if os.path.samefile(out, source):
            raise ConfigError(f"{out}: the same file as the input {source}; export to a new file path")
    if out.exists() and not is_export(out):
        raise ConfigError(f"{out}: exists and is not a repa-pipe export (only an earlier export is replaced); "
                          "remove it or export to a new file path")


def export_ema(run_or_file: Path, out: Path) -> Checkpoint:
    """Write the EMA weights of a run's newest checkpoint (or of a checkpoint file) to `out` as safetensors, with
    the training config, what was derived from it and the cache's view in the metadata (str -> str, JSON)."""
    given = Path(run_or_file)
    source = given if given.is_file() else resolve(given, None)
    check_export_target(out, source)
    ck = load(source) if given.is_file() else load_from(given, None)
    ck.require_training("export reads a run or one of its checkpoints")
    tensors = {k: v.detach().cpu().contiguous() for k, v in ck.ema.items()}
    meta = {"format": EXPORT_FORMAT, "step": str(ck.step), "config": json.dumps(ck.config),
            "resolved": json.dumps(ck.resolved), "cache_spec": json.dumps(ck.view.to_json() if ck.view else {})}
    atomic_write_bytes(Path(out), safetensors_bytes(tensors, metadata=meta))  # never a torn file
    return ck
