"""`repa-pipe encode-latents`: image source -> VAE posterior moments in the cache (encoding/latents.py)."""
from __future__ import annotations

from repa_pipe.encoding.config import EncodeLatentsConfig
from repa_pipe.encoding.latents import encode_latents
from repa_pipe.pipeline.progress import log


def run(cfg: EncodeLatentsConfig) -> None:
    done = encode_latents(cfg)
    if done is not None:
        log(done.summary())
