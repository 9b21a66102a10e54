"""A run folder's record: RUN/config.json says how the run was made and where its cache is.

```
RUN/config.json      {"format": "repa-pipe-run/2", "tool", "created_utc",
                      "config":   the options of the first `train` as typed (never rewritten),
                      "resolved": {option: {"value", "why"}}: what was derived from them (e.g. the aligned block
                                  for the model, the cache's only latents),
                      "cache":    {"path": absolute, "run_relative": the cache seen from RUN, "view": the cache's
                                   training view (latent shape, codec, classes, source root, ...), "identity": the
                                   cache's file-list and label hashes},
                      "history":  [{"step", "utc", "changed": {option: [before, after]}}, ...] one per resume
                                  that changed an option (or went on with another cache)}
RUN/.train.lock      held by the `train` writing the run (cache/lock.py's holder lock; not `.lock`, the name of
                     the cache's own lock)
RUN/checkpoints/     NNNNNNN.pt (run/checkpoint.py)
RUN/metrics.jsonl, RUN/loss.png, RUN/samples/NNNNNNN.png
```

Records of repa-pipe 0.2 ("repa-pipe-run/1") have the derived values inside `config`, no `resolved` and no
`identity`; they are read the same way. The record makes a run self-contained: sampling reads the codec and the
cache's facts from it, and finds the cache by its absolute path, else by its path relative to the run (a run and
its cache moved together), else where `--cache` says.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from repa_pipe import __version__
from repa_pipe.cache.manifest import Manifest, TrainingView, is_cache
from repa_pipe.pipeline import checkpoint as files
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.fileio import atomic_write_json, read_json
from repa_pipe.run.facts import TrainFacts, check_resolved, typed_config

FORMAT = "repa-pipe-run/2"
READS = ("repa-pipe-run/1", FORMAT)
RECORD = "config.json"
LOCK = ".train.lock"  # repa-pipe 0.2 to 0.3 named it `.lock`; such a file left in an old run is never read


@dataclass(frozen=True)
class CacheIdentity:
    """Which images a cache holds: the hashes of its file list and of its labels (from its manifest).

    Names and labels only, not pixels: images replaced under the same names between two encode runs keep the
    identity (docs/CONTRACTS.md)."""

    file_list_sha256: str
    labels_sha256: str

    @classmethod
    def of(cls, m: Manifest) -> "CacheIdentity":
        return cls(m.dataset.file_list_sha256, m.dataset.labels_sha256)

    def to_json(self) -> dict[str, str]:
        return {"file_list_sha256": self.file_list_sha256, "labels_sha256": self.labels_sha256}

    @classmethod
    def from_json(cls, d: Optional[dict[str, Any]]) -> Optional["CacheIdentity"]:
        return None if d is None else cls(str(d["file_list_sha256"]), str(d["labels_sha256"]))

    def short(self) -> str:
        return f"files {self.file_list_sha256[:12]}, labels {self.labels_sha256[:12]}"


@dataclass
class CacheRecord:
    path: str                              # absolute, as last trained from
    relative: str                          # the same, relative to the run folder
    view: TrainingView
    identity: Optional[CacheIdentity]      # None in records of repa-pipe 0.2


@dataclass
class RunRecord:
    config: dict[str, Any]                 # the first train's options, as typed
    resolved: dict[str, dict[str, Any]]    # what was derived from them, and why
    cache: CacheRecord
    history: list[dict[str, Any]] = field(default_factory=list)
    created_utc: str = ""
    tool: str = f"repa-pipe {__version__}"

    @property
    def facts(self) -> TrainFacts:
        return TrainFacts.of(self.config, self.resolved)

    def to_json(self) -> dict[str, Any]:
        c = self.cache
        return {"format": FORMAT, "tool": self.tool, "created_utc": self.created_utc, "config": self.config,
                "resolved": self.resolved,
                "cache": {"path": c.path, "run_relative": c.relative, "view": c.view.to_json(),
                          "identity": c.identity.to_json() if c.identity else None},
                "history": self.history}


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a training run's folder: it holds checkpoints, or a run record (config.json with a run
    format tag; a config.json of another tool is not one)."""
    path = Path(path)
    if files.list_checkpoints(path):
        return True
    try:
        return (path / RECORD).is_file() and read_json(path / RECORD).get("format") in READS
    except (OSError, ValueError, AttributeError):
        return False


def cache_paths(run_dir: Path, cache: Path) -> tuple[str, str]:
    """(absolute, run-relative) spellings of the cache's location."""
    absolute = Path(cache).resolve()
    return str(absolute), os.path.relpath(absolute, Path(run_dir).resolve())


def new_record(run_dir: Path, config: dict[str, Any], resolved: dict[str, dict[str, Any]], cache: Path,
               view: TrainingView, identity: CacheIdentity, utc: str) -> RunRecord:
    absolute, relative = cache_paths(run_dir, cache)
    return RunRecord(config=config, resolved=resolved, cache=CacheRecord(absolute, relative, view, identity),
                     created_utc=utc)


def read_record(run_dir: Path) -> Optional[RunRecord]:
    """RUN/config.json, or None when the run has none yet."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return None
    try:
        d = read_json(path)
        if d.get("format") not in READS:
            raise ValueError(f"format {d.get('format')!r}, this repa-pipe reads {', '.join(READS)}")
        c = d["cache"]
        cache = CacheRecord(c["path"], c["run_relative"], TrainingView.from_json(c["view"]),
                            CacheIdentity.from_json(c.get("identity")))
        return RunRecord(config=typed_config(d["config"]), resolved=check_resolved(d.get("resolved", {}), "record"),
                         cache=cache, history=d.get("history", []), created_utc=d.get("created_utc", ""),
                         tool=d.get("tool", ""))
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise ConfigError(f"{path}: not a readable run record ({type(e).__name__}: {e})") from None


def write_record(run_dir: Path, record: RunRecord) -> None:
    atomic_write_json(Path(run_dir) / RECORD, record.to_json())


def locate_cache(run_dir: Path, record: RunRecord, override: Optional[Path]) -> Path:
    """Where the run's cache is now: `override` (--cache), else its absolute path, else its path relative to the
    run."""
    if override is not None:
        if not is_cache(Path(override)):
            raise ConfigError(f"--cache {override}: not a repa-pipe cache")
        return Path(override)
    relative = Path(run_dir) / record.cache.relative
    for candidate in (Path(record.cache.path), relative):
        if is_cache(candidate):
            return candidate
    raise ConfigError(f"{run_dir}: its cache is neither at {record.cache.path} nor at {relative} (where it was "
                      "relative to the run); pass --cache with its new location")
