"""A SiT built from weights of any kind (run/checkpoint.py reads them: our training checkpoint, our exported
safetensors, the reference's `last.pt`), for sampling and analysis.

The architecture is read off the weights (channels, patch, token grid, classes, projector dims) and checked
against the preset name, so a wrong `--model` is one clear error rather than a shape traceback.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from repa_pipe.models.sit import SIT_PRESETS, SiT, build_sit, load_reference_state_dict
from repa_pipe.pipeline.config import check_choice
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.run.checkpoint import Checkpoint, load_from


@dataclass
class LoadedModel:
    model: SiT
    ck: Checkpoint                   # where the weights came from, and what is known of their training

    @property
    def source(self) -> str:
        return str(self.ck.source)

    @property
    def kind(self) -> str:
        return self.ck.kind

    @property
    def step(self) -> Optional[int]:
        return self.ck.step


def _shape(sd: dict[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in sd:
        raise ConfigError(f"{path}: not a SiT state dict (no {key})")
    return tuple(sd[key].shape)


def build_from_weights(sd: dict[str, torch.Tensor], preset: str, encoder_depth: int, path: Path) -> SiT:
    """Build preset `preset` with the geometry the weights imply, then load them strictly."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    hidden, channels, p, _ = _shape(sd, "x_embedder.proj.weight", path)
    tokens = _shape(sd, "pos_embed", path)[1]
    grid = int(round(tokens ** 0.5))
    num_classes = _shape(sd, "y_embedder.embedding_table.weight", path)[0] - 1
    z_dims, i = [], 0
    while f"projectors.{i}.4.weight" in sd:
        z_dims.append(sd[f"projectors.{i}.4.weight"].shape[0])
        i += 1
    projector_dim = sd["projectors.0.0.weight"].shape[0] if z_dims else 2048
    pre = SIT_PRESETS[preset]
    if (pre.hidden_size, pre.patch_size) != (hidden, p):
        raise ConfigError(f"{path}: weights are width {hidden}, patch {p}; --model {preset} is width "
                          f"{pre.hidden_size}, patch {pre.patch_size}")
    model = build_sit(preset, input_size=grid * p, in_channels=channels, num_classes=num_classes,
                      encoder_depth=min(encoder_depth, pre.depth), z_dims=z_dims, projector_dim=projector_dim)
    load_reference_state_dict(model, sd)
    return model


def load_model(run: Optional[Path], ckpt: Optional[str], preset: Optional[str],
               device: torch.device) -> LoadedModel:
    """The EMA model of --ckpt FILE|STEP or RUN's newest checkpoint, on `device`, in eval mode."""
    ck = load_from(run, ckpt)
    name = preset or ck.facts.model
    if name is None:
        raise ConfigError(f"{ck.source}: a reference checkpoint does not say its model; pass --model (e.g. SiT-XL/2)")
    check_choice(name, SIT_PRESETS, "model")
    # The tap depth changes no sampling output (projectors are skipped); it must only be a valid block.
    depth = ck.facts.encoder_depth or SIT_PRESETS[name].encoder_depth
    model = build_from_weights(ck.ema, name, depth, ck.source)
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model, ck)
