"""ADM-format sample batches: an ``.npz`` whose ``arr_0`` is uint8 ``[N, H, W, 3]`` NHWC in 0..255.

ADM's evaluator casts ``arr_0`` to float32 without dividing by 255, so a float array in [0, 1] would be
scored as near-black images without any error. We refuse anything but integers in 0..255 instead.
Both ``np.savez`` and ``np.savez_compressed`` files are read; ``iter_npz_images`` streams the array from
the zip member so a 50k x 256 x 256 x 3 batch (9.8 GB) never has to sit in memory at once.
"""
from __future__ import annotations

import os
import zipfile
from typing import Iterable, Iterator, Optional, Tuple, Union

import numpy as np

from repa_pipe.pipeline.errors import BadInputError

ImageBatches = Union[np.ndarray, Iterable[np.ndarray]]

_HINT_FLOAT = ("sample images must be integers in 0..255 (uint8); ADM's evaluator would silently read float "
               "images in [0, 1] as near-black. Convert with np.clip(np.round(x * 255), 0, 255).astype(np.uint8)")


def check_image_array_header(shape: Tuple[int, ...], dtype: np.dtype, where: str) -> None:
    """Reject by dtype and shape alone (no data read). ``where`` names the file/key for the message."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" or dtype.kind == "c":
        raise BadInputError(f"{where}: dtype {dtype} is rejected: {_HINT_FLOAT}")
    if dtype.kind not in "ui":
        raise BadInputError(f"{where}: dtype {dtype} is not an integer image dtype; expected uint8 in 0..255")
    if len(shape) != 4:
        raise BadInputError(f"{where}: shape {tuple(shape)} has rank {len(shape)}; expected [N, H, W, 3] (NHWC)")
    n, h, w, c = shape
    if c != 3:
        hint = " (looks like NCHW; transpose to NHWC)" if shape[1] == 3 else ""
        raise BadInputError(f"{where}: shape {tuple(shape)} has {c} channels in the last axis; "
                            f"expected [N, H, W, 3] RGB{hint}")
    if n < 1 or h < 1 or w < 1:
        raise BadInputError(f"{where}: shape {tuple(shape)} holds no images")


def check_image_values(arr: np.ndarray, where: str) -> np.ndarray:
    """Return ``arr`` as uint8 after checking integer values lie in 0..255. (N, H, W, 3) -> same, uint8."""
    if arr.dtype == np.uint8:
        return arr
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise BadInputError(f"{where}: values span {lo}..{hi}, outside 0..255; expected uint8 images")
    return arr.astype(np.uint8)


def check_images(arr: np.ndarray, where: str) -> np.ndarray:
    """Full check of an in-memory image array; returns it as uint8 [N, H, W, 3]."""
    if not isinstance(arr, np.ndarray):
        raise BadInputError(f"{where}: expected a numpy array of images, got {type(arr).__name__}")
    check_image_array_header(arr.shape, arr.dtype, where)
    return check_image_values(arr, where)


def _open_npz(path: str | os.PathLike) -> zipfile.ZipFile:
    if not os.path.isfile(path):
        raise BadInputError(f"{path}: no such file (expected an ADM-format .npz with arr_0 images)")
    try:
        return zipfile.ZipFile(path, "r")
    except (zipfile.BadZipFile, OSError) as e:
        raise BadInputError(f"{path}: not a readable .npz file ({e})") from e


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Array names in an npz file, without loading any array."""
    with _open_npz(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def _check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    if labels.dtype.kind not in "ui" or labels.ndim != 1 or labels.shape[0] != n:
        raise BadInputError(f"{where}: labels must be a 1-D integer array of length {n}; "
                            f"got dtype {labels.dtype}, shape {labels.shape}")
    return labels.astype(np.int64)


def load_sample_npz(path: str | os.PathLike) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Load and validate an ADM sample batch. Returns (images uint8 (N, H, W, 3), labels (N,) int64 or None).

    Labels are read from ``arr_1`` when present (ADM's class-conditional batches carry them; DiT's do not).
    Raises BadInputError naming the file and the problem.
    """
    keys = npz_keys(path)
    if "arr_0" not in keys:
        raise BadInputError(f"{path}: no 'arr_0' array (found {keys or 'no arrays'}); "
                            "an ADM sample batch stores images as arr_0, uint8 [N, H, W, 3]")
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z["arr_0"]
            labels = z["arr_1"] if "arr_1" in keys else None
    except ValueError as e:  # object arrays need pickle: never valid here
        raise BadInputError(f"{path}: cannot read arr_0 ({e})") from e
    images = check_images(images, f"{path}: arr_0")
    if labels is not None:
        labels = _check_labels(labels, images.shape[0], f"{path}: arr_1")
    return images, labels


def _read_exact(f, size: int, where: str) -> bytes:
    """Read exactly ``size`` bytes; zip members may return short reads."""
    chunks, got = [], 0
    while got < size:
        b = f.read(size - got)
        if not b:
            raise BadInputError(f"{where}: file ends early (truncated npz?)")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def npz_image_count(path: str | os.PathLike, key: str = "arr_0") -> int:
    """N of ``key`` from the .npy header alone; validates dtype and shape."""
    with _open_npz(path) as zf, _open_member(zf, path, key) as f:
        shape, _, dtype = _read_header(f, path, key)
    check_image_array_header(shape, dtype, f"{path}: {key}")
    return int(shape[0])


def _open_member(zf: zipfile.ZipFile, path, key: str):
    name = f"{key}.npy"
    if name not in zf.namelist():
        found = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        raise BadInputError(f"{path}: no '{key}' array (found {found or 'no arrays'}); "
                            f"expected images as {key}, uint8 [N, H, W, 3]")
    return zf.open(name, "r")


def _read_header(f, path, key: str):
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    except ValueError as e:
        raise BadInputError(f"{path}: {key} is not a valid .npy member ({e})") from e
    return None  # newer format version: caller falls back to a full load


def iter_npz_images(path: str | os.PathLike, batch_size: int = 500, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Stream validated uint8 batches (B, H, W, 3) of ``key`` from an npz without loading it whole.

    The dtype/shape check happens before the first batch; the 0..255 range check per batch (only
    non-uint8 integer arrays need it).
    """
    where = f"{path}: {key}"
    with _open_npz(path) as zf, _open_member(zf, path, key) as f:
        header = _read_header(f, path, key)
        if header is None or header[1] or header[2].hasobject:
            # Fortran order / unknown version: rare, take the memory route.
            with np.load(path, allow_pickle=False) as z:
                arr = check_images(z[key], where)
            for i in range(0, arr.shape[0], batch_size):
                yield arr[i:i + batch_size]
            return
        shape, _, dtype = header
        check_image_array_header(shape, dtype, where)
        n, per_image = shape[0], int(np.prod(shape[1:]))
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            raw = _read_exact(f, b * per_image * dtype.itemsize, where)
            batch = np.frombuffer(raw, dtype=dtype).reshape((b, *shape[1:]))
            yield check_image_values(batch, where)


def iter_batches(images: ImageBatches, batch_size: int, where: str = "images") -> Iterator[np.ndarray]:
    """Re-chunk an array (or tensor, or iterable of arrays) into validated uint8 batches; the last may be short."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if hasattr(images, "detach"):  # one torch tensor (N, H, W, 3)
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        images = check_images(images, where)
        for i in range(0, images.shape[0], batch_size):
            yield images[i:i + batch_size]
        return
    pending: list[np.ndarray] = []
    count = 0
    for chunk in images:
        if hasattr(chunk, "detach"):  # a torch tensor in NHWC
            chunk = chunk.detach().cpu().numpy()
        chunk = check_images(np.asarray(chunk), where)
        if pending and chunk.shape[1:] != pending[0].shape[1:]:
            raise BadInputError(f"{where}: image batches differ in size "
                                f"({pending[0].shape[1:]} vs {chunk.shape[1:]})")
        pending.append(chunk)
        count += chunk.shape[0]
        while count >= batch_size:
            cat = np.concatenate(pending, 0) if len(pending) > 1 else pending[0]
            yield cat[:batch_size]
            rest = cat[batch_size:]
            pending, count = ([rest] if rest.shape[0] else []), rest.shape[0]
    if count:
        yield np.concatenate(pending, 0) if len(pending) > 1 else pending[0]
