"""The training loop, in a fixed order (as EDM2 keeps one): get batch -> forward/backward per micro-batch ->
unscale, clip, AdamW -> EMA -> at a boundary: non-finite check, log, preview, checkpoint -> stop if asked.

A SIGINT/SIGTERM (Ctrl-C, a cluster's preemption notice) on any rank makes every rank stop at the same step
boundary, after a checkpoint of that step: the resumed run ends bitwise equal to an uninterrupted one.
"""
from __future__ import annotations

import signal
from pathlib import Path

from repa_pipe.pipeline import checkpoint as files
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.errors import CheckpointError
from repa_pipe.pipeline.signals import StopOnSignal, Stopped
from repa_pipe.run.checkpoint import save
from repa_pipe.training.config import TrainConfig
from repa_pipe.training.guard import NonFiniteGuard
from repa_pipe.training.setup import Plan
from repa_pipe.training.state import State
from repa_pipe.training.step import Runtime, forward_backward, optimizer_step
from repa_pipe.training.stream import BatchStream
from repa_pipe.training.watch import Watcher


def due(cfg: TrainConfig, step: int) -> set[str]:
    """What happens after `step`: log (every --log-every and at the end), sample, ckpt (every --ckpt-every and at
    the end)."""
    end = step == cfg.steps
    events = set()
    if step % cfg.log_every == 0 or end:
        events.add("log")
    if cfg.sample_every and step % cfg.sample_every == 0:
        events.add("sample")
    if step % cfg.ckpt_every == 0 or end:
        events.add("ckpt")
    return events


def save_checkpoint(p: Plan, state: State) -> Path:
    cfg = p.cfg
    path = files.ckpt_path(cfg.run_dir, state.step)
    err = None
    if dist.is_main():
        try:
            ck = state.checkpoint(p.typed, p.resolved, p.view, p.identity, path)
            save(path, ck, cfg.seed)  # atomic: temp file, fsync, rename
            files.prune(cfg.run_dir, cfg.keep_ckpts)
        except CheckpointError as e:
            err = e
    err = dist.broadcast_object(err)  # every rank stops together when rank 0 cannot save
    if err is not None:
        raise err
    return path


def loop(p: Plan, state: State, rt: Runtime, stream: BatchStream, watch: Watcher) -> None:
    cfg, view = p.cfg, p.view
    state.model.train()
    guard = NonFiniteGuard(rt.device, check_grad=not state.scaler.is_enabled(), bad_rows=stream.nonfinite_rows)
    last_good = files.latest(cfg.run_dir)
    with StopOnSignal() as stop:
        while state.step < cfg.steps:
            batch = next(stream)
            sums = forward_backward(cfg, view, state, rt, batch)
            grad_norm = optimizer_step(cfg, state)
            state.step += 1
            guard.update(state.step, sums["loss"], grad_norm)
            watch.step(sums, grad_norm)
            stopping = dist.any_rank(stop.requested)
            events = due(cfg, state.step) | ({"log", "ckpt"} if stopping else set())
            if not events:
                continue
            guard.check(last_good, Path(cfg.cache))
            if "log" in events:
                watch.log(state.step, stream.wait_s)
            if "sample" in events:
                watch.preview(state.step)
            if "ckpt" in events:
                last_good = save_checkpoint(p, state)
            if stopping:
                raise Stopped(f"saved step {state.step} to {last_good}; run the same command to resume",
                              stop.signum or signal.SIGTERM)
