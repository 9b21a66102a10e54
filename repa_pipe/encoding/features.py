"""encode-features' work: image source -> pretrained-encoder patch tokens (and, with --with-cls, the class
token) in the cache (the job itself: runner.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from repa_pipe.cache.manifest import cls_spec, features_spec
from repa_pipe.encoding import runner
from repa_pipe.encoding.config import EncodeFeaturesConfig
from repa_pipe.models.feature_encoders import load_encoder
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.precision import resolve
from repa_pipe.pipeline.progress import log


def default_grid(cache: Path, resolution: int) -> int:
    """The token grid of a patch-2 SiT on the cache's latents; resolution/16 when it has none yet."""
    m = runner.existing_manifest(cache)
    grid = m.default_grid() if m is not None else None
    return grid if grid is not None else max(1, resolution // 16)


def encode_features(cfg: EncodeFeaturesConfig) -> Optional[runner.Encoded]:
    """Encode every pending shard of the features array `cfg` names (and its class-token array with
    --with-cls). Returns where the features array ended (rank 0; None on the other ranks)."""
    dist.init()
    source = runner.open_checked_source(cfg)
    res = runner.resolve_resolution(Path(cfg.cache), cfg.resolution)
    if res % 2 and runner.existing_manifest(Path(cfg.cache)) is None:
        raise ConfigError(f"--resolution {res}: no latent codec encodes an odd image side (pixel needs a multiple "
                          "of 2, tiny of 8, sd-vae-* of 16), so a cache made at it could never be trained on")
    grid = cfg.grid or default_grid(Path(cfg.cache), res)
    if grid > res:  # refused before the encoder (and its grid * patch px input) is built
        raise ConfigError(f"--grid {grid}: more tokens per side than the {res} px images have pixels; a SiT on "
                          f"these images has at most {res} tokens per side (use the default, or --grid <= {res})")
    device = dist.device()
    precision = resolve(cfg.precision, device, "encode")
    enc = load_encoder(cfg.encoder, cfg.encoder_weights, grid=grid, device=device)
    if enc.is_random_init:
        log(f"[yellow]{cfg.encoder}: random-init encoder (for tests), not a pretrained one[/]")
    if cfg.with_cls and not enc.spec.has_cls:
        raise ConfigError(f"--with-cls: encoder {cfg.encoder} has no class token")
    spec = features_spec(enc.describe(), len(source), res, cfg.feature_dtype, precision)
    spec = runner.resume_precision(Path(cfg.cache), spec, cfg.precision)
    job = runner.job_from(cfg, source, res, desc=f"encode-features {cfg.encoder}")
    if cfg.with_cls:
        # forward: (B, 3, H, W) uint8 -> ((B, T, D) patch tokens, (B, D) class token), float32, one pass
        extra = [cls_spec(enc.describe(), len(source), res, cfg.feature_dtype, spec.precision)]
        return runner.run_job(job, spec, enc.forward_with_cls, spec.precision, extra)
    # forward: (B, 3, H, W) uint8 -> (B, T, D) float32 patch tokens
    return runner.run_job(job, spec, enc, spec.precision)
