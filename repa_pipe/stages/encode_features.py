"""`repa-pipe encode-features`: image source -> pretrained-encoder patch tokens in the cache
(encoding/features.py)."""
from __future__ import annotations

from repa_pipe.encoding.config import EncodeFeaturesConfig
from repa_pipe.encoding.features import encode_features
from repa_pipe.pipeline.progress import log


def run(cfg: EncodeFeaturesConfig) -> None:
    done = encode_features(cfg)
    if done is not None:
        log(done.summary())
