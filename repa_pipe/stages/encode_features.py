"""`repa-pipe encode-features`: image source -> pretrained-encoder patch tokens in the cache."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


from repa_pipe.models.feature_encoders import ENCODERS, FeatureEncoder, load_encoder
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.progress import log
from repa_pipe.stages import encode


@dataclass(frozen=True)
class EncodeFeaturesConfig:
    source: str                            # the same image source the cache was made from
    cache: Path                            # cache folder (created if new)
    encoder: str = "dinov2-b"              # one of ENCODERS
    encoder_weights: Optional[str] = None  # timm-format or official-format state dict file
    grid: Optional[int] = None             # tokens per side; None: a patch-2 model's grid on the cache's latents
    resolution: Optional[int] = None       # None: the cache's, or 256 for a new cache
    shard_size: Optional[int] = None       # None: the cache's, or 1024 for a new cache
    batch_size: int = 32
    workers: int = 4
    dtype: str = "float16"                 # stored feature dtype: float16 or float32
    precision: str = "fp32"                # encoder compute precision: fp32, bf16, fp16
    skip_bad: bool = False


def validate(cfg: EncodeFeaturesConfig) -> None:
    encode.check_choice(cfg.encoder, tuple(ENCODERS), "--encoder")
    encode.check_choice(cfg.dtype, ("float16", "float32"), "--dtype")
    encode.check_choice(cfg.precision, tuple(encode.PRECISIONS), "--precision")
    for name in ("batch_size", "shard_size", "resolution", "grid"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {v}")


def default_grid(cache: Path, resolution: int) -> int:
    """The token grid of a patch-2 model on the cache's latents; resolution/16 when it has none yet."""
    m = encode.existing_manifest(cache)
    sides = sorted({e["shape"][-1] for e in (m or {}).get("arrays", {}).values() if e["kind"] == "latents"})
    if len(sides) > 1:
        raise ConfigError(f"{cache}: latents of several sizes {sides}; pass --grid")
    if sides:
        if sides[0] % 2:
            raise ConfigError(f"{cache}: latent side {sides[0]} is odd; pass --grid")
        return sides[0] // 2
    return max(1, resolution // 16)


def array_entry(cfg: EncodeFeaturesConfig, enc: FeatureEncoder, manifest: dict[str, Any]) -> tuple[str, dict]:
    n = manifest["dataset"]["N"]
    t, d = enc.grid * enc.grid, enc.embed_dim
    spec = enc.spec
    entry = {
        "kind": "features",
        "model": {"name": cfg.encoder, "id": enc.weights_id, "weights_hash": enc.weights_hash,
                  "random_init": enc.is_random_init, "timm_name": spec.timm_name},
        "dtype": cfg.dtype, "shape": [n, t, d], "chunk": [1, t, d],
        "preprocessing": {"resolution": manifest["preprocessing"]["resolution"], "crop": "adm_center_crop",
                          "encoder_input": {"range": "uint8/255", "mean": list(spec.mean), "std": list(spec.std),
                                            "size": enc.image_size, "interp": "bicubic",
                                            "normalize_first": spec.normalize_first}},
        "extra": {"grid": enc.grid, "embed_dim": d, "tokens": "patch tokens (no cls/registers)",
                  "final_norm": spec.final_norm, "precision": cfg.precision},
    }
    return f"features/{cfg.encoder}", entry


def run(cfg: EncodeFeaturesConfig) -> None:
    validate(cfg)
    dist.init()
    source = encode.prepare_source(cfg.source)
    res = encode.resolve_resolution(cfg.cache, cfg.resolution)
    grid = cfg.grid or default_grid(Path(cfg.cache), res)
    enc = load_encoder(cfg.encoder, cfg.encoder_weights, grid=grid, device=dist.device())
    if enc.is_random_init:
        log(f"[yellow]{cfg.encoder}: random-init encoder (for tests and the demo), not a pretrained one[/]")
    job = encode.EncodeJob(Path(cfg.cache), source, res, cfg.shard_size, cfg.batch_size, cfg.workers, cfg.skip_bad,
                           desc=f"encode-features {cfg.encoder}")
    # forward: (B, 3, H, W) uint8 -> (B, T, D) float32 patch tokens
    encode.run_job(job, lambda m: array_entry(cfg, enc, m), enc, cfg.precision)
