"""`repa-pipe cache info` and `repa-pipe cache verify`."""
from __future__ import annotations

import json

from rich.console import Console

from repa_pipe.cache import inspect
from repa_pipe.cache.options import CacheInfoConfig, CacheVerifyConfig
from repa_pipe.pipeline.errors import CorruptDataError
from repa_pipe.pipeline.progress import console


def info(cfg: CacheInfoConfig) -> None:
    summary = inspect.info(cfg.cache)
    if cfg.json:
        print(json.dumps(summary, indent=2))
    else:
        inspect.render_info(summary, Console())


def verify(cfg: CacheVerifyConfig) -> None:
    report = inspect.verify(cfg.cache)
    for p in report.problems:
        console.print(f"[red]problem:[/] {p}", highlight=False, soft_wrap=True)
    if report.ok:
        Console().print(f"[green]ok[/]: {', '.join(report.checked) or 'no arrays'}")
        return
    if cfg.repair and report.damaged:
        fixed = inspect.repair(cfg.cache, report)
        for name, shards in fixed.items():
            console.print(f"repaired: removed the done markers of {len(shards)} shard(s) of {name} "
                          f"{shards[:10]}; run its encode command again to rewrite them", highlight=False)
    raise CorruptDataError(f"{cfg.cache}: {len(report.problems)} problem(s) found"
                           + ("" if cfg.repair else "; `repa-pipe cache verify --repair` removes the done markers "
                              "of damaged shards so their encode command rewrites them"))
