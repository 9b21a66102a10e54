"""`repa-pipe export RUN OUT.safetensors`: the EMA weights of a run, as safetensors.

The metadata holds the training config and the cache facts that fix the architecture (latent size and
channels, classes, projector dims), so the file alone is enough to rebuild and sample the model
(sampling/weights.py: export_ema).
"""
from __future__ import annotations

from repa_pipe.pipeline.progress import log
from repa_pipe.sampling.config import ExportConfig
from repa_pipe.sampling.weights import export_ema


def run(cfg: ExportConfig) -> None:
    ck = export_ema(cfg.run, cfg.out)
    log(f"wrote {cfg.out}: EMA weights of {ck.source} (step {ck.step}, {len(ck.ema)} tensors)")
