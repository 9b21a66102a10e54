"""`repa-pipe analyze RUN`: the paper's representation analysis of a run's EMA model against the cached encoder
features (analysis/session.py). Writes RUN/analysis/<step>.json and <step>.png and prints the table.
"""
from __future__ import annotations

from repa_pipe.analysis import report
from repa_pipe.analysis.config import AnalyzeConfig
from repa_pipe.analysis.session import analyze_run
from repa_pipe.pipeline.progress import console, log


def run(cfg: AnalyzeConfig) -> None:
    done = analyze_run(cfg)
    report.render_table(done.analysis, console)
    log(f"wrote {done.json} and {done.png}")
