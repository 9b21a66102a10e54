"""The options of `repa-pipe analyze` (light: read by the CLI)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from repa_pipe.pipeline.config import check_at_least, check_choices, option
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.precision import EVAL_NAMES as PRECISION_NAMES


def parse_times(text: str) -> tuple[float, ...]:
    try:
        ts = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--times must be comma-separated numbers in [0, 1] (e.g. 0,0.25,0.5); got {text!r}") \
            from None
    if not ts or not all(0.0 <= t <= 1.0 for t in ts):
        raise ConfigError(f"--times must be comma-separated numbers in [0, 1]; got {text!r}")
    return ts


@dataclass(frozen=True)
class AnalyzeConfig:
    run_dir: Path = option(help="Training run folder.", metavar="RUN", argument=True)
    ckpt: Optional[str] = option(None, "Checkpoint step in the run, or a checkpoint file. Default: the run's "
                                       "newest.", metavar="STEP|FILE")
    cache: Optional[Path] = option(None, "The cache to analyse on: the run's own when it moved, or another with "
                                         "the same latent shape (e.g. held-out images, or other encoders' "
                                         "features). Default: where the run recorded its cache.", metavar="DIR")
    encoder: Optional[str] = option(None, "Cached features to compare with (an encoder name). Default: the run's "
                                          "first aligned encoder, or the cache's only features array.",
                                    metavar="NAME")
    num_samples: int = option(2000, "Cache rows analysed (a seeded random subset of the usable rows; the paper "
                                    "uses 10,000 ImageNet validation images).", metavar="N")
    times: str = option("0,0.25,0.5,0.75", "Noise levels t (t=1 is pure noise) at which hidden states are taken.",
                        metavar="T,T,...")
    topk: int = option(10, "Mutual nearest neighbours of CKNNA (the paper's k=10).", metavar="K")
    probe_holdout: float = option(0.25, "Fraction of the analysed rows held out to score the linear probe.",
                                  metavar="F")
    batch_size: int = option(64, "Rows per model forward.", metavar="N")
    precision: str = option("auto", "Model compute precision: auto (bf16 on CUDA, fp32 on a CPU), fp32 (strict: "
                                    "TF32 off), tf32, bf16.", metavar="P", choices=PRECISION_NAMES)
    seed: int = option(0, "Seed of the row subset, the noise and the probe split.", metavar="N")

    def __post_init__(self) -> None:
        check_choices(self)
        parse_times(self.times)
        check_at_least(self, ("batch_size",), 1)
        check_at_least(self, ("topk",), 2)
        check_at_least(self, ("num_samples",), 20)
        if not 0.0 < self.probe_holdout < 1.0:
            raise ConfigError(f"--probe-holdout must be in (0, 1), got {self.probe_holdout}")
