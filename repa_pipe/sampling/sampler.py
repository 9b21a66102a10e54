"""Drawing the samples of sample-eval: sample i from its own generator, in shards that resume.

Sample i's noise, its label (labels `random`) and every SDE noise come from a generator seeded by (seed, i),
so the draws are the same at any world size, batch size or shard size, and so are the labels. The pixels are
too up to float rounding: the model's matrix products may sum in another order for another batch size, which
can move a uint8 value by 1 (the conversion truncates). OUT/shards/sampling.json records everything a sample
depends on, and a re-run with other settings is refused.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from repa_pipe.models.samplers import PerSampleRandn, sample
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.fileio import atomic_write_json, read_json
from repa_pipe.pipeline.images import Decoder
from repa_pipe.pipeline.precision import compute, resolve
from repa_pipe.pipeline.progress import Tracker, log
from repa_pipe.pipeline.seeding import sample_seed
from repa_pipe.pipeline.signals import StopOnSignal, Stopped
from repa_pipe.sampling import shards
from repa_pipe.sampling.config import SampleEvalConfig, parse_interval


@dataclass
class Sampler:
    cfg: SampleEvalConfig
    model: torch.nn.Module
    decode: Decoder
    device: torch.device
    decoder_id: tuple[str, Optional[str]] = ("", None)  # (codec name, weights) that decode

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @functools.cached_property
    def precision(self) -> str:
        """What the model runs in: --precision, `auto` resolved as the shards already in --out were made (a resumed
        run never mixes precisions, nor is refused for one made before `auto` or on another device), else for
        this device."""
        if self.cfg.precision == "auto":
            path = Path(self.cfg.out) / "shards" / "sampling.json"
            have = read_json(path) if path.is_file() else None
            if have and have.get("precision") and any((Path(self.cfg.out) / "shards").glob("[0-9]*.npz")):
                return have["precision"]
        return resolve(self.cfg.precision, self.device, "sample")

    def batch(self, idx: range, bar: Optional[Tracker] = None) -> tuple[np.ndarray, np.ndarray]:
        """Samples idx -> (uint8 (n, H, W, 3), labels (n,)); `bar` advances by len(idx) / num_steps per step."""
        cfg, m = self.cfg, self.model
        randn = PerSampleRandn([sample_seed(cfg.seed, i) for i in idx], self.device)
        h, w = m.input_size
        z = randn((m.in_channels, h, w))  # (n, C, h, w): first draw of each sample's generator
        if cfg.labels == "random":
            y = randn.randint(self.num_classes)  # second draw, as the reference (noise, then labels)
        else:
            y = torch.tensor([i % self.num_classes for i in idx], device=self.device)
        on_step = (lambda: bar.update(len(idx) / cfg.num_steps)) if bar is not None else None
        with compute(self.precision, self.device):
            x = sample(m.forward_velocity, z, y, mode=cfg.mode, num_steps=cfg.num_steps, heun=cfg.heun,
                       cfg_scale=cfg.cfg_scale, guidance_interval=parse_interval(cfg.guidance_interval),
                       null_class=m.null_class, randn=randn, on_step=on_step)
        # Decoding stays float32 (a few per mille of the sampler's FLOPs): TF32 only when --precision tf32 asked.
        with compute("tf32" if self.precision == "tf32" else "fp32", self.device):
            pixels = self.decode(x.float())
        return pixels.numpy(), y.cpu().numpy()


def sampling_key(cfg: SampleEvalConfig, s: Sampler, weights_hash: str) -> dict[str, Any]:
    """Everything sample i depends on, besides i (batch size and world size change nothing)."""
    lo, hi = parse_interval(cfg.guidance_interval)
    return {"weights_state_sha256": weights_hash, "num_samples": cfg.num_samples, "shard_size": cfg.shard_size,
            "mode": cfg.mode, "num_steps": cfg.num_steps, "heun": cfg.heun, "cfg_scale": cfg.cfg_scale,
            "guidance_interval": [lo, hi], "seed": cfg.seed, "labels": cfg.labels, "precision": s.precision,
            "decoder": [s.decoder_id[0], str(Path(s.decoder_id[1]).resolve()) if s.decoder_id[1] else None]}


def check_resume(out: Path, key: dict[str, Any]) -> None:
    """Refuse to mix shards made with other settings; rank 0 records the key before any shard is written."""
    path = out / "shards" / "sampling.json"
    have = read_json(path) if path.is_file() else None
    if have is not None and have != key and any((out / "shards").glob("[0-9]*.npz")):
        diff = sorted(k for k in set(have) | set(key) if have.get(k) != key.get(k))
        raise ConfigError(f"{out}: holds sample shards made with other settings "
                          f"({'; '.join(f'{k}: {have.get(k)!r} then, {key.get(k)!r} now' for k in diff)}); "
                          f"use another --out, or delete {out / 'shards'} to start over")
    dist.barrier()  # every rank has read the old key before rank 0 may write the new one
    if dist.is_main():
        # Left by a killed run (a sample shard, or the final npz: 10 GB at 50k x 256 px); no rank writes yet.
        for tmp in [*(out / "shards").glob(".*.tmp"), *out.glob(".*.tmp")]:
            tmp.unlink(missing_ok=True)
        if have != key:
            atomic_write_json(path, key)
    dist.barrier()


def run_sampling(cfg: SampleEvalConfig, s: Sampler, key: Optional[dict[str, Any]] = None) -> int:
    """Write every missing shard this rank owns; returns the number of shards. SIGINT/SIGTERM stop after the
    current batch (finished shards are kept)."""
    out = Path(cfg.out)
    if key is not None:
        check_resume(out, key)
    n_shards = (cfg.num_samples + cfg.shard_size - 1) // cfg.shard_size
    todo = {k for k in range(n_shards) if not shards.shard_path(out, k).is_file()}
    mine = [k for k in range(dist.get_rank(), n_shards, dist.get_world_size()) if k in todo]
    log(f"sample-eval: {n_shards - len(todo)}/{n_shards} shards already done; {dist.get_world_size()} process(es)")
    total = sum(min(cfg.shard_size, cfg.num_samples - k * cfg.shard_size) for k in mine)
    err: Optional[Stopped] = None
    with StopOnSignal() as stop, Tracker("sample", total, every_s=5.0) as bar:
        try:
            for k in mine:
                _write_shard(cfg, s, k, bar, stop)
        except Stopped as e:
            err = e
    stopped = [e for e in dist.all_gather_object(err) if e is not None]
    if stopped:
        done = sum(shards.shard_path(out, k).is_file() for k in range(n_shards))
        raise Stopped(f"on {stopped[0]}, {done}/{n_shards} sample shards are done and kept; run the same "
                      "command to resume", stopped[0].signum)
    return n_shards


def _write_shard(cfg: SampleEvalConfig, s: Sampler, k: int, bar: Tracker, stop: StopOnSignal) -> None:
    lo, hi = k * cfg.shard_size, min((k + 1) * cfg.shard_size, cfg.num_samples)
    imgs, labels = [], []
    for b in range(lo, hi, cfg.batch_size):
        if stop.requested:
            raise Stopped(stop.name, stop.signum)
        x, y = s.batch(range(b, min(b + cfg.batch_size, hi)), bar)
        imgs.append(x)
        labels.append(y)
    shards.write_shard(Path(cfg.out), k, np.concatenate(imgs), np.concatenate(labels))
