"""The options of `repa-pipe train`, and what may change when a run resumes (light: the CLI reads it)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from repa_pipe.models.registry import ALIGN_LOSSES, ATTN_BACKENDS, ENCODERS, PATHS, SIT_PRESETS, TIME_SAMPLERS
from repa_pipe.pipeline.config import check_at_least, check_choices, check_fraction, flag, option
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.precision import NAMES as PRECISION_NAMES

# What a resumed run may not change: the model, its inputs and the stream of batches and draws it trains on.
RESUME_FIXED = ("model", "encoder", "latents", "encoder_depth", "projector_dim", "global_batch_size", "seed",
                "path", "weighting", "align_loss", "label_dropout")


@dataclass(frozen=True)
class TrainConfig:
    cache: Path = option(help="Cache folder made by the encode stages.", metavar="DIR")
    run_dir: Path = option(help="Run folder (checkpoints, metrics.jsonl, samples). Running the same command "
                                "again resumes from its newest checkpoint.", metavar="DIR")
    model: str = option("SiT-XL/2", "SiT preset (SiT-T is tiny, for tests).", metavar="NAME", choices=SIT_PRESETS)
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
    tensorboard: bool = option(False, "Also log to RUN/tensorboard (needs the tensorboard package).")
    attn_backend: str = option("sdpa", "Attention kernel (xformers needs the xformers package).",
                               metavar="NAME", choices=ATTN_BACKENDS)
    loader_threads: int = option(8, "Threads reading the cache (pread).", metavar="N")

    def __post_init__(self) -> None:
        check_choices(self)
        check_at_least(self, ("steps", "global_batch_size", "ckpt_every", "log_every", "projector_dim",
                              "loader_threads", "micro_batch_size", "encoder_depth"), 1)
        check_at_least(self, ("sample_every", "keep_ckpts"), 0)
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        if self.proj_coeff < 0:
            raise ConfigError(f"--proj-coeff must be >= 0, got {self.proj_coeff}")
        check_fraction(self, ("label_dropout", "ema_decay"))
        depth = SIT_PRESETS[self.model].depth
        if self.encoder and self.encoder_depth is not None and self.encoder_depth > depth:
            raise ConfigError(f"--encoder-depth {self.encoder_depth} must be in [1, {depth}]: {self.model} has "
                              f"{depth} blocks")

    @property
    def align_depth(self) -> int:
        """--encoder-depth, or the preset's default."""
        return self.encoder_depth or SIT_PRESETS[self.model].align_depth


def micro_batches(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per step) for this world size."""
    if cfg.global_batch_size % world:
        raise ConfigError(f"--global-batch-size {cfg.global_batch_size} is not divisible by {world} processes")
    share = cfg.global_batch_size // world
    micro = min(cfg.micro_batch_size or share, share)
    if share % micro:
        raise ConfigError(f"a rank's share {share} (--global-batch-size {cfg.global_batch_size} / {world} "
                          f"processes) is not divisible by --micro-batch-size {micro}")
    return micro, share // micro


def resume_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, list[Any]]:
    """{option: [saved, now]} for every option that differs from the run being resumed; ConfigError naming
    every fixed option that differs (see RESUME_FIXED)."""
    fixed = [f"{flag(k)} {saved.get(k)!r} (now {now.get(k)!r})" for k in RESUME_FIXED if saved.get(k) != now.get(k)]
    if fixed:
        raise ConfigError(f"this run was trained with other settings: {', '.join(fixed)}; these cannot change on "
                          "resume: use another --run-dir or the same options")
    # --cache and --run-dir are locations spelled as typed (relative to the working folder), not settings: a run
    # resumed from another folder or after a move changed neither (the record tracks the cache's location)
    return {k: [saved.get(k), v] for k, v in now.items() if k not in ("cache", "run_dir") and saved.get(k) != v}
