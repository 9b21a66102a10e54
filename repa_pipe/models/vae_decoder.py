"""The decoder half of an AutoencoderKL, built and loaded without ever constructing its encoder.

Training previews and sample-eval only decode. Building the whole AutoencoderKL would construct (and for the hub
models, load) the VAE encoder too; here only diffusers' `Decoder` and `post_quant_conv` exist, filled from the
same weight files with the `decoder.` / `post_quant_conv.` keys.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from repa_pipe.models import weights as W
from repa_pipe.models.latent_codecs import (CODEC_NAMES, HUB_IDS, OPTION, SD_SCALING_FACTOR, TINY_SCALING_FACTOR,
                                            load_codec)
from repa_pipe.pipeline.errors import ConfigError

_CONFIG = "config.json"
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class VAEDecoder(torch.nn.Module):
    """post_quant_conv + Decoder of an AutoencoderKL config; decode(model-space z) -> images in [-1, 1]."""

    def __init__(self, config: dict[str, Any], scaling_factor: float):
        super().__init__()
        from diffusers.models.autoencoders.vae import Decoder

        c = config["latent_channels"]
        self.scaling_factor = scaling_factor
        self.latent_channels = c
        self.decoder = Decoder(in_channels=c, out_channels=config.get("out_channels", 3),
                               up_block_types=tuple(config["up_block_types"]),
                               block_out_channels=tuple(config["block_out_channels"]),
                               layers_per_block=config.get("layers_per_block", 1),
                               norm_num_groups=config.get("norm_num_groups", 32), act_fn=config.get("act_fn", "silu"),
                               mid_block_add_attention=config.get("mid_block_add_attention", True))
        use_pq = config.get("use_post_quant_conv", True)
        self.post_quant_conv = torch.nn.Conv2d(c, c, 1) if use_pq else None

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """(B, C, h, w) model-space latents -> (B, 3, H, W) float32 in [-1, 1] (divides by the scaling factor)."""
        p = next(self.parameters())
        z = (z.to(p.device).float() / self.scaling_factor).to(p.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).float().clamp(-1.0, 1.0)


def _folder_files(path: Path) -> tuple[Path, Path]:
    for base in (path, path / "vae"):
        if (base / _CONFIG).is_file():
            for name in _WEIGHT_NAMES:
                if (base / name).is_file():
                    return base / _CONFIG, base / name
    raise ConfigError(f"--vae-weights {path}: no config.json with diffusion_pytorch_model.safetensors/.bin "
                      "(a diffusers AutoencoderKL folder, as written by save_pretrained)")


def _decoder_state(raw: Any) -> dict[str, Tensor]:
    return {k: v for k, v in raw.items() if k.startswith(("decoder.", "post_quant_conv."))}


def load_vae_decoder(name: str, weights: str | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Decoder-only codec by name: `pixel` (identity) and `tiny` (seeded test VAE) come from load_codec;
    the SD VAEs from `weights` (a diffusers folder) or the hub id, decoder weights only."""
    if name not in CODEC_NAMES:
        raise ConfigError(f"unknown codec {name!r}; valid codecs: {', '.join(CODEC_NAMES)}")
    if name == "pixel" or (name == "tiny" and weights is None):
        return load_codec(name, weights, device=device)  # no encoder network to avoid (tiny: test-only)
    if weights is not None:
        cfg_path, w_path = _folder_files(W.local_path(weights, "--vae-weights", f"codec {name}"))
    else:
        hub = HUB_IDS[name]
        cfg_path = W.hub_file(f"codec {name}", hub, [_CONFIG], OPTION)
        w_path = W.hub_file(f"codec {name}", hub, list(_WEIGHT_NAMES), OPTION)
    config = json.loads(Path(cfg_path).read_text())
    scale = TINY_SCALING_FACTOR if name == "tiny" else SD_SCALING_FACTOR
    dec = VAEDecoder(config, scale)
    state = _decoder_state(W.read_state_dict(w_path, "--vae-weights"))
    missing, unexpected = dec.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{w_path}: decoder weights do not fit the config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    return dec.to(device).eval().requires_grad_(False)
