"""`repa-pipe train`: SiT + REPA from the cache alone (no encoder, no VAE encoder), exactly resumable.

Everything random in a step is drawn per sample from (seed, step) (training/stream.py), so the state of a run is
just model, EMA, optimizer (+ grad scaler) and the step: resuming repeats the draws of an uninterrupted run.
Running the same command again resumes from the newest checkpoint in RUN/checkpoints; options that are safe to
change (learning rate, EMA decay, precision, ...) may change on resume, and each change is recorded in the
run's history (RUN/config.json).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from repa_pipe.cache.manifest import TrainingView, read_manifest, training_view, utc_now
from repa_pipe.cache.reader import check_labels, check_ready
from repa_pipe.models.sit import flops_per_sample
from repa_pipe.pipeline import checkpoint, dist, runs
from repa_pipe.pipeline.config import flag, to_dict
from repa_pipe.pipeline.errors import CacheMismatchError, ConfigError
from repa_pipe.pipeline.progress import log
from repa_pipe.sampling.decode import choose_decoder, make_decoder
from repa_pipe.training import state as st
from repa_pipe.training.config import TrainConfig, micro_batches, resume_changes
from repa_pipe.training.loop import loop
from repa_pipe.training.step import setup_device, wrap
from repa_pipe.training.stream import BatchStream
from repa_pipe.training.watch import Watcher


def check_options(cfg: TrainConfig) -> None:
    """Checks that need more than the option values themselves (installed packages)."""
    if cfg.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or pip install 'repa-pipe[tensorboard]')") from None


def cache_view(cfg: TrainConfig) -> TrainingView:
    """The cache's training view, with every array it names checked on disk."""
    cache = Path(cfg.cache)
    m = read_manifest(cache)
    try:
        view = training_view(m, check_labels(cache, m), cfg.latents, cfg.encoder)
    except CacheMismatchError as e:
        raise CacheMismatchError(f"{cache}: {e}") from None
    check_ready(cache, m, [view.latents, *view.features])
    if view.valid < cfg.global_batch_size:
        raise CacheMismatchError(f"{cache}: {view.valid} usable rows (of {view.n}) are fewer than one "
                                 f"--global-batch-size {cfg.global_batch_size}")
    return view


def resume_plan(cfg: TrainConfig, view: TrainingView) -> tuple[Optional[dict[str, Any]], dict[str, list[Any]]]:
    """(newest checkpoint or None, {option: [before, now]}) — refusing any change a resume cannot take."""
    path = checkpoint.latest(cfg.run_dir)
    if path is None:
        return None, {}
    ck = st.read_checkpoint(path)
    try:
        changes = resume_changes(ck["config"], to_dict(cfg))
    except ConfigError as e:
        raise ConfigError(f"{cfg.run_dir}: {e}") from None
    st.check_view(ck, view, path)
    ck["path"] = path
    return ck, changes


def write_record(cfg: TrainConfig, view: TrainingView, step: int, changes: dict[str, list[Any]]) -> None:
    """Rank 0: RUN/config.json for a new run; for a resume, the changed options appended to its history."""
    run_dir = Path(cfg.run_dir)
    # A run with no checkpoint has trained nothing that persists: it starts from a fresh record.
    record = runs.read_record(run_dir) if checkpoint.latest(run_dir) is not None else None
    if record is None:
        record = runs.new_record(run_dir, to_dict(cfg), Path(cfg.cache), view.to_json(), utc_now())
    absolute, relative = runs.cache_paths(run_dir, Path(cfg.cache))
    if absolute != record.cache_path:
        changes = {**changes, "cache": [record.cache_path, absolute]}
        record.cache_path, record.cache_relative = absolute, relative
    if changes:
        record.history.append({"step": step, "utc": utc_now(), "changed": changes})
    if changes or not (run_dir / runs.RECORD).is_file():
        runs.write_record(run_dir, record)


def run(cfg: TrainConfig) -> None:
    check_options(cfg)
    # Every check that can refuse the run comes first, before the process group and before anything is written:
    # a bad split, cache or resume fails on every rank at once.
    world = dist.env_info().world_size
    micro, accum = micro_batches(cfg, world)
    view = cache_view(cfg)
    cfg = dataclasses.replace(cfg, latents=view.latents.removeprefix("latents/"), encoder_depth=cfg.align_depth)
    ck, changes = resume_plan(cfg, view)
    info = dist.init()
    device = setup_device(cfg)
    state = st.new_state(cfg, view, device)
    if ck is not None:
        st.load_into(state, ck, cfg)
        what = ", ".join(f"{flag(k)} {a!r} -> {b!r}" for k, (a, b) in changes.items())
        log(f"resumed from {ck['path']} at step {state.step}" + (f" with changed options: {what}" if what else ""))
    if state.step >= cfg.steps:
        log(f"{cfg.run_dir}: already trained to step {state.step} (--steps {cfg.steps}); nothing to do")
        dist.shutdown()
        return
    if dist.is_main():
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        if checkpoint.clean_temp(cfg.run_dir):
            log("removed temp files of an interrupted checkpoint save")
        write_record(cfg, view, state.step, changes)
    dist.barrier()
    rt = wrap(cfg, state.model, micro, device)
    log(f"train {cfg.model}: {sum(p.numel() for p in state.model.parameters()):,} parameters, "
        f"{info.world_size} process(es), global batch {cfg.global_batch_size} = {info.world_size} x {accum} x {micro}")
    stream = BatchStream(Path(cfg.cache), view, cfg.global_batch_size, cfg.seed, info.rank, info.world_size,
                         cfg.label_dropout, state.step, cfg.steps, threads=cfg.loader_threads)
    name, weights = choose_decoder(view.codec, None, None, pair=False)  # previews: the cache's own codec
    watch = Watcher(cfg, view, state, flops_per_sample(state.model) * 3 * cfg.global_batch_size,
                    lambda: make_decoder(name, weights, device))
    try:
        with watch:
            loop(cfg, view, state, rt, stream, watch)
    finally:
        stream.close()
    log(f"done: step {state.step}, checkpoint {checkpoint.ckpt_path(cfg.run_dir, state.step)}")
    dist.shutdown()  # only after a clean finish: after an error another rank may still be inside a collective
