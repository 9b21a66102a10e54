"""`cache info` and `cache verify`: what a cache holds, and whether every shard is done and intact."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from repa_pipe.cache import layout
from repa_pipe.cache.layout import CachePaths
from repa_pipe.cache.reader import ArrayReader, valid_mask
from repa_pipe.cache.writer import file_crc32, read_markers


def array_summary(root: Path, manifest: dict[str, Any], name: str) -> dict[str, Any]:
    entry = manifest["arrays"][name]
    markers = read_markers(root, name, manifest["num_shards"])
    done = sum(m.get("config_hash") == entry["config_hash"] for m in markers.values())
    nbytes = int(np.prod(entry["shape"])) * np.dtype(entry["dtype"]).itemsize
    return {"name": name, "shape": entry["shape"], "dtype": entry["dtype"], "bytes": nbytes,
            "shards_done": done, "num_shards": manifest["num_shards"], "status": entry["status"],
            "bad": len(entry.get("bad", [])), "model": entry["model"], "extra": entry.get("extra", {})}


def info(root: str | Path) -> dict[str, Any]:
    """Everything `repa-pipe cache info` shows, as a dict."""
    root = Path(root)
    m = layout.load_manifest(root)
    return {"root": str(root), "dataset": m["dataset"], "preprocessing": m["preprocessing"],
            "shard_size": m["shard_size"], "num_shards": m["num_shards"], "created_utc": m["created_utc"],
            "tool": m["tool"], "arrays": [array_summary(root, m, n) for n in m["arrays"]]}


@dataclass
class VerifyReport:
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _verify_array(root: Path, m: dict[str, Any], name: str, report: VerifyReport) -> None:
    entry = m["arrays"][name]
    paths = CachePaths(root)
    markers = read_markers(root, name, m["num_shards"])
    valid = valid_mask(m, [name])
    reader = ArrayReader(root, m, name, threads=1)
    try:
        for k in range(m["num_shards"]):
            mk = markers.get(k)
            if mk is None or mk.get("config_hash") != entry["config_hash"]:
                report.problems.append(f"{name}: shard {k} not done")
                continue
            path = paths.shard_file(name, k, len(entry["shape"]))
            if not path.is_file():
                report.problems.append(f"{name}: shard {k} marked done but {path} is missing")
                continue
            if path.stat().st_size != mk["bytes"] or file_crc32(path) != mk["crc32"]:
                report.problems.append(f"{name}: shard {k} changed since it was written ({path})")
                continue
            start, stop = layout.shard_range(k, m["dataset"]["N"], m["shard_size"])
            rows = np.arange(start, stop)[valid[start:stop]]
            try:
                data = reader.gather(rows)
            except Exception as e:  # a corrupt index is reported, not raised: verify lists every problem
                report.problems.append(f"{name}: shard {k}: {e}")
                continue
            nan_rows = rows[np.isnan(data.reshape(len(rows), -1)).any(axis=1)]
            if len(nan_rows):
                report.problems.append(f"{name}: shard {k}: NaN in valid rows {nan_rows[:5].tolist()}")
    finally:
        reader.close()
    report.checked.append(name)


def verify(root: str | Path) -> VerifyReport:
    """Check every array: each shard done, file unchanged since its marker, valid rows free of NaN."""
    root = Path(root)
    m = layout.load_manifest(root)
    report = VerifyReport()
    labels = layout.read_labels(root)
    if len(labels) != m["dataset"]["N"] or len(layout.read_keys(root)) != m["dataset"]["N"]:
        report.problems.append("index/: keys or labels do not have N rows")
    for name in m["arrays"]:
        _verify_array(root, m, name, report)
    return report
