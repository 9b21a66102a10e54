"""RUN/metrics.jsonl: one JSON object per logged step, appended by rank 0; the one reader and writer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from repa_pipe.pipeline.fileio import atomic_write_bytes


def append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read(path: Path) -> list[dict[str, Any]]:
    """Every record, in order; a line torn by a crash mid-write (the last one) is skipped."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def truncate_after(path: Path, step: int) -> None:
    """Drop records logged after `step`: a run that died past its last checkpoint and resumes from it logs those
    steps again, and each step must appear once."""
    if not Path(path).is_file():
        return
    lines = Path(path).read_text().splitlines()
    keep = [r for r in read(path) if r.get("step", 0) <= step]
    if len(keep) != len(lines):
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
