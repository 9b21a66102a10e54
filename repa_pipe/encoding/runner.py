"""What encode-latents and encode-features share: check everything, then (rank 0, holding the array's lock)
create the cache and the array once, then run a model over every shard this rank owns and is not done,
writing whole shards.

Batches never cross a shard boundary, so a shard's bytes do not depend on how many ranks ran or on which
shards were already done: a resumed or multi-process run writes the same cache as one uninterrupted run.
SIGINT/SIGTERM stop at the next batch boundary; every finished shard is kept.

One job may fill several arrays from one model pass (encode-features --with-cls: patch tokens and the class
token): they share shards, and a shard is encoded again unless every one of its arrays has it done.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from rich.markup import escape
from torch.utils.data import DataLoader

from repa_pipe.cache import writer
from repa_pipe.cache.lock import ArrayLock
from repa_pipe.cache.manifest import ArraySpec, BadRow, Manifest, is_cache, read_manifest
from repa_pipe.cache.sources import (ImageSource, PreprocessedBatch, PreprocessedImages, collate_preprocessed,
                                     open_source)
from repa_pipe.encoding.config import DEFAULT_RESOLUTION, EncodeFeaturesConfig, EncodeLatentsConfig
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.errors import BadInputError, RepaError
from repa_pipe.pipeline.precision import compute
from repa_pipe.pipeline.progress import Tracker, log
from repa_pipe.pipeline.signals import StopOnSignal, Stopped, loader_worker_init

# (uint8 images (B, 3, H, W) on the device) -> float rows (B, *row_shape), or a tuple of them, one per array
ModelFn = Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]


@dataclass
class EncodeJob:
    """One array to fill from one source."""

    cache: Path
    source: ImageSource
    resolution: int
    shard_size: Optional[int]      # None: the cache's, or the default for a new cache
    batch_size: int
    workers: int
    skip_bad: bool
    max_pixels: Optional[int]
    desc: str


@dataclass(frozen=True)
class Encoded:
    """Where an encode command left its (first) array once every rank is done."""

    desc: str
    name: str
    status: str                    # complete | in_progress
    shards_done: int
    num_shards: int
    bad: int                       # samples recorded as bad (--skip-bad)

    def summary(self) -> str:
        return (f"{self.desc}: {self.name} {self.status} ({self.shards_done}/{self.num_shards} shards"
                + (f", {self.bad} bad sample(s) recorded" if self.bad else "") + ")")


def open_checked_source(cfg: EncodeLatentsConfig | EncodeFeaturesConfig) -> ImageSource:
    """The source of an encode command, listed, with its warnings printed once. A source with damaged tar shards or
    parquet files is refused (before anything is written) unless --skip-bad."""
    opts = cfg.source_options()

    def fill_spool() -> None:
        open_source(cfg.source, cfg.num_classes, opts)

    if cfg.source.startswith("pipe:") and opts.spool is not None:
        dist.run_on_rank0(fill_spool)  # rank 0 copies the shards into the shared spool; the others then reuse them
    source = open_source(cfg.source, cfg.num_classes, opts)
    damaged = source.damaged
    if damaged and not cfg.skip_bad:
        path, reason = next(iter(damaged.items()))
        noun = source.shard_noun
        more = f" (and {len(damaged) - 1} more damaged {noun}(s))" if len(damaged) > 1 else ""
        raise BadInputError(f"{path}: damaged {noun} ({reason}){more}; pass --skip-bad to encode the samples "
                            "readable before the damage and record the lost ones as bad samples")
    for w in source.warnings:
        log(f"[yellow]warning:[/] {escape(w)}")
    return source


def job_from(cfg: EncodeLatentsConfig | EncodeFeaturesConfig, source: ImageSource, resolution: int,
             desc: str) -> EncodeJob:
    return EncodeJob(Path(cfg.cache), source, resolution, cfg.shard_size, cfg.batch_size, cfg.workers,
                     cfg.skip_bad, int(cfg.max_megapixels * 1e6), desc)


def existing_manifest(cache: Path) -> Optional[Manifest]:
    """The cache's manifest if CACHE is already a cache, None if it is new (or an empty folder)."""
    return read_manifest(cache) if is_cache(cache) else None


def resolve_resolution(cache: Path, asked: Optional[int]) -> int:
    if asked is not None:
        return asked
    m = existing_manifest(cache)
    return m.resolution if m else DEFAULT_RESOLUTION


def resume_precision(cache: Path, spec: ArraySpec, asked: str) -> ArraySpec:
    """With --precision auto, an array already begun keeps the precision it was begun in (say fp32, made before
    `auto` existed or on another device), so resuming it never mixes precisions nor is refused for it."""
    m = existing_manifest(cache)
    have = m.arrays.get(spec.name) if m is not None and asked == "auto" else None
    return dataclasses.replace(spec, precision=have.spec.precision) if have is not None else spec


def precheck(job: EncodeJob, specs: Sequence[ArraySpec]) -> None:
    """Every check that can refuse the job, before anything is written: the folder, the cache's images,
    resolution and shard size, and an existing array's spec."""
    writer.check_target(job.cache)
    m = existing_manifest(job.cache)
    if m is not None:
        writer.check_same(m, job.source.dataset(), job.resolution, job.shard_size, job.cache)
        for spec in specs:
            writer.check_spec(m, spec, job.cache)


def run_job(job: EncodeJob, spec: ArraySpec, forward: ModelFn, precision: str,
            extra: Sequence[ArraySpec] = ()) -> Optional[Encoded]:
    """Create (or check) the array, then encode every pending shard with `forward` under `precision`.
    `extra`: more arrays filled by the same pass; `forward` then returns one tensor per array, `spec`'s first.
    Returns where `spec`'s array ended, on rank 0 (None on the other ranks)."""
    specs = [spec, *extra]
    precheck(job, specs)
    locks = [ArrayLock(job.cache, s.name) for s in specs]

    def create() -> None:
        for lock in locks:
            lock.acquire()  # refuses a second job writing this array, naming the holder
        src = job.source
        writer.open_or_create(job.cache, src.dataset(), list(src.keys), np.asarray(src.labels), job.resolution,
                              job.shard_size)
        for s in specs:
            writer.ensure_array(job.cache, s)
            if writer.clean_array_debris(job.cache, s.name):
                log(f"{job.desc}: removed temp files of an interrupted run of {s.name}")

    device = dist.device()

    def model_fn(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with compute(precision, device):  # autocast / TF32 for the forward only, the caller's flags after it
            out = forward(x)
        return out if isinstance(out, tuple) else (out,)

    try:
        dist.run_on_rank0(create)
        return encode_shards(job, [s.name for s in specs], read_manifest(job.cache), model_fn)
    finally:
        for lock in locks:
            lock.release()


def _shard_batches(ranges: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    return [list(range(s, min(s + batch_size, e))) for s, e in ranges for s in range(s, e, batch_size)]


def owned_shards(n_shards: int, rank: int, world_size: int) -> list[int]:
    """Whole-shard ownership: rank r writes shards k = r mod world_size, never a row of any other."""
    return list(range(rank, n_shards, world_size))


def encode_shards(job: EncodeJob, names: Sequence[str], manifest: Manifest, model_fn: ModelFn) -> Optional[Encoded]:
    """Fill every pending shard this rank owns in arrays `names` (one model pass fills them all); then rank 0
    finalizes and returns where the first array ended (None on the other ranks). Errors on any rank stop all
    ranks, after every rank has kept the shards it finished."""
    ws = [writer.ShardWriter(job.cache, manifest, n) for n in names]
    w, name = ws[0], names[0]
    todo = set().union(*(set(x.pending(range(w.num_shards))) for x in ws))  # lists each done folder once
    mine = [k for k in owned_shards(w.num_shards, dist.get_rank(), dist.get_world_size()) if k in todo]
    log(f"{job.desc}: {w.num_shards - len(todo)}/{w.num_shards} shards already done; "
        f"{dist.get_world_size()} process(es)")
    err: Optional[RepaError] = None
    with StopOnSignal() as stop:
        try:
            _encode_owned(job, ws, mine, model_fn, stop)
        except RepaError as e:
            err = e
    errors = [e for e in dist.all_gather_object(err) if e is not None]
    final = None
    if dist.is_main() and (not errors or all(isinstance(e, Stopped) for e in errors)):
        for extra in names[1:]:
            writer.finalize(job.cache, extra)
        final = writer.finalize(job.cache, name).array(name)
    if errors:
        first = errors[0]
        if isinstance(first, Stopped) and final is not None:
            raise Stopped(f"on {first}, {final.shards_done}/{w.num_shards} shards of {name} are done and "
                          "kept; run the same command to resume", first.signum)
        raise first
    dist.barrier()
    if final is None:
        return None
    return Encoded(job.desc, name, final.status, final.shards_done, w.num_shards, len(final.bad))


def _encode_owned(job: EncodeJob, ws: list[writer.ShardWriter], shards: list[int], model_fn: ModelFn,
                  stop: StopOnSignal) -> None:
    w = ws[0]
    ranges = [w.manifest.shard_range(k) for k in shards]
    if not ranges:
        return
    # Identity index map: the batch sampler yields source indices directly.
    dataset = PreprocessedImages(job.source, np.arange(w.manifest.n), job.resolution, job.max_pixels)
    # No DataLoader pin_memory: the batch is numpy, which it does not pin; _encode_batch pins the tensor itself.
    loader = DataLoader(dataset, batch_sampler=_shard_batches(ranges, job.batch_size), num_workers=job.workers,
                        collate_fn=collate_preprocessed,
                        persistent_workers=False, prefetch_factor=4 if job.workers else None,
                        worker_init_fn=loader_worker_init if job.workers else None)
    it = iter(loader)
    try:
        with Tracker(job.desc, sum(e - s for s, e in ranges)) as bar:
            for k, (start, stop_row) in zip(shards, ranges):
                bufs = [x.empty_rows(stop_row - start) for x in ws]  # stored form; unfilled rows read as NaN
                bad: list[BadRow] = []
                for _ in range(start, stop_row, job.batch_size):
                    if stop.requested:
                        raise Stopped(stop.name, stop.signum)
                    batch = next(it)
                    _encode_batch(job, batch, start, bufs, bad, model_fn, ws)
                    bar.update(len(batch.indices))
                for x, buf in zip(ws, bufs):
                    x.write(k, buf, bad)
    finally:
        # Shut the loader's workers down now: on an error or a stop the exception's traceback would keep this frame,
        # and so the iterator, alive until exit, where its workers (which ignore SIGTERM) would block the exit.
        del it


def _encode_batch(job: EncodeJob, batch: PreprocessedBatch, shard_start: int, bufs: list[np.ndarray],
                  bad: list[BadRow], model_fn: ModelFn, ws: list[writer.ShardWriter]) -> None:
    for index, ok, reason in zip(batch.indices, batch.valid, batch.reasons):
        if ok:
            continue
        where = job.source.where(int(index))
        if not job.skip_bad:
            raise BadInputError(f"{where}: {reason} (sample {index}; pass --skip-bad to record it and go on; "
                                "finished shards are kept)")
        bad.append(BadRow(index=int(index), key=job.source.keys[index], path=where, reason=reason))
    if not batch.valid.any():
        return
    # (B, 3, H, W) uint8 with NHWC strides (channels_last): the layout cuDNN's fastest convolutions read
    x = torch.from_numpy(batch.images[batch.valid]).permute(0, 3, 1, 2)
    rows = batch.indices[batch.valid] - shard_start
    device = dist.device()
    on_gpu = device.type == "cuda"
    if on_gpu:  # page-locked, so the copy to the GPU is asynchronous (a pageable copy makes the host wait)
        x = x.pin_memory()
    stored, finite = [], []
    with torch.inference_mode():
        outs = model_fn(x.to(device, non_blocking=on_gpu))
        for w, out in zip(ws, outs):
            spec = w.spec
            out = out.reshape(len(rows), *spec.row_shape)
            # Finite in the dtype served to training (int8 rows are read back as float16), on the device: no host
            # pass over the values.
            ok = torch.isfinite(out.to(getattr(torch, spec.read_dtype)).flatten(1)).all(dim=1)
            # Stored from the float32 model output: float16 rounds once, int8 quantizes the float32 values.
            out = out.to(torch.float32 if spec.quantized else getattr(torch, spec.dtype))
            stored.append(out.to("cpu", non_blocking=on_gpu))
            finite.append(ok.to("cpu", non_blocking=on_gpu))
        if on_gpu:  # one wait for the GPU per batch: every result comes back on the stream, then one synchronize
            torch.cuda.current_stream(device).synchronize()
    for w, buf, out, ok in zip(ws, bufs, stored, finite):
        spec = w.spec
        ok = ok.numpy()
        if not ok.all():
            first = int(batch.indices[batch.valid][~ok][0])
            raise BadInputError(f"{job.source.where(first)}: {spec.model.name} gave NaN or Inf for this image (in "
                                f"{spec.read_dtype}); try --precision fp32, or "
                                f"{'--dtype' if spec.kind == 'latents' else '--feature-dtype'} float32 for values "
                                "beyond float16")
        buf[rows] = w.store_rows(out.float().numpy())
