"""encode-latents' work: image source -> VAE posterior moments in the cache (the job itself: runner.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from repa_pipe.cache.manifest import latents_spec
from repa_pipe.encoding import runner
from repa_pipe.encoding.config import EncodeLatentsConfig
from repa_pipe.models.latent_codecs import load_codec
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.precision import resolve
from repa_pipe.pipeline.progress import log


def check_resolution(resolution: int, downsample: int, vae: str, given: bool = True) -> None:
    """The latent side must be a whole number and even, so that patch-2 SiT models tile it. `given`: the user
    typed --resolution (else it is the existing cache's)."""
    if resolution % (2 * downsample):
        what = f"--resolution {resolution}" if given else f"the cache's resolution {resolution} (set when it was made)"
        raise ConfigError(f"{what} must be a multiple of {2 * downsample} for --vae {vae} (its latents are "
                          f"1/{downsample} of the image side, and patch-2 SiT models need an even latent side)")


def encode_latents(cfg: EncodeLatentsConfig) -> Optional[runner.Encoded]:
    """Encode every pending shard of the latents array `cfg` names. Returns where it ended (rank 0; None on the
    other ranks)."""
    dist.init()
    source = runner.open_checked_source(cfg)
    res = runner.resolve_resolution(Path(cfg.cache), cfg.resolution)
    device = dist.device()
    codec = load_codec(cfg.vae, cfg.vae_weights, device=device)
    if device.type == "cuda":  # NHWC conv weights, as the images arrive: cuDNN's fast layout (no transposes)
        codec.to(memory_format=torch.channels_last)
    precision = resolve(cfg.precision, device, "encode")
    check_resolution(res, codec.downsample, cfg.vae, given=cfg.resolution is not None)
    if codec.is_random_init:
        log(f"[yellow]{cfg.vae}: random-init VAE (for tests), not a pretrained one[/]")
    spec = latents_spec(codec.describe(), len(source), res, cfg.dtype, precision)
    job = runner.job_from(cfg, source, res, desc=f"encode-latents {cfg.vae}")
    # forward: (B, 3, H, W) uint8 -> (B, 2C, h, w) float32 moments
    spec = runner.resume_precision(Path(cfg.cache), spec, cfg.precision)
    return runner.run_job(job, spec, codec.encode_moments, spec.precision)
