"""Small synthetic caches for the training tests, written with the real cache writer.

Array specs come from the same manifest constructors the encode stages use (with the codec's / encoder's
describe() written out), so the train stage sees what it would see after the encode stages, without running a
VAE or an encoder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from repa_pipe.cache import writer
from repa_pipe.cache.manifest import ArraySpec, Dataset, Manifest, features_spec, latents_spec
from repa_pipe.pipeline.hashing import sha256_int64

SD_SCALE = 0.18215

# A tiny SiT-T/2 + REPA run that trains in a second on a CPU (the modules that run `train` through the CLI share it).
TINY_ARGS = ["--model", "SiT-T/2", "--encoder-depth", "2", "--projector-dim", "64", "--global-batch-size", "8",
             "--lr", "1e-3", "--log-every", "1", "--sample-every", "0", "--precision", "fp32", "--loader-threads", "1"]


def train_args(cache, run, steps: int, *extra, encoder: str = "dinov2-b") -> list:
    """The `train` command of a tiny run on `cache` into `run`, to `steps`, with `extra` options."""
    return ["train", "--cache", cache, "--run-dir", run, "--encoder", encoder, "--steps", steps, *TINY_ARGS, *extra]


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
    file_list_sha256: str = "f" * 64                  # the identity of the image list (another: another cache)
    extra: dict = field(default_factory=dict)


def _dataset(o: CacheOpts) -> Dataset:
    return Dataset(kind="imagefolder", root="/synthetic", n=o.n, num_classes=o.num_classes,
                   file_list_sha256=o.file_list_sha256, labels_sha256=sha256_int64(np.arange(o.n) % o.num_classes))


def latents_spec_of(lat: Latents, n: int) -> ArraySpec:
    """The spec encode-latents would write for such a codec (through the same manifest constructor)."""
    codec = {"name": lat.codec, "latent_channels": lat.channels, "downsample": 32 // lat.size,
             "scaling_factor": lat.scale, "moments": "mean_std",
             "weights_id": "none" if lat.codec == "pixel" else f"test/{lat.codec}", "weights_hash": "none",
             "is_random_init": False}
    return latents_spec(codec, n, 32, "float32", "fp32")


def features_spec_of(f: Features, n: int) -> ArraySpec:
    """The spec encode-features would write for such an encoder."""
    enc = {"name": f.encoder, "grid": f.grid, "embed_dim": f.dim, "weights_id": f"test/{f.encoder}",
           "weights_hash": "none", "is_random_init": True}
    return features_spec(enc, n, 32, "float16", "fp32")


def latent_moments(lat: Latents, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2C, s, s): blocky means in [-1, 1] (4x4 blocks, so a tiny model memorises them fast), constant std."""
    side = -(-lat.size // 4)  # ceil: sides that are not a multiple of 4 are cut from the next block up
    coarse = np.tanh(rng.standard_normal((n, lat.channels, side, side)))
    mean = np.kron(coarse, np.ones((1, 1, 4, 4)))[:, :, :lat.size, :lat.size]
    std = np.full_like(mean, lat.std)
    return np.concatenate([mean, std], axis=1).astype(np.float32)


def _write(root: Path, spec: ArraySpec, data: np.ndarray, unfinished: bool) -> Manifest:
    m = writer.ensure_array(root, spec)
    w = writer.ShardWriter(root, m, spec.name)
    for k in range(m.num_shards - (1 if unfinished else 0)):
        lo, hi = m.shard_range(k)
        w.write(k, data[lo:hi], [])
    return writer.finalize(root, spec.name)


def make_cache(root: Path, opts: CacheOpts | None = None) -> Path:
    o = opts or CacheOpts()
    rng = np.random.default_rng(o.seed)
    root = Path(root)
    labels = np.arange(o.n) % o.num_classes
    writer.open_or_create(root, _dataset(o), [f"c{y}/img{i}.png" for i, y in enumerate(labels)], labels, 32,
                          o.shard_size or o.n)
    for lat in o.latents:
        spec = latents_spec_of(lat, o.n)
        data = latent_moments(lat, o.n, rng)
        if o.nan_latents:
            data[:] = np.nan
        _write(root, spec, data, spec.name in o.unfinished)
    for f in o.features:
        spec = features_spec_of(f, o.n)
        data = rng.standard_normal((o.n, f.grid * f.grid, f.dim)).astype(np.float16)
        _write(root, spec, data, spec.name in o.unfinished)
    return root


def assert_states_equal(a: dict, b: dict) -> None:
    """Two training checkpoints, bitwise: model, EMA, optimizer (moments and step counts), grad scaler, step."""
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    oa, ob = a["opt"], b["opt"]
    assert oa["param_groups"] == ob["param_groups"]
    for i in oa["state"]:
        for k in oa["state"][i]:
            assert torch.equal(oa["state"][i][k], ob["state"][i][k]), ("opt", i, k)
    assert a["scaler"] == b["scaler"] and a["step"] == b["step"] and a["sampler"] == b["sampler"]
