"""The options of `repa-pipe bench` (light: the CLI reads them to build --help)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from repa_pipe.models.registry import ENCODERS, SIT_PRESETS
from repa_pipe.pipeline.config import check_at_least, check_choices, option
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.precision import EVAL_NAMES, NAMES


@dataclass(frozen=True)
class BenchConfig:
    cache: Optional[Path] = option(None, "A cache to read batches from. Default: a synthetic cache in the real "
                                         "format (SD-VAE latents, float16 features), written through the cache "
                                         "writer into --work.", metavar="DIR")
    work: Optional[Path] = option(None, "Scratch folder for the synthetic cache. Default: a temporary folder, "
                                        "removed after.", metavar="DIR")
    model: str = option("SiT-XL/2", "SiT preset.", metavar="NAME", choices=SIT_PRESETS)
    encoder: str = option("dinov2-b", "Aligned encoder (its cached features; 'none' for the SiT baseline).",
                          metavar="NAME", choices=(*ENCODERS, "none"))
    resolution: int = option(256, "Image side of the synthetic cache (latents are 1/8 of it).", metavar="PX")
    batch_size: int = option(64, "Training samples per step on this device.", metavar="N")
    steps: int = option(20, "Measured training steps (after --warmup).", metavar="N")
    warmup: int = option(5, "Training steps run before measuring (with --compile: the compilation).", metavar="N")
    precision: str = option("bf16", "Training autocast precision.", metavar="P", choices=NAMES)
    compile: bool = option(False, "Also measure the torch.compile'd step.")
    eager: bool = option(True, "Measure the eager step (--no-eager with --compile: the compiled step only).")
    sampling: bool = option(True, "Also measure sampling (sample-eval's sampler).")
    sample_batch_size: int = option(64, "Samples per sampler batch.", metavar="N")
    sample_precision: str = option("auto", "Sampling precision (auto: bf16 on CUDA, fp32 on a CPU).", metavar="P",
                                   choices=EVAL_NAMES)
    sample_steps: int = option(250, "SDE steps of the projected schedule (guidance 1.8 on [0, 0.7]).",
                               metavar="N")
    sample_measure_steps: int = option(10, "SDE steps actually run and timed (all guided).", metavar="N")
    gpus: int = option(8, "GPUs of the projected run (per-GPU throughput as measured here, linear scaling).",
                       metavar="N")
    train_steps: int = option(400_000, "Optimizer steps of the projected training run.", metavar="N")
    global_batch_size: int = option(256, "Global batch of the projected training run.", metavar="N")
    num_samples: int = option(50_000, "Samples of the projected sample-eval run.", metavar="N")
    loader_threads: int = option(8, "Threads reading the cache.", metavar="N")
    json: Optional[Path] = option(None, "Also write every figure to this JSON file.", metavar="FILE")

    def __post_init__(self) -> None:
        check_choices(self)
        check_at_least(self, ("resolution", "batch_size", "steps", "sample_batch_size", "sample_steps",
                              "sample_measure_steps", "gpus", "train_steps", "global_batch_size", "num_samples",
                              "loader_threads"), 1)
        check_at_least(self, ("warmup",), 0)
        if not (self.eager or self.compile):
            raise ConfigError("--no-eager measures nothing without --compile")
        if self.sample_measure_steps > self.sample_steps:
            raise ConfigError(f"--sample-measure-steps {self.sample_measure_steps} exceeds --sample-steps "
                              f"{self.sample_steps}")
