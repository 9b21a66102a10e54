"""Training checkpoints: written atomically, read with `weights_only=True`.

A checkpoint is a dict of tensors and plain Python values (no pickled objects), so loading it never runs code.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.fileio import atomic_write

_NAME = re.compile(r"^(\d{7,})\.pt$")


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


def save(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a foreign or corrupt file: say which file, not a pickle traceback
        raise ConfigError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def prune(run: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(run)[:-keep]:
        p.unlink(missing_ok=True)
