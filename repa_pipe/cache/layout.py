"""Where everything lives inside a cache folder, and the index files.

```
CACHE/
  manifest.json              the typed contract (cache/manifest.py)
  .lock                      flock'ed around every manifest read-modify-write (cache/lock.py)
  locks/<kind>--<name>.lock  held by the one job writing that array; names the holder
  index/keys.txt             line i = key (source-relative path) of sample i, canonical order
  index/labels.npy           (N,) int64; -1 for a sample whose label could not be used (a bad row)
  cache.zarr/                Zarr v3 group; every array sharded on axis 0 with the same S rows per shard
    latents/<codec>          (N, 2C, h, w) posterior moments (mean, std)
    features/<encoder>       (N, T, D) patch tokens (int8: (N, T, D + 4), each token's float32 scale after it)
    cls/<encoder>            (N, 1, D) the encoder's class token (encode-features --with-cls), stored alike
  done/<kind>/<name>/<k>.json  shard k of that array is complete (written last, atomically, after fsync)
  stats/                     reference statistics for sample-eval, computed once
```
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repa_pipe.pipeline.fileio import atomic_write

ZARR_DIR = "cache.zarr"


@dataclass(frozen=True)
class CachePaths:
    """Every path inside one cache folder."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def array_lock(self, array: str) -> Path:
        return self.root / "locks" / (array.replace("/", "--") + ".lock")

    @property
    def zarr(self) -> Path:
        return self.root / ZARR_DIR

    def array_dir(self, array: str) -> Path:
        return self.zarr / array

    @property
    def keys(self) -> Path:
        return self.root / "index" / "keys.txt"

    @property
    def labels(self) -> Path:
        return self.root / "index" / "labels.npy"

    @property
    def stats(self) -> Path:
        return self.root / "stats"

    def done_dir(self, array: str) -> Path:
        return self.root / "done" / array

    def done_marker(self, array: str, k: int) -> Path:
        return self.done_dir(array) / f"{k:06d}.json"

    def shard_file(self, array: str, k: int, ndim: int) -> Path:
        """Zarr v3 default chunk-key encoding: c/<k>/0/.../0 (one shard per k along axis 0)."""
        return self.array_dir(array).joinpath("c", str(k), *(["0"] * (ndim - 1)))


def write_index(root: Path, keys: list[str], labels: np.ndarray) -> None:
    paths = CachePaths(Path(root))
    atomic_write(paths.keys, lambda f: f.write("".join(k + "\n" for k in keys).encode()))
    atomic_write(paths.labels, lambda f: np.save(f, np.asarray(labels, dtype=np.int64)))


def check_regular(path: Path) -> Path:
    """`path` if it is a regular file (after symlinks); else OSError. Checked before opening: a FIFO in a
    cache's place would block the open, a device node would read without end."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise OSError(f"{path} is not a regular file")
    return path


def read_labels(root: Path) -> np.ndarray:
    return np.load(check_regular(CachePaths(Path(root)).labels), allow_pickle=False)


def read_keys(root: Path) -> list[str]:
    return check_regular(CachePaths(Path(root)).keys).read_text().splitlines()
