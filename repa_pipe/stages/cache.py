"""`repa-pipe cache info` and `repa-pipe cache verify` (cache/inspect.py)."""
from __future__ import annotations

import json

from rich.console import Console

from repa_pipe.cache import inspect
from repa_pipe.cache.options import CacheInfoConfig, CacheVerifyConfig
from repa_pipe.pipeline.progress import console


def info(cfg: CacheInfoConfig) -> None:
    summary = inspect.info(cfg.cache)
    if cfg.json:
        print(json.dumps(summary, indent=2))
    else:
        inspect.render_info(summary, Console())


def verify(cfg: CacheVerifyConfig) -> None:
    done = inspect.check(cfg.cache, cfg.repair)
    for p in done.report.problems:
        console.print(f"[red]problem:[/] {p}", highlight=False, soft_wrap=True)
    for name, shards in done.repaired.items():
        console.print(f"repaired: removed the done markers of {len(shards)} shard(s) of {name} "
                      f"{shards[:10]}; run its encode command again to rewrite them", highlight=False)
    failure = done.failure()
    if failure is not None:
        raise failure
    Console().print(f"[green]ok[/]: {', '.join(done.report.checked) or 'no arrays'}")
