"""What a `train` command will do, decided before anything is written: the batch split, the cache's view and
identity, what is derived from the options (and why), and the resume plan (which checkpoint, what changed).

Every check that can refuse the run is here, so a bad split, cache or resume fails on every rank at once, before
the process group starts and before the run folder is touched.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from repa_pipe.cache.manifest import TrainingView, is_cache, read_manifest, training_view, utc_now
from repa_pipe.cache.reader import check_labels, check_ready
from repa_pipe.pipeline import checkpoint as files
from repa_pipe.pipeline.config import flag, to_dict
from repa_pipe.pipeline.errors import CacheMismatchError, ConfigError
from repa_pipe.run.checkpoint import Checkpoint, load_from
from repa_pipe.run.facts import effective
from repa_pipe.run.record import (RECORD, CacheIdentity, CacheRecord, RunRecord, cache_paths, new_record, read_record,
                                  write_record)
from repa_pipe.training.config import TrainConfig, encoder_depth_for
from repa_pipe.training.state import check_view

Resolved = dict[str, dict[str, Any]]  # {option: {"value": derived value, "why": how}}

# What a resumed run may not change: the model, its inputs and the stream of batches and draws it trains on.
RESUME_FIXED = ("model", "encoder", "latents", "encoder_depth", "projector_dim", "global_batch_size", "seed",
                "path", "weighting", "align_loss", "label_dropout")
# Options that belong to one command, not to the run: locations spelled as typed (relative to the working folder;
# a run resumed from another folder or after a move changed neither, the record tracks the cache's location), and
# the permission to go on with another cache (recorded as the cache's change itself).
PER_COMMAND = ("cache", "run_dir", "allow_other_cache")


def micro_batches(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per step) for this world size."""
    if cfg.global_batch_size % world:
        raise ConfigError(f"--global-batch-size {cfg.global_batch_size} is not divisible by {world} processes")
    share = cfg.global_batch_size // world
    micro = min(cfg.micro_batch_size or share, share)
    if share % micro:
        raise ConfigError(f"a rank's share {share} (--global-batch-size {cfg.global_batch_size} / {world} "
                          f"processes) is not divisible by --micro-batch-size {micro}")
    return micro, share // micro


def resume_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, list[Any]]:
    """{option: [saved, now]} for every option that differs from the run being resumed (both as trained with:
    derived values filled in); ConfigError naming every fixed option that differs (see RESUME_FIXED). An option
    the saved run does not know (added since) counts at its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    saved = {**{k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}, **saved}
    fixed = [f"{flag(k)} {saved.get(k)!r} (now {now.get(k)!r})" for k in RESUME_FIXED if saved.get(k) != now.get(k)]
    if fixed:
        raise ConfigError(f"this run was trained with other settings: {', '.join(fixed)}; these cannot change on "
                          "resume: use another --run-dir or the same options")
    return {k: [saved.get(k), v] for k, v in now.items() if k not in PER_COMMAND and saved.get(k) != v}


@dataclass
class Plan:
    cfg: TrainConfig                  # as typed
    typed: dict[str, Any]             # the same as saved (pipeline.config.to_dict)
    resolved: Resolved                # what was derived from it
    encoder_depth: int                # the aligned block, as resolved
    view: TrainingView
    identity: CacheIdentity
    micro: int                        # rows per forward on a rank
    accum: int                        # forwards per optimizer step
    resume: Optional[Checkpoint]      # the checkpoint to go on from (None: a new run)
    changes: dict[str, list[Any]]     # {option: [before, now]} on resume


def check_options(cfg: TrainConfig) -> None:
    """Checks that need more than the option values themselves (installed packages)."""
    if cfg.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or pip install 'repa-pipe[tensorboard]')") from None


def check_run_dir(cfg: TrainConfig) -> None:
    """--run-dir must be a folder (or not exist yet) and lie outside every cache: a run written into a cache would
    mix its checkpoints with the cache's files (and `cache verify --repair` owns those). A cache inside a run
    folder is allowed: the run writes only its own names (config.json, checkpoints/, samples/, metrics.jsonl,
    loss.png, tensorboard/, .train.lock), none of which a cache uses."""
    run = Path(cfg.run_dir)
    if run.exists() and not run.is_dir():
        raise ConfigError(f"--run-dir {run}: not a folder (an existing file); pass a new or a run folder")
    for folder in (run.resolve(), *run.resolve().parents):
        if is_cache(folder):
            where = "a cache" if folder == run.resolve() else f"inside the cache {folder}"
            raise ConfigError(f"--run-dir {run}: {where}; a run folder must lie outside every cache (e.g. beside "
                              "it)")


def cache_view(cfg: TrainConfig) -> tuple[TrainingView, CacheIdentity]:
    """The cache's training view, with every array it names checked on disk, and the cache's identity."""
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
    return view, CacheIdentity.of(m)


def resolve(cfg: TrainConfig, view: TrainingView) -> Resolved:
    """What the run uses that the user did not type: the latents array's codec name, the aligned block."""
    out: Resolved = {}
    latents = view.latents.removeprefix("latents/")
    if cfg.latents != latents:
        out["latents"] = {"value": latents, "why": "the cache's only latents array" if cfg.latents is None else
                          f"--latents {cfg.latents} names the array {view.latents}"}
    if cfg.encoder_depth is None:
        out["encoder_depth"] = {"value": encoder_depth_for(cfg),
                                "why": f"{cfg.model}'s default aligned block (models/registry.py)"}
    return out


def check_cache_identity(cfg: TrainConfig, ck: Checkpoint, identity: CacheIdentity) -> dict[str, list[Any]]:
    """{} when the run resumes on the cache it trained on (or its checkpoint predates recorded identities); the
    change to record when --allow-other-cache lets it go on with another; else ConfigError."""
    saved = ck.cache_identity
    if saved is None or saved == identity:
        return {}
    if not cfg.allow_other_cache:
        raise ConfigError(f"--cache {cfg.cache}: not the cache this run trained on (other images or labels: "
                          f"{saved.short()} then, {identity.short()} now); pass --allow-other-cache to go on with "
                          "it (recorded in the run's history), or use the run's own cache")
    return {"cache_identity": [saved.to_json(), identity.to_json()]}


def resume_plan(cfg: TrainConfig, typed: dict[str, Any], resolved: Resolved, view: TrainingView,
                identity: CacheIdentity) -> tuple[Optional[Checkpoint], dict[str, list[Any]]]:
    """(newest checkpoint or None, {option: [before, now]}) — refusing any change a resume cannot take."""
    if files.latest(cfg.run_dir) is None:
        return None, {}
    ck = load_from(Path(cfg.run_dir), None)
    ck.require_training("use another --run-dir")
    try:
        changes = resume_changes(effective(ck.config, ck.resolved), effective(typed, resolved))
    except ConfigError as e:
        raise ConfigError(f"{cfg.run_dir}: {e}") from None
    check_view(ck, view)
    return ck, {**changes, **check_cache_identity(cfg, ck, identity)}


def plan(cfg: TrainConfig, world_size: int) -> Plan:
    check_options(cfg)
    check_run_dir(cfg)
    micro, accum = micro_batches(cfg, world_size)
    view, identity = cache_view(cfg)
    resolved, typed = resolve(cfg, view), to_dict(cfg)
    ck, changes = resume_plan(cfg, typed, resolved, view, identity)
    depth = resolved["encoder_depth"]["value"] if "encoder_depth" in resolved else cfg.encoder_depth
    return Plan(cfg, typed, resolved, depth, view, identity, micro, accum, ck, changes)


def write_run_record(p: Plan, step: int) -> None:
    """Rank 0: RUN/config.json for a new run; for a resume, the changed options appended to its history."""
    run_dir = Path(p.cfg.run_dir)
    # A run with no checkpoint has trained nothing that persists: it starts from a fresh record.
    record: Optional[RunRecord] = read_record(run_dir) if files.latest(run_dir) is not None else None
    if record is None:
        record = new_record(run_dir, p.typed, p.resolved, Path(p.cfg.cache), p.view, p.identity, utc_now())
    changes = dict(p.changes)
    absolute, relative = cache_paths(run_dir, Path(p.cfg.cache))
    if absolute != record.cache.path:
        changes["cache"] = [record.cache.path, absolute]
    # the cache's facts as of this run (a record of repa-pipe 0.2 gains the cache's identity here)
    rewrite = bool(changes) or record.cache.identity != p.identity or not (run_dir / RECORD).is_file()
    record.cache = CacheRecord(absolute, relative, p.view, p.identity)
    if changes:
        record.history.append({"step": step, "utc": utc_now(), "changed": changes})
    if rewrite:
        write_record(run_dir, record)


def describe_changes(changes: dict[str, list[Any]]) -> str:
    """'--lr 0.001 -> 0.002, another cache (--allow-other-cache)' for the resume line."""
    return ", ".join("another cache (--allow-other-cache)" if k == "cache_identity" else f"{flag(k)} {a!r} -> {b!r}"
                     for k, (a, b) in changes.items())
