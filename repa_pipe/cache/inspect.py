"""`cache info` and `cache verify`: what a cache holds, and whether it is exactly what was written.

verify checks everything the manifest claims, one line per problem: the index files against their recorded
hashes, each array's on-disk metadata (shape, dtype, shard layout, row codec) against its spec, every done
marker readable, every done shard's file present at its recorded size, every valid row's crc32c (naming the
rows that differ), and no NaN or Inf in a valid row (int8 rows dequantized first). `repair` then removes the done markers of the damaged
shards, so running the array's encode command again rewrites exactly those.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from rich.console import Console
from rich.table import Table

from repa_pipe.cache import layout
from repa_pipe.cache.layout import CachePaths
from repa_pipe.cache.lock import cache_lock
from repa_pipe.cache.manifest import Manifest, read_manifest, read_markers, write_manifest
from repa_pipe.cache.reader import ArrayReader, disk_problems
from repa_pipe.pipeline.errors import CorruptDataError
from repa_pipe.pipeline.hashing import hash_lines, sha256_int64

_VERIFY_ROWS = 256  # rows read per gather while verifying
_EXAMPLES = 5


# --------------------------------------------------------------------------------------------- info
def array_summary(root: Path, m: Manifest, name: str) -> dict[str, Any]:
    """One array: shape, dtype, stored bytes per image (int8: values and scales), the bytes of its done shards'
    rows and (`bytes`) what the whole source takes once every shard is done. Each row also carries 20 bytes on
    disk (its crc32c and its shard-index entry), not counted here."""
    entry = m.array(name)
    markers, _ = read_markers(root, name, m.num_shards, m.n)
    done = [mk for mk in markers.values() if mk.spec_hash == entry.spec.spec_hash]
    spec = entry.spec
    return {"name": name, "shape": list(spec.shape), "dtype": spec.dtype, "bytes_per_image": spec.row_bytes,
            "bytes": spec.row_bytes * m.n, "bytes_done": spec.row_bytes * sum(mk.stop - mk.start for mk in done),
            "shards_done": len(done), "num_shards": m.num_shards, "status": entry.status, "bad": len(entry.bad),
            "model": dataclasses.asdict(spec.model), "precision": spec.precision}


def info(root: str | Path) -> dict[str, Any]:
    """Everything `repa-pipe cache info` shows, as a dict."""
    root = Path(root)
    m = read_manifest(root)
    return {"root": str(root), "dataset": dataclasses.asdict(m.dataset), "resolution": m.resolution,
            "crop": m.crop, "shard_size": m.shard_size, "num_shards": m.num_shards, "created_utc": m.created_utc,
            "tool": m.tool, "schema_version": m.schema_version,
            "arrays": [array_summary(root, m, n) for n in m.arrays]}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def render_info(info_: dict[str, Any], out: Console) -> None:
    """`cache info` as a header and one table row per array; random-init models are marked."""
    ds = info_["dataset"]
    out.print(f"[bold]{info_['root']}[/]  ({info_['tool']}, schema {info_['schema_version']}, created "
              f"{info_['created_utc']})", highlight=False)
    out.print(f"source: {ds['kind']} {ds['root']}  N={ds['n']}  classes={ds['num_classes']}  "
              f"file-list sha256 {ds['file_list_sha256'][:12]}", highlight=False)
    for note in ds["notes"]:
        out.print(f"  note: {note}", highlight=False)
    out.print(f"preprocessing: {info_['crop']} {info_['resolution']}px;  {info_['num_shards']} shards x "
              f"{info_['shard_size']} samples", highlight=False)
    # Short columns only, folded rather than elided when narrow; the long model provenance goes on its own
    # unwrapped line per array.
    table = Table()
    for column in ("array", "shape", "dtype", "bytes/image", "size", "shards done", "status", "bad"):
        table.add_column(column, overflow="fold")
    for a in info_["arrays"]:
        # Unfinished: what is written so far, and what the whole source will take when every shard is done.
        size = _human(a["bytes"]) if a["shards_done"] == a["num_shards"] else \
            f"{_human(a['bytes_done'])} of {_human(a['bytes'])} projected"
        table.add_row(a["name"], "x".join(map(str, a["shape"])), a["dtype"], f"{a['bytes_per_image']:,}", size,
                      f"{a['shards_done']}/{a['num_shards']}", a["status"], str(a["bad"]))
    # A pipe or log file has no width limit: render there at full width instead of rich's default 80 columns.
    (out if out.is_terminal else Console(file=out.file, width=max(out.width, 200))).print(table)
    for a in info_["arrays"]:
        model = a["model"]
        mark = " [yellow](random init)[/]" if model["random_init"] else ""
        out.print(f"{a['name']}: model {model['weights_id']}{mark}, weights hash {model['weights_hash']}, "
                  f"computed in {a['precision']}", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------- verify
@dataclass
class VerifyReport:
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    damaged: dict[str, set[int]] = field(default_factory=dict)  # array -> shards to rewrite

    @property
    def ok(self) -> bool:
        return not self.problems

    def shard_problem(self, name: str, k: int, line: str) -> None:
        self.problems.append(line)
        self.damaged.setdefault(name, set()).add(k)


def _check_index(root: Path, m: Manifest, report: VerifyReport) -> None:
    """keys.txt and labels.npy: readable, N entries, the sha256 the manifest recorded."""
    paths = CachePaths(root)
    for path, read, digest, want in ((paths.keys, layout.read_keys, hash_lines, m.dataset.file_list_sha256),
                                     (paths.labels, layout.read_labels, sha256_int64, m.dataset.labels_sha256)):
        try:
            values = read(root)
        except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            report.problems.append(f"index: {path} unreadable ({e})")
            continue
        if len(values) != m.n or digest(values) != want:
            report.problems.append(f"index: {path} differs from what was written ({len(values)} entries, N={m.n}; "
                                   "or its sha256)")


def _bad_rows(reader: ArrayReader, rows: np.ndarray) -> list[int]:
    """Rows of `rows` whose checksum fails, read one at a time (only after a batch read failed)."""
    out = []
    for r in rows:
        try:
            reader.gather(np.array([r]))
        except CorruptDataError:
            out.append(int(r))
    return out


def _check_shard(reader: ArrayReader, name: str, k: int, rows: np.ndarray, report: VerifyReport) -> None:
    """Every valid row of shard k: its crc32c, then NaN / Inf."""
    for lo in range(0, len(rows), _VERIFY_ROWS):
        chunk = rows[lo:lo + _VERIFY_ROWS]
        try:
            data = reader.gather(chunk)
        except CorruptDataError as e:
            try:
                reader.check_shard(k)
            except CorruptDataError as whole:  # the file or its index, not single rows
                report.shard_problem(name, k, f"{name}: shard {k}: {whole.detail}")
                return
            bad = _bad_rows(reader, rows[lo:])
            if not bad:
                report.shard_problem(name, k, f"{name}: shard {k}: {e}")
                return
            report.shard_problem(name, k, f"{name}: shard {k}: checksum mismatch in {len(bad)} row(s) "
                                          f"{bad[:_EXAMPLES]} ({reader.shard_path(k)})")
            return
        finite = np.isfinite(data.reshape(len(chunk), -1).astype(np.float32, copy=False)).all(axis=1)
        if not finite.all():
            report.shard_problem(name, k, f"{name}: shard {k}: NaN or Inf in valid row(s) "
                                          f"{chunk[~finite][:_EXAMPLES].tolist()}")
            return


def _verify_array(root: Path, m: Manifest, name: str, report: VerifyReport) -> None:
    entry = m.array(name)
    markers, unreadable = read_markers(root, name, m.num_shards, m.n)
    for k, line in unreadable:
        report.shard_problem(name, k, line)
    markers = {k: mk for k, mk in markers.items() if mk.spec_hash == entry.spec.spec_hash}
    not_done = [k for k in range(m.num_shards) if k not in markers and k not in report.damaged.get(name, ())]
    if not_done:
        report.problems.append(f"{name}: {len(not_done)} of {m.num_shards} shard(s) not done (e.g. "
                               f"{not_done[:_EXAMPLES]}); run its encode command to finish them")
    for k, line in disk_problems(root, m, name, markers):
        if k is None:  # array-level metadata: no row can be trusted
            report.problems.append(line)
            report.checked.append(name)
            return
        report.shard_problem(name, k, line)
    valid = m.valid_mask([name])
    reader = ArrayReader(root, m, name, threads=4)
    try:
        for k in sorted(markers):
            if k in report.damaged.get(name, ()):
                continue
            start, stop = m.shard_range(k)
            rows = np.arange(start, stop)[valid[start:stop]]  # a shard with no valid rows is fine
            if len(rows):
                _check_shard(reader, name, k, rows, report)
    finally:
        reader.close()
    report.checked.append(name)


def verify(root: str | Path) -> VerifyReport:
    """Check the index and every array (see the module docstring)."""
    root = Path(root)
    m = read_manifest(root)
    report = VerifyReport()
    _check_index(root, m, report)
    for name in m.arrays:
        _verify_array(root, m, name, report)
    return report


def repair(root: str | Path, report: VerifyReport) -> dict[str, list[int]]:
    """Remove the done markers of damaged shards and mark their arrays in progress, so the encode command
    rewrites them. Returns {array: shards}."""
    root = Path(root)
    paths = CachePaths(root)
    with cache_lock(root):
        m = read_manifest(root)
        for name, shards in report.damaged.items():
            for k in shards:
                paths.done_marker(name, k).unlink(missing_ok=True)
            entry = m.array(name)
            m = m.with_array(dataclasses.replace(entry, status="in_progress", completed_utc=None,
                                                 shards_done=max(0, entry.shards_done - len(shards))))
        write_manifest(root, m)
    return {name: sorted(s) for name, s in report.damaged.items()}


@dataclass(frozen=True)
class Checked:
    """What `cache verify` found and, with --repair, which shards' done markers it removed."""

    cache: str | Path
    report: VerifyReport
    repair: bool                          # --repair was asked
    repaired: dict[str, list[int]]        # array -> shards whose markers were removed

    def failure(self) -> Optional[CorruptDataError]:
        """The error the command ends with, None when the cache is sound."""
        if self.report.ok:
            return None
        return CorruptDataError(f"{self.cache}: {len(self.report.problems)} problem(s) found"
                                + ("" if self.repair else "; `repa-pipe cache verify --repair` removes the done "
                                   "markers of damaged shards so their encode command rewrites them"))


def check(root: str | Path, repair_damaged: bool) -> Checked:
    """`cache verify`: verify the cache and, when asked and some shards are damaged, repair them."""
    report = verify(root)
    fixed = repair(root, report) if repair_damaged and not report.ok and report.damaged else {}
    return Checked(root, report, repair_damaged, fixed)
