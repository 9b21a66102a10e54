"""Creating a cache, adding arrays, writing whole shards durably, finalizing.

Protocol (reference/storage.md section 6.4): rank 0 creates the cache and each array at full size once;
every rank writes only the shards it owns, one whole-shard assignment per array; after the shard file is
fsynced a done marker is written atomically. A killed run is resumed by running the same command again:
shards with a marker are skipped, all others are rewritten whole (idempotent).
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from repa_pipe.cache import layout
from repa_pipe.cache.layout import CachePaths
from repa_pipe.pipeline.errors import CacheMismatchError, NotACacheError
from repa_pipe.pipeline.fileio import atomic_write_json, fsync_path, read_json
from repa_pipe.pipeline.hashing import hash_json

# Fields of an array entry that describe its bytes: two runs that agree on these write identical data.
_IDENTITY_FIELDS = ("kind", "model", "dtype", "shape", "chunk", "preprocessing", "extra")


def open_or_create(root: Path, dataset: dict, keys: list[str], labels: np.ndarray, resolution: int,
                   shard_size: int | None) -> dict[str, Any]:
    """Rank 0: create the cache folder (or check an existing one is for the same source) and return its manifest.

    `shard_size=None` means "whatever the existing cache uses" (1024 for a new cache).
    """
    root = Path(root)
    if layout.is_cache(root):
        manifest = layout.load_manifest(root)
        layout.check_same_dataset(manifest, dataset, resolution, shard_size, root)
        return manifest
    if root.exists() and not root.is_dir():
        raise NotACacheError(f"{root}: exists and is not a folder (nor a repa-pipe cache); "
                             "pass a new or empty folder to --cache")
    if root.exists() and any(root.iterdir()):
        raise NotACacheError(f"{root}: folder exists, is not empty and is not a repa-pipe cache; "
                             "pass a new or empty folder to --cache")
    root.mkdir(parents=True, exist_ok=True)
    manifest = layout.new_manifest(dataset, resolution, shard_size or 1024)
    layout.write_index(root, keys, labels)
    zarr.open_group(store=str(CachePaths(root).zarr), mode="a", zarr_format=3)
    layout.save_manifest(root, manifest)  # written last: a folder with a manifest is a usable cache
    return manifest


def config_hash(entry: dict[str, Any]) -> str:
    return hash_json({k: entry.get(k) for k in _IDENTITY_FIELDS})


def ensure_array(root: Path, manifest: dict[str, Any], name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: create array `name` at full size, or check the existing one was made the same way.

    `entry` holds kind, model (id, weights hash, ...), dtype, shape, chunk, preprocessing, extra.
    Returns the updated manifest.
    """
    entry = {**entry, "config_hash": config_hash(entry)}
    have = manifest["arrays"].get(name)
    if have is not None:
        if have["config_hash"] != entry["config_hash"]:
            diff = [k for k in _IDENTITY_FIELDS if have.get(k) != entry.get(k)]
            raise CacheMismatchError(
                f"{root}: array {name} exists but was made differently ({', '.join(diff)} differ: "
                f"cache {[have.get(k) for k in diff]} vs now {[entry.get(k) for k in diff]}); "
                "use another --cache folder")
        return manifest
    shape = tuple(entry["shape"])
    shard = (manifest["shard_size"],) + shape[1:]
    group = zarr.open_group(store=str(CachePaths(root).zarr), mode="a", zarr_format=3)
    # One sample per inner chunk, no compressor: each row is a fixed-stride slice of its shard file, which is
    # what the pread reader relies on. NaN fill: a row never written reads as NaN, never as zeros.
    group.create_array(name, shape=shape, chunks=(1,) + shape[1:], shards=shard, dtype=entry["dtype"],
                       compressors=None, fill_value=np.nan, config={"write_empty_chunks": True},
                       overwrite=True)
    manifest["arrays"][name] = {**entry, "status": "in_progress", "created_utc": layout.utc_now(), "bad": []}
    layout.save_manifest(root, manifest)
    return manifest


def clean_partials(root: Path) -> int:
    """Remove zarr's `*.partial` temp files left by a killed writer (zarr never fsyncs; we do)."""
    n = 0
    for p in CachePaths(Path(root)).zarr.rglob("*.partial"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def file_crc32(path: Path, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


class ShardWriter:
    """Writes whole shards of one array and their done markers. Safe for concurrent ranks owning distinct shards."""

    def __init__(self, root: Path, manifest: dict[str, Any], name: str):
        self.root, self.name = Path(root), name
        self.paths = CachePaths(self.root)
        self.n = int(manifest["dataset"]["N"])
        self.shard_size = int(manifest["shard_size"])
        self.num_shards = int(manifest["num_shards"])
        self.entry = manifest["arrays"][name]
        # write_empty_chunks is a runtime setting, not stored in the metadata: an all-NaN (bad) row must still be
        # materialised so every row sits at its fixed offset in the shard file.
        self.array = zarr.open_array(store=str(self.paths.zarr), path=name, mode="r+",
                                     zarr_format=3).with_config({"write_empty_chunks": True})

    def is_done(self, k: int) -> bool:
        marker = self.paths.done_marker(self.name, k)
        if not marker.is_file():
            return False
        try:
            return read_json(marker).get("config_hash") == self.entry["config_hash"]
        except ValueError:  # a torn marker cannot exist (atomic rename), but a hand-edited one can
            return False

    def pending(self, shards: list[int]) -> list[int]:
        return [k for k in shards if not self.is_done(k)]

    def write(self, k: int, data: np.ndarray, bad: list[dict[str, Any]]) -> None:
        """Write shard k whole (`data` has all its rows; bad rows already NaN), fsync, then mark it done."""
        start, stop = layout.shard_range(k, self.n, self.shard_size)
        expect = (stop - start,) + tuple(self.entry["shape"][1:])
        if data.shape != expect:
            raise ValueError(f"shard {k} of {self.name}: got {data.shape}, expected {expect}")
        self.array[start:stop] = data.astype(self.entry["dtype"], copy=False)
        path = self.paths.shard_file(self.name, k, len(expect))
        fsync_path(path)
        fsync_path(path.parent)
        marker = {"k": k, "start": start, "stop": stop, "bytes": path.stat().st_size, "crc32": file_crc32(path),
                  "config_hash": self.entry["config_hash"], "bad": bad, "written_utc": layout.utc_now()}
        atomic_write_json(self.paths.done_marker(self.name, k), marker)


def read_markers(root: Path, name: str, num_shards_: int) -> dict[int, dict]:
    paths = CachePaths(Path(root))
    out = {}
    for k in range(num_shards_):
        p = paths.done_marker(name, k)
        if p.is_file():
            out[k] = read_json(p)
    return out


def finalize(root: Path, name: str) -> dict[str, Any]:
    """Rank 0 after all ranks finished: collect bad rows from the markers, mark the array complete if every
    shard is done. Returns the manifest."""
    root = Path(root)
    manifest = layout.load_manifest(root)
    entry = manifest["arrays"][name]
    markers = read_markers(root, name, manifest["num_shards"])
    good = {k: m for k, m in markers.items() if m.get("config_hash") == entry["config_hash"]}
    entry["bad"] = sorted((b for m in good.values() for b in m["bad"]), key=lambda b: b["index"])
    entry["shards_done"] = len(good)
    if len(good) == manifest["num_shards"]:
        entry["status"] = "complete"
        entry["completed_utc"] = layout.utc_now()
    layout.save_manifest(root, manifest)
    return manifest
