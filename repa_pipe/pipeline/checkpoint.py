"""Checkpoint files: written atomically, read with `weights_only=True` and memory-mapped.

A checkpoint is a dict of tensors and plain Python values (no pickled objects), so loading it never runs code.
It is written in torch's zip format (torch.save's default), which lets `load` map it instead of reading it: the
ranks of one machine then share the file's pages in the page cache rather than each holding a private copy
(https://pytorch.org/docs/stable/generated/torch.load.html, `mmap`). What the dict holds is run/checkpoint.py's.
A full disk is one clear error (checked before writing, and recognised if it happens anyway), and the temp
files of a save that was killed are removed by the next start.
"""
from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from repa_pipe.pipeline.errors import CheckpointError
from repa_pipe.pipeline.fileio import atomic_write

_NAME = re.compile(r"^(\d{7,})\.pt$")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

__all__ = ["CheckpointError", "ckpt_path", "list_checkpoints", "latest", "save", "load", "prune", "clean_temp"]


def ckpt_path(run: Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"{step:07d}.pt"


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    folder = Path(run) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest(run: Path) -> Path | None:
    found = list_checkpoints(run)
    return found[-1][1] if found else None


def clean_temp(run: Path) -> int:
    """Remove the temp files of checkpoint saves that were killed (call before anyone saves)."""
    folder = Path(run) / "checkpoints"
    found = list(folder.glob(".*.tmp")) if folder.is_dir() else []
    for p in found:
        p.unlink(missing_ok=True)
    return len(found)


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _no_space(e: BaseException) -> int | None:
    """The errno of a full disk, a quota or a file-size limit behind `e`, else None. torch.save wraps the OSError
    in a RuntimeError ("unexpected pos ..."): look through it."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return e.errno
        e = e.__cause__ or e.__context__
    return None


def save(path: Path, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    need = _tensor_bytes(state)
    free = shutil.disk_usage(path.parent).free
    if free < need * 1.02 + (1 << 20):
        raise CheckpointError(f"{path}: no space left for the checkpoint (about {_gb(need)} needed, {_gb(free)} "
                              "free); free some space (or use --keep-ckpts) and run the same command to resume")
    try:
        atomic_write(path, lambda f: torch.save(state, f))  # zip format (the default): `load` can map it
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(path.parent).free
        code = _no_space(e)
        if code == errno.EFBIG:  # not the disk: a file-size limit (`ulimit -f`, or the file system's largest file)
            raise CheckpointError(f"{path}: file too large: the checkpoint (about {_gb(need)}) exceeds the largest "
                                  "file this process may write (see `ulimit -f`) or this file system holds; raise "
                                  "the limit or use another --run-dir, and run the same command to resume") from None
        if code is not None or free < need:
            raise CheckpointError(f"{path}: no space left on device while saving the checkpoint (about "
                                  f"{_gb(need)} needed, {_gb(free)} free); free some space and run the same "
                                  "command to resume") from None
        raise CheckpointError(f"{path}: cannot write the checkpoint ({type(e).__name__}: {e})") from None


def load(path: str | Path) -> Any:
    """The file's object, its tensors memory-mapped on the CPU (copied only where a caller moves or writes them).

    Files in torch's legacy (pre-zip) format cannot be mapped; they are read whole."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        try:
            return torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        except RuntimeError as e:
            if "zipfile" not in str(e) and "mmap" not in str(e):
                raise
            return torch.load(path, weights_only=True, map_location="cpu")  # a legacy-format file
    except Exception as e:  # a foreign or corrupt file: say which file, not a pickle traceback
        raise CheckpointError(f"{path}: not a readable checkpoint ({_why(e)})") from None


def _why(e: Exception) -> str:
    """One line for a failed torch.load: the first line of its message, and for a file the weights-only
    unpickler refused, what it met, without torch's advice to load with weights_only=False or to allowlist the
    class (either runs whatever code the file holds: repa-pipe never does that)."""
    text = str(e)
    if "Weights only load failed" in text:
        after = text.partition("WeightsUnpickler error:")[2]
        what = next((line.strip() for line in after.splitlines() if line.strip()), "")
        what = what.split(". ")[0].rstrip(".")  # what it met, not how to allowlist it
        return ("it holds objects other than tensors and plain values, which repa-pipe does not unpickle"
                + (f": {what}" if what else ""))
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def prune(run: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(run)[:-keep]:
        p.unlink(missing_ok=True)
