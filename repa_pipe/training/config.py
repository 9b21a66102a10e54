"""The options of `repa-pipe train` (light: the CLI reads it)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from repa_pipe.models.registry import (ALIGN_LOSSES, ATTN_BACKENDS, ENCODERS, PATHS, SIT_PRESETS, SIT_PRESETS_TEXT,
                                      TIME_SAMPLERS)
from repa_pipe.pipeline.config import check_at_least, check_choices, check_fraction, flag, option
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.precision import NAMES as PRECISION_NAMES

@dataclass(frozen=True)
class TrainConfig:
    cache: Path = option(help="Cache folder made by the encode stages.", metavar="DIR")
    run_dir: Path = option(help="Run folder (checkpoints, metrics.jsonl, samples). Running the same command "
                                "again resumes from its newest checkpoint.", metavar="DIR")
    model: str = option("SiT-XL/2", "SiT preset (SiT-T is tiny, for tests).", metavar="NAME", choices=SIT_PRESETS,
                        choices_text=SIT_PRESETS_TEXT)
    encoder: tuple[str, ...] = option(("dinov2-b",), "Encoder(s) whose cached features to align to; repeat or "
                                      "comma-separate for several; 'none' trains the SiT baseline.", metavar="NAME",
                                      choices=ENCODERS)
    latents: Optional[str] = option(None, "Latents array (its codec name) when the cache has several.",
                                    metavar="NAME")
    steps: int = option(400_000, "Total optimizer steps.", metavar="N")
    global_batch_size: int = option(256, "Samples per optimizer step, all ranks together.", metavar="N")
    micro_batch_size: Optional[int] = option(None, "Samples per forward on a rank (gradient accumulation below "
                                                   "the rank's share). Default: the whole share.", metavar="N")
    lr: float = option(1e-4, "AdamW learning rate (constant; betas 0.9, 0.999; no weight decay).", metavar="LR")
    grad_clip: float = option(1.0, "Gradient-norm clipping threshold.", metavar="X")
    proj_coeff: float = option(0.5, "Weight of the alignment loss (lambda).", metavar="X")
    encoder_depth: Optional[int] = option(None, "Align the hidden state after this block (1-indexed). Default: the "
                                                "paper's 8 for L and XL, 4 for B; 4 for S, 2 for T.", metavar="N")
    projector_dim: int = option(2048, "Projector MLP width.", metavar="N")
    align_loss: str = option("cosine", "Alignment loss: cosine (per-token negative cosine, the paper's) or ntxent.",
                             metavar="NAME", choices=ALIGN_LOSSES)
    path: str = option("linear", "Interpolant path.", metavar="NAME", choices=PATHS)
    weighting: str = option("uniform", "Time sampling.", metavar="NAME", choices=TIME_SAMPLERS)
    label_dropout: float = option(0.1, "Probability of the null label (for classifier-free guidance).",
                                  metavar="P")
    ema_decay: float = option(0.9999, "EMA decay, updated every step.", metavar="X")
    precision: str = option("bf16", "Autocast precision (fp16 uses a grad scaler).", metavar="P",
                            choices=PRECISION_NAMES)
    compile: bool = option(False, "torch.compile the model.")
    tf32: bool = option(True, "Allow TF32 matmuls on GPU.")
    seed: int = option(0, "Seed of the init, the data order and every per-sample draw.", metavar="N")
    ckpt_every: int = option(50_000, "Checkpoint every N steps (and at the end, and on SIGINT/SIGTERM).",
                             metavar="N")
    keep_ckpts: int = option(0, "Keep only the newest K checkpoints (0: all).", metavar="K")
    log_every: int = option(100, "Write metrics.jsonl and a progress line every N steps.", metavar="N")
    sample_every: int = option(10_000, "EMA preview grid every N steps (0: never).", metavar="N")
    # the reference's preview sampler (github.com/sihyun-yu/REPA, train.py): Euler ODE, 50 steps, guidance 4
    preview_samples: int = option(16, "Images in each EMA preview grid (fixed noises and labels).", metavar="N")
    preview_steps: int = option(50, "Euler ODE steps of the EMA previews.", metavar="N")
    preview_cfg_scale: float = option(4.0, "Classifier-free guidance scale of the EMA previews.", metavar="W")
    tensorboard: bool = option(False, "Also log to RUN/tensorboard (needs the tensorboard package).")
    attn_backend: str = option("sdpa", "Attention kernel (xformers needs the xformers package).",
                               metavar="NAME", choices=ATTN_BACKENDS)
    loader_threads: int = option(8, "Threads reading the cache (pread).", metavar="N")
    allow_other_cache: bool = option(False, "Resume on a cache with other images or labels than the run trained on "
                                            "(its identity is its file names and labels; recorded in the run's "
                                            "history).")

    def __post_init__(self) -> None:
        check_choices(self)
        check_at_least(self, ("steps", "global_batch_size", "ckpt_every", "log_every", "projector_dim",
                              "loader_threads", "micro_batch_size", "encoder_depth", "preview_samples",
                              "preview_steps"), 1)
        check_at_least(self, ("sample_every", "keep_ckpts"), 0)
        if not 0 <= self.seed < 2 ** 64:  # the seed derivation (pipeline/seeding.py) takes 64-bit seeds
            raise ConfigError(f"--seed must be in [0, 2^64 - 1], got {self.seed}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        if not math.isfinite(self.lr):
            raise ConfigError(f"--lr must be finite, got {self.lr}")
        if not (math.isfinite(self.proj_coeff) and self.proj_coeff >= 0):
            raise ConfigError(f"--proj-coeff must be finite and >= 0, got {self.proj_coeff}")
        if not (math.isfinite(self.preview_cfg_scale) and self.preview_cfg_scale >= 1):
            raise ConfigError(f"--preview-cfg-scale must be finite and >= 1, got {self.preview_cfg_scale}")
        check_fraction(self, ("label_dropout", "ema_decay"))
        depth = SIT_PRESETS[self.model].depth
        if self.encoder and self.encoder_depth is not None and self.encoder_depth > depth:
            raise ConfigError(f"--encoder-depth {self.encoder_depth} must be in [1, {depth}]: {self.model} has "
                              f"{depth} blocks")



def encoder_depth_for(cfg: TrainConfig) -> int:
    """--encoder-depth, or the model's default (models/registry.py)."""
    return cfg.encoder_depth or SIT_PRESETS[cfg.model].encoder_depth
