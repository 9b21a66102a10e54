"""What encode-latents and encode-features share: open the source and the cache, create the array once,
then run a model over every shard this rank owns and is not done, writing whole shards.

Batches never cross a shard boundary, so a shard's bytes do not depend on how many ranks ran or on which
shards were already done: a resumed or multi-process run writes the same cache as one uninterrupted run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from repa_pipe.cache import layout, writer
from repa_pipe.cache.sources import ImageSource, PreprocessedBatch, PreprocessedImages, collate_preprocessed, open_source
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.errors import BadInputError, ConfigError, RepaError
from repa_pipe.pipeline.progress import Tracker, log

DEFAULT_RESOLUTION = 256
DTYPES = {"float32": np.float32, "float16": np.float16}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (uint8 images (B, 3, H, W) on the device) -> float rows (B, *row_shape)
ModelFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EncodeJob:
    """One array to fill: the stage supplies the entry (from the model and the manifest) and the model fn."""

    cache: Path
    source: ImageSource
    resolution: int
    shard_size: int | None
    batch_size: int
    workers: int
    skip_bad: bool
    desc: str


def check_choice(value: str, choices, option: str) -> None:
    if value not in choices:
        raise ConfigError(f"{option} must be one of {', '.join(choices)}; got {value!r}")


def prepare_source(spec: str) -> ImageSource:
    source = open_source(spec)
    for w in getattr(source, "warnings", []):
        log(f"[yellow]warning:[/] {w}")
    return source


def existing_manifest(cache: Path) -> dict[str, Any] | None:
    """The cache's manifest if CACHE is already a cache, None if it does not exist yet (or is empty)."""
    cache = Path(cache)
    if layout.is_cache(cache):
        return layout.load_manifest(cache)
    return None


def resolve_resolution(cache: Path, asked: int | None) -> int:
    m = existing_manifest(cache)
    if asked is None:
        return m["preprocessing"]["resolution"] if m else DEFAULT_RESOLUTION
    return asked


def _on_rank0(fn: Callable[[], Any]) -> Any:
    """Run fn on rank 0 and hand its result (or its error) to every rank, so no rank waits forever."""
    result, err = None, None
    if dist.is_main():
        try:
            result = fn()
        except RepaError as e:
            err = e
    err = dist.broadcast_object(err)
    if err is not None:
        raise err
    dist.barrier()
    return result


def setup_array(job: EncodeJob, make_entry: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]) -> tuple[str, dict]:
    """Rank 0 creates (or checks) the cache and the array; every rank returns (array name, manifest)."""
    src = job.source
    dataset = src.describe()

    def create() -> str:
        m = writer.open_or_create(job.cache, dataset, list(src.keys), np.asarray(src.labels), job.resolution,
                                  job.shard_size)
        name, entry = make_entry(m)
        writer.ensure_array(job.cache, m, name, entry)
        writer.clean_partials(job.cache)
        return name

    name = dist.broadcast_object(_on_rank0(create))
    return name, layout.load_manifest(job.cache)


def _shard_batches(ranges: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    return [list(range(s, min(s + batch_size, e))) for s, e in ranges for s in range(s, e, batch_size)]


def encode_shards(job: EncodeJob, name: str, manifest: dict[str, Any], model_fn: ModelFn) -> None:
    """Fill every pending shard this rank owns; then rank 0 finalizes. Errors on any rank stop all ranks,
    after every rank has kept the shards it finished."""
    w = writer.ShardWriter(job.cache, manifest, name)
    todo = set(w.pending(range(w.num_shards)))  # reads every done marker once
    mine = [k for k in layout.owned_shards(w.num_shards, dist.get_rank(), dist.get_world_size()) if k in todo]
    n_total = w.num_shards
    log(f"{job.desc}: {n_total - len(todo)}/{n_total} shards already done; "
        f"{dist.get_world_size()} process(es)")
    err: RepaError | None = None
    try:
        _encode_owned(job, w, mine, model_fn)
    except RepaError as e:
        err = e
    errors = [e for e in dist.all_gather_object(err) if e is not None]
    if errors:
        raise errors[0]
    if dist.is_main():
        m = writer.finalize(job.cache, name)
        entry = m["arrays"][name]
        bad = len(entry["bad"])
        log(f"{job.desc}: {name} {entry['status']} ({entry['shards_done']}/{m['num_shards']} shards"
            + (f", {bad} bad image(s) recorded" if bad else "") + ")")
    dist.barrier()


def _encode_owned(job: EncodeJob, w: writer.ShardWriter, shards: list[int], model_fn: ModelFn) -> None:
    ranges = [layout.shard_range(k, w.n, w.shard_size) for k in shards]
    if not ranges:
        return
    # Identity index map: the batch sampler yields source indices directly.
    dataset = PreprocessedImages(job.source, np.arange(w.n), job.resolution, job.skip_bad)
    loader = DataLoader(dataset, batch_sampler=_shard_batches(ranges, job.batch_size), num_workers=job.workers,
                        collate_fn=collate_preprocessed, pin_memory=torch.cuda.is_available(),
                        persistent_workers=False, prefetch_factor=4 if job.workers else None)
    row_shape = tuple(w.entry["shape"][1:])
    it = iter(loader)
    with Tracker(job.desc, sum(e - s for s, e in ranges)) as bar:
        for k, (start, stop) in zip(shards, ranges):
            buf = np.full((stop - start,) + row_shape, np.nan, dtype=w.entry["dtype"])
            bad: list[dict] = []
            for s in range(start, stop, job.batch_size):
                batch = next(it)
                _encode_batch(job, batch, start, buf, bad, model_fn)
                bar.update(len(batch.indices))
            w.write(k, buf, bad)


def _encode_batch(job: EncodeJob, batch: PreprocessedBatch, shard_start: int, buf: np.ndarray,
                  bad: list[dict], model_fn: ModelFn) -> None:
    for index, ok, reason in zip(batch.indices, batch.valid, batch.reasons):
        if ok:
            continue
        where = job.source.where(int(index))
        if not job.skip_bad:
            raise BadInputError(f"{where}: {reason} (sample {index}; pass --skip-bad to record it and go on; "
                                "finished shards are kept)")
        bad.append({"index": int(index), "key": job.source.keys[index], "path": where, "reason": reason})
    if not batch.valid.any():
        return
    x = torch.from_numpy(batch.images[batch.valid]).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    with torch.inference_mode():
        out = model_fn(x.to(dist.device(), non_blocking=True))
    buf[batch.indices[batch.valid] - shard_start] = out.float().cpu().numpy()


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """Compute-precision context for the encoder forward (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dev = dist.device().type
    return torch.autocast(device_type=dev, dtype=PRECISIONS[precision])


def run_job(job: EncodeJob, make_entry: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]],
            forward: Callable[[torch.Tensor], torch.Tensor], precision: str) -> None:
    """Create (or check) the array, then encode every pending shard with `forward` under `precision`."""
    name, manifest = setup_array(job, make_entry)
    amp = autocast(precision)

    def model_fn(x: torch.Tensor) -> torch.Tensor:
        with amp:
            return forward(x)

    encode_shards(job, name, manifest, model_fn)
