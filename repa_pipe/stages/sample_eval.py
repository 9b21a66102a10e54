"""`repa-pipe sample-eval`: sample from a trained SiT (SDE/ODE, guidance interval) and evaluate under ADM.

Sample i depends only on (seed, i): its own generator draws its starting noise, its label (label policy
`random`) and every SDE noise, so the same images come out at any world size or batch size. Shards of
samples are written as they finish (resume skips them); then OUT/samples.npz (ADM format), OUT/grid.png,
OUT/metrics.json and OUT/manifest.json.

Resume is safe only for the same samples: OUT/shards/sampling.json records everything a sample depends on
(weights by content hash, sampler, guidance, seed, labels, precision, decoder, sample and shard counts; not the
batch size or the world size, which change nothing) and a re-run with different settings is refused.
"""
from __future__ import annotations

import contextlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from numpy.lib import format as npy_format

from repa_pipe import __version__
from repa_pipe.cache import layout
from repa_pipe.cache.sources import load_preprocessed, open_source
from repa_pipe.metrics.evaluate import evaluate
from repa_pipe.metrics.inception import load_inception
from repa_pipe.metrics.npz_io import iter_npz_images, npz_image_count
from repa_pipe.metrics.reference import ReferenceStats
from repa_pipe.models.samplers import PerSampleRandn, sample
from repa_pipe.pipeline import dist
from repa_pipe.pipeline.config import to_dict
from repa_pipe.pipeline.errors import ConfigError, MissingWeightsError
from repa_pipe.pipeline.fileio import atomic_write_json, read_json
from repa_pipe.pipeline.hashing import hash_state_dict
from repa_pipe.pipeline.progress import Tracker, log
from repa_pipe.stages import images, model_io, sample_io
from repa_pipe.stages.decode import Decoder, codec_of, make_decoder

GRID_N = 64


@dataclass(frozen=True)
class SampleEvalConfig:
    out: Path                                  # output folder
    run: Optional[Path] = None                 # training run folder
    ckpt: Optional[str] = None                 # step in RUN, or a file: our .pt, exported .safetensors, reference last.pt
    model: Optional[str] = None                # SiT preset, needed for the reference checkpoint (e.g. SiT-XL/2)
    num_samples: int = 50_000
    mode: str = "sde"                          # sde (Euler-Maruyama) or ode (Euler / Heun)
    num_steps: int = 250
    heun: bool = False
    cfg_scale: float = 1.8
    guidance_interval: str = "0,0.7"           # LO,HI in t (t=1 is noise); guidance only where LO <= t <= HI
    seed: int = 0
    batch_size: int = 64
    shard_size: int = 1000
    labels: str = "random"                     # random (as the reference) or balanced (i mod num_classes)
    precision: str = "fp32"                    # model compute: fp32 (reference) or bf16
    vae: Optional[str] = None                  # decoder codec; None: the run's cache codec
    vae_weights: Optional[str] = None
    inception_weights: Optional[str] = None    # torch-fidelity's weights-inception-2015-12-05-6726825d.pth
    ref_stats: Optional[str] = None            # ADM reference npz or stored stats; None: computed from the cache
    ref_images: int = 50_000                   # cache images used when computing reference statistics
    fd_dinov2: bool = False                    # also FD_DINOv2 (needs --dinov2-weights)
    dinov2_weights: Optional[str] = None       # DINOv2-L weights file for FD_DINOv2
    eval_only: Optional[Path] = None           # evaluate this ADM-format npz instead of sampling
    eval_batch_size: int = 64


def parse_interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--guidance-interval must be LO,HI (e.g. 0,0.7); got {text!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"--guidance-interval needs 0 <= LO <= HI <= 1; got {text!r}")
    return lo, hi


def validate(cfg: SampleEvalConfig) -> None:
    parse_interval(cfg.guidance_interval)
    for name, choices in (("mode", ("sde", "ode")), ("labels", ("random", "balanced")),
                          ("precision", ("fp32", "bf16"))):
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"--{name} must be one of {', '.join(choices)}; got {getattr(cfg, name)!r}")
    for name in ("num_samples", "num_steps", "batch_size", "shard_size", "eval_batch_size", "ref_images"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if cfg.fd_dinov2 and not cfg.dinov2_weights:
        raise MissingWeightsError("--fd-dinov2 needs DINOv2-L weights: pass --dinov2-weights FILE")


def sample_seed(seed: int, i: int) -> int:
    """Seed of sample i's own generator (63-bit, from numpy's SeedSequence: well mixed, no overlap)."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ---------------------------------------------------------------------------------------------- sampling
@dataclass
class Sampler:
    cfg: SampleEvalConfig
    model: torch.nn.Module
    decode: Decoder
    device: torch.device
    decoder_id: tuple[str, Optional[str]] = ("", None)  # (codec name, weights) that decode

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def batch(self, idx: range) -> tuple[np.ndarray, np.ndarray]:
        """Samples idx -> (uint8 (n, H, W, 3), labels (n,))."""
        cfg, m = self.cfg, self.model
        randn = PerSampleRandn([sample_seed(cfg.seed, i) for i in idx], self.device)
        h, w = m.input_size
        z = randn((m.in_channels, h, w))  # (n, C, h, w): first draw of each sample's generator
        if cfg.labels == "random":
            y = randn.randint(self.num_classes)  # second draw, as the reference (noise, then labels)
        else:
            y = torch.tensor([i % self.num_classes for i in idx], device=self.device)
        amp = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
               else contextlib.nullcontext())
        with amp:
            x = sample(m.forward_velocity, z, y, mode=cfg.mode, num_steps=cfg.num_steps, heun=cfg.heun,
                       cfg_scale=cfg.cfg_scale, guidance_interval=parse_interval(cfg.guidance_interval),
                       null_class=m.null_class, randn=randn)
        return self.decode(x.float()).numpy(), y.cpu().numpy()


def sampling_key(cfg: SampleEvalConfig, s: Sampler, weights_hash: str) -> dict[str, Any]:
    """Everything sample i depends on, besides i (batch size and world size change nothing)."""
    lo, hi = parse_interval(cfg.guidance_interval)
    return {"weights_state_sha256": weights_hash, "num_samples": cfg.num_samples, "shard_size": cfg.shard_size,
            "mode": cfg.mode, "num_steps": cfg.num_steps, "heun": cfg.heun, "cfg_scale": cfg.cfg_scale,
            "guidance_interval": [lo, hi], "seed": cfg.seed, "labels": cfg.labels, "precision": cfg.precision,
            "decoder": [s.decoder_id[0], str(Path(s.decoder_id[1]).resolve()) if s.decoder_id[1] else None]}


def check_resume(out: Path, key: dict[str, Any]) -> None:
    """Refuse to mix shards made with other settings; rank 0 records the key before any shard is written."""
    path = out / "shards" / "sampling.json"
    have = read_json(path) if path.is_file() else None
    if have is not None and have != key and any((out / "shards").glob("[0-9]*.npz")):
        diff = sorted(k for k in set(have) | set(key) if have.get(k) != key.get(k))
        raise ConfigError(f"{out}: holds sample shards made with other settings "
                          f"({'; '.join(f'{k}: {have.get(k)!r} then, {key.get(k)!r} now' for k in diff)}); "
                          f"use another --out, or delete {out / 'shards'} to start over")
    dist.barrier()  # every rank has read the old key before rank 0 may write the new one
    if dist.is_main() and have != key:
        atomic_write_json(path, key)
    dist.barrier()


def run_sampling(cfg: SampleEvalConfig, s: Sampler, key: Optional[dict[str, Any]] = None) -> int:
    """Write every missing shard this rank owns; returns the number of shards."""
    out = Path(cfg.out)
    if key is not None:
        check_resume(out, key)
    n_shards = (cfg.num_samples + cfg.shard_size - 1) // cfg.shard_size
    todo = {k for k in range(n_shards) if not sample_io.shard_path(out, k).is_file()}
    mine = [k for k in range(dist.get_rank(), n_shards, dist.get_world_size()) if k in todo]
    log(f"sample-eval: {n_shards - len(todo)}/{n_shards} shards already done; {dist.get_world_size()} process(es)")
    todo = sum(min(cfg.shard_size, cfg.num_samples - k * cfg.shard_size) for k in mine)
    with Tracker("sample", todo) as bar:
        for k in mine:
            lo, hi = k * cfg.shard_size, min((k + 1) * cfg.shard_size, cfg.num_samples)
            imgs, labels = [], []
            for b in range(lo, hi, cfg.batch_size):
                x, y = s.batch(range(b, min(b + cfg.batch_size, hi)))
                imgs.append(x)
                labels.append(y)
                bar.update(len(y))
            sample_io.write_shard(out, k, np.concatenate(imgs), np.concatenate(labels))
    dist.barrier()
    if dist.is_main():  # every rank is done writing: temp files left by a killed run can go
        for tmp in (out / "shards").glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    return n_shards


def make_sampler(cfg: SampleEvalConfig, device: torch.device) -> tuple[Sampler, model_io.LoadedModel]:
    loaded = model_io.load_for_sampling(cfg.run, cfg.ckpt, cfg.model, 8, device)
    if cfg.vae is not None:
        name, weights = cfg.vae, cfg.vae_weights
    elif loaded.train_config.get("cache"):
        tc = loaded.train_config
        latents = tc.get("latents") or _only_latents(Path(tc["cache"]))
        latents = latents if latents.startswith("latents/") else f"latents/{latents}"
        name, weights = codec_of(Path(tc["cache"]), latents)
        weights = cfg.vae_weights or weights
    else:
        raise ConfigError("cannot tell which VAE decodes these latents: pass --vae (e.g. sd-vae-ft-ema) "
                          "and --vae-weights DIR")
    return Sampler(cfg, loaded.model, make_decoder(name, weights, device), device, (name, weights)), loaded


def _only_latents(cache: Path) -> str:
    names = [n for n, e in layout.load_manifest(cache)["arrays"].items() if e["kind"] == "latents"]
    if len(names) != 1:
        raise ConfigError(f"{cache}: {len(names)} latents arrays; pass --vae")
    return names[0]


# ---------------------------------------------------------------------------------------------- evaluation
def reference_stats(cfg: SampleEvalConfig, inception, cache: Optional[Path], dinov2=None) -> ReferenceStats:
    """--ref-stats file, else statistics of the cache's source images (computed once, stored in CACHE/stats).

    `dinov2` (a DINOv2-L CLS forward) adds the FD_DINOv2 reference statistics to those computed here."""
    if cfg.ref_stats:
        return ReferenceStats.load(cfg.ref_stats, inception, cfg.eval_batch_size)
    if cache is None:
        raise ConfigError("no reference statistics: pass --ref-stats (an ADM reference npz such as "
                          "VIRTUAL_imagenet256_labeled.npz) or evaluate a run whose cache holds the source images")
    tag = f"inception-ref-{inception.weights_sha256[:8]}-{cfg.ref_images}" + ("-dinov2" if dinov2 else "")
    path = Path(cache) / "stats" / f"{tag}.npz"
    if path.is_file():
        return ReferenceStats.load(path, inception, cfg.eval_batch_size)
    m = layout.load_manifest(cache)
    source = open_source(m["dataset"]["root"])
    res = m["preprocessing"]["resolution"]
    n = min(cfg.ref_images, len(source))
    idx = np.sort(np.random.default_rng(0).permutation(len(source))[:n])

    def batches():
        for b in range(0, n, cfg.eval_batch_size):
            yield np.stack([load_preprocessed(source, int(i), res) for i in idx[b:b + cfg.eval_batch_size]])

    log(f"reference statistics from {n} source images of {cache} (stored in {path} for reuse)")
    ref = ReferenceStats.from_images(batches(), inception, cfg.eval_batch_size, dinov2_forward=dinov2,
                                     meta={"source": str(cache), "num_images": n, "resolution": res})
    ref.save(path)
    return ref


def check_sample_npz(npz: Path) -> int:
    """Header (dtype, shape) and, unless the array is uint8, every value: a bad file fails before any model
    loads rather than after Inception (and the reference statistics) have run. Returns N."""
    n = npz_image_count(npz)
    if _arr0_dtype(npz) != np.uint8:
        for _ in iter_npz_images(npz, 1024):  # raises on the first value outside 0..255
            pass
    return n


def _arr0_dtype(npz: Path) -> Optional[np.dtype]:
    """dtype of arr_0 from its .npy header (None when the header version is not 1.0/2.0: check the values)."""
    with zipfile.ZipFile(npz) as zf, zf.open("arr_0.npy") as f:
        version = npy_format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return None
        read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        return np.dtype(read(f)[2])


def run_eval(cfg: SampleEvalConfig, npz: Path, cache: Optional[Path]) -> Optional[dict[str, Any]]:
    """Metrics of an ADM-format npz; None (and one line saying why) without Inception weights."""
    if not cfg.inception_weights:
        log("metrics skipped: pass --inception-weights FILE (torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth) to compute FID, sFID, IS, precision and recall")
        return None
    n = check_sample_npz(npz)
    device = dist.device()
    inception = load_inception(cfg.inception_weights, device)
    log(f"evaluating {n} samples from {npz}")
    fd = _dinov2_forward(cfg, device) if cfg.fd_dinov2 else None
    ref = reference_stats(cfg, inception, cache, fd)
    metrics = evaluate(iter_npz_images(npz, cfg.eval_batch_size), ref, inception, cfg.eval_batch_size, fd)
    log("  ".join(f"{k} {metrics[k]:.4f}" for k in ("fid", "sfid", "inception_score", "precision", "recall",
                                                      "fd_dinov2") if k in metrics))
    for note in metrics.get("notes", []):
        log(f"[yellow]note:[/] {note}")
    return metrics


def _dinov2_forward(cfg: SampleEvalConfig, device: torch.device):
    from repa_pipe.models.feature_encoders import load_encoder
    enc = load_encoder("dinov2-l", cfg.dinov2_weights, grid=16, device=device)
    return enc.cls_from_input


# ---------------------------------------------------------------------------------------------- stage
def run(cfg: SampleEvalConfig) -> None:
    validate(cfg)
    dist.init()
    out = Path(cfg.out)
    if cfg.eval_only is not None:
        if dist.is_main():
            check_sample_npz(Path(cfg.eval_only))
            if not cfg.inception_weights:  # nothing else to do: exit 1 rather than a silent no-op
                raise MissingWeightsError("--eval-only computes metrics: pass --inception-weights FILE "
                                          "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
            metrics = run_eval(cfg, Path(cfg.eval_only), None)
            if metrics is not None:
                atomic_write_json(out / "metrics.json", _jsonable(metrics))
        return
    device = dist.device()
    s, loaded = make_sampler(cfg, device)
    log(f"sample-eval: {loaded.kind} {loaded.source} (step {loaded.step}), {cfg.num_samples} samples, "
        f"{cfg.mode} {cfg.num_steps} steps, cfg {cfg.cfg_scale} on t in [{cfg.guidance_interval}]")
    weights_hash = hash_state_dict(loaded.model.state_dict())
    n_shards = run_sampling(cfg, s, sampling_key(cfg, s, weights_hash))
    if not dist.is_main():
        return
    h, w = sample_io.read_shard(out, 0)[0].shape[1:3]
    npz = out / "samples.npz"
    sample_io.assemble_npz(out, npz, n_shards, cfg.num_samples, (h, w))
    first = np.concatenate([imgs for imgs, _ in _first_shards(out, n_shards)])[:GRID_N]
    images.save_grid(first, out / "grid.png")
    cache = Path(loaded.train_config["cache"]) if loaded.train_config.get("cache") else None
    metrics = run_eval(cfg, npz, cache)
    if metrics is not None:
        atomic_write_json(out / "metrics.json", _jsonable(metrics))
    atomic_write_json(out / "manifest.json", {
        "tool": f"repa-pipe {__version__}", "config": to_dict(cfg), "weights": loaded.source,
        "weights_kind": loaded.kind, "weights_state_sha256": weights_hash, "decoder": list(s.decoder_id),
        "step": loaded.step, "num_samples": cfg.num_samples, "image_size": [h, w],
        "uint8": "(x+1)/2, clamp(255x, 0, 255), truncated to uint8 (the reference's conversion)",
        "samples_npz": str(npz), "metrics": "metrics.json" if metrics is not None else None})
    log(f"wrote {npz}, {out / 'grid.png'}" + (f", {out / 'metrics.json'}" if metrics is not None else ""))


def _first_shards(out: Path, n_shards: int):
    seen = 0
    for k in range(n_shards):
        imgs, labels = sample_io.read_shard(out, k)
        yield imgs, labels
        seen += len(imgs)
        if seen >= GRID_N:
            return


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (np.floating, np.integer)) else v) for k, v in d.items()
            if k != "features"}
