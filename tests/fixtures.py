"""Shared tiny-dataset builders and helpers for the stage/CLI tests (not a test module).

Everything here is independent of repa_pipe's own implementation where a test compares against it: the ADM crop is
the reference procedure written out again, arrays are read back with zarr itself (not the cache's pread reader),
and ImageFolder keys/labels are derived from the files written here.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import tarfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

VENV_BIN = Path(sys.executable).parent
# Fail fast: every image set is tiny, every cache small.
RES = 16
SHARD = 8


# ------------------------------------------------------------------------------------------------- images
def rand_rgb(w: int, h: int, seed: int) -> Image.Image:
    """A smooth-ish random RGB image (gradients + noise) so crops and resizes matter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255.0 / max(w - 1, 1), yy * 255.0 / max(h - 1, 1), (xx + yy) * 127.0 / max(w + h, 1)], -1)
    noise = rng.normal(0, 40, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# Sizes chosen to exercise the ADM crop at 16 px: BOX halving (short side >= 32), landscape/portrait, odd sizes.
SIZES = [(20, 30), (37, 19), (64, 40), (17, 17), (50, 33), (16, 23), (33, 71), (25, 18)]


def make_imagefolder(root: Path, classes: Sequence[str] = ("cat", "dog", "eel"), per_class: int = 8,
                     seed: int = 0, ext: str = ".png") -> Path:
    """ROOT/<class>/img_<j>.png with varied sizes. Returns root."""
    root = Path(root)
    k = 0
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            w, h = SIZES[k % len(SIZES)]
            rand_rgb(w, h, seed * 1000 + k).save(root / c / f"img_{j:03d}{ext}")
            k += 1
    return root


def imagefolder_index(root: Path) -> tuple[list[str], np.ndarray]:
    """Expected (keys, labels) of an ImageFolder written by make_imagefolder: class folders sorted, files sorted."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    keys, labels = [], []
    for ci, c in enumerate(classes):
        files = sorted(f.name for f in (root / c).iterdir() if f.is_file() and not f.name.startswith("."))
        keys += [f"{c}/{f}" for f in files]
        labels += [ci] * len(files)
    return keys, np.asarray(labels, dtype=np.int64)


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))
    return path


def ref_adm_crop(img: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's center_crop_arr (the REPA/ADM reference preprocessing), copied independently."""
    img = img.convert("RGB")
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    y = (arr.shape[0] - size) // 2
    x = (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


# ------------------------------------------------------------------------------------------------- cache
def read_array(cache: Path, name: str) -> np.ndarray:
    """An array of the cache read with zarr itself (not repa_pipe's pread reader)."""
    import zarr

    return zarr.open_array(store=str(Path(cache) / "cache.zarr"), path=name, mode="r")[:]


def shard_file(cache: Path, name: str, k: int, ndim: int) -> Path:
    return Path(cache).joinpath("cache.zarr", name, "c", str(k), *(["0"] * (ndim - 1)))


def done_marker(cache: Path, name: str, k: int) -> Path:
    return Path(cache) / "done" / name / f"{k:06d}.json"


def tree(root: Path, under: str = "") -> dict[str, str]:
    """{relative path: sha256} of every file under root/under (for 'nothing changed' and 'same bytes' checks)."""
    root = Path(root)
    out = {}
    for p in sorted((root / under).rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tree_stat(root: Path) -> dict[str, tuple[int, int, str]]:
    """{relative path: (size, mtime_ns, sha256)} -- also catches a rewrite with identical bytes."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


_TIME_KEY = re.compile(r".*_utc$")


def strip_times(obj):
    """A manifest (or marker) without its timestamps (keys ending in _utc)."""
    if isinstance(obj, dict):
        return {k: strip_times(v) for k, v in obj.items() if not _TIME_KEY.match(k)}
    if isinstance(obj, list):
        return [strip_times(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------- CLI
def invoke(args: Sequence[str], env: dict | None = None):
    """Run the real Typer app in-process, as `repa-pipe ARGS` would; returns click's Result (output = stdout+stderr)."""
    from typer.testing import CliRunner

    from repa_pipe.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env=env, catch_exceptions=True)


def ok(args: Sequence[str], env: dict | None = None):
    r = invoke(args, env)
    assert r.exit_code == 0, f"repa-pipe {' '.join(map(str, args))} -> {r.exit_code}\n{r.output}\n{r.exception!r}"
    return r


def subprocess_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment for `repa-pipe` subprocesses: offline, empty HF cache, one thread (as torchrun gives a rank)."""
    env = dict(os.environ)
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_HOME=str(Path(tmp) / "hf-home"), PYTHONUNBUFFERED="1")
    env.pop("HF_HUB_CACHE", None)
    env.update(extra)
    return env


def forbid_network(monkeypatch) -> list:
    """Every hub download function and socket connect records the attempt and raises."""
    import socket

    import huggingface_hub
    import huggingface_hub.file_download

    attempts: list = []

    def boom(*args, **kwargs):
        attempts.append((args, kwargs))
        raise OSError("network access attempted in an offline test")

    mods = [huggingface_hub, huggingface_hub.file_download]
    try:
        import diffusers.configuration_utils
        import diffusers.utils.hub_utils
        mods += [diffusers.utils.hub_utils, diffusers.configuration_utils]
    except ImportError:  # pragma: no cover
        pass
    for mod in mods:
        for fn in ("hf_hub_download", "snapshot_download"):
            if hasattr(mod, fn):
                monkeypatch.setattr(mod, fn, boom)
    monkeypatch.setattr(socket.socket, "connect", boom)
    monkeypatch.setattr(socket, "create_connection", boom)
    monkeypatch.setattr(socket, "getaddrinfo", boom)
    return attempts
