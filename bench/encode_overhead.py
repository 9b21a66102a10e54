"""Encode overhead: each encode stage's images/s divided by the bare model forward's images/s.

    python bench/encode_overhead.py                 # tiny codec/encoder (512 images) + sd-vae / dinov2-b (random
                                                    # weights, few images); updates docs/benchmarks.md
    python bench/encode_overhead.py --skip-real     # tiny models only
    python bench/encode_overhead.py --quick         # tiny models, 128 images, one round, prints only

Source: a generated ImageFolder of JPEGs with ImageNet-like sizes (500x375 .. 375x500, quality 90, smooth content
plus noise) under $REPA_BENCH_DIR (default /tmp/repa_bench), ADM-cropped to 256 px by the stage.

Stage: the real code path, `stages.encode_latents.run` / `stages.encode_features.run`, into a fresh cache, loader
workers 2. The model object is built once with `load_codec` / `load_encoder` (the real loading path: sd-vae-ft-ema
from a `save_pretrained` folder of a random-init AutoencoderKL with the sd-vae-ft-ema config, dinov2-b from a
random timm `vit_base_patch14_dinov2` state dict file) and handed to the stage by patching the `load_codec` /
`load_encoder` name of encoding/latents.py / encoding/features.py (where the stage's work loads its model), so
stage and bare forward run the very same object; model loading is excluded from both. Images/s of the stage =
images / wall time of `run()`.

Bare forward: the same model call the stage makes (`codec.encode_moments(x)` / `enc(x)`, under
`torch.inference_mode()`), same batch size, on the same ADM-cropped uint8 batches, decoded beforehand and held in
memory in the layout the stage hands over (`torch.from_numpy(NHWC).permute(0, 3, 1, 2)`).

Stage and bare runs alternate round by round; medians. The stage's time is split (by wrapping
`encoding.runner._encode_batch`, its model fn, `ShardWriter.write` and the progress `Tracker`; bench-side only) into
setup (source listing, cache creation), model forward, other per-batch work, shard writes and waiting for the
loader.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402

from repa_pipe.cache import writer as cache_writer  # noqa: E402
from repa_pipe.cache.sources import PreprocessedImages, collate_preprocessed, open_source  # noqa: E402
from repa_pipe.encoding import runner as encode_runner  # noqa: E402
from repa_pipe.encoding.config import EncodeFeaturesConfig, EncodeLatentsConfig  # noqa: E402
from repa_pipe.models.feature_encoders import load_encoder  # noqa: E402
from repa_pipe.models.latent_codecs import load_codec  # noqa: E402
from repa_pipe.encoding import features as encode_features_work  # noqa: E402
from repa_pipe.encoding import latents as encode_latents_work  # noqa: E402
from repa_pipe.stages import encode_features, encode_latents  # noqa: E402

SD_VAE_CONFIG = dict(  # stabilityai/sd-vae-ft-ema config.json (architecture fields)
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)


# ------------------------------------------------------------------------------------------------ inputs
def make_images(root: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs in 8 class folders, ImageNet-like sizes; idempotent."""
    from PIL import Image
    marker = root / ".done"
    if marker.is_file() and marker.read_text() == str(n):
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    sizes = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 300), (640, 480)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        low = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        d = root / f"class{i % 8}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=90)
    marker.write_text(str(n))
    return root


def sd_vae_folder(root: Path) -> Path:
    """A random-init AutoencoderKL with the sd-vae-ft-ema config, written with save_pretrained (once)."""
    from diffusers import AutoencoderKL
    if not (root / "config.json").is_file():
        torch.manual_seed(0)
        AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(str(root))
    return root


def dinov2_b_file(path: Path) -> Path:
    """A random-init timm vit_base_patch14_dinov2 (224 px) state dict file (once)."""
    import timm
    from safetensors.torch import save_file
    if not path.is_file():
        torch.manual_seed(0)
        m = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224, num_classes=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------- instrumentation
class Probe:
    """Bench-side wrappers around the stage's internals; records seconds spent in each part of one run()."""

    def __enter__(self):
        self.t = {"model": 0.0, "batch": 0.0, "write": 0.0, "loop": 0.0, "first_wait": 0.0}
        self._loop_t0 = None
        probe = self
        self._orig_batch = encode_runner._encode_batch
        self._orig_write = cache_writer.ShardWriter.write
        self._orig_tracker = encode_runner.Tracker

        def batch(job, b, start, buf, bad, model_fn, *rest):
            def timed_model(x):
                t0 = time.perf_counter()
                out = model_fn(x)
                probe.t["model"] += time.perf_counter() - t0
                return out
            t0 = time.perf_counter()
            if probe._loop_t0 is not None:  # the first batch: time from loop start to its arrival
                probe.t["first_wait"] = t0 - probe._loop_t0
                probe._loop_t0 = None
            r = probe._orig_batch(job, b, start, buf, bad, timed_model, *rest)
            probe.t["batch"] += time.perf_counter() - t0
            return r

        def write(self_, *a, **k):
            t0 = time.perf_counter()
            r = probe._orig_write(self_, *a, **k)
            probe.t["write"] += time.perf_counter() - t0
            return r

        class Tracker(self._orig_tracker):
            def __enter__(self_):
                self_._bench_t0 = probe._loop_t0 = time.perf_counter()
                return super().__enter__()

            def __exit__(self_, *exc):
                probe.t["loop"] += time.perf_counter() - self_._bench_t0
                return super().__exit__(*exc)

        encode_runner._encode_batch, encode_runner.Tracker = batch, Tracker
        cache_writer.ShardWriter.write = write
        return self

    def __exit__(self, *exc):
        encode_runner._encode_batch, encode_runner.Tracker = self._orig_batch, self._orig_tracker
        cache_writer.ShardWriter.write = self._orig_write


@contextlib.contextmanager
def same_model(work_module, attr: str, model):
    """Make the stage's `load_codec` / `load_encoder` (in encoding/latents.py, encoding/features.py) return our
    prebuilt object."""
    orig = getattr(work_module, attr)
    setattr(work_module, attr, lambda *a, **k: model)
    try:
        yield
    finally:
        setattr(work_module, attr, orig)


# --------------------------------------------------------------------------------------------------- cases
def run_case(case: dict, images: Path, rounds: int, scratch: Path) -> dict:
    stage, name, n, bs, shard = case["stage"], case["name"], case["n"], case["batch"], case["shard"]
    res = 256
    t0 = time.perf_counter()
    if stage == "latents":
        model = load_codec(name, case.get("weights"))
        model_fn = model.encode_moments
    else:
        model = load_encoder(name, case.get("weights"), grid=case["grid"])
        model_fn = model
    t_load = time.perf_counter() - t0

    # the same ADM-cropped uint8 batches, decoded beforehand (timed: the decode + crop cost, 1 process)
    source = open_source(str(images))
    ds = PreprocessedImages(source, None, res)
    t0 = time.perf_counter()
    items = [ds[i] for i in range(n)]
    t_decode = (time.perf_counter() - t0) / n
    batches = [torch.from_numpy(collate_preprocessed(items[s:s + bs]).images).permute(0, 3, 1, 2)
               for s in range(0, n, bs)]

    def bare() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for x in batches:
                model_fn(x)
        return n / (time.perf_counter() - t0)

    def stage_run() -> tuple[float, dict]:
        cache = scratch / f"cache_{stage}_{name}"
        shutil.rmtree(cache, ignore_errors=True)
        if stage == "latents":
            cfg = EncodeLatentsConfig(source=str(images), cache=cache, vae=name, vae_weights=case.get("weights"),
                                      resolution=res, shard_size=shard, batch_size=bs, workers=case.get("workers", 2))
            mod, attr, runner = encode_latents_work, "load_codec", encode_latents.run
        else:
            cfg = EncodeFeaturesConfig(source=str(images), cache=cache, encoder=name,
                                       encoder_weights=case.get("weights"), grid=case["grid"], resolution=res,
                                       shard_size=shard, batch_size=bs, workers=case.get("workers", 2))
            mod, attr, runner = encode_features_work, "load_encoder", encode_features.run
        with same_model(mod, attr, model), Probe() as probe:
            t0 = time.perf_counter()
            runner(cfg)
            wall = time.perf_counter() - t0
        parts = dict(probe.t)
        parts["wall"] = wall
        return n / wall, parts

    with torch.inference_mode():
        model_fn(batches[0])  # warm-up (allocator, oneDNN kernels); not counted
    out = {"bare": [], "stage": [], "parts": []}
    for r in range(rounds):
        order = [("bare", bare), ("stage", stage_run)] if r % 2 == 0 else [("stage", stage_run), ("bare", bare)]
        for kind, fn in order:
            if kind == "bare":
                out["bare"].append(fn())
            else:
                rate, parts = fn()
                out["stage"].append(rate)
                out["parts"].append(parts)
        print(f"  {case['label']}: round {r + 1}/{rounds}: bare {out['bare'][-1]:.2f} img/s, "
              f"stage {out['stage'][-1]:.2f} img/s, ratio {out['stage'][-1] / out['bare'][-1]:.3f}", flush=True)

    # layout check: is the permuted (channels-last strided) batch slower than a contiguous NCHW one?
    cont = [x.contiguous() for x in batches]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in cont:
            model_fn(x)
    out["bare_nchw"] = n / (time.perf_counter() - t0)
    out.update(t_load=t_load, t_decode=t_decode)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_docs_args(ap)
    ap.add_argument("--skip-real", action="store_true", help="only the tiny codec and encoder")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    scratch = C.SCRATCH / "encode_overhead"
    scratch.mkdir(parents=True, exist_ok=True)
    n_tiny = 128 if args.quick else 512
    n_tiny_vae = 64 if args.quick else 128  # the tiny VAE runs its mid-block attention over 64x64 tokens at 256 px
    rounds = args.rounds or (1 if args.quick else 5)
    cases = [
        dict(label="tiny codec (encode-latents)", stage="latents", name="tiny", n=n_tiny_vae, batch=32,
             shard=n_tiny_vae // 2),
        dict(label="tiny encoder (encode-features)", stage="features", name="tiny", n=n_tiny, batch=32,
             shard=n_tiny // 2, grid=16),
    ]
    if not args.quick:  # why the tiny encoder falls short: loader workers share the 2 cores with the model
        cases += [dict(label=f"tiny encoder (encode-features), loader workers {w}", stage="features", name="tiny",
                       n=n_tiny, batch=32, shard=n_tiny // 2, grid=16, workers=w) for w in (0, 1)]
    if not (args.quick or args.skip_real):
        cases += [
            dict(label="sd-vae-ft-ema arch, random weights (encode-latents)", stage="latents", name="sd-vae-ft-ema",
                 weights=str(sd_vae_folder(scratch / "sd-vae-random")), n=4, batch=4, shard=4, rounds=4),
            dict(label="dinov2-b arch, random weights (encode-features)", stage="features", name="dinov2-b",
                 weights=str(dinov2_b_file(scratch / "dinov2-b-random.safetensors")), n=8, batch=8, shard=8,
                 grid=16, rounds=4),
        ]
    info = C.machine({"workers": 2})
    print(C.machine_line(info))
    results = []
    for case in cases:
        images = make_images(C.SCRATCH / f"images_{case['n']}", case["n"])
        r = run_case(case, images, args.rounds or (1 if args.quick else case.get("rounds", rounds)), scratch)
        results.append((case, r))
    info["load_end"] = C.loadavg()

    rows, split_rows = [], []
    cores = os.cpu_count() or 1
    for case, r in results:
        bare, stage = C.median(r["bare"]), C.median(r["stage"])
        ratios = [s_ / b_ for s_, b_ in zip(r["stage"], r["bare"])]
        bound = 1.0 / (1.0 + r["t_decode"] * bare / cores)  # decode CPU time added to the model's, all cores busy
        rows.append([case["label"], f"{case['n']} / {case['batch']}", f"{bare:.2f} ({max(r['bare']):.2f})",
                     f"{stage:.2f} ({max(r['stage']):.2f})", f"**{C.median(ratios):.2f}**",
                     f"{min(ratios):.2f}-{max(ratios):.2f}", f"{max(r['stage']) / max(r['bare']):.2f}",
                     f"{r['t_decode'] * 1e3:.1f}", f"{bound:.2f}", f"{r['bare_nchw']:.2f}"])
        p = {k: C.median([x[k] for x in r["parts"]]) for k in r["parts"][0]}
        shares = [x["model"] / x["wall"] for x in r["parts"]]
        slow = C.median([x["model"] / (case["n"] / b_) for x, b_ in zip(r["parts"], r["bare"])])
        other = p["batch"] - p["model"]
        wait = p["loop"] - p["batch"] - p["write"]
        setup = p["wall"] - p["loop"]
        split_rows.append([case["label"], f"{p['wall']:.1f}", f"{setup:.2f}", f"{p['model']:.1f}", f"{other:.2f}",
                           f"{p['write']:.2f}", f"{wait:.2f}", f"{p['first_wait']:.2f}",
                           f"**{C.median(shares):.2f}**", f"{slow:.2f}"])
    t1 = C.table(["case", "images / batch", "bare img/s median (best)", "stage img/s median (best)",
                  "ratio (median of rounds)", "ratio range", "ratio of bests", "decode+crop ms/img (1 proc)",
                  "CPU-share bound", "bare img/s, NCHW-contiguous input"], rows)
    t2 = C.table(["case", "stage wall s", "setup s", "model fwd s", "other per-batch s", "shard writes s",
                  "waiting for loader s", "of which first batch s", "model share of stage wall",
                  "model slowdown in stage vs bare"], split_rows)
    text = f"""## Encode overhead: stage images/s / bare model forward images/s

`python bench/encode_overhead.py` ({'quick run' if args.quick else 'full run'}). {C.machine_line(info)}

Source: generated JPEG ImageFolder (ImageNet-like sizes 400x300 to 640x480, q90) ADM-cropped to 256 px; loader
workers 2, fp32 compute, default stored dtypes. Ratio = stage img/s (wall time of the stage's `run()`, model load
excluded: the prebuilt object is handed to the stage) / bare forward img/s (the same model call on the same
cropped uint8 batches held in memory, same batch size); stage and bare alternate, {rounds} round(s) (4 for the
real architectures, on 4 and 8 images: one batch each), medians; "best" = the fastest round, the least disturbed
by other users. Target: 0.9 or more. Loader workers 2 unless the case says otherwise.
"CPU-share bound" = 1 / (1 + decode ms x bare img/s / cores): the best ratio possible when the decode+crop work
must share this machine's cores with a model forward that already uses all of them (it does not on a GPU machine).
"bare, NCHW-contiguous input" runs the same model on `.contiguous()` batches: the stage hands over a permuted
(channels-last-strided) view.

{t1}

Where the stage's time goes (medians; seconds for the whole run; "waiting for loader" = encode loop time minus
model, other per-batch work and writes). "Model share of stage wall" is the fraction of the stage's own wall time
spent inside the model call, measured within the same run, so it is insensitive to other users' load: it is the
ratio the stage would reach if the model ran as fast inside the stage as alone. "Model slowdown" = time in the
model call inside the stage / bare forward time for the same images: above 1 when the loader workers' decoding
competes with the model for this machine's cores (or when the load from other users changed between runs).

{t2}
"""
    print(text)
    if C.should_write_docs(args):
        C.update_section("encode_overhead", text)


if __name__ == "__main__":
    main()
