"""The options of `repa-pipe sample-eval` (light: the CLI reads them to build --help)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from repa_pipe.models.registry import CODEC_NAMES, SIT_PRESETS, SIT_PRESETS_TEXT
from repa_pipe.pipeline.config import check_at_least, check_choices, check_seed, option
from repa_pipe.pipeline.errors import ConfigError, MissingWeightsError
from repa_pipe.pipeline.precision import EVAL_NAMES as PRECISION_NAMES


def parse_interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--guidance-interval must be LO,HI (e.g. 0,0.7); got {text!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"--guidance-interval needs 0 <= LO <= HI <= 1; got {text!r}")
    return lo, hi


@dataclass(frozen=True)
class SampleEvalConfig:
    out: Path = option(help="Output folder: shards/, samples.npz (ADM format), grid.png, metrics.json, "
                            "manifest.json. Running the same command again resumes unfinished shards.", metavar="DIR")
    run_dir: Optional[Path] = option(None, "Training run folder (its newest checkpoint, its cache's facts).",
                                     metavar="DIR")
    cache: Optional[Path] = option(None, "The run's cache, when it moved since training (only metrics read it: "
                                         "stored reference statistics and source images). Default: where the run "
                                         "recorded it.", metavar="DIR")
    ckpt: Optional[str] = option(None, "Checkpoint step in the run, or a file: our .pt, an exported .safetensors, "
                                       "or the reference implementation's last.pt. Default: the run's newest.",
                                 metavar="STEP|FILE")
    model: Optional[str] = option(None, "SiT preset; needed for the reference checkpoint (SiT-XL/2).",
                                  metavar="NAME", choices=SIT_PRESETS, choices_text=SIT_PRESETS_TEXT)
    num_samples: int = option(50_000, "Samples to draw (the ADM protocol uses 50,000).", metavar="N")
    mode: str = option("sde", "Sampler: sde (Euler-Maruyama, grid ending at t=0.04) or ode (Euler/Heun).",
                       metavar="MODE", choices=("sde", "ode"))
    num_steps: int = option(250, "Sampler steps (model evaluations for SDE/Euler).", metavar="N")
    heun: bool = option(False, "ODE only: Heun's second-order correction.")
    cfg_scale: float = option(1.8, "Classifier-free guidance scale, finite and >= 1 (1: no guidance).",
                              metavar="W")
    guidance_interval: str = option("0,0.7", "LO,HI: guide only where LO <= t <= HI (t=1 is noise).",
                                    metavar="LO,HI")
    seed: int = option(0, "Sample i's noise and label depend only on (seed, i).", metavar="N")
    batch_size: int = option(64, "Samples per sampler batch on a rank.", metavar="N")
    shard_size: int = option(1000, "Samples per shard file (the resume unit).", metavar="N")
    labels: str = option("random", "Class labels: random (uniform, as the reference) or balanced "
                                   "(i mod num_classes).", metavar="KIND", choices=("random", "balanced"))
    precision: str = option("auto", "Model compute precision: auto (bf16 on CUDA, fp32 on a CPU), fp32 (strict: "
                                    "TF32 off), tf32 (the reference generate.py's), bf16.", metavar="P",
                            choices=PRECISION_NAMES)
    vae: Optional[str] = option(None, "Decoder. Default: sd-vae-ft-ema for SD-VAE latents (the reference's "
                                      "pairing: train on ft-mse latents, decode with ft-ema), else the run's "
                                      "codec.", metavar="NAME", choices=CODEC_NAMES)
    vae_weights: Optional[str] = option(None, "Local diffusers VAE folder for the decoder.", metavar="DIR")
    inception_weights: Optional[str] = option(None, "InceptionV3 weights file (torch-fidelity's "
                                              "weights-inception-2015-12-05-6726825d.pth). Without it metrics are "
                                              "skipped.", metavar="FILE")
    ref_stats: Optional[str] = option(None, "Reference: an ADM reference npz (VIRTUAL_imagenet256_labeled.npz) or "
                                            "stored stats. Default: computed from the cache's source images and "
                                            "stored in CACHE/stats.", metavar="FILE")
    ref_images: int = option(50_000, "Source images used when computing reference statistics.", metavar="N")
    fd_dinov2: bool = option(False, "Also compute FD_DINOv2 (DINOv2-L CLS features).")
    dinov2_weights: Optional[str] = option(None, "DINOv2-L weights file for --fd-dinov2.", metavar="FILE")
    eval_only: Optional[Path] = option(None, "Evaluate this ADM-format npz; no sampling.", metavar="FILE")
    eval_batch_size: int = option(64, "Images per Inception forward.", metavar="N")

    def __post_init__(self) -> None:
        parse_interval(self.guidance_interval)
        check_choices(self)
        check_at_least(self, ("num_samples", "num_steps", "batch_size", "shard_size", "eval_batch_size",
                              "ref_images"), 1)
        check_seed(self)
        # The sampler guides only when w > 1 (the reference's `cfg_scale > 1.0` gate): a smaller w would be
        # recorded in the manifest but sample unguided, and inf/nan give black images.
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 1.0):
            raise ConfigError(f"--cfg-scale must be a finite number >= 1 (1: no guidance), got {self.cfg_scale}")
        if self.heun and self.mode != "ode":
            raise ConfigError(f"--heun is a correction of the ODE sampler: use it with --mode ode (got --mode "
                              f"{self.mode})")
        if self.fd_dinov2 and not self.dinov2_weights:
            raise MissingWeightsError("--fd-dinov2 needs DINOv2-L weights: pass --dinov2-weights FILE")
        if self.eval_only is None and self.run_dir is None and self.ckpt is None:
            raise ConfigError("pass --run-dir RUN (a training run folder), --ckpt FILE, or --eval-only NPZ")


@dataclass(frozen=True)
class ExportConfig:
    run: Path = option(help="Run folder (its newest checkpoint) or a checkpoint .pt file.", metavar="RUN",
                       argument=True)
    out: Path = option(help="Output .safetensors file, outside every run folder and cache. An existing file is "
                            "replaced only if it is an earlier repa-pipe export.", metavar="OUT", argument=True)
