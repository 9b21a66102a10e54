"""What a run's options say once derived values are filled in: shared by the run record and the checkpoint.

A run saves the options as the user typed them (`config`) and, apart, what was derived from them and why
(`resolved`, e.g. `{"encoder_depth": {"value": 8, "why": "SiT-XL/2's default (models/registry.py)"}}`). Files of
repa-pipe 0.2 saved the derived values inside `config` and have no `resolved`: read the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from repa_pipe.models.registry import SIT_PRESETS

# Earlier spellings of an option, read from old files: {old: current}. The aligned block is `encoder_depth`
# everywhere (the reference's and the paper's name).
OLD_NAMES = {"align_depth": "encoder_depth"}


def typed_config(d: dict[str, Any]) -> dict[str, Any]:
    """A saved config with earlier option names mapped to today's."""
    out = dict(d)
    for old, new in OLD_NAMES.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def effective(config: dict[str, Any], resolved: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The options a run trained with: as typed, with each derived value filled in."""
    return {**config, **{k: v["value"] for k, v in resolved.items()}}


def check_resolved(resolved: Any, where: str) -> dict[str, dict[str, Any]]:
    """`resolved` as read from a file: {option: {"value": ..., "why": str}}; ValueError naming `where` if not."""
    if not isinstance(resolved, dict) or not all(isinstance(v, dict) and "value" in v for v in resolved.values()):
        raise ValueError(f"{where}: 'resolved' must map options to {{'value', 'why'}}")
    return typed_config(resolved)


@dataclass(frozen=True)
class TrainFacts:
    """The training facts that sampling and analysis need: which model, which interpolant, which aligned block."""

    model: Optional[str]            # SiT preset name (None: not recorded, e.g. the reference's bare EMA weights)
    path: str                       # interpolant
    encoder_depth: Optional[int]    # the block REPA aligned (1-indexed); None when unknown

    @classmethod
    def of(cls, config: dict[str, Any], resolved: dict[str, dict[str, Any]]) -> "TrainFacts":
        eff = effective(config, resolved)
        model = eff.get("model")
        depth = eff.get("encoder_depth")
        if depth is None and model in SIT_PRESETS:
            depth = SIT_PRESETS[model].encoder_depth
        return cls(model=model, path=eff.get("path", "linear"), encoder_depth=depth)
