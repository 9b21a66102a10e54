"""Stable hashes for provenance: of JSON-able configs, of files, of state dicts."""
from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:  # torch is imported where a state dict is hashed: `cache info`/`verify` never load it (700 MiB)
    import torch


def hash_json(obj: Any, n: int = 16) -> str:
    """sha256 of the canonical JSON form (sorted keys), first n hex digits."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def hash_lines(lines: Iterable[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


def sha256_int64(values) -> str:
    """sha256 of integers as little-endian int64 bytes (e.g. a cache's labels)."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(values, dtype="<i8").tobytes()).hexdigest()


def hash_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_state_dict(sd: Mapping[str, torch.Tensor], n: int = 16) -> str:
    """Hash of names, shapes, dtypes and values: identifies weights whatever file format they came in."""
    import torch

    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:n]
