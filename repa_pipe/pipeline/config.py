"""Config dataclass helpers shared by every stage.

Each stage has one frozen dataclass; the CLI builds it from options whose names are the field names
(tests check the two agree), and the resolved config is written next to the stage's outputs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


def to_dict(cfg: Any) -> dict:
    """JSON-able dict of a config dataclass (paths become strings)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}
