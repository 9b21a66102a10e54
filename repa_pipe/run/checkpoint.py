"""The checkpoint, typed, and the one loader of SiT weights: train's resume, sample-eval, analyze and export all
read files through `load` / `load_from`.

Three kinds of file hold SiT weights:
- our training checkpoint (RUN/checkpoints/NNNNNNN.pt): a dict of tensors and plain values, format tag
  "repa-pipe-train/N" (layout below);
- our exported safetensors (`repa-pipe export`): the EMA weights, with the config and the cache's view in its
  metadata (format "repa-pipe-ema/1");
- the reference implementation's published `last.pt` (github.com/sihyun-yu/REPA, train.py): a dict with `model`,
  `ema`, `opt`, `args` (an argparse.Namespace) and `steps`, or a bare EMA state dict.

```
repa-pipe-train/2  {"format", "model", "ema", "opt", "scaler", "rng": {"torch"[, "cuda"]}, "step",
                    "sampler": {"seed", "step"}, "config": options as typed, "resolved": {option: {"value", "why"}},
                    "cache_spec": the cache's training view, "cache_identity": {"file_list_sha256", "labels_sha256"}}
repa-pipe-train/1  the same without "resolved" and "cache_identity"; "config" holds the derived values (0.2)
```
A format tag this release does not know (a newer repa-pipe's) is refused, naming it.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from repa_pipe.cache.manifest import TrainingView
from repa_pipe.pipeline import checkpoint as files
from repa_pipe.pipeline.errors import CheckpointError, ConfigError
from repa_pipe.run.facts import TrainFacts, check_resolved, typed_config
from repa_pipe.run.record import CacheIdentity

TRAIN_FORMAT = "repa-pipe-train/2"
TRAIN_READS = ("repa-pipe-train/1", TRAIN_FORMAT)
TRAIN_PREFIX = "repa-pipe-train/"
EXPORT_FORMAT = "repa-pipe-ema/1"

StateDict = dict[str, torch.Tensor]


@dataclass
class TrainingState:
    """What only our training checkpoints hold beside the EMA: enough to go on training."""

    model: StateDict
    opt: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]


@dataclass
class Checkpoint:
    """SiT weights and what is known about how they were trained, whatever file they came from."""

    source: Path                           # the file
    kind: str                              # "checkpoint" | "safetensors" | "reference"
    ema: StateDict
    step: Optional[int]
    config: dict[str, Any]                 # training options as typed ({} for the reference's files)
    resolved: dict[str, dict[str, Any]]    # what training derived from them
    view: Optional[TrainingView]           # the cache's training view, when recorded
    cache_identity: Optional[CacheIdentity]
    training: Optional[TrainingState]      # our training checkpoints only
    format: Optional[str] = None

    @property
    def facts(self) -> TrainFacts:
        return TrainFacts.of(self.config, self.resolved)

    def to_file(self, seed: int) -> dict[str, Any]:
        """The dict `torch.save` writes (tensors and plain values only: it loads with weights_only=True)."""
        if self.training is None:
            raise ValueError("only a training checkpoint is saved")
        t = self.training
        return {"format": TRAIN_FORMAT, "model": t.model, "ema": self.ema, "opt": t.opt, "scaler": t.scaler,
                "step": self.step, "rng": t.rng, "sampler": {"seed": seed, "step": self.step},
                "config": self.config, "resolved": self.resolved,
                "cache_spec": self.view.to_json() if self.view else None,
                "cache_identity": self.cache_identity.to_json() if self.cache_identity else None}

    def require_training(self, what: str) -> TrainingState:
        """The training state, or one line saying this file cannot be resumed from."""
        if self.training is None:
            raise CheckpointError(f"{self.source}: a {self.kind} file holds EMA weights only, not a repa-pipe "
                                  f"training checkpoint; {what}")
        return self.training


def save(path: Path, ck: Checkpoint, seed: int) -> None:
    files.save(path, ck.to_file(seed))


# ------------------------------------------------------------------------------------------------ reading
def _load_pt(path: Path) -> Any:
    """torch.load(weights_only=True, mmap), also for the reference's training checkpoints: they pickle `args`, an
    argparse.Namespace (a plain attribute bag), which the weights-only unpickler refuses unless allowlisted."""
    safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; 2.4 has only add_safe_globals
    if safe is None:
        torch.serialization.add_safe_globals([argparse.Namespace])
        return files.load(path)
    with safe([argparse.Namespace]):
        return files.load(path)


def _train_checkpoint(d: dict[str, Any], path: Path) -> Checkpoint:
    fmt = d["format"]
    if fmt not in TRAIN_READS:
        raise CheckpointError(f"{path}: checkpoint format {fmt} is not one this repa-pipe reads "
                              f"({', '.join(TRAIN_READS)}); a newer repa-pipe wrote it: upgrade repa-pipe to use it")
    for key, kind in (("model", dict), ("ema", dict), ("opt", dict), ("scaler", dict), ("rng", dict),
                      ("config", dict)):
        if not isinstance(d.get(key), kind):
            raise CheckpointError(f"{path}: damaged {fmt} checkpoint: its {key!r} entry is "
                                  f"{'missing' if key not in d else type(d[key]).__name__}")
    for key in ("model", "ema"):
        if not d[key] or not all(isinstance(v, torch.Tensor) for v in d[key].values()):
            raise CheckpointError(f"{path}: damaged {fmt} checkpoint: its {key!r} entry is "
                                  f"{'empty' if not d[key] else 'not a dict of tensors'}")
    step = d.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: damaged {fmt} checkpoint: 'step' is {step!r}, not a step number")
    try:
        view = TrainingView.from_json(d["cache_spec"]) if d.get("cache_spec") else None
        identity = CacheIdentity.from_json(d.get("cache_identity"))
        resolved = check_resolved(d.get("resolved", {}), "checkpoint")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged {fmt} checkpoint ({type(e).__name__}: {e})") from None
    return Checkpoint(path, "checkpoint", d["ema"], step, typed_config(d["config"]), resolved, view, identity,
                      TrainingState(d["model"], d["opt"], d["scaler"], d["rng"]), fmt)


def _reference(obj: Any, path: Path) -> Checkpoint:
    """The reference's `last.pt`: {"model", "ema", "opt", "args", "steps"} or a bare EMA state dict."""
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        # `args` is not read: it names the reference's options, not ours (sampling asks for --model instead)
        steps = obj.get("steps")
        return Checkpoint(path, "reference", obj["ema"], steps if isinstance(steps, int) else None, {}, {}, None,
                          None, None)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return Checkpoint(path, "reference", obj, None, {}, {}, None, None, None)
    raise CheckpointError(f"{path}: neither a repa-pipe checkpoint nor a SiT state dict")


_SAFETENSORS_HEADER_MAX = 100_000_000  # the safetensors format's own cap on the JSON header


def safetensors_header(path: Path) -> Optional[dict[str, Any]]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), or None when the file is
    not one: a file is told by its bytes, never by its suffix."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= _SAFETENSORS_HEADER_MAX or size + 8 > Path(path).stat().st_size:
                return None
            text = f.read(size)
        header = json.loads(text) if text[:1] == b"{" else None
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def is_export(path: Path) -> bool:
    """Whether `path` is a safetensors file written by `repa-pipe export` (its metadata's format tag)."""
    header = safetensors_header(path)
    meta = header.get("__metadata__") if header else None
    return isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT


def _first_line(e: BaseException) -> str:
    """An exception in one line: its first line, with the next one when the first only announces it (torch's
    "Error(s) in loading state_dict for SiT:")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _safetensors(path: Path) -> Checkpoint:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        config = typed_config(json.loads(meta["config"])) if "config" in meta else {}
        resolved = check_resolved(json.loads(meta.get("resolved", "{}")), "metadata")
        view = TrainingView.from_json(json.loads(meta["cache_spec"])) if meta.get("cache_spec") not in (None, "{}",
                                                                                                         "null") else None
        step = int(meta["step"]) if "step" in meta else None
    except Exception as e:  # truncated or foreign file: name it, no Rust traceback
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    return Checkpoint(path, "safetensors", sd, step, config, resolved, view, None, None, meta.get("format"))


def load(path: Path) -> Checkpoint:
    """Any of the three kinds of file, typed; CheckpointError (one line naming the file) for anything else."""
    path = Path(path)
    if path.is_file() and safetensors_header(path) is not None:  # whatever its suffix (an export named x.pt)
        return _safetensors(path)
    try:
        obj = _load_pt(path)
    except CheckpointError:
        if path.suffix == ".safetensors" and path.is_file():  # named so, neither kind: say what it was meant to be
            raise CheckpointError(f"{path}: not a readable safetensors file (its header is missing or damaged)") \
                from None
        raise
    if isinstance(obj, dict) and "format" in obj:
        fmt = obj["format"]
        if not isinstance(fmt, str):
            raise CheckpointError(f"{path}: damaged checkpoint: its format field is {fmt!r} "
                                  f"({type(fmt).__name__}), not a format tag such as {TRAIN_FORMAT}")
        if fmt.startswith(TRAIN_PREFIX):
            return _train_checkpoint(obj, path)
    return _reference(obj, path)


def resolve(run: Optional[Path], ckpt: Optional[str]) -> Path:
    """--ckpt FILE, --ckpt STEP (in RUN), or RUN's newest checkpoint."""
    if ckpt is not None and not re.fullmatch(r"[0-9]+", ckpt):  # not str.isdigit: it takes '²' and other digits
        p = Path(ckpt)
        if not p.is_file():
            raise ConfigError(f"--ckpt {ckpt}: no such file")
        return p
    if run is None:
        raise ConfigError("pass --run-dir RUN (a training run folder) or --ckpt FILE")
    if ckpt is not None:
        p = files.ckpt_path(run, int(ckpt))
        if not p.is_file():
            have = [s for s, _ in files.list_checkpoints(run)]
            raise ConfigError(f"--ckpt {ckpt}: {run} has no checkpoint at that step (have: {have or 'none'})")
        return p
    p = files.latest(run)
    if p is None:
        raise ConfigError(f"{run}: no checkpoints in {run}/checkpoints")
    return p


def load_from(run: Optional[Path], ckpt: Optional[str]) -> Checkpoint:
    """`load(resolve(run, ckpt))`; when RUN's newest checkpoint (no --ckpt) cannot be read, the error names the
    newest earlier one that can, and how to go on from it."""
    path = resolve(run, ckpt)
    try:
        return load(path)
    except CheckpointError as e:
        if ckpt is not None or run is None:
            raise
        raise CheckpointError(f"{e}; {_intact_hint(run, path)}") from None


def _intact_hint(run: Path, damaged: Path) -> str:
    for step, p in reversed(files.list_checkpoints(run)):
        if p == damaged:
            continue
        try:
            load(p)
        except CheckpointError:
            continue
        return (f"the newest intact checkpoint is {p} (step {step}): move the damaged file aside "
                f"(`mv {shlex.quote(str(damaged))} {shlex.quote(str(damaged) + '.damaged')}`) and run the same "
                "command again to go on from it")
    return "no earlier checkpoint of this run is intact"


def damaged(ck: Checkpoint, part: str, e: BaseException) -> CheckpointError:
    """One line for a training checkpoint whose `part` (model, ema, opt, scaler, rng) does not fit the state it is
    loaded into; for a run's newest checkpoint, with load_from's hint (the newest intact one, how to go on)."""
    msg = f"{ck.source}: damaged checkpoint: its {part!r} entry does not fit ({_first_line(e)})"
    run = ck.source.parent.parent
    if ck.source.parent.name == "checkpoints" and files.latest(run) == ck.source:
        msg += "; " + _intact_hint(run, ck.source)
    return CheckpointError(msg)
