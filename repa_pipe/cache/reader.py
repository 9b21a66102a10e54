"""Reading random batches from the cache: the training hot path.

zarr-python 3.1's `oindex` on sharded arrays reads ~100 samples/s (reference/storage.md section 4). Our arrays
are uncompressed with one sample per inner chunk, so each row is a contiguous byte range of its shard file,
located by the shard index at the file's end. `ArrayReader` parses each shard index once, checks its crc32c
and then gathers rows with `os.pread` from a thread pool (pread releases the GIL).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from repa_pipe.cache import layout
from repa_pipe.cache.layout import CachePaths
from repa_pipe.pipeline.errors import CacheMismatchError

_EMPTY = np.uint64(2**64 - 1)  # zarr's marker for an absent inner chunk


class ArrayReader:
    """pread-based row gather for one uncompressed, sharded Zarr v3 array of the cache."""

    def __init__(self, root: Path, manifest: dict[str, Any], name: str, threads: int = 8):
        entry = manifest["arrays"].get(name)
        if entry is None:
            raise CacheMismatchError(f"{root}: no array {name} (have: {', '.join(manifest['arrays']) or 'none'})")
        self.root, self.name = Path(root), name
        self.paths = CachePaths(self.root)
        self.shape = tuple(entry["shape"])
        self.dtype = np.dtype(entry["dtype"])
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self.shard_size = int(manifest["shard_size"])
        self._fds: dict[int, int] = {}
        self._offsets: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None

    def _open(self, k: int) -> tuple[int, np.ndarray]:
        with self._lock:
            if k in self._fds:
                return self._fds[k], self._offsets[k]
            path = self.paths.shard_file(self.name, k, len(self.shape))
            fd = os.open(path, os.O_RDONLY)
            size = os.fstat(fd).st_size
            idx_bytes = self.shard_size * 16
            raw = os.pread(fd, idx_bytes + 4, size - idx_bytes - 4)
            if google_crc32c.value(raw[:idx_bytes]) != int.from_bytes(raw[idx_bytes:], "little"):
                os.close(fd)
                raise CacheMismatchError(f"{path}: shard index checksum mismatch (corrupt shard; re-run the encode)")
            index = np.frombuffer(raw[:idx_bytes], dtype="<u8").reshape(self.shard_size, 2)
            self._fds[k], self._offsets[k] = fd, index[:, 0].copy()
            return fd, self._offsets[k]

    def _read_rows(self, rows: np.ndarray, out: np.ndarray, pos: np.ndarray) -> None:
        """Read global rows `rows` (all in one shard) into out[pos]."""
        k = int(rows[0]) // self.shard_size
        fd, offsets = self._open(k)
        flat = out.reshape(out.shape[0], -1).view(np.uint8)
        for r, p in zip(rows, pos):
            off = offsets[int(r) - k * self.shard_size]
            if off == _EMPTY:
                raise CacheMismatchError(f"{self.name}: row {r} was never written")
            n = os.preadv(fd, [memoryview(flat[p])], int(off))
            if n != self.row_bytes:
                raise CacheMismatchError(f"{self.name}: short read of row {r} in shard {k}")

    def gather(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `indices` (any order, repeats allowed) -> array (len(indices), *shape[1:]).

        `out`, a buffer of that shape and dtype the caller reuses, saves page-faulting a fresh allocation per
        batch (1.4x warm, docs/benchmarks.md)."""
        indices = np.asarray(indices, dtype=np.int64)
        if out is None:
            out = np.empty((len(indices),) + self.shape[1:], dtype=self.dtype)
        order = np.argsort(indices, kind="stable")  # sorted reads: sequential within a shard
        shards = indices[order] // self.shard_size
        cuts = np.flatnonzero(np.diff(shards)) + 1
        groups = [(indices[g], g) for g in np.split(order, cuts)] if len(indices) else []
        # Split big groups so the pool has work even when a batch falls in one shard.
        chunks = [(r[i:i + 16], p[i:i + 16]) for r, p in groups for i in range(0, len(r), 16)]
        if self._pool is None or len(chunks) == 1:
            for r, p in chunks:
                self._read_rows(r, out, p)
        else:
            for f in [self._pool.submit(self._read_rows, r, out, p) for r, p in chunks]:
                f.result()
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def __getstate__(self) -> dict:  # picklable for DataLoader workers: reopen lazily in the child
        state = dict(self.__dict__)
        state.update(_fds={}, _offsets={}, _lock=None, _pool=None, _threads=self._pool._max_workers if self._pool else 1)
        return state

    def __setstate__(self, state: dict) -> None:
        threads = state.pop("_threads")
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None


def valid_mask(manifest: dict[str, Any], names: list[str]) -> np.ndarray:
    """(N,) bool: False for rows recorded bad (skipped) in any of `names`."""
    n = int(manifest["dataset"]["N"])
    mask = np.ones(n, dtype=bool)
    for name in names:
        for b in manifest["arrays"][name].get("bad", []):
            mask[b["index"]] = False
    return mask


class CacheReader:
    """Batch gather over several arrays of one cache: moments, features and labels for a batch of indices."""

    def __init__(self, root: str | os.PathLike, names: list[str], threads: int = 8):
        self.root = Path(root)
        self.manifest = layout.load_manifest(self.root)
        self.names = list(names)
        self.arrays = {n: ArrayReader(self.root, self.manifest, n, threads) for n in self.names}
        self.labels = layout.read_labels(self.root)
        self.valid = valid_mask(self.manifest, self.names)

    @property
    def n(self) -> int:
        return int(self.manifest["dataset"]["N"])

    def valid_indices(self) -> np.ndarray:
        return np.flatnonzero(self.valid)

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """{array name: rows, "labels": (B,) int64} for `indices`; every index must be valid."""
        indices = np.asarray(indices, dtype=np.int64)
        if not self.valid[indices].all():
            raise ValueError(f"invalid rows requested: {indices[~self.valid[indices]][:8].tolist()}")
        out = {n: a.gather(indices) for n, a in self.arrays.items()}
        out["labels"] = self.labels[indices]
        return out

    def close(self) -> None:
        for a in self.arrays.values():
            a.close()


class IndexSampler:
    """Seeded permutation per epoch over the valid rows; global batch b of the run is a fixed set of rows, and
    rank r takes the r-th of `world_size` equal slices of it.

    The state is just the global step: exact O(1) resume from (seed, step), and the same global batches at
    any world size (2 ranks x 4 rows cover the rows that 1 rank x 8 reads).
    """

    def __init__(self, indices: np.ndarray, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if len(indices) < global_batch:
            raise ValueError(f"{len(indices)} valid samples are fewer than one global batch of {global_batch}")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.global_batch, self.seed, self.rank, self.world_size = global_batch, seed, rank, world_size
        self.per_rank = global_batch // world_size
        self.batches_per_epoch = len(self.indices) // global_batch  # drop_last: every batch is full
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._perm = epoch, self.indices[rng.permutation(len(self.indices))]
        return self._perm

    def global_batch_at(self, step: int) -> np.ndarray:
        """Rows of global batch `step` (0-based), all ranks' together."""
        epoch, b = divmod(step, self.batches_per_epoch)
        return self._permutation(epoch)[b * self.global_batch:(b + 1) * self.global_batch]

    def batch_at(self, step: int) -> np.ndarray:
        """This rank's rows of global batch `step`."""
        lo = self.rank * self.per_rank
        return self.global_batch_at(step)[lo:lo + self.per_rank]

    def epoch_of(self, step: int) -> int:
        return step // self.batches_per_epoch
