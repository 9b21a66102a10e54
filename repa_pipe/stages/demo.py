"""`repa-pipe demo OUT`: the whole pipeline on a small real dataset, on a CPU, with a judge of the result.

OUT/images    scikit-learn's 1,797 real 8x8 digits as an ImageFolder (or --source, used in place)
OUT/encoder   the alignment target: the `tiny` ViT trained self-supervised (SimCLR) on those images, a timm state
              dict loaded through --encoder-weights exactly as DINOv2 weights would be (demo/ssl.py)
OUT/cache     pixel latents and that encoder's patch tokens
OUT/run       SiT-T/1 (SiT-T/2 at 16 px) + REPA: checkpoints, metrics.jsonl, loss.png, previews
OUT/samples   class-balanced samples (grid.png, samples.npz) and judge.json: the share of samples that a
              classifier trained on the real images (never on samples, never the alignment target) assigns to
              the class they were drawn for (demo/judge.py)

The recipe (docs/benchmarks.md, demo section, has the frontier it was chosen from): 8 tokens per side (patch =
resolution / 8), batch 64, AdamW lr 4e-3, EMA 0.99, bf16 autocast, align after block 2 with a 128-wide
projector; sampling with Heun's ODE, 25 steps, guidance 2.0 at every step. lr and EMA differ from the paper's
1e-4 and 0.9999, which are meant for 400k+ steps: after 1,000 steps a 0.9999 EMA is still 90% the initial model.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from repa_pipe.cache import inspect
from repa_pipe.cache.sources import ImageSource, load_preprocessed, open_source
from repa_pipe.demo.config import TOKENS_PER_SIDE, DemoConfig
from repa_pipe.demo.digits import write_digits_imagefolder
from repa_pipe.demo.judge import Judge
from repa_pipe.demo.ssl import train_ssl_encoder
from repa_pipe.encoding.config import EncodeFeaturesConfig, EncodeLatentsConfig
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.config import to_dict
from repa_pipe.pipeline.errors import BadInputError
from repa_pipe.pipeline.fileio import atomic_write_json, read_json
from repa_pipe.pipeline.progress import Tracker, console, human_duration, log
from repa_pipe.sampling.config import SampleEvalConfig
from repa_pipe.stages import encode_features, encode_latents, sample_eval, train
from repa_pipe.training.config import TrainConfig

BATCH, LR, EMA, ALIGN_DEPTH, PROJECTOR = 64, 4e-3, 0.99, 2, 128
SAMPLER = dict(mode="ode", num_steps=25, heun=True, cfg_scale=2.0, guidance_interval="0,1")


def real_images(source: ImageSource, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image of the source as the cache sees it (ADM crop at `resolution`), uint8 (N, R, R, 3), and labels."""
    images = np.stack([load_preprocessed(source, i, resolution) for i in range(len(source))])
    return images, np.asarray(source.labels)


def train_encoder(cfg: DemoConfig, images: np.ndarray, folder: Path) -> Path:
    """The demo's alignment target, trained once (a re-run with the same recipe reuses the file)."""
    path, meta_path = folder / f"tiny-simclr-grid{TOKENS_PER_SIDE}.safetensors", folder / "encoder.json"
    meta = {"method": "simclr", "steps": cfg.encoder_steps, "seed": cfg.seed, "grid": TOKENS_PER_SIDE,
            "images": int(len(images)), "resolution": int(images.shape[1]),
            "images_sha256": hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()}
    if path.is_file() and meta_path.is_file() and read_json(meta_path) == meta:
        log(f"encoder: reusing {path}")
        return path
    with Tracker("encoder (SimCLR)", cfg.encoder_steps, unit="step") as bar:
        sd = train_ssl_encoder(images, TOKENS_PER_SIDE, steps=cfg.encoder_steps, seed=cfg.seed,
                               progress=lambda step, loss: bar.update(1, fields=f"loss {loss:.3f}"))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    atomic_write_json(meta_path, meta)
    return path


def stage_configs(cfg: DemoConfig, images: Path, encoder: Path, cache: Path, run: Path, samples: Path
                  ) -> tuple[EncodeLatentsConfig, EncodeFeaturesConfig, TrainConfig, SampleEvalConfig]:
    """The recipe, as the configs of the four stage commands a user would run."""
    res, patch = cfg.side, cfg.side // TOKENS_PER_SIDE
    common = dict(source=str(images), cache=cache, resolution=res, shard_size=256, workers=cfg.workers)
    lat = EncodeLatentsConfig(**common, vae="pixel", batch_size=256)
    feat = EncodeFeaturesConfig(**common, encoder="tiny", encoder_weights=str(encoder), grid=TOKENS_PER_SIDE,
                                batch_size=128)
    tr = TrainConfig(cache=cache, run_dir=run, model=f"SiT-T/{patch}", encoder=("tiny",) if cfg.align else (),
                     steps=cfg.steps, global_batch_size=BATCH, lr=LR, ema_decay=EMA, encoder_depth=ALIGN_DEPTH,
                     projector_dim=PROJECTOR, precision="bf16", seed=cfg.seed, ckpt_every=cfg.steps // 2 or 1,
                     log_every=50, sample_every=cfg.steps // 2 or 1, loader_threads=2)
    se = SampleEvalConfig(out=samples, run_dir=run, num_samples=cfg.num_samples, labels="balanced", seed=cfg.seed,
                          batch_size=100, shard_size=100, precision="bf16", inception_weights=cfg.inception_weights,
                          ref_images=10_000, **SAMPLER)
    return lat, feat, tr, se


def judge_samples(judge: Judge, samples: Path) -> dict:
    with np.load(samples / "samples.npz") as z:  # the ADM-format file sample-eval wrote
        images, labels = z["arr_0"], z["arr_1"]
    score = judge.score(images, labels)
    atomic_write_json(samples / "judge.json", score)
    return score


PHASES = ("data and judge", "encoder", "encodes", "training", "sampling and judging")  # in the order they run


class Clock:
    """Wall time of the demo's phases, for its summary line and OUT/demo.json."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self.last, 1)
        self.last = now

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.t0, 1)

    def summary(self) -> str:
        parts = ", ".join(f"{k} {human_duration(v)}" for k, v in self.phases.items())
        return f"{human_duration(self.elapsed())} ({parts})"


def run(cfg: DemoConfig) -> None:
    clock = Clock()
    out = Path(cfg.out)
    if cfg.source is None:
        images = write_digits_imagefolder(out / "images", size=cfg.side)
        what = "scikit-learn's digits"
    else:
        images, what = Path(cfg.source), f"your images in {cfg.source}"
    source = open_source(images)
    if source.num_classes < 2 or len(source) < BATCH:
        raise BadInputError(f"{images}: the demo needs at least 2 classes (class folders) and {BATCH} images (one "
                            f"batch); found {source.num_classes} and {len(source)}")
    log(f"[bold]demo 1/6[/]: {len(source)} images of {source.num_classes} classes ({what}) at {cfg.side} px")
    real, labels = real_images(source, cfg.side)
    judge = Judge.fit(real, labels, seed=cfg.seed)
    clock.lap("data and judge")
    log(f"[bold]demo 2/6[/]: the judge, an MLP trained on 80% of the real images, classifies the other 20% with "
        f"accuracy {judge.heldout_accuracy:.3f}")
    log("[bold]demo 3/6[/]: training the alignment target, the `tiny` ViT, self-supervised (SimCLR) on the images")
    encoder = train_encoder(cfg, real, out / "encoder")
    clock.lap("encoder")
    cache, run_dir, samples = out / "cache", out / "run", out / "samples"
    lat, feat, tr, se = stage_configs(cfg, images, encoder, cache, run_dir, samples)
    log(f"[bold]demo 4/6[/]: encoding into {cache}")
    encode_latents.run(lat)
    encode_features.run(feat)
    clock.lap("encodes")
    if dist.is_main():
        inspect.render_info(inspect.info(cache), console)
    log(f"[bold]demo 5/6[/]: training {tr.model} {'+ REPA' if cfg.align else '(no alignment)'} for {cfg.steps} "
        f"steps into {run_dir}")
    train.run(tr)
    clock.lap("training")
    log(f"[bold]demo 6/6[/]: sampling {cfg.num_samples} class-balanced images into {samples}")
    sample_eval.run(se)
    score = judge_samples(judge, samples)
    clock.lap("sampling and judging")
    atomic_write_json(out / "demo.json", {"seconds": clock.phases, "total_seconds": clock.elapsed(),
                                          "judge": score, "config": to_dict(cfg)})
    log(f"[bold green]judge[/]: {score['accuracy']:.1%} of {cfg.num_samples} samples show the class they were drawn "
        f"for (chance {1 / source.num_classes:.0%}; the judge's own held-out accuracy on real images "
        f"{judge.heldout_accuracy:.1%}); its Frechet distance to the real images {score['fd']:.1f}")
    log(f"done in {clock.summary()}")
    log(f"samples {samples / 'grid.png'}, loss curve {run_dir / 'loss.png'}, scores {samples / 'judge.json'}"
        + (f", metrics {samples / 'metrics.json'}" if cfg.inception_weights else ""))
