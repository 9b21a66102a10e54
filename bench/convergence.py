"""REPA's effect measured: REPA versus the SiT baseline on the demo's data and recipe, at equal steps, across seeds.

    python bench/convergence.py            # 3 seeds x 5 variants x 1,000 steps (~55 min on 2 CPU cores)
    python bench/convergence.py --quick    # 1 seed, 200 steps, prints only

Variants (the demo's recipe otherwise: SiT-T/1 on the 8x8 digits, batch 64, lr 4e-3, EMA 0.99, bf16):
- `repa-ssl`: REPA aligned after block 2 to the demo's self-supervised `tiny` encoder (SimCLR, trained with the
  run's seed);
- `vanilla`: the same SiT without alignment (`--encoder none`);
- `repa-random`: REPA aligned to the random-init `tiny` encoder: the paper's "encoder quality" axis;
- `repa-ssl-block1`, `repa-ssl-block3`: `repa-ssl` aligned after block 1 or 3 of 4: the paper's depth axis.

Every K steps, on the EMA model: the demo judge's conditional accuracy on 200 class-balanced samples, with the
demo's sampler (Heun ODE 25 steps, guidance 2.0) and without guidance; the Frechet distance in the judge's hidden
layer (guided samples); and `repa-pipe analyze`'s CKNNA and linear probe at block 2, the demo's aligned block
(t = 0.5, 1,000 cache rows), against the SSL encoder's features of the run's seed, for every variant alike. Then the steps each run
needs to reach fixed judge scores. Everything runs through the pipeline's own stages (encode, train, sample-eval,
analyze). Writes docs/convergence.md and docs/convergence.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from repa_pipe.analysis.config import AnalyzeConfig  # noqa: E402
from repa_pipe.cache.sources import open_source  # noqa: E402
from repa_pipe.demo.judge import Judge  # noqa: E402
from repa_pipe.demo.ssl import train_ssl_encoder  # noqa: E402
from repa_pipe.demo.digits import write_digits_imagefolder  # noqa: E402
from repa_pipe.encoding.config import EncodeFeaturesConfig, EncodeLatentsConfig  # noqa: E402
from repa_pipe.sampling.config import SampleEvalConfig  # noqa: E402
from repa_pipe.stages import analyze, demo, encode_features, encode_latents, sample_eval, train  # noqa: E402
from repa_pipe.training.config import TrainConfig  # noqa: E402

# variant: (alignment target: the SSL encoder, the random-init one, or none; aligned block of 4)
VARIANTS = {"repa-ssl": ("ssl", 2), "vanilla": (None, 2), "repa-random": ("random", 2),
            "repa-ssl-block1": ("ssl", 1), "repa-ssl-block3": ("ssl", 3)}
THRESHOLDS = (("guided", 0.95), ("unguided", 0.85))
DOC = C.REPO / "docs" / "convergence.md"
PLOT = C.REPO / "docs" / "convergence.png"


def make_cache(root: Path, images: Path, weights: Path | None) -> Path:
    """latents/pixel + features/tiny (from `weights`, or the random-init encoder) at the demo's resolution."""
    common = dict(source=str(images), cache=root, resolution=8, shard_size=256, workers=0)
    encode_latents.run(EncodeLatentsConfig(**common, vae="pixel", batch_size=256))
    encode_features.run(EncodeFeaturesConfig(**common, encoder="tiny", grid=8, batch_size=128,
                                             encoder_weights=str(weights) if weights else None))
    return root


def train_run(run: Path, cache: Path, variant: str, seed: int, steps: int, every: int) -> float:
    target, block = VARIANTS[variant]
    cfg = TrainConfig(cache=cache, run_dir=run, model="SiT-T/1", encoder=() if target is None else ("tiny",),
                      steps=steps, global_batch_size=demo.BATCH, lr=demo.LR, ema_decay=demo.EMA,
                      encoder_depth=block, projector_dim=demo.PROJECTOR, precision="bf16", seed=seed,
                      ckpt_every=every, log_every=every, sample_every=0, loader_threads=2)
    t0 = time.perf_counter()
    train.run(cfg)
    return time.perf_counter() - t0


def judge_at(judge: Judge, run: Path, step: int, out: Path, n: int, seed: int, cfg_scale: float) -> dict:
    sampler = {**demo.SAMPLER, "cfg_scale": cfg_scale}
    sample_eval.run(SampleEvalConfig(out=out, run_dir=run, ckpt=str(step), num_samples=n, labels="balanced",
                                     seed=seed, batch_size=100, shard_size=100, precision="bf16", **sampler))
    with np.load(out / "samples.npz") as z:
        return judge.score(z["arr_0"], z["arr_1"])


def evaluate(judge: Judge, run: Path, target_cache: Path, step: int, n: int, seed: int, quick: bool) -> dict:
    guided = judge_at(judge, run, step, run / "eval" / f"{step:07d}-cfg2", n, seed, demo.SAMPLER["cfg_scale"])
    unguided = judge_at(judge, run, step, run / "eval" / f"{step:07d}-cfg1", n, seed, 1.0)
    analyze.run(AnalyzeConfig(run_dir=run, ckpt=str(step), cache=target_cache, encoder="tiny",
                              num_samples=300 if quick else 1000, times="0.5", seed=seed))
    a = json.loads((run / "analysis" / f"step{step:07d}.json").read_text())
    block = demo.ALIGN_DEPTH
    return {"step": step, "acc_guided": guided["accuracy"], "acc_unguided": unguided["accuracy"],
            "fd": guided["fd"], "cknna": a["cknna"][0][block - 1], "probe": a["probe"][0][block - 1],
            "cknna_best": max(a["cknna"][0]), "encoder_probe": a["encoder_probe"]}


# ----------------------------------------------------------------------------------------------------- report
def mean_std(xs: list[float], fmt: str = ".3f") -> str:
    if len(xs) == 1:
        return f"{xs[0]:{fmt}}"
    return f"{statistics.mean(xs):{fmt}} ± {statistics.stdev(xs):{fmt}}"


def steps_to(curve: list[dict], key: str, level: float) -> int | None:
    return next((r["step"] for r in curve if r[key] >= level), None)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("acc_guided", "judge accuracy, guided (w=2)"), ("acc_unguided", "judge accuracy, unguided"),
            ("fd", "FD in the judge's features (guided)"), ("cknna", "CKNNA at block 2 (t=0.5)")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for (key, title), ax in zip(keys, axes):
        for variant in VARIANTS:
            curves = [results[variant][s]["curve"] for s in sorted(results[variant])]
            steps = [r["step"] for r in curves[0]]
            vals = np.array([[r[key] for r in c] for c in curves])
            (line,) = ax.plot(steps, vals.mean(0), marker="o", ms=3, label=variant)
            if len(curves) > 1:
                ax.fill_between(steps, vals.min(0), vals.max(0), alpha=0.2, color=line.get_color())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if key == "fd":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def kept_findings() -> str:
    """The hand-written reading of the numbers below "## What it shows", kept when the study is re-run."""
    if DOC.is_file() and "## What it shows" in DOC.read_text():
        print(f"kept the hand-written findings of {DOC}: re-read them against the new tables", flush=True)
        return DOC.read_text().split("## What it shows", 1)[1].strip()
    return "(to be written after reading the numbers)"


def runs_span(root: Path) -> str:
    """When the runs' results were written: a resumed study reports runs from several invocations."""
    times = sorted(p.stat().st_mtime for p in root.glob("run-*/convergence.json"))
    fmt = lambda t: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))  # noqa: E731
    return f"The runs' results were written between {fmt(times[0])} and {fmt(times[-1])}." if times else ""


def encoder_probe(cache: Path, seed: int) -> float:
    """Linear-probe accuracy of the cache's mean-pooled `tiny` features (the analysis' protocol)."""
    from repa_pipe.analysis.alignment import linear_probe
    from repa_pipe.cache.reader import CacheReader

    r = CacheReader(cache, ["features/tiny"], threads=2)
    try:
        rows = r.valid_indices()
        feats = r.gather(rows)["features/tiny"].astype(np.float32).mean(axis=1)
        return linear_probe(feats, r.labels[rows], 0.25, seed)
    finally:
        r.close()


def report(results: dict, info: dict, args, seeds: list[int], encoder_probes: dict, span: str) -> str:
    steps = [r["step"] for r in results[next(iter(VARIANTS))][seeds[0]]["curve"]]
    rows = []
    for key, name in (("acc_guided", "judge acc., guided"), ("acc_unguided", "judge acc., unguided"),
                      ("fd", "judge FD"), ("cknna", "CKNNA, block 2"), ("probe", "probe acc., block 2")):
        for variant in VARIANTS:
            fmt = ".0f" if key == "fd" else ".3f"
            cells = [mean_std([results[variant][s]["curve"][i][key] for s in seeds], fmt) for i in range(len(steps))]
            rows.append([name, variant, *cells])
    table = C.table(["measure", "variant", *[f"step {s}" for s in steps]], rows)
    per_seed = C.table(["measure", "variant", *[f"step {s}" for s in steps]], [
        [name, variant, *[" / ".join(f"{results[variant][s]['curve'][i][key]:{'.0f' if key == 'fd' else '.3f'}}"
                                     for s in seeds) for i in range(len(steps))]]
        for key, name in (("acc_guided", "judge acc., guided"), ("acc_unguided", "judge acc., unguided"),
                          ("fd", "judge FD"), ("cknna", "CKNNA, block 2"), ("probe", "probe acc., block 2"))
        for variant in VARIANTS])
    reach_rows = []
    for variant in VARIANTS:
        cells = []
        for key, level in THRESHOLDS:
            got = [steps_to(results[variant][s]["curve"], f"acc_{key}", level) for s in seeds]
            cells.append(" / ".join(str(g) if g is not None else f">{steps[-1]}" for g in got))
        times = [results[variant][s]["train_s"] for s in seeds]
        reach_rows.append([variant, *cells, f"{statistics.mean(times):.0f}"])
    reach = C.table(["variant", *[f"steps to judge acc. >= {lv} ({k}), seeds {'/'.join(map(str, seeds))}"
                                  for k, lv in THRESHOLDS], "train s (mean)"], reach_rows)
    probes = ", ".join(f"{k}: {p:.3f}" for k, p in encoder_probes.items() if k != "pixels")
    findings = kept_findings()
    return f"""# Convergence: REPA versus the SiT baseline, measured

`python bench/convergence.py` ({'quick run' if args.quick else 'full run'}). {C.machine_line(info)} {span}

**Setup.** The demo's data and recipe (`repa-pipe demo`: scikit-learn's 1,797 digits at 8 px, SiT-T/1, batch 64,
AdamW lr {demo.LR}, EMA {demo.EMA}, bf16), {args.steps} steps, seeds {', '.join(map(str, seeds))}; every variant and
seed trained through `repa-pipe train` on its cache. Every {args.every} steps, on the EMA model: the demo judge
(an MLP trained on real digits, never used in training) scores {args.samples} class-balanced samples drawn with
the demo's sampler (Heun ODE, 25 steps, guidance 2.0 at every step) and without guidance; FD is the Frechet
distance between the guided samples and the real digits in the judge's hidden layer; CKNNA (k = 10) and the
linear-probe accuracy are `repa-pipe analyze`'s, at block 2 (the demo's aligned block) and t = 0.5, against
the SSL encoder's features of the same seed, for every variant alike. Cells are mean ± standard deviation over the seeds; the
plot's bands span min to max.

- `repa-ssl`: REPA (lambda 0.5, block 2 of 4, projector 128) aligned to the demo's `tiny` ViT trained
  self-supervised (SimCLR, {args.encoder_steps} steps, with the run's seed).
- Linear probe of each encoder's mean token on held-out digits (the analysis' protocol): {probes}; raw pixels:
  {encoder_probes.get('pixels', float('nan')):.3f}.
- `vanilla`: no alignment.
- `repa-random`: REPA aligned to the random-init `tiny` encoder (the paper's encoder-quality axis).
- `repa-ssl-block1`, `repa-ssl-block3`: as `repa-ssl`, aligned after block 1 or 3 (the paper's depth axis);
  their CKNNA and probe are still read at block 2, like every variant's.

![convergence](convergence.png)

{table}

{reach}

Every seed, in seed order {'/'.join(map(str, seeds))} (a seed fixes the SiT's initialisation, the data order and the
noise draws, and for `repa-ssl` the encoder):

{per_seed}

## What it shows

{findings}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_docs_args(ap)
    ap.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; --quick 0)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 1000; --quick 200)")
    ap.add_argument("--every", type=int, default=None, help="evaluate every K steps (default 125; --quick 100)")
    ap.add_argument("--samples", type=int, default=None, help="judged samples per point (default 200; --quick 50)")
    ap.add_argument("--encoder-steps", type=int, default=None, help="SimCLR steps (default 200; --quick 20)")
    args = ap.parse_args()
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    args.steps = args.steps or (200 if args.quick else 1000)
    args.every = args.every or (100 if args.quick else 125)
    args.samples = args.samples or (50 if args.quick else 200)
    args.encoder_steps = args.encoder_steps or (20 if args.quick else 200)
    root = C.SCRATCH / ("convergence-quick" if args.quick else "convergence")
    info = C.machine({"steps": args.steps, "every": args.every, "samples": args.samples})

    images = write_digits_imagefolder(root / "images", size=8)
    real, labels = demo.real_images(open_source(images), 8)
    judge = Judge.fit(real, labels)
    caches, encoder_probes = {"random": make_cache(root / "cache-random", images, None)}, {}
    for s in seeds:
        path = root / f"encoder-s{s}.safetensors"
        if not path.is_file():
            save_file(train_ssl_encoder(real, 8, steps=args.encoder_steps, seed=s), str(path))
        caches[s] = make_cache(root / f"cache-ssl-s{s}", images, path)
    results: dict = {v: {} for v in VARIANTS}
    for s in seeds:
        for variant in VARIANTS:
            run = root / f"run-{variant}-s{s}"
            done = run / "convergence.json"
            if done.is_file():  # a resumed study keeps finished runs
                results[variant][s] = json.loads(done.read_text())
                continue
            cache = caches["random"] if VARIANTS[variant][0] == "random" else caches[s]
            train_s = train_run(run, cache, variant, s, args.steps, args.every)
            curve = [evaluate(judge, run, caches[s], k, args.samples, s, args.quick)
                     for k in range(args.every, args.steps + 1, args.every)]
            results[variant][s] = {"train_s": train_s, "curve": curve}
            done.write_text(json.dumps(results[variant][s]))
            print(f"{variant} seed {s}: " + ", ".join(f"{r['step']}: {r['acc_guided']:.3f}/{r['acc_unguided']:.3f}"
                                                      f" cknna {r['cknna']:.3f}" for r in curve), flush=True)
        encoder_probes[f"SSL seed {s}"] = encoder_probe(caches[s], s)
    encoder_probes["random init"] = encoder_probe(caches["random"], 0)
    from repa_pipe.analysis.alignment import linear_probe
    encoder_probes["pixels"] = linear_probe(real.reshape(len(real), -1).astype(np.float32), labels, 0.25, 0)
    info["load_end"] = C.loadavg()
    (root / "results.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    text = report(results, info, args, seeds, encoder_probes, runs_span(root))
    print(text)
    if C.should_write_docs(args):
        plot(results, PLOT)
        DOC.write_text(text)
        print(f"wrote {DOC} and {PLOT}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
