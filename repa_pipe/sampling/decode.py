"""Turning model-space latents back into uint8 pixels: which decoder, built without the VAE encoder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from repa_pipe.cache.manifest import Provenance
from repa_pipe.models.registry import sampling_decoder
from repa_pipe.models.vae_decoder import load_vae_decoder
from repa_pipe.pipeline.images import Decoder, to_uint8


def choose_decoder(codec: Provenance, vae: Optional[str], vae_weights: Optional[str],
                   pair: bool = True) -> tuple[str, Optional[str]]:
    """(decoder name, local weights or None) for latents made by `codec`.

    `vae` (--vae) wins. Otherwise, with `pair`, the reference's pairing (SD-VAE latents decode with
    sd-vae-ft-ema, generate.py's default), else the codec itself; a local folder the codec was loaded from is
    reused when the decoder is that same codec."""
    if vae is not None:
        return vae, vae_weights
    name = sampling_decoder(codec.name) if pair else codec.name
    local = codec.weights_id if name == codec.name and Path(codec.weights_id).exists() else None
    return name, vae_weights or local


def make_decoder(name: str, weights: Optional[str], device: torch.device) -> Decoder:
    codec = load_vae_decoder(name, weights, device=device)  # never builds the VAE encoder

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        return to_uint8(codec.decode(z.to(device)))  # codec.decode divides by its scaling factor

    return decode
