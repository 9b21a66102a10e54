"""The `repa-pipe` command line: one thin command per stage (options -> config dataclass -> stage.run).

Option names are the config fields (tests check the two agree). Library errors (RepaError) become one red
line and exit code 1; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from repa_pipe.pipeline.errors import RepaError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train diffusion transformers with REPA as a staged, cached pipeline.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check a cache.")
app.add_typer(cache_app, name="cache")

_state = {"debug": False}
err_console = Console(stderr=True)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")) -> None:
    _state["debug"] = debug


def _run(fn, *args) -> None:
    """Call a stage; turn a RepaError into one red line and exit code 1."""
    try:
        fn(*args)
    except RepaError as e:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


# Shared option declarations (help text written once).
SOURCE = typer.Option(..., "--source", help="Images: ImageFolder root (ROOT/<class>/<file>), a folder of "
                      "WebDataset .tar shards, or a brace pattern such as 'shards/train-{0000..0099}.tar'.")
CACHE = typer.Option(..., "--cache", help="Cache folder (created if it does not exist).")
RESOLUTION = typer.Option(None, "--resolution", help="ADM center-crop size in pixels. Default: the cache's, "
                          "or 256 for a new cache.")
SHARD_SIZE = typer.Option(None, "--shard-size", help="Samples per shard. Default: the cache's, or 1024 for a new cache.")
BATCH = typer.Option(32, "--batch-size", help="Images per model forward.")
WORKERS = typer.Option(4, "--workers", help="Image-decoding loader processes per rank (0: in the main process).")
PRECISION = typer.Option("fp32", "--precision", help="Model compute precision: fp32, bf16 or fp16.")
SKIP_BAD = typer.Option(False, "--skip-bad", help="Record bad images (path, reason) in the manifest and mark "
                        "their rows invalid, instead of stopping at the first one.")


@app.command("encode-latents")
def encode_latents(
    source: str = SOURCE,
    cache: Path = CACHE,
    vae: str = typer.Option("sd-vae-ft-ema", "--vae", help="VAE: sd-vae-ft-ema, sd-vae-ft-mse (diffusers "
                            "AutoencoderKL), pixel (the image in [-1,1]), tiny (random-init, tests/demo)."),
    vae_weights: Optional[str] = typer.Option(None, "--vae-weights", help="Local diffusers VAE folder "
                                              "(save_pretrained layout) instead of the hub id."),
    resolution: Optional[int] = RESOLUTION,
    shard_size: Optional[int] = SHARD_SIZE,
    batch_size: int = BATCH,
    workers: int = WORKERS,
    dtype: str = typer.Option("float32", "--dtype", help="Stored moments dtype: float32 or float16."),
    precision: str = PRECISION,
    skip_bad: bool = SKIP_BAD,
) -> None:
    """Encode images into VAE posterior moments (mean, std) in the cache."""
    from repa_pipe.stages import encode_latents as stage
    _run(stage.run, stage.EncodeLatentsConfig(**_locals(locals())))


@app.command("encode-features")
def encode_features(
    source: str = SOURCE,
    cache: Path = CACHE,
    encoder: str = typer.Option("dinov2-b", "--encoder", help="Encoder: dinov2-s|b|l|g[-reg], dinov1-b, clip-l, "
                                "mae-l, ijepa-h, mocov3-b|l (need --encoder-weights), tiny (random-init, tests/demo)."),
    encoder_weights: Optional[str] = typer.Option(None, "--encoder-weights", help="Encoder state dict file "
                                                  "(timm or the encoder's official format) instead of the hub."),
    grid: Optional[int] = typer.Option(None, "--grid", help="Token grid per side. Default: a patch-2 model's "
                                       "grid on the cache's latents, or resolution/16 without latents."),
    resolution: Optional[int] = RESOLUTION,
    shard_size: Optional[int] = SHARD_SIZE,
    batch_size: int = BATCH,
    workers: int = WORKERS,
    dtype: str = typer.Option("float16", "--dtype", help="Stored feature dtype: float16 or float32."),
    precision: str = PRECISION,
    skip_bad: bool = SKIP_BAD,
) -> None:
    """Encode images into pretrained-encoder patch tokens in the cache."""
    from repa_pipe.stages import encode_features as stage
    _run(stage.run, stage.EncodeFeaturesConfig(**_locals(locals())))


def _locals(d: dict) -> dict:
    """A command's parameters (its locals, less the stage module it imported)."""
    return {k: v for k, v in d.items() if not k.startswith("_") and k != "stage"}


@cache_app.command("info")
def cache_info(
    cache: Path = typer.Argument(..., help="Cache folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Show a cache's arrays, shapes, dtypes, bytes, progress and provenance."""
    from repa_pipe.cache import inspect

    def go() -> None:
        summary = inspect.info(cache)
        if as_json:
            print(json.dumps(summary, indent=2))
        else:
            inspect.render_info(summary, Console())

    _run(go)


@cache_app.command("verify")
def cache_verify(cache: Path = typer.Argument(..., help="Cache folder.")) -> None:
    """Check every shard is done and unchanged since it was written, and that valid rows hold no NaN."""
    from repa_pipe.cache import inspect

    def go() -> None:
        report = inspect.verify(cache)
        for p in report.problems:
            err_console.print(f"[red]problem:[/] {p}", highlight=False)
        if not report.ok:
            raise typer.Exit(1)
        Console().print(f"[green]ok[/]: {', '.join(report.checked) or 'no arrays'}")

    _run(go)


def _encoders(values: list[str]) -> tuple[str, ...]:
    """--encoder may repeat and/or hold comma-separated names; 'none' trains without alignment."""
    names = tuple(n.strip() for v in values for n in v.split(",") if n.strip())
    return () if names == ("none",) else names


@app.command("train")
def train(
    cache: Path = typer.Option(..., "--cache", help="Cache folder made by the encode stages."),
    run: Path = typer.Option(..., "--run", help="Run folder (checkpoints, metrics.jsonl, samples). Running the "
                             "same command again resumes from its newest checkpoint."),
    model: str = typer.Option("SiT-XL/2", "--model", help="SiT preset: SiT-S|B|L|XL/1|2|4, SiT-T/2 (tiny)."),
    encoder: list[str] = typer.Option(["dinov2-b"], "--encoder", help="Encoder(s) whose cached features to align "
                                      "to; repeat or comma-separate for several; 'none' for the SiT baseline."),
    latents: Optional[str] = typer.Option(None, "--latents", help="Latents array (codec name) when the cache has several."),
    steps: int = typer.Option(400_000, "--steps", help="Total optimizer steps."),
    global_batch_size: int = typer.Option(256, "--global-batch-size", help="Samples per optimizer step, all ranks together."),
    micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="Samples per forward on a rank "
                                                   "(gradient accumulation below the rank's share). Default: the whole share."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate (constant; betas 0.9, 0.999; no weight decay)."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Gradient-norm clipping threshold."),
    proj_coeff: float = typer.Option(0.5, "--proj-coeff", help="Weight of the alignment loss."),
    encoder_depth: int = typer.Option(8, "--encoder-depth", help="Align the hidden state after this block "
                                      "(1-indexed; 8 for L/XL, 4 for B in the paper)."),
    projector_dim: int = typer.Option(2048, "--projector-dim", help="Projector MLP width."),
    align_loss: str = typer.Option("cosine", "--align-loss", help="Alignment loss: cosine (per-token negative cosine) or ntxent."),
    path: str = typer.Option("linear", "--path", help="Interpolant path: linear or cosine."),
    weighting: str = typer.Option("uniform", "--weighting", help="Time sampling: uniform or lognormal."),
    label_dropout: float = typer.Option(0.1, "--label-dropout", help="Probability of the null label (for guidance)."),
    ema_decay: float = typer.Option(0.9999, "--ema-decay", help="EMA decay, updated every step."),
    precision: str = typer.Option("bf16", "--precision", help="Autocast precision: bf16, fp16 (grad scaler) or fp32."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    tf32: bool = typer.Option(True, "--tf32/--no-tf32", help="Allow TF32 matmuls on GPU."),
    seed: int = typer.Option(0, "--seed", help="Seed of the init, the data order and every per-sample draw."),
    ckpt_every: int = typer.Option(50_000, "--ckpt-every", help="Checkpoint every N steps (and at the end)."),
    keep_ckpts: int = typer.Option(0, "--keep-ckpts", help="Keep only the newest K checkpoints (0: all)."),
    log_every: int = typer.Option(100, "--log-every", help="Write metrics.jsonl and a console line every N steps."),
    sample_every: int = typer.Option(10_000, "--sample-every", help="EMA preview grid every N steps (0: never)."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also log to RUN/tensorboard."),
    attn_backend: str = typer.Option("sdpa", "--attn-backend", help="Attention: sdpa or xformers (optional)."),
    loader_threads: int = typer.Option(8, "--loader-threads", help="Threads reading the cache (pread)."),
) -> None:
    """Train SiT with REPA from the cache alone (never runs an encoder or the VAE encoder)."""
    from repa_pipe.stages import train as stage
    args = _locals(locals())
    args["encoder"] = _encoders(args["encoder"])
    _run(stage.run, stage.TrainConfig(**args))


@app.command("export")
def export(
    run: Path = typer.Argument(..., help="Run folder (its newest checkpoint) or a checkpoint .pt file."),
    out: Path = typer.Argument(..., help="Output .safetensors file."),
) -> None:
    """Write a run's EMA weights as safetensors (with the model config in its metadata)."""
    from repa_pipe.stages import export as stage
    _run(stage.run, run, out)


@app.command("sample-eval")
def sample_eval(
    out: Path = typer.Option(..., "--out", help="Output folder: shards/, samples.npz (ADM format), grid.png, "
                             "metrics.json, manifest.json. Re-running resumes unfinished shards."),
    run: Optional[Path] = typer.Option(None, "--run", help="Training run folder (its checkpoints and cache)."),
    ckpt: Optional[str] = typer.Option(None, "--ckpt", help="Checkpoint step in RUN, or a file: our .pt, an "
                                       "exported .safetensors, or the reference implementation's last.pt. "
                                       "Default: RUN's newest."),
    model: Optional[str] = typer.Option(None, "--model", help="SiT preset; needed for the reference checkpoint (SiT-XL/2)."),
    num_samples: int = typer.Option(50_000, "--num-samples", help="Samples to draw (the ADM protocol uses 50,000)."),
    mode: str = typer.Option("sde", "--mode", help="Sampler: sde (Euler-Maruyama, grid ending at 0.04) or ode (Euler/Heun)."),
    num_steps: int = typer.Option(250, "--num-steps", help="Sampler steps (model evaluations for SDE/Euler)."),
    heun: bool = typer.Option(False, "--heun", help="ODE only: Heun's second-order correction."),
    cfg_scale: float = typer.Option(1.8, "--cfg-scale", help="Classifier-free guidance scale (1: no guidance)."),
    guidance_interval: str = typer.Option("0,0.7", "--guidance-interval", help="LO,HI: guide only where LO <= t <= HI "
                                          "(t=1 is noise)."),
    seed: int = typer.Option(0, "--seed", help="Sample i depends only on (seed, i)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Samples per sampler batch on a rank."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per shard file (the resume unit)."),
    labels: str = typer.Option("random", "--labels", help="Class labels: random (uniform, as the reference) or "
                               "balanced (i mod num_classes)."),
    precision: str = typer.Option("fp32", "--precision", help="Model compute precision: fp32 or bf16."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Decoder codec. Default: the one that made the run's cache."),
    vae_weights: Optional[str] = typer.Option(None, "--vae-weights", help="Local diffusers VAE folder."),
    inception_weights: Optional[str] = typer.Option(None, "--inception-weights", help="InceptionV3 weights file "
                                                    "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth). "
                                                    "Without it metrics are skipped."),
    ref_stats: Optional[str] = typer.Option(None, "--ref-stats", help="Reference: an ADM reference npz "
                                            "(VIRTUAL_imagenet256_labeled.npz) or stored stats. Default: computed "
                                            "from the run's cache source images and stored in CACHE/stats."),
    ref_images: int = typer.Option(50_000, "--ref-images", help="Source images used when computing reference statistics."),
    fd_dinov2: bool = typer.Option(False, "--fd-dinov2", help="Also compute FD_DINOv2 (DINOv2-L CLS features)."),
    dinov2_weights: Optional[str] = typer.Option(None, "--dinov2-weights", help="DINOv2-L weights file for --fd-dinov2."),
    eval_only: Optional[Path] = typer.Option(None, "--eval-only", help="Evaluate this ADM-format npz; no sampling."),
    eval_batch_size: int = typer.Option(64, "--eval-batch-size", help="Images per Inception forward."),
) -> None:
    """Sample from a trained model (SDE/ODE, guidance interval) and evaluate under the ADM protocol."""
    from repa_pipe.stages import sample_eval as stage
    _run(stage.run, stage.SampleEvalConfig(**_locals(locals())))


@app.command("demo")
def demo(
    out: Path = typer.Argument(..., help="Output folder for the demo's dataset, cache and runs."),
    resolution: int = typer.Option(32, "--resolution", help="Image size of the digits dataset."),
    vae: str = typer.Option("pixel", "--vae", help="Latent codec for the demo cache (pixel or tiny)."),
    workers: int = typer.Option(0, "--workers", help="Image-decoding loader processes."),
    steps: int = typer.Option(300, "--steps", help="Training steps of the tiny model."),
    num_samples: int = typer.Option(32, "--num-samples", help="Samples drawn by the final sample-eval."),
    inception_weights: Optional[str] = typer.Option(None, "--inception-weights", help="InceptionV3 weights "
                                                    "file; with it the demo also computes FID & co."),
) -> None:
    """Run the pipeline (encode, train, sample-eval) on scikit-learn's digits, on a CPU, in a few minutes."""
    from repa_pipe.stages import demo as stage
    _run(stage.run, stage.DemoConfig(**_locals(locals())))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
