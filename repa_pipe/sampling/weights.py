"""Building a SiT for sampling from weights of any kind, and exporting a run's EMA weights (run/checkpoint.py reads them: our training checkpoint,
our exported safetensors, the reference's `last.pt`).

The architecture is read off the weights (channels, patch, token grid, classes, projector dims) and checked
against the preset name, so a wrong `--model` is one clear error rather than a shape traceback.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save as safetensors_bytes

from repa_pipe.models.sit import SIT_PRESETS, SiT, build_sit, load_reference_state_dict
from repa_pipe.pipeline import checkpoint as files
from repa_pipe.pipeline.config import check_choice
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.fileio import atomic_write_bytes
from repa_pipe.run.checkpoint import EXPORT_FORMAT, Checkpoint, load, load_from
from repa_pipe.run.record import RECORD


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


def load_for_sampling(run: Optional[Path], ckpt: Optional[str], preset: Optional[str],
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


# ------------------------------------------------------------------------------------------------ export
def check_export_target(out: Path) -> None:
    """One line for a target that must not be written: inside a run's checkpoints folder (it would replace or sit
    among the run's checkpoints), an existing file that is not a regular file (a device, a FIFO, a folder: the
    temp-and-rename write would replace the node), or a file in a folder that does not exist."""
    out = Path(out)
    parent = out.parent.resolve()
    if not parent.is_dir():
        raise ConfigError(f"{out}: its folder {out.parent} does not exist; create it first or export elsewhere")
    if parent.name == "checkpoints" and (files.list_checkpoints(parent.parent) or
                                         (parent.parent / RECORD).is_file()):
        raise ConfigError(f"{out}: inside the checkpoints folder of run {parent.parent}, where it would replace or "
                          "sit among the run's checkpoints; export to a path outside RUN/checkpoints")
    if out.exists() or out.is_symlink():
        if out.is_dir() or not stat.S_ISREG(os.stat(out).st_mode):
            raise ConfigError(f"{out}: exists and is not a regular file; export to a new file path")


def export_ema(run_or_file: Path, out: Path) -> Checkpoint:
    """Write the EMA weights of a run's newest checkpoint (or of a checkpoint file) to `out` as safetensors, with
    the training config, what was derived from it and the cache's view in the metadata (str -> str, JSON)."""
    check_export_target(out)
    ck = load(run_or_file) if Path(run_or_file).is_file() else load_from(Path(run_or_file), None)
    ck.require_training("export reads a run or one of its checkpoints")
    tensors = {k: v.detach().cpu().contiguous() for k, v in ck.ema.items()}
    meta = {"format": EXPORT_FORMAT, "step": str(ck.step), "config": json.dumps(ck.config),
            "resolved": json.dumps(ck.resolved), "cache_spec": json.dumps(ck.view.to_json() if ck.view else {})}
    atomic_write_bytes(Path(out), safetensors_bytes(tensors, metadata=meta))  # never a torn file
    return ck
