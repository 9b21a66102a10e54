"""Training input: the batch for each step, and the step's random draws.

Every random draw of a step (posterior eps, diffusion noise, time, label dropout) is made for the whole
global batch from a generator seeded by (seed, step), then sliced by rank. The draws therefore belong to the
sample's position in the global batch, not to the rank: 2 ranks x 4 rows train like 1 rank x 8, and a resumed
run repeats exactly the draws of an uninterrupted one.

int8 features (cache/quant.py) are dequantized where `BatchStream(dequantize=)` says: in the reader on the CPU
(the default there), or on the device inside the step (`features_to`; the default when training on CUDA): the
batch then carries the stored (B, T, D + 4) int8 rows, half the host-memory traffic and host-to-device bytes of
float16, and the GPU dequantizes them in a few elementwise kernels with the reader's own arithmetic, bit for bit.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from repa_pipe.cache.manifest import TrainingView
from repa_pipe.cache.quant import dequantize_int8_tensor
from repa_pipe.cache.reader import CacheReader, IndexSampler
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.seeding import step_seed


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


DEQUANTIZE = ("reader", "device")


def default_dequantize() -> str:
    """Where int8 features are dequantized by default: on the device when training on CUDA (where it is a few
    elementwise kernels and the copies shrink by half), else in the reader (CPU batches as they always were)."""
    return "device" if dist.device().type == "cuda" else "reader"


def features_to(f: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch's feature rows on `device`: (B, T, D) float as read, or (B, T, D + 4) int8 as stored, copied
    as stored and dequantized there to (B, T, D) float16 (the same bits as the reader's dequantization)."""
    f = f.to(device, non_blocking=True)
    return dequantize_int8_tensor(f) if f.dtype == torch.int8 else f


@dataclass
class Batch:
    step: int
    moments: torch.Tensor         # (B, 2C, h, w) float32
    features: list[torch.Tensor]  # per encoder (B, T, D) float, or (B, T, D + 4) int8 as stored (see features_to)
    labels: torch.Tensor          # (B,) int64
    draws: dict[str, torch.Tensor]


class BatchStream:
    """Background thread that gathers step s+1's rows and draws while step s computes (pread and torch's RNG
    release the GIL)."""

    def __init__(self, root: Path, spec: TrainingView, global_batch: int, seed: int, rank: int, world: int,
                 label_dropout: float, start_step: int, end_step: int, prefetch: int = 3, threads: int = 8,
                 pin: Optional[bool] = None, dequantize: Optional[str] = None):
        self.reader = CacheReader(root, [spec.latents, *spec.features], threads=threads)
        self.sampler = IndexSampler(self.reader.valid_indices(), global_batch, seed, rank, world)
        self.spec, self.seed, self.dropout = spec, seed, label_dropout
        self.lo = rank * (global_batch // world)
        self.hi = self.lo + global_batch // world
        self.global_batch = global_batch
        # Page-locked batches when training on a GPU (default: when dist.device() is one), so the step's
        # `.to(device, non_blocking=True)` copies are asynchronous; from pageable memory they are not.
        self.pin = dist.device().type == "cuda" if pin is None else pin
        self.dequantize = default_dequantize() if dequantize is None else dequantize
        if self.dequantize not in DEQUANTIZE:
            raise ValueError(f"dequantize={self.dequantize!r}: expected one of {DEQUANTIZE}")
        self._stored = self.dequantize == "device"  # int8 rows gathered as stored (crc32c still checked per row)
        self.q: queue.Queue = queue.Queue(maxsize=prefetch)
        # Rows land in reused buffers (1.45-1.6x faster than a fresh allocation per batch, docs/benchmarks.md). While
        # the producer fills the buffer of step s, at most `prefetch` later-consumed batches sit in the queue and the
        # trainer holds one more, so a ring of prefetch + 2 never overwrites a batch still in use.
        self._ring = [self.reader.buffers(global_batch // world, self._stored) for _ in range(prefetch + 2)]
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
        got = self.reader.gather(rows, out=self._ring[step % len(self._ring)], stored=self._stored)
        draws = draw_step(self.seed, step, self.global_batch,
                          (self.spec.latent_channels, self.spec.latent_size, self.spec.latent_size), self.dropout)
        pin = (lambda x: x.pin_memory()) if self.pin else (lambda x: x)  # noqa: E731
        draws = {k: pin(v[self.lo:self.hi]) for k, v in draws.items()}
        t = lambda a: pin(torch.from_numpy(a))  # noqa: E731
        return Batch(step, t(got[self.spec.latents].astype(np.float32, copy=False)),
                     [t(got[f]) for f in self.spec.features], t(got["labels"]), draws)

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

    def nonfinite_rows(self, step: int) -> list[str]:
        """'array row i' for each row this rank read at (1-based) `step` that holds NaN or Inf."""
        rows = self.sampler.batch_at(step - 1)
        got = self.reader.gather(rows)
        out = []
        for name in (self.spec.latents, *self.spec.features):
            flat = got[name].reshape(len(rows), -1).astype(np.float32, copy=False)
            out += [f"{name} row {r}" for r in rows[~np.isfinite(flat).all(axis=1)]]
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.reader.close()
        sys.setswitchinterval(self._switch)
