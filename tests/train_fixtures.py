"""Small synthetic caches for the training tests, written with the real cache writer.

Array entries have the fields `stages.encode_latents.array_entry` / `encode_features.array_entry` write, so the
train stage sees exactly what it would see after the encode stages, without running a VAE or an encoder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from repa_pipe.cache import layout, writer

SD_SCALE = 0.18215


@dataclass(frozen=True)
class Latents:
    """One latents array: codec name, channels C (moments have 2C), side, scaling factor, posterior std."""

    codec: str = "pixel"
    channels: int = 3
    size: int = 8
    scale: float = 1.0
    std: float = 0.0


@dataclass(frozen=True)
class Features:
    """One features array: encoder name, token grid side, embedding dim."""

    encoder: str = "dinov2-b"
    grid: int = 4
    dim: int = 32


@dataclass
class CacheOpts:
    n: int = 8
    num_classes: int = 4
    shard_size: Optional[int] = None                  # None: one shard holding every row
    latents: tuple[Latents, ...] = (Latents(),)
    features: tuple[Features, ...] = (Features(),)
    unfinished: tuple[str, ...] = ()                  # array names left with their last shard not done
    nan_latents: bool = False                         # every moment NaN (a non-finite loss from step 1)
    seed: int = 0
    extra: dict = field(default_factory=dict)


def _dataset(o: CacheOpts) -> dict:
    return {"kind": "imagefolder", "root": "/synthetic", "N": o.n, "num_classes": o.num_classes,
            "file_list_sha256": "f" * 64, "labels_sha256": "l" * 64}


def latents_entry(lat: Latents, n: int) -> tuple[str, dict]:
    c2 = 2 * lat.channels
    return f"latents/{lat.codec}", {
        "kind": "latents",
        "model": {"name": lat.codec, "id": "none" if lat.codec == "pixel" else f"test/{lat.codec}",
                  "weights_hash": "none", "random_init": False},
        "dtype": "float32", "shape": [n, c2, lat.size, lat.size], "chunk": [1, c2, lat.size, lat.size],
        "preprocessing": {"resolution": 32, "crop": "adm_center_crop", "input": "uint8/127.5 - 1"},
        "extra": {"moments": "mean_std", "scaling_factor": lat.scale, "latent_channels": lat.channels,
                  "downsample": 32 // lat.size, "precision": "fp32"},
    }


def features_entry(f: Features, n: int) -> tuple[str, dict]:
    t = f.grid * f.grid
    return f"features/{f.encoder}", {
        "kind": "features",
        "model": {"name": f.encoder, "id": f"test/{f.encoder}", "weights_hash": "none", "random_init": True,
                  "timm_name": "none"},
        "dtype": "float16", "shape": [n, t, f.dim], "chunk": [1, t, f.dim],
        "preprocessing": {"resolution": 32, "crop": "adm_center_crop", "encoder_input": {}},
        "extra": {"grid": f.grid, "embed_dim": f.dim, "tokens": "patch tokens (no cls/registers)",
                  "final_norm": True, "precision": "fp32"},
    }


def latent_moments(lat: Latents, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2C, s, s): blocky means in [-1, 1] (4x4 blocks, so a tiny model memorises them fast), constant std."""
    coarse = np.tanh(rng.standard_normal((n, lat.channels, max(1, lat.size // 4), max(1, lat.size // 4))))
    mean = np.kron(coarse, np.ones((1, 1, 4, 4)))[:, :, :lat.size, :lat.size]
    std = np.full_like(mean, lat.std)
    return np.concatenate([mean, std], axis=1).astype(np.float32)


def _write(root: Path, manifest: dict, name: str, entry: dict, data: np.ndarray, unfinished: bool) -> dict:
    manifest = writer.ensure_array(root, manifest, name, entry)
    w = writer.ShardWriter(root, manifest, name)
    shards = range(manifest["num_shards"] - (1 if unfinished else 0))
    for k in shards:
        lo, hi = layout.shard_range(k, manifest["dataset"]["N"], manifest["shard_size"])
        w.write(k, data[lo:hi], [])
    return writer.finalize(root, name)


def make_cache(root: Path, opts: CacheOpts | None = None) -> Path:
    o = opts or CacheOpts()
    rng = np.random.default_rng(o.seed)
    root = Path(root)
    labels = np.arange(o.n) % o.num_classes
    m = writer.open_or_create(root, _dataset(o), [f"c{y}/img{i}.png" for i, y in enumerate(labels)], labels, 32,
                              o.shard_size or o.n)
    for lat in o.latents:
        name, entry = latents_entry(lat, o.n)
        data = latent_moments(lat, o.n, rng)
        if o.nan_latents:
            data[:] = np.nan
        m = _write(root, m, name, entry, data, name in o.unfinished)
    for f in o.features:
        name, entry = features_entry(f, o.n)
        data = rng.standard_normal((o.n, f.grid * f.grid, f.dim)).astype(np.float16)
        m = _write(root, m, name, entry, data, name in o.unfinished)
    return root
