"""Training input: manifest checks, the batch for each step, and the step's random draws.

Every random draw of a step (posterior eps, diffusion noise, time, label dropout) is made for the whole
global batch from a generator seeded by (seed, step), then sliced by rank. The draws therefore belong to the
sample's position in the global batch, not to the rank: 2 ranks x 4 rows train like 1 rank x 8, and a resumed
run repeats exactly the draws of an uninterrupted one.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from repa_pipe.cache import layout
from repa_pipe.cache.reader import CacheReader, IndexSampler, valid_mask
from repa_pipe.pipeline.errors import CacheMismatchError


@dataclass(frozen=True)
class CacheSpec:
    """What the model needs to know about the cache, checked against the manifests."""

    latents: str                 # array name, e.g. "latents/sd-vae-ft-ema"
    features: list[str]          # array names, one per encoder, e.g. ["features/dinov2-b"]
    latent_channels: int
    latent_size: int
    scaling_factor: float
    feature_tokens: list[int]
    feature_dims: list[int]
    num_classes: int
    n: int
    valid: Optional[int] = None  # rows not recorded bad in any of the arrays above (None: all n)


def _complete(root: Path, m: dict, name: str, option: str) -> dict:
    entry = m["arrays"].get(name)
    if entry is None:
        have = ", ".join(m["arrays"]) or "none"
        raise CacheMismatchError(f"{root}: no array {name} in the cache (have: {have}); encode it first or fix {option}")
    if entry["status"] != "complete":
        raise CacheMismatchError(f"{root}: {name} is not complete ({entry.get('shards_done', 0)}/{m['num_shards']} "
                                 "shards done); re-run its encode command to finish it")
    if entry["shape"][0] != m["dataset"]["N"]:
        raise CacheMismatchError(f"{root}: {name} has {entry['shape'][0]} rows, the dataset has {m['dataset']['N']}")
    return entry


def pick_latents(m: dict, asked: str | None, root: Path) -> str:
    names = [n for n, e in m["arrays"].items() if e["kind"] == "latents"]
    if asked:
        return asked if asked.startswith("latents/") else f"latents/{asked}"
    if len(names) != 1:
        raise CacheMismatchError(f"{root}: {'no latents' if not names else 'several latents: ' + ', '.join(names)}"
                                 "; " + ("run encode-latents first" if not names else "pass --latents"))
    return names[0]


def _scaling_factor(root: Path, name: str, entry: dict) -> float:
    try:
        return float(entry["extra"]["scaling_factor"])
    except (KeyError, TypeError, ValueError):
        raise CacheMismatchError(f"{root}: {name} records no scaling_factor in its manifest entry; "
                                 "re-encode it with this version of encode-latents") from None


def _check_labels(root: Path, labels: np.ndarray, n: int, num_classes: int) -> None:
    if len(labels) != n:
        raise CacheMismatchError(f"{root}: index/labels.npy has {len(labels)} rows, the manifest says {n}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise CacheMismatchError(f"{root}: labels span [{labels.min()}, {labels.max()}] but the dataset has "
                                 f"{num_classes} classes")


def check_cache(root: Path, encoders: list[str], latents: str | None) -> CacheSpec:
    """Read the manifest and check every array training needs is there, complete and consistent."""
    m = layout.load_manifest(root)
    lat_name = pick_latents(m, latents, root)
    lat = _complete(root, m, lat_name, "--latents")
    if lat["kind"] != "latents":
        raise CacheMismatchError(f"{root}: {lat_name} holds {lat['kind']}, not latents; fix --latents")
    feat_names = [f"features/{e}" for e in encoders]
    feats = [_complete(root, m, f, "--encoder") for f in feat_names]
    labels = layout.read_labels(root)
    n = int(m["dataset"]["N"])
    num_classes = int(m["dataset"].get("num_classes") or int(labels.max()) + 1)
    _check_labels(root, labels, n, num_classes)
    c2, h, w = lat["shape"][1:]
    if h != w:
        raise CacheMismatchError(f"{root}: {lat_name} latents are {h}x{w}; only square latents are supported")
    return CacheSpec(latents=lat_name, features=feat_names, latent_channels=c2 // 2, latent_size=h,
                     scaling_factor=_scaling_factor(root, lat_name, lat),
                     feature_tokens=[f["shape"][1] for f in feats], feature_dims=[f["shape"][2] for f in feats],
                     num_classes=num_classes, n=n, valid=int(valid_mask(m, [lat_name, *feat_names]).sum()))


def check_batch_fits(spec: CacheSpec, global_batch: int, root: Path) -> None:
    """Every step reads one full global batch of distinct rows (drop_last): the cache must hold that many."""
    valid = spec.n if spec.valid is None else spec.valid
    if valid < global_batch:
        raise CacheMismatchError(f"{root}: {valid} usable rows (of {spec.n}) are fewer than one "
                                 f"--global-batch-size {global_batch}")


def check_model_fits(spec: CacheSpec, model_tokens: int, model_desc: str) -> None:
    """Token grid of each feature array vs the model's tokens: one clear error naming both."""
    for name, t in zip(spec.features, spec.feature_tokens):
        if t != model_tokens:
            g, mg = int(round(t ** 0.5)), int(round(model_tokens ** 0.5))
            raise CacheMismatchError(
                f"{name} has a {g}x{g} token grid ({t} tokens) but {model_desc} on {spec.latent_size}x"
                f"{spec.latent_size} latents has {mg}x{mg} ({model_tokens}); re-encode features with --grid {mg} "
                "or pick a model with another patch size")


def step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def draw_step(seed: int, step: int, global_batch: int, latent_shape: tuple[int, ...], label_dropout: float,
              ) -> dict[str, torch.Tensor]:
    """The random draws of one global batch: (G, C, h, w) posterior eps and diffusion noise, (G,) base normals /
    uniforms for time, (G,) bool label drop."""
    g = torch.Generator().manual_seed(step_seed(seed, step))
    shape = (global_batch, *latent_shape)
    return {"eps": torch.randn(shape, generator=g), "noise": torch.randn(shape, generator=g),
            "t_uniform": torch.rand(global_batch, generator=g, dtype=torch.float64).float(),
            "t_normal": torch.randn(global_batch, generator=g),
            "drop": torch.rand(global_batch, generator=g) < label_dropout}


@dataclass
class Batch:
    step: int
    moments: torch.Tensor         # (B, 2C, h, w) float32
    features: list[torch.Tensor]  # per encoder (B, T, D)
    labels: torch.Tensor          # (B,) int64
    draws: dict[str, torch.Tensor]


class BatchStream:
    """Background thread that gathers step s+1's rows and draws while step s computes (pread and torch's RNG
    release the GIL)."""

    def __init__(self, root: Path, spec: CacheSpec, global_batch: int, seed: int, rank: int, world: int,
                 label_dropout: float, start_step: int, end_step: int, prefetch: int = 3, threads: int = 8):
        self.reader = CacheReader(root, [spec.latents, *spec.features], threads=threads)
        self.sampler = IndexSampler(self.reader.valid_indices(), global_batch, seed, rank, world)
        self.spec, self.seed, self.dropout = spec, seed, label_dropout
        self.lo = rank * (global_batch // world)
        self.hi = self.lo + global_batch // world
        self.global_batch = global_batch
        self.pin = torch.cuda.is_available()
        self.q: queue.Queue = queue.Queue(maxsize=prefetch)
        self.wait_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(start_step, end_step), daemon=True)
        # The loader thread re-takes the GIL around each of ~2 preads per row; with Python's default 5 ms switch
        # interval a busy training thread can hold it that long each time (bench/loader.py: 19% wait -> 0.3%).
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, 5e-4))
        self._thread.start()

    def _make(self, step: int) -> Batch:
        rows = self.sampler.batch_at(step)
        got = self.reader.gather(rows)
        draws = draw_step(self.seed, step, self.global_batch,
                          (self.spec.latent_channels, self.spec.latent_size, self.spec.latent_size), self.dropout)
        draws = {k: v[self.lo:self.hi] for k, v in draws.items()}
        t = lambda a: torch.from_numpy(a).pin_memory() if self.pin else torch.from_numpy(a)  # noqa: E731
        return Batch(step, t(got[self.spec.latents].astype(np.float32, copy=False)),
                     [t(got[f]) for f in self.spec.features], torch.from_numpy(got["labels"]), draws)

    def _put(self, item: Batch | BaseException) -> bool:
        """Queue `item` unless the stream is closed meanwhile (then False: the consumer is gone)."""
        while not self._stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, start: int, end: int) -> None:
        try:
            for step in range(start, end):
                if not self._put(self._make(step)):
                    return
        except BaseException as e:  # surface loader errors in the training thread
            self._put(e)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        t0 = time.perf_counter()
        item = self.q.get()
        self.wait_s += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.reader.close()
        sys.setswitchinterval(self._switch)

    def describe(self) -> dict[str, Any]:
        return {"valid_samples": int(len(self.sampler.indices)), "batches_per_epoch": self.sampler.batches_per_epoch}
