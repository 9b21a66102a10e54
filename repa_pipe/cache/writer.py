"""Creating a cache, adding arrays, writing whole shards durably, finalizing.

Protocol (docs/cache.md): the cache and each array are created once, at full size, under
the cache lock; every rank writes only the shards it owns; after a shard file is fsynced its done marker is
written atomically. A killed run is resumed by running the same command again: shards with a marker are
skipped, all others are rewritten whole (idempotent). Every manifest update is a read-modify-write under the
cache lock, so jobs writing different arrays of one cache never lose each other's entries.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from repa_pipe.cache import layout
from repa_pipe.cache.layout import CachePaths
from repa_pipe.cache.lock import cache_lock, wait_for_cache_lock
from repa_pipe.cache.manifest import (DEFAULT_SHARD_SIZE, ArrayEntry, ArraySpec, BadRow, Dataset, Manifest,
                                      ShardMarker, is_cache, read_manifest, read_markers, utc_now, write_manifest,
                                      write_marker)
from repa_pipe.cache.quant import empty_int8, quantize_int8
from repa_pipe.pipeline.errors import CacheMismatchError, NotACacheError
from repa_pipe.pipeline.fileio import fsync_path, read_json

LOCK_FILES = {".lock", "locks"}
CREATION_FILES = {"index", "cache.zarr"}  # written, in this order, before the manifest of a new cache


def check_target(root: Path) -> None:
    """Before anything is written: CACHE must be a cache, a new path or an empty folder."""
    root = Path(root)
    if is_cache(root) or not root.exists():
        return
    if not root.is_dir():
        raise NotACacheError(f"{root}: exists and is not a folder; pass a new or empty folder to --cache")
    names = {p.name for p in root.iterdir()}
    if names - LOCK_FILES:
        if wait_for_cache_lock(root) and is_cache(root):  # another job was creating it just now
            return
        if all(n in LOCK_FILES | CREATION_FILES or n.startswith(".manifest.json.") for n in names):
            return  # the creation of this cache was killed before its manifest: it is made again
        raise NotACacheError(f"{root}: folder exists, is not empty and is not a repa-pipe cache; "
                             "pass a new or empty folder to --cache")


def check_same(m: Manifest, dataset: Dataset, resolution: int, shard_size: Optional[int], root: Path) -> None:
    """Adding arrays to a cache made from another source, resolution or shard size is an error."""
    diff = m.dataset.same_images(dataset)
    if diff:
        raise CacheMismatchError(
            f"{root}: cache was made from another source ({diff}: cache {getattr(m.dataset, diff)!r} vs source "
            f"{getattr(dataset, diff)!r}; cache source {m.dataset.root!r}, given {dataset.root!r})")
    if m.resolution != resolution:
        raise CacheMismatchError(f"{root}: cache resolution is {m.resolution}, asked for --resolution {resolution}")
    if shard_size is not None and m.shard_size != shard_size:
        raise CacheMismatchError(f"{root}: cache shard size is {m.shard_size}, asked for --shard-size {shard_size}")


def check_spec(m: Manifest, spec: ArraySpec, root: Path) -> None:
    """An existing array must have been made exactly as `spec` says (same model, weights, dtype, ...)."""
    have = m.arrays.get(spec.name)
    if have is None or have.spec.spec_hash == spec.spec_hash:
        return
    a, b = dataclasses.asdict(have.spec), dataclasses.asdict(spec)
    diff = [k for k in a if a[k] != b[k]]
    raise CacheMismatchError(
        f"{root}: array {spec.name} exists but was made differently ({', '.join(diff)} differ: cache "
        f"{[a[k] for k in diff]} vs now {[b[k] for k in diff]}); use another --cache folder")


def open_or_create(root: Path, dataset: Dataset, keys: list[str], labels: np.ndarray, resolution: int,
                   shard_size: Optional[int]) -> Manifest:
    """Create the cache (or check that an existing one is of the same images) and return its manifest.
    `shard_size=None`: the existing cache's, or DEFAULT_SHARD_SIZE for a new one."""
    root = Path(root)
    check_target(root)
    root.mkdir(parents=True, exist_ok=True)
    with cache_lock(root):
        if is_cache(root):  # made meanwhile by a concurrent job, or before
            m = read_manifest(root)
            check_same(m, dataset, resolution, shard_size, root)
            return m
        clean_manifest_debris(root)
        m = Manifest(dataset=dataset, resolution=resolution, shard_size=shard_size or DEFAULT_SHARD_SIZE)
        layout.write_index(root, keys, labels)
        zarr.open_group(store=str(CachePaths(root).zarr), mode="a", zarr_format=3)
        write_manifest(root, m)  # written last: a folder with a manifest is a usable cache
        return m


def ensure_array(root: Path, spec: ArraySpec) -> Manifest:
    """Create array `spec.name` at full size once, or check the existing one was made the same way.

    An array is never recreated once it has done shards: only an array with no manifest entry and no done
    marker (left by a crash between its creation and the manifest update) is made again.
    """
    root = Path(root)
    with cache_lock(root):
        m = read_manifest(root)
        if spec.name in m.arrays:
            check_spec(m, spec, root)
            return m
        done = CachePaths(root).done_dir(spec.name)
        if done.is_dir() and any(done.glob("*.json")):
            raise CacheMismatchError(f"{root}: {spec.name} has done shards but no manifest entry (was manifest.json "
                                     "edited or replaced?); refusing to recreate it: use another --cache folder")
        group = zarr.open_group(store=str(CachePaths(root).zarr), mode="a", zarr_format=3)
        # One sample per inner chunk, raw bytes plus a crc32c each: every row is a fixed-stride, self-checking
        # slice of its shard file, which is what the pread reader relies on. NaN fill: a row never written reads
        # as NaN, never as zeros (int8 rows carry their NaN in the scale: the writer always writes whole shards).
        row = spec.stored_row_shape
        group.create_array(spec.name, shape=(spec.shape[0], *row), chunks=(1, *row), shards=(m.shard_size, *row),
                           dtype=spec.dtype, compressors=[Crc32cCodec()],
                           fill_value=0 if spec.quantized else np.nan, config={"write_empty_chunks": True},
                           overwrite=True)
        m = m.with_array(ArrayEntry(spec=spec, created_utc=utc_now()))
        write_manifest(root, m)
        return m


def clean_manifest_debris(root: Path) -> int:
    """Remove temp files of interrupted manifest/index writes. Call holding the cache lock."""
    paths = CachePaths(Path(root))
    found = [*paths.root.glob(".manifest.json.*.tmp"), *paths.keys.parent.glob(".*.tmp")]
    for p in found:
        p.unlink(missing_ok=True)
    return len(found)


def clean_array_debris(root: Path, name: str) -> int:
    """Remove temp files a killed writer of `name` left (zarr partial writes, done-marker temps). Call holding
    the array's lock, so no live writer's file is touched."""
    paths = CachePaths(Path(root))
    found = [*paths.array_dir(name).rglob("*.partial"), *paths.done_dir(name).glob(".*.tmp")]
    for p in found:
        p.unlink(missing_ok=True)
    return len(found)


class ShardWriter:
    """Writes whole shards of one array and their done markers. Safe for concurrent ranks owning distinct shards."""

    def __init__(self, root: Path, manifest: Manifest, name: str):
        self.root, self.name = Path(root), name
        self.paths = CachePaths(self.root)
        self.manifest = manifest
        self.spec = manifest.array(name).spec
        self.spec_hash = self.spec.spec_hash
        # write_empty_chunks is a runtime setting, not stored in the metadata: an all-NaN (bad) row must still be
        # materialised so every row sits at its fixed offset in the shard file.
        self.array = zarr.open_array(store=str(self.paths.zarr), path=name, mode="r+",
                                     zarr_format=3).with_config({"write_empty_chunks": True})

    @property
    def num_shards(self) -> int:
        return self.manifest.num_shards

    def is_done(self, k: int) -> bool:
        marker = self.paths.done_marker(self.name, k)
        if not marker.is_file():
            return False
        try:
            return read_json(marker).get("spec_hash") == self.spec_hash
        except (ValueError, OSError, AttributeError):  # unreadable: rewrite the shard, and its marker with it
            return False

    def pending(self, shards: Iterable[int]) -> list[int]:
        """The shards of `shards` not done. Lists the done folder once rather than probing a marker per shard:
        a resumed encode of an ImageNet-sized cache checks 1,252 shards per array (bench/scale.py)."""
        done_dir = self.paths.done_dir(self.name)
        present = {p.name for p in done_dir.iterdir()} if done_dir.is_dir() else set()
        return [k for k in shards if self.paths.done_marker(self.name, k).name not in present or not self.is_done(k)]

    def empty_rows(self, n: int) -> np.ndarray:
        """n stored rows that read back as NaN: the buffer a shard's encode fills."""
        shape = (n, *self.spec.stored_row_shape)
        return empty_int8(shape) if self.spec.quantized else np.full(shape, np.nan, dtype=self.spec.dtype)

    def store_rows(self, x: np.ndarray) -> np.ndarray:
        """(B, *row) float model output -> (B, *stored row) in the array's stored form."""
        return quantize_int8(x) if self.spec.quantized else x.astype(self.spec.dtype, copy=False)

    def write(self, k: int, data: np.ndarray, bad: list[BadRow]) -> None:
        """Write shard k whole (`data` has all its rows, stored form, bad rows as `empty_rows`), fsync, then
        mark it done. The marker records the file's size, not a whole-file crc32c: that would cost a re-read
        of the shard at write time and add nothing to the per-row and index checksums `cache verify` checks."""
        start, stop = self.manifest.shard_range(k)
        expect = (stop - start, *self.spec.stored_row_shape)
        if data.shape != expect:
            raise ValueError(f"shard {k} of {self.name}: got {data.shape}, expected {expect}")
        path = self.paths.shard_file(self.name, k, len(expect))
        # An unmarked shard's old bytes are never trusted: zarr would read (and checksum) their index before
        # rewriting, so a damaged or truncated file (what `cache verify --repair` hands back) could never heal.
        path.unlink(missing_ok=True)
        self.array[start:stop] = data.astype(self.spec.dtype, copy=False)
        fsync_path(path)
        fsync_path(path.parent)
        write_marker(self.root, self.name, ShardMarker(k=k, start=start, stop=stop, bytes=path.stat().st_size,
                                                       spec_hash=self.spec_hash, bad=tuple(bad),
                                                       written_utc=utc_now()))


def finalize(root: Path, name: str) -> Manifest:
    """After all ranks finished: collect bad rows from the markers and mark the array complete if every shard
    is done. Returns the manifest."""
    root = Path(root)
    with cache_lock(root):
        m = read_manifest(root)
        entry = m.array(name)
        markers, _ = read_markers(root, name, m.num_shards, m.n)
        good = [mk for mk in markers.values() if mk.spec_hash == entry.spec.spec_hash]
        bad = sorted((b for mk in good for b in mk.bad), key=lambda b: b.index)
        complete = len(good) == m.num_shards
        entry = dataclasses.replace(entry, bad=tuple(bad), shards_done=len(good),
                                    status="complete" if complete else "in_progress",
                                    completed_utc=utc_now() if complete else None)
        m = m.with_array(entry)
        write_manifest(root, m)
        return m
