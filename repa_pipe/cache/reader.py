"""Reading random batches from the cache: the training hot path, checked byte for byte.

zarr-python 3.1's `oindex` on sharded arrays reads ~100 samples/s (docs/cache.md, docs/benchmarks.md). Our arrays
store one row per inner chunk, raw bytes followed by their crc32c, so each row is a contiguous byte range of
its shard file, located by the shard index at the file's end. `ArrayReader` parses each shard index once
(checking the index's own crc32c), then gathers rows with `os.preadv` from a thread pool and checks every
row's crc32c (both release the GIL): training never uses bytes that differ from what was written.

Open files are bounded: each ArrayReader keeps at most `max_open` shard files open (least recently used closed
first; an ImageNet-sized cache has ~1,252 shards per array, above the common soft limit of 1,024 descriptors),
and `raise_fd_limit` lifts the soft RLIMIT_NOFILE to the hard one where allowed. Running out of descriptors is
reported as what it is (`ResourceLimitError`, naming the limit), never as damage to a shard.

int8 arrays (cache/quant.py) are gathered in their stored form and dequantized to float16 by the same pool
task that read them: callers see the float16 rows a float16 cache would serve. With `stored=True` they get the
stored rows themselves ((..., D + 4) int8, every row's crc32c still checked), for a consumer that dequantizes
elsewhere (training on a GPU: training/stream.py).
"""
from __future__ import annotations

import errno
import json
import os
import resource
import stat
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import crc32c
import numpy as np

from repa_pipe.cache import layout
from repa_pipe.cache.layout import CachePaths
from repa_pipe.cache.manifest import Manifest, ShardMarker, read_manifest, read_markers
from repa_pipe.cache.quant import dequantize_int8, scratch
from repa_pipe.pipeline.errors import CorruptDataError, ResourceLimitError
from repa_pipe.pipeline.hashing import sha256_int64
from repa_pipe.pipeline.seeding import order_rng

_EMPTY = np.uint64(2**64 - 1)  # zarr's marker for an absent inner chunk
_CRC = 4  # bytes of the crc32c after each row
_CHUNK_ROWS = 16  # rows per pool task
_MAX_OPEN = 256  # shard files one ArrayReader keeps open (at most a quarter of the soft limit; see _open_cap)


def raise_fd_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit where allowed; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # not allowed here (a container's seccomp, macOS's OPEN_MAX): keep the soft one
            pass
    return soft


def _open_cap(max_open: Optional[int]) -> int:
    """Shard files to keep open: `max_open`, else _MAX_OPEN, never over a quarter of the soft limit (the rest
    is left to other arrays, the loader, torch and the checkpoints)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    quarter = max(2, soft // 4) if soft != resource.RLIM_INFINITY else _MAX_OPEN
    return max(1, min(max_open or _MAX_OPEN, quarter))


def _fd_limit_error(path: Path, e: OSError) -> ResourceLimitError:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    which = "the process's open-file limit (RLIMIT_NOFILE" if e.errno == errno.EMFILE else \
        "the system's open-file table (ENFILE; RLIMIT_NOFILE"
    return ResourceLimitError(f"{path}: too many open files: {which} soft {soft}, hard {hard}); raise it "
                              "(`ulimit -n`) or close other programs: the cache is not damaged")


class _Shard:
    """One open shard file: its descriptor, row offsets, and how many reads use it now (never closed then)."""

    __slots__ = ("fd", "offsets", "users")

    def __init__(self, fd: int, offsets: np.ndarray):
        self.fd, self.offsets, self.users = fd, offsets, 0


class ArrayReader:
    """pread-based, checksummed row gather for one array of the cache."""

    def __init__(self, root: Path, manifest: Manifest, name: str, threads: int = 8, max_open: Optional[int] = None):
        spec = manifest.array(name).spec
        self.root, self.name = Path(root), name
        self.paths = CachePaths(self.root)
        self.shape = tuple(spec.shape)                    # rows as served: (N, *row)
        self.dtype = np.dtype(spec.read_dtype)
        self.stored_row = tuple(spec.stored_row_shape)
        self.stored_dtype = np.dtype(spec.dtype)
        self.quantized = spec.quantized
        self.row_bytes = spec.row_bytes
        self.shard_size = manifest.shard_size
        self.max_open = _open_cap(max_open)
        self._open_shards: OrderedDict[int, _Shard] = OrderedDict()  # LRU: least recently used first
        # Parsed shard indexes outlive their descriptors (8 bytes a row: 10 MB for ImageNet), so reopening a shard
        # closed by the LRU costs an open and an fstat, not a re-read of its index. Keyed by the file's identity:
        # a shard rewritten meanwhile (repair, then its encode) is parsed again.
        self._indexes: dict[int, tuple[tuple[int, int, int], np.ndarray]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None

    def shard_path(self, k: int) -> Path:
        return self.paths.shard_file(self.name, k, len(self.stored_row) + 1)

    def _acquire(self, k: int) -> _Shard:
        """Shard k open and in use by the caller (release with `_release`); opens it, closing unused ones past
        `max_open`, on first use."""
        with self._lock:
            sh = self._open_shards.get(k)
            if sh is not None:
                self._open_shards.move_to_end(k)
                sh.users += 1
                return sh
            self._evict(self.max_open - 1)
            sh = self._open_new(k)
            sh.users = 1
            self._open_shards[k] = sh
            return sh

    def _release(self, sh: _Shard) -> None:
        with self._lock:
            sh.users -= 1

    def _evict(self, keep: int) -> None:
        """Close least recently used shards not in use until at most `keep` are open. Call holding the lock."""
        for k in [k for k, sh in self._open_shards.items() if sh.users == 0]:
            if len(self._open_shards) <= keep:
                break
            os.close(self._open_shards.pop(k).fd)

    def _open_new(self, k: int) -> _Shard:
        path = self.shard_path(k)
        try:
            # O_NONBLOCK: a FIFO in a shard's place must not block the open; a regular file ignores the flag.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise _fd_limit_error(path, e) from None
            raise self._shard_damage(k, f"cannot be opened ({path}: {e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._shard_damage(k, f"is not a regular file ({path})")
            ident = (st.st_ino, st.st_size, st.st_mtime_ns)
            known = self._indexes.get(k)
            if known is None or known[0] != ident:
                known = (ident, self._read_index(fd, k, path)[:, 0].copy())
                self._indexes[k] = known
        except BaseException:
            os.close(fd)
            raise
        return _Shard(fd, known[1])

    def check_shard(self, k: int) -> None:
        """Open shard k and check its index (raises CorruptDataError naming what is wrong); rows are not read."""
        self._release(self._acquire(k))

    def _read_index(self, fd: int, k: int, path: Path) -> np.ndarray:
        """The shard index ((shard_size, 2) offsets and sizes), its own crc32c checked."""
        idx_bytes = self.shard_size * 16
        size = os.fstat(fd).st_size
        raw = os.pread(fd, idx_bytes + _CRC, max(0, size - idx_bytes - _CRC))
        if len(raw) != idx_bytes + _CRC or crc32c.crc32c(raw[:idx_bytes]) != int.from_bytes(raw[idx_bytes:], "little"):
            raise self._shard_damage(k, f"index checksum mismatch ({path})")
        index = np.frombuffer(raw[:idx_bytes], dtype="<u8").reshape(self.shard_size, 2)
        sizes = index[:, 1][index[:, 0] != _EMPTY]
        if (sizes != self.row_bytes + _CRC).any():
            raise self._shard_damage(k, f"holds rows of {int(sizes.max())} bytes, the manifest says "
                                        f"{self.row_bytes} + {_CRC} ({path})")
        return index

    def _shard_damage(self, k: int, what: str) -> CorruptDataError:
        """Damage to shard k as a whole (its file or index): one error for training, its `detail` for verify."""
        return CorruptDataError(f"{self.root}: shard {k} of {self.name}: {what}; run `repa-pipe cache verify "
                                f"{self.root}`", detail=what)

    def served(self, stored: bool = False) -> tuple[tuple[int, ...], np.dtype]:
        """(row shape, dtype) of what `gather` returns: the read form, or with `stored` the form on disk."""
        return (self.stored_row, self.stored_dtype) if stored else (self.shape[1:], self.dtype)

    def _read_rows(self, rows: np.ndarray, out: np.ndarray, pos: np.ndarray, stored: bool = False) -> None:
        """Read global rows `rows` (all in one shard) into out[pos], checking each row's crc32c; int8 rows are
        read into a task-local buffer and dequantized into out[pos] in one vectorized step, unless `stored`."""
        k = int(rows[0]) // self.shard_size
        raw = scratch("rows", (len(rows), *self.stored_row), self.stored_dtype) \
            if self.quantized and not stored else None
        buf = raw if raw is not None else out
        flat = buf.reshape(buf.shape[0], -1).view(np.uint8)
        crcs = np.empty(len(rows), dtype="<u4")
        crc_bytes = crcs.view(np.uint8)
        sh = self._acquire(k)
        try:
            for j, (r, p) in enumerate(zip(rows, pos)):
                off = sh.offsets[int(r) - k * self.shard_size]
                if off == _EMPTY:
                    raise CorruptDataError(f"{self.root}: row {r} of {self.name} (shard {k}) was never written")
                dst = flat[j] if raw is not None else flat[p]
                n = os.preadv(sh.fd, [dst, crc_bytes[j * _CRC:(j + 1) * _CRC]], int(off))
                if n != self.row_bytes + _CRC:
                    raise CorruptDataError(f"{self.root}: short read of row {r} of {self.name} in shard {k} "
                                           f"({self.shard_path(k)})")
                if crc32c.crc32c(dst) != crcs[j]:
                    raise CorruptDataError(
                        f"{self.root}: {self.name} shard {k} row {r}: checksum mismatch, the bytes on disk differ "
                        f"from what was written ({self.shard_path(k)}); run `repa-pipe cache verify {self.root}`")
        finally:
            self._release(sh)
        if raw is not None:
            if np.all(np.diff(pos) == 1):  # a run of rows: dequantize straight into the caller's buffer
                dequantize_int8(raw, out[pos[0]:pos[0] + len(pos)])
            else:
                out[pos] = dequantize_int8(raw, np.empty((len(pos), *self.shape[1:]), dtype=self.dtype))

    def gather(self, indices: np.ndarray, out: np.ndarray | None = None, stored: bool = False) -> np.ndarray:
        """Rows `indices` (any order, repeats allowed) -> array (len(indices), *row) of `served(stored)`.

        `out`, a buffer of that shape and dtype the caller reuses, saves page-faulting a fresh allocation per
        batch (1.4x warm, docs/benchmarks.md). `stored`: int8 rows as stored, not dequantized."""
        indices = np.asarray(indices, dtype=np.int64)
        if out is None:
            row, dtype = self.served(stored)
            out = np.empty((len(indices), *row), dtype=dtype)
        order = np.argsort(indices, kind="stable")  # sorted reads: sequential within a shard
        shards = indices[order] // self.shard_size
        cuts = np.flatnonzero(np.diff(shards)) + 1
        groups = [(indices[g], g) for g in np.split(order, cuts)] if len(indices) else []
        # Split big groups so the pool has work even when a batch falls in one shard.
        chunks = [(r[i:i + _CHUNK_ROWS], p[i:i + _CHUNK_ROWS]) for r, p in groups
                  for i in range(0, len(r), _CHUNK_ROWS)]
        if self._pool is None or len(chunks) == 1:
            for r, p in chunks:
                self._read_rows(r, out, p, stored)
        else:
            for f in [self._pool.submit(self._read_rows, r, out, p, stored) for r, p in chunks]:
                f.result()
        return out

    @property
    def open_files(self) -> int:
        return len(self._open_shards)

    def close(self) -> None:
        with self._lock:
            for sh in self._open_shards.values():
                os.close(sh.fd)
            self._open_shards.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def disk_problems(root: Path, manifest: Manifest, name: str,
                  markers: dict[int, ShardMarker]) -> list[tuple[Optional[int], str]]:
    """What a stat and the array's zarr.json can tell: metadata equal to the manifest's spec, and every done
    shard's file present with the size its marker recorded. One (shard or None for the array, line) each."""
    spec = manifest.array(name).spec
    paths = CachePaths(Path(root))
    meta_path = paths.array_dir(name) / "zarr.json"
    try:
        meta = json.loads(layout.check_regular(meta_path).read_text())
        shard = meta["codecs"][0]["configuration"]
        on_disk = (tuple(meta["shape"]), meta["data_type"], tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]),
                   tuple(shard["chunk_shape"]), [c["name"] for c in shard["codecs"]])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        return [(None, f"{name}: unreadable array metadata {meta_path} ({type(e).__name__}: {e})")]
    row = spec.stored_row_shape
    want = ((spec.shape[0], *row), spec.dtype, (manifest.shard_size, *row), (1, *row), ["bytes", "crc32c"])
    labels = ("shape", "dtype", "shard shape", "row chunk", "row codecs")
    out: list[tuple[Optional[int], str]] = [
        (None, f"{name}: {what} on disk {d!r} but the manifest says {w!r} ({meta_path})")
        for what, d, w in zip(labels, on_disk, want) if d != w]
    for k, mk in sorted(markers.items()):
        path = paths.shard_file(name, k, len(row) + 1)
        if not path.is_file():
            out.append((k, f"{name}: shard {k} is marked done but its file is missing ({path})"))
        elif path.stat().st_size != mk.bytes:
            out.append((k, f"{name}: shard {k} has {path.stat().st_size} bytes, {mk.bytes} were written "
                           f"({path})"))
    return out


def check_ready(root: Path, manifest: Manifest, names: list[str]) -> None:
    """Before training reads `names`: the first disk problem (see `disk_problems`) as a CorruptDataError."""
    for name in names:
        markers, unreadable = read_markers(root, name, manifest.num_shards, manifest.n)
        problems = [line for _, line in unreadable + disk_problems(root, manifest, name, markers)]
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise CorruptDataError(f"{root}: {problems[0]}{more}; run `repa-pipe cache verify {root}`")


def check_labels(root: Path, manifest: Manifest) -> np.ndarray:
    """index/labels.npy, checked against the hash the manifest recorded; returns the labels."""
    try:
        labels = layout.read_labels(root)
    except (OSError, ValueError) as e:
        raise CorruptDataError(f"{root}: index/labels.npy is unreadable ({e}); run `repa-pipe cache verify {root}`") \
            from None
    if len(labels) != manifest.n or sha256_int64(labels) != manifest.dataset.labels_sha256:
        raise CorruptDataError(f"{root}: index/labels.npy differs from what was written (sha256 or length); "
                               f"run `repa-pipe cache verify {root}`")
    return labels


class CacheReader:
    """Batch gather over several arrays of one cache: moments, features and labels for a batch of indices."""

    def __init__(self, root: str | os.PathLike, names: list[str], threads: int = 8):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.names = list(names)
        raise_fd_limit()
        self.arrays = {n: ArrayReader(self.root, self.manifest, n, threads) for n in self.names}
        self.labels = check_labels(self.root, self.manifest)
        self.valid = self.manifest.valid_mask(self.names)

    @property
    def n(self) -> int:
        return self.manifest.n

    def valid_indices(self) -> np.ndarray:
        return np.flatnonzero(self.valid)

    def gather(self, indices: np.ndarray, out: Optional[dict[str, np.ndarray]] = None,
               stored: bool = False) -> dict[str, np.ndarray]:
        """{array name: rows, "labels": (B,) int64} for `indices`; every index must be valid. `out` holds a
        reused buffer per array (see `ArrayReader.gather`); `stored`: int8 arrays as stored, not dequantized."""
        indices = np.asarray(indices, dtype=np.int64)
        if not self.valid[indices].all():
            raise ValueError(f"invalid rows requested: {indices[~self.valid[indices]][:8].tolist()}")
        got = {n: a.gather(indices, out=out[n] if out else None, stored=stored) for n, a in self.arrays.items()}
        got["labels"] = self.labels[indices]
        return got

    def buffers(self, batch: int, stored: bool = False) -> dict[str, np.ndarray]:
        """One empty (batch, *row) buffer per array, for `gather(..., out=, stored=)`."""
        forms = {n: a.served(stored) for n, a in self.arrays.items()}
        return {n: np.empty((batch, *row), dtype=dtype) for n, (row, dtype) in forms.items()}

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
            rng = order_rng(self.seed, epoch)
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
