"""`repa-pipe demo OUT`: the whole pipeline on scikit-learn's digits (1,797 real 8x8 digits), on a CPU.

Writes the digits as an ImageFolder under OUT/images so the real source path runs, then fills OUT/cache with
latents (`pixel` at 32x32 by default) and features from the random-init `tiny` encoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from repa_pipe.cache import inspect
from repa_pipe.cache.sources import write_digits_imagefolder
from repa_pipe.pipeline.progress import log
from repa_pipe.stages import encode_features, encode_latents


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    resolution: int = 32
    vae: str = "pixel"
    workers: int = 0


def run(cfg: DemoConfig) -> None:
    out = Path(cfg.out)
    images = write_digits_imagefolder(out / "images", size=cfg.resolution)
    cache = out / "cache"
    log(f"[bold]demo[/]: digits ImageFolder at {images}")
    encode_latents.run(encode_latents.EncodeLatentsConfig(
        source=str(images), cache=cache, vae=cfg.vae, resolution=cfg.resolution, shard_size=256,
        batch_size=128, workers=cfg.workers))
    encode_features.run(encode_features.EncodeFeaturesConfig(
        source=str(images), cache=cache, encoder="tiny", batch_size=64, workers=cfg.workers))
    summary = inspect.info(cache)
    for a in summary["arrays"]:
        log(f"  {a['name']}: {'x'.join(map(str, a['shape']))} {a['dtype']} {a['status']}")
