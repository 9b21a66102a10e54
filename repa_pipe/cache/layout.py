"""The cache's on-disk layout and its manifest.

```
CACHE/
  manifest.json              dataset identity, preprocessing, shard size, one entry per array
  index/keys.txt             line i = key (source-relative path) of sample i, canonical order
  index/labels.npy           (N,) int64
  cache.zarr/                Zarr v3 group; every array sharded on axis 0 with the same S rows per shard
    latents/<codec>          (N, 2C, h, w) float32 posterior moments (mean, std)
    features/<encoder>       (N, T, D) float16 patch tokens after the encoder's final norm
  done/<array>/<k>.json      shard k of <array> is complete (written last, atomically, after fsync)
```

Shard k is the sample range [kS, min((k+1)S, N)) in every array. Only rank 0 writes the manifest (at init
and at finalize); worker ranks write whole shards they own plus their done markers.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from repa_pipe import __version__
from repa_pipe.pipeline.errors import CacheMismatchError, NotACacheError
from repa_pipe.pipeline.fileio import atomic_write, atomic_write_json, read_json

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ZARR_DIR = "cache.zarr"
KINDS = ("latents", "features")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class CachePaths:
    """Every path inside one cache folder."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def zarr(self) -> Path:
        return self.root / ZARR_DIR

    @property
    def keys(self) -> Path:
        return self.root / "index" / "keys.txt"

    @property
    def labels(self) -> Path:
        return self.root / "index" / "labels.npy"

    def done_dir(self, array: str) -> Path:
        return self.root / "done" / array

    def done_marker(self, array: str, k: int) -> Path:
        return self.done_dir(array) / f"{k:06d}.json"

    def shard_file(self, array: str, k: int, ndim: int) -> Path:
        """Zarr v3 default chunk-key encoding: c/<k>/0/.../0 (one shard per k along axis 0)."""
        return self.zarr.joinpath(array, "c", str(k), *(["0"] * (ndim - 1)))


def array_name(kind: str, model: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"array kind must be one of {KINDS}, got {kind!r}")
    return f"{kind}/{model}"


def num_shards(n: int, shard_size: int) -> int:
    return (n + shard_size - 1) // shard_size


def shard_range(k: int, n: int, shard_size: int) -> tuple[int, int]:
    return k * shard_size, min((k + 1) * shard_size, n)


def owned_shards(n_shards: int, rank: int, world_size: int) -> list[int]:
    """Whole-shard ownership: rank r writes shards k = r mod world_size, never a row of any other."""
    return list(range(rank, n_shards, world_size))


def is_cache(root: Path) -> bool:
    return (Path(root) / MANIFEST).is_file()


def load_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check CACHE/manifest.json; NotACacheError if the folder is not a cache."""
    root = Path(root)
    if not root.exists():
        raise NotACacheError(f"{root}: no such folder (expected a cache made by `repa-pipe encode-latents`)")
    path = root / MANIFEST
    if not path.is_file():
        raise NotACacheError(f"{root}: not a repa-pipe cache (no {MANIFEST})")
    try:
        m = read_json(path)
    except ValueError as e:
        raise NotACacheError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != "repa-pipe-cache":
        raise NotACacheError(f"{path}: not a repa-pipe cache manifest")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise CacheMismatchError(f"{path}: schema version {m.get('schema_version')}, this tool reads {SCHEMA_VERSION}")
    return m


def save_manifest(root: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(Path(root) / MANIFEST, manifest)


def new_manifest(dataset: dict[str, Any], resolution: int, shard_size: int) -> dict[str, Any]:
    n = int(dataset["N"])
    return {
        "format": "repa-pipe-cache",
        "schema_version": SCHEMA_VERSION,
        "tool": f"repa-pipe {__version__}",
        "created_utc": utc_now(),
        "dataset": dataset,
        "preprocessing": {"resolution": resolution, "crop": "adm_center_crop",
                          "order": "canonical source order (index/keys.txt)"},
        "shard_size": shard_size,
        "num_shards": num_shards(n, shard_size),
        "arrays": {},
    }


def write_index(root: Path, keys: list[str], labels: np.ndarray) -> None:
    paths = CachePaths(Path(root))
    atomic_write(paths.keys, lambda f: f.write("".join(k + "\n" for k in keys).encode()))
    atomic_write(paths.labels, lambda f: np.save(f, np.asarray(labels, dtype=np.int64)))


def read_labels(root: Path) -> np.ndarray:
    return np.load(CachePaths(Path(root)).labels)


def read_keys(root: Path) -> list[str]:
    return CachePaths(Path(root)).keys.read_text().splitlines()


def check_same_dataset(manifest: dict, dataset: dict, resolution: int, shard_size: int | None, root: Path) -> None:
    """Adding arrays to a cache made from another source, resolution or shard size is an error."""
    have = manifest["dataset"]
    for key in ("N", "file_list_sha256", "labels_sha256"):
        if have.get(key) != dataset.get(key):
            raise CacheMismatchError(
                f"{root}: cache was made from another source ({key}: cache {have.get(key)!r} vs "
                f"source {dataset.get(key)!r}; cache source {have.get('root')!r}, given {dataset.get('root')!r})")
    res = manifest["preprocessing"]["resolution"]
    if res != resolution:
        raise CacheMismatchError(f"{root}: cache resolution is {res}, asked for --resolution {resolution}")
    if shard_size is not None and manifest["shard_size"] != shard_size:
        raise CacheMismatchError(
            f"{root}: cache shard size is {manifest['shard_size']}, asked for --shard-size {shard_size}")
