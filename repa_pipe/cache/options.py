"""The options of `repa-pipe cache info` and `cache verify`, and of `export` (light: read by the CLI)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from repa_pipe.pipeline.config import option


@dataclass(frozen=True)
class CacheInfoConfig:
    cache: Path = option(help="Cache folder.", metavar="CACHE", argument=True)
    json: bool = option(False, "Print the summary as JSON.")


@dataclass(frozen=True)
class CacheVerifyConfig:
    cache: Path = option(help="Cache folder.", metavar="CACHE", argument=True)
    repair: bool = option(False, "Remove the done markers of damaged shards, so that running their encode command "
                                 "again rewrites exactly those.")
