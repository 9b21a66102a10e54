"""The options of `repa-pipe demo` (light: read by the CLI)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from repa_pipe.pipeline.config import check_at_least, option
from repa_pipe.pipeline.errors import ConfigError

DIGITS_RESOLUTION = 8    # the digits are 8x8 scans: no upsampling, 64 tokens with patch 1
SOURCE_RESOLUTION = 16   # a user's 28-64 px images: 16 px, 64 tokens with patch 2
TOKENS_PER_SIDE = 8      # the recipe's token grid, whatever the resolution (patch = resolution / 8)


@dataclass(frozen=True)
class DemoConfig:
    out: Path = option(help="Output folder for the demo's images, encoder, cache, run and samples (running the same "
                            "command again resumes).", metavar="OUT", argument=True)
    source: Optional[Path] = option(None, "Your own ImageFolder (ROOT/<class>/<image>; a few thousand images of "
                                          "28-64 px, any number of classes) instead of the digits.",
                                    metavar="DIR")
    resolution: Optional[int] = option(None, f"Image side in pixels, a multiple of {TOKENS_PER_SIDE}. Default: "
                                             f"{DIGITS_RESOLUTION} for the digits (their scans' size), "
                                             f"{SOURCE_RESOLUTION} with --source.", metavar="PX")
    steps: int = option(1000, "SiT training steps (batch 64).", metavar="N")
    encoder_steps: int = option(200, "Self-supervised training steps of the demo's small encoder (the "
                                     "alignment target).", metavar="N")
    align: bool = option(True, "Train with REPA, aligned to the demo's encoder; --no-align trains the SiT "
                               "baseline, to compare.")
    num_samples: int = option(200, "Samples drawn, class-balanced, and scored by the judge.", metavar="N")
    seed: int = option(0, "Seed of the encoder, the SiT and the samples.", metavar="N")
    workers: int = option(0, "Image-decoding loader processes of the encode stages.", metavar="N")
    inception_weights: Optional[str] = option(None, "InceptionV3 weights file; with it the demo also computes FID "
                                                    "and the other ADM metrics.", metavar="FILE")

    def __post_init__(self) -> None:
        check_at_least(self, ("steps", "encoder_steps", "num_samples", "resolution"), 1)
        check_at_least(self, ("workers",), 0)
        if self.resolution is not None and self.resolution % TOKENS_PER_SIDE:
            raise ConfigError(f"--resolution must be a multiple of {TOKENS_PER_SIDE}, got {self.resolution}")

    @property
    def side(self) -> int:
        """The resolution in use."""
        if self.resolution is not None:
            return self.resolution
        return SOURCE_RESOLUTION if self.source is not None else DIGITS_RESOLUTION
