"""A run folder's record: RUN/config.json says how the run was made and where its cache is.

```
RUN/config.json      {"format", "tool", "created_utc",
                      "config":  the resolved options of the first `train` (never rewritten),
                      "cache":   {"path": absolute, "run_relative": the cache seen from RUN, "view": the cache's
                                  training view (latent shape, codec, classes, source root, ...)},
                      "history": [{"step", "utc", "changed": {option: [before, after]}}, ...] one per resume
                                 that changed an option}
RUN/checkpoints/     NNNNNNN.pt (pipeline/checkpoint.py)
RUN/metrics.jsonl, RUN/loss.png, RUN/samples/NNNNNNN.png
```

The record makes a run self-contained: sampling reads the codec and the cache's facts from it, and finds the
cache by its absolute path, else by its path relative to the run (a run and its cache moved together), else
where `--cache` says.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from repa_pipe import __version__
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.fileio import atomic_write_json, read_json

FORMAT = "repa-pipe-run/1"
RECORD = "config.json"


@dataclass
class RunRecord:
    config: dict[str, Any]                 # the first train's resolved options
    cache_path: str                        # absolute, as last trained from
    cache_relative: str                    # the same, relative to the run folder
    view: dict[str, Any]                   # cache.manifest.TrainingView.to_json()
    history: list[dict[str, Any]] = field(default_factory=list)
    created_utc: str = ""
    tool: str = f"repa-pipe {__version__}"

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "tool": self.tool, "created_utc": self.created_utc, "config": self.config,
                "cache": {"path": self.cache_path, "run_relative": self.cache_relative, "view": self.view},
                "history": self.history}


def cache_paths(run_dir: Path, cache: Path) -> tuple[str, str]:
    """(absolute, run-relative) spellings of the cache's location."""
    absolute = Path(cache).resolve()
    return str(absolute), os.path.relpath(absolute, Path(run_dir).resolve())


def new_record(run_dir: Path, config: dict[str, Any], cache: Path, view: dict[str, Any], utc: str) -> RunRecord:
    absolute, relative = cache_paths(run_dir, cache)
    return RunRecord(config=config, cache_path=absolute, cache_relative=relative, view=view, created_utc=utc)


def read_record(run_dir: Path) -> Optional[RunRecord]:
    """RUN/config.json, or None when the run has none yet."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return None
    try:
        d = read_json(path)
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}, expected {FORMAT}")
        c = d["cache"]
        return RunRecord(config=d["config"], cache_path=c["path"], cache_relative=c["run_relative"], view=c["view"],
                         history=d.get("history", []), created_utc=d.get("created_utc", ""), tool=d.get("tool", ""))
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ConfigError(f"{path}: not a readable run record ({type(e).__name__}: {e})") from None


def write_record(run_dir: Path, record: RunRecord) -> None:
    atomic_write_json(Path(run_dir) / RECORD, record.to_json())


def locate_cache(run_dir: Path, record: RunRecord, override: Optional[Path], is_cache) -> Path:
    """Where the run's cache is now: `override` (--cache), else its absolute path, else its path relative to the
    run. `is_cache(path) -> bool` tells a cache folder."""
    if override is not None:
        if not is_cache(Path(override)):
            raise ConfigError(f"--cache {override}: not a repa-pipe cache")
        return Path(override)
    relative = Path(run_dir) / record.cache_relative
    for candidate in (Path(record.cache_path), relative):
        if is_cache(candidate):
            return candidate
    raise ConfigError(f"{run_dir}: its cache is neither at {record.cache_path} nor at {relative} (where it was "
                      "relative to the run); pass --cache with its new location")
