"""Turning model-space latents back into uint8 pixels with the cache's codec (or one given by name)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from repa_pipe.cache import layout
from repa_pipe.models.vae_decoder import load_vae_decoder
from repa_pipe.stages.images import to_uint8

Decoder = Callable[[torch.Tensor], torch.Tensor]  # (N, C, h, w) model-space latents -> (N, H, W, 3) uint8


def codec_of(cache: Path, latents: str) -> tuple[str, Optional[str]]:
    """(codec name, local weights path or None) that made `latents` in `cache`."""
    entry = layout.load_manifest(cache)["arrays"][latents]
    model = entry["model"]
    wid = model.get("id") or ""
    local = wid if wid and Path(wid).exists() else None
    return model["name"], local


def make_decoder(name: str, weights: Optional[str], device: torch.device) -> Decoder:
    codec = load_vae_decoder(name, weights, device=device)  # never builds the VAE encoder

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        return to_uint8(codec.decode(z.to(device)))  # codec.decode divides by its scaling factor

    return decode


def latent_decoder(cache: Path, latents: str, device: torch.device) -> Decoder:
    name, weights = codec_of(cache, latents)
    return make_decoder(name, weights, device)
