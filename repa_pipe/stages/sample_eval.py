"""`repa-pipe sample-eval`: sample from a trained SiT (SDE/ODE, guidance interval) and evaluate under ADM
(sampling/session.py)."""
from __future__ import annotations

from repa_pipe.pipeline.progress import log
from repa_pipe.sampling.config import SampleEvalConfig
from repa_pipe.sampling.session import sample_and_evaluate


def run(cfg: SampleEvalConfig) -> None:
    written = sample_and_evaluate(cfg)
    if written is not None:
        log(written.summary())
