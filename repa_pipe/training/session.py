"""A whole `train` command: plan (training/setup.py), lock the run folder, build or restore the state, run the
loop (training/loop.py), and say where it ended.

Everything random in a step is drawn per sample from (seed, step) (training/stream.py), so the state of a run is
just model, EMA, optimizer (+ grad scaler) and the step: resuming repeats the draws of an uninterrupted run.
Running the same command again resumes from the newest checkpoint in RUN/checkpoints; options that are safe to
change (learning rate, EMA decay, precision, ...) may change on resume, and each change is recorded in the
run's history (RUN/config.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from repa_pipe.cache.lock import HolderLock
from repa_pipe.models.sit import flops_per_sample
from repa_pipe.pipeline import checkpoint as files
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.errors import RunBusyError
from repa_pipe.pipeline.progress import log
from repa_pipe.run.record import LOCK
from repa_pipe.training import state as st
from repa_pipe.training.config import TrainConfig
from repa_pipe.training.loop import loop
from repa_pipe.training.setup import Plan, describe_changes, plan, write_run_record
from repa_pipe.training.step import setup_device, wrap
from repa_pipe.training.stream import BatchStream
from repa_pipe.training.watch import MakeDecoder, Watcher


@dataclass(frozen=True)
class Trained:
    run_dir: Path
    step: int
    checkpoint: Optional[Path]      # None: nothing to do (already trained to --steps)
    steps: int

    def summary(self) -> str:
        if self.checkpoint is None:
            return f"{self.run_dir}: already trained to step {self.step} (--steps {self.steps}); nothing to do"
        return f"done: step {self.step}, checkpoint {self.checkpoint}"


def run_lock(run_dir: Path) -> HolderLock:
    """RUN/.train.lock: one `train` at a time writes a run folder (a second one is refused, naming the first)."""
    return HolderLock(Path(run_dir) / LOCK, lambda holder: RunBusyError(
        f"{run_dir}: another train is writing this run ({holder}); wait for it to finish, or stop it and run this "
        "command again to resume"))


def train(cfg: TrainConfig, make_decoder: MakeDecoder) -> Trained:
    """Train (or resume) the run `cfg` describes. `make_decoder(view, device)` builds the decoder of the EMA
    previews (called on first use; sampling/ knows the decoders, training does not)."""
    # Every check that can refuse the run comes first, before the process group and before anything is written.
    p = plan(cfg, dist.env_info().world_size)
    info = dist.init()
    lock = run_lock(cfg.run_dir)
    try:
        return _train(p, info.world_size, make_decoder, lock)
    finally:
        lock.release()


def _hold(lock: HolderLock, p: Plan) -> None:
    """Rank 0 takes the run's lock; the newest checkpoint must still be the one planned from (another train may
    have written one since)."""
    lock.acquire()
    newest = files.latest(p.cfg.run_dir)
    if newest != (p.resume.source if p.resume is not None else None):
        raise RunBusyError(f"{p.cfg.run_dir}: another train wrote {newest} while this one started; run the same "
                           "command again to resume from it")


def _train(p: Plan, world_size: int, make_decoder: MakeDecoder, lock: HolderLock) -> Trained:
    cfg = p.cfg
    device = setup_device(cfg)
    state = st.new_state(cfg, p.view, device, p.encoder_depth)
    if p.resume is not None:
        st.load_into(state, p.resume, cfg)
        what = describe_changes(p.changes)
        log(f"resumed from {p.resume.source} at step {state.step}" + (f" with changed options: {what}" if what else ""))
    if state.step >= cfg.steps:
        dist.shutdown()
        return Trained(Path(cfg.run_dir), state.step, None, cfg.steps)
    dist.run_on_rank0(lambda: _hold(lock, p))  # its error, if any, stops every rank
    if dist.is_main():
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        if files.clean_temp(cfg.run_dir):
            log("removed temp files of an interrupted checkpoint save")
        write_run_record(p, state.step)
    dist.barrier()
    rt = wrap(cfg, state.model, p.micro, device)
    log(f"train {cfg.model}: {sum(q.numel() for q in state.model.parameters()):,} parameters, "
        f"{world_size} process(es), global batch {cfg.global_batch_size} = {world_size} x {p.accum} x {p.micro}")
    stream = BatchStream(Path(cfg.cache), p.view, cfg.global_batch_size, cfg.seed, dist.get_rank(), world_size,
                         cfg.label_dropout, state.step, cfg.steps, threads=cfg.loader_threads)
    watch = Watcher(cfg, p.view, state, flops_per_sample(state.model) * 3 * cfg.global_batch_size,
                    lambda: make_decoder(p.view, device))
    try:
        with watch:
            loop(p, state, rt, stream, watch)
    finally:
        stream.close()
    dist.shutdown()  # only after a clean finish: after an error another rank may still be inside a collective
    return Trained(Path(cfg.run_dir), state.step, files.ckpt_path(cfg.run_dir, state.step), cfg.steps)
