"""The options of `repa-pipe demo` (light: read by the CLI)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from repa_pipe.pipeline.config import check_at_least, check_choices, option


@dataclass(frozen=True)
class DemoConfig:
    out: Path = option(help="Output folder for the demo's dataset, cache, run and samples.", metavar="OUT",
                       argument=True)
    resolution: int = option(32, "Image size of the digits dataset.", metavar="PX")
    vae: str = option("pixel", "Latent codec of the demo cache.", metavar="NAME", choices=("pixel", "tiny"))
    workers: int = option(0, "Image-decoding loader processes.", metavar="N")
    steps: int = option(300, "Training steps.", metavar="N")
    num_samples: int = option(32, "Samples drawn by the final sample-eval.", metavar="N")
    inception_weights: Optional[str] = option(None, "InceptionV3 weights file; with it the demo also computes FID "
                                                    "and the other ADM metrics.", metavar="FILE")

    def __post_init__(self) -> None:
        check_choices(self)
        check_at_least(self, ("resolution", "steps", "num_samples"), 1)
        check_at_least(self, ("workers",), 0)
