"""`repa-pipe encode-latents`: image source -> VAE posterior moments in the cache."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


from repa_pipe.models.latent_codecs import CODEC_NAMES, LatentCodec, load_codec
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.progress import log
from repa_pipe.stages import encode


@dataclass(frozen=True)
class EncodeLatentsConfig:
    source: str                          # ImageFolder root, folder of .tar shards, or a brace pattern
    cache: Path                          # cache folder (created if new)
    vae: str = "sd-vae-ft-ema"           # one of CODEC_NAMES
    vae_weights: Optional[str] = None    # local diffusers folder instead of the hub id
    resolution: Optional[int] = None     # ADM center-crop size; None: the cache's, or 256 for a new cache
    shard_size: Optional[int] = None     # samples per shard; None: the cache's, or 1024 for a new cache
    batch_size: int = 32
    workers: int = 4                     # image-decoding loader processes per rank
    dtype: str = "float32"               # stored moments dtype: float32 or float16
    precision: str = "fp32"              # VAE compute precision: fp32, bf16, fp16
    skip_bad: bool = False               # record bad images and go on, instead of stopping


def validate(cfg: EncodeLatentsConfig) -> None:
    encode.check_choice(cfg.vae, CODEC_NAMES, "--vae")
    encode.check_choice(cfg.dtype, ("float32", "float16"), "--dtype")
    encode.check_choice(cfg.precision, tuple(encode.PRECISIONS), "--precision")
    for name in ("batch_size", "shard_size", "resolution"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if cfg.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {cfg.workers}")


def array_entry(cfg: EncodeLatentsConfig, codec: LatentCodec, manifest: dict[str, Any]) -> tuple[str, dict]:
    res = manifest["preprocessing"]["resolution"]
    if res % codec.downsample:
        raise ConfigError(f"--resolution {res} is not divisible by the {cfg.vae} downsampling factor {codec.downsample}")
    h = res // codec.downsample
    c2 = 2 * codec.latent_channels
    n = manifest["dataset"]["N"]
    entry = {
        "kind": "latents",
        "model": {"name": cfg.vae, "id": codec.weights_id, "weights_hash": codec.weights_hash,
                  "random_init": codec.is_random_init},
        "dtype": cfg.dtype, "shape": [n, c2, h, h], "chunk": [1, c2, h, h],
        "preprocessing": {"resolution": res, "crop": "adm_center_crop", "input": "uint8/127.5 - 1"},
        "extra": {"moments": "mean_std", "moments_layout": f"channels 0..{codec.latent_channels - 1} mean, "
                  f"{codec.latent_channels}..{c2 - 1} std", "scaling_factor": codec.scaling_factor,
                  "latent_channels": codec.latent_channels, "downsample": codec.downsample,
                  "precision": cfg.precision},
    }
    return f"latents/{cfg.vae}", entry


def run(cfg: EncodeLatentsConfig) -> None:
    validate(cfg)
    dist.init()
    source = encode.prepare_source(cfg.source)
    res = encode.resolve_resolution(cfg.cache, cfg.resolution)
    codec = load_codec(cfg.vae, cfg.vae_weights, device=dist.device())
    if codec.is_random_init:
        log(f"[yellow]{cfg.vae}: random-init VAE (for tests and the demo), not a pretrained one[/]")
    job = encode.EncodeJob(Path(cfg.cache), source, res, cfg.shard_size, cfg.batch_size, cfg.workers, cfg.skip_bad,
                           desc=f"encode-latents {cfg.vae}")
    # forward: (B, 3, H, W) uint8 -> (B, 2C, h, w) float32 moments
    encode.run_job(job, lambda m: array_entry(cfg, codec, m), codec.encode_moments, cfg.precision)
