"""`cache info` and `cache verify`: what a cache holds, and whether every shard is done and intact."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

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


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def render_info(info_: dict[str, Any], out: Console) -> None:
    """`cache info` as a header and one table row per array; random-init models are marked."""
    ds = info_["dataset"]
    out.print(f"[bold]{info_['root']}[/]  ({info_['tool']}, created {info_['created_utc']})", highlight=False)
    out.print(f"source: {ds['kind']} {ds['root']}  N={ds['N']}  classes={ds.get('num_classes')}  "
              f"file-list sha256 {ds['file_list_sha256'][:12]}", highlight=False)
    pp = info_["preprocessing"]
    out.print(f"preprocessing: {pp['crop']} {pp['resolution']}px;  {info_['num_shards']} shards x "
              f"{info_['shard_size']} samples", highlight=False)
    # Short columns only, folded rather than elided when narrow (rich's default squeezed an 80-column table into
    # "feature…" / "random…"); the long model provenance goes on its own unwrapped line per array.
    table = Table()
    for column in ("array", "shape", "dtype", "bytes", "shards done", "status", "bad"):
        table.add_column(column, overflow="fold")
    for a in info_["arrays"]:
        table.add_row(a["name"], "x".join(map(str, a["shape"])), a["dtype"], _human(a["bytes"]),
                      f"{a['shards_done']}/{a['num_shards']}", a["status"], str(a["bad"]))
    # A pipe or log file has no width limit: render there at full width instead of rich's default 80 columns.
    (out if out.is_terminal else Console(file=out.file, width=max(out.width, 200))).print(table)
    for a in info_["arrays"]:
        model = a["model"]
        mark = " [yellow](random init)[/]" if model.get("random_init") else ""
        out.print(f"{a['name']}: model {model.get('id')}{mark}, weights hash {model.get('weights_hash')}",
                  highlight=False, soft_wrap=True)
