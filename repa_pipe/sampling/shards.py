"""Sample shards on disk and the ADM-format npz assembled from them.

OUT/shards/NNNNNN.npz holds samples [k*S, min((k+1)*S, N)) (`images` uint8 (n, H, W, 3), `labels` (n,) int64),
written atomically: a shard file that exists is complete, so a killed run resumes by skipping them.
The final OUT/samples.npz (`arr_0` (N, H, W, 3) uint8, `arr_1` (N,) labels, as ADM's class-conditional batches)
is streamed shard by shard into the zip, so 50,000 256x256 images (9.8 GB) never sit in memory at once.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
from numpy.lib import format as npy_format

from repa_pipe.pipeline.fileio import atomic_write


def shard_path(out: Path, k: int) -> Path:
    return Path(out) / "shards" / f"{k:06d}.npz"


def write_shard(out: Path, k: int, images: np.ndarray, labels: np.ndarray) -> None:
    atomic_write(shard_path(out, k), lambda f: np.savez(f, images=images, labels=labels))


def read_shard(out: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(shard_path(out, k), allow_pickle=False) as z:
        return z["images"], z["labels"]


def iter_shards(out: Path, num_shards: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for k in range(num_shards):
        yield read_shard(out, k)


def first_images(out: Path, num_shards: int, n: int) -> np.ndarray:
    """The first n samples (reading only the shards that hold them), for the grid."""
    got, seen = [], 0
    for k in range(num_shards):
        if seen >= n:
            break
        imgs, _ = read_shard(out, k)
        got.append(imgs)
        seen += len(imgs)
    return np.concatenate(got)[:n]


def _write_npy_member(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype,
                      chunks: Iterator[np.ndarray]) -> None:
    """One .npy member of a zip, header first, then the rows chunk by chunk (C order)."""
    with zf.open(name, "w", force_zip64=True) as f:
        npy_format.write_array_header_2_0(f, {"descr": npy_format.dtype_to_descr(np.dtype(dtype)),
                                              "fortran_order": False, "shape": shape})
        written = 0
        for c in chunks:
            f.write(np.ascontiguousarray(c, dtype=dtype).tobytes())
            written += len(c)
        if written != shape[0]:
            raise RuntimeError(f"{name}: wrote {written} rows, header says {shape[0]}")


def assemble_npz(out: Path, path: Path, num_shards: int, n: int, hw: tuple[int, int]) -> None:
    """Stream every shard into one ADM-format npz (`arr_0` uint8 NHWC, `arr_1` labels), atomically."""
    labels = np.concatenate([read_shard(out, k)[1] for k in range(num_shards)])

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_npy_member(zf, "arr_0.npy", (n, hw[0], hw[1], 3), np.uint8,
                              (imgs for imgs, _ in iter_shards(out, num_shards)))
            _write_npy_member(zf, "arr_1.npy", (n,), np.int64, iter([labels]))

    atomic_write(path, write)
