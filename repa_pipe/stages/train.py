"""`repa-pipe train`: SiT + REPA from the cache alone (no encoder, no VAE encoder), exactly resumable
(training/session.py)."""
from __future__ import annotations

import torch

from repa_pipe.cache.manifest import TrainingView
from repa_pipe.pipeline.images import Decoder
from repa_pipe.pipeline.progress import log
from repa_pipe.sampling.decode import choose_decoder, make_decoder
from repa_pipe.training.config import TrainConfig
from repa_pipe.training.session import train


def preview_decoder(view: TrainingView, device: torch.device) -> Decoder:
    """Previews decode with the cache's own codec."""
    name, weights = choose_decoder(view.codec, None, None, pair=False)
    return make_decoder(name, weights, device)


def run(cfg: TrainConfig) -> None:
    log(train(cfg, preview_decoder).summary())
