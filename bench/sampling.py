"""Sampling: classifier-free guidance on the interval [0, 0.7] (the paper's headline setting) against guidance on
every step [0, 1], same model, same batch, same noise, side by side in one run.

    python bench/sampling.py             # SiT-T/2 on 4x32x32 latents, SDE 250 steps, batch 8, 3 rounds; updates docs
    python bench/sampling.py --quick     # 50 steps, batch 4, 1 round, prints only
    python bench/sampling.py --steps 100 --batch 16 --threads 2

Both variants run `models.samplers.sample` exactly as `repa-pipe sample-eval` calls it: Euler-Maruyama on
t = linspace(1, 0.04, N) + [0], cfg_scale 1.8, per-sample generators (`PerSampleRandn`, seeds 0..B-1) for the
starting noise, the labels (of 1000 classes) and every step's noise, model in fp32 with float64 integration state.
A guided step runs one forward on 2B rows ([cond, uncond]); outside the interval only the B conditional rows run.
The sampler's `stats` dict gives the model evaluations, the guided ones and the rows handed to the model.
The VAE decode is left out: it is the same for both variants (and the tiny model makes it a large share).
Rounds are interleaved (interval, every step, interval, ...) so load drift on a shared machine hits both alike.
The model is SiT-T/2 (depth 4, width 64; 256 tokens on 32x32 latents) with random weights (the zero-initialised
adaLN and output layers perturbed, so every forward does real arithmetic). Nothing here asserts on times.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402

from repa_pipe.models.samplers import PerSampleRandn, guided_steps, sample  # noqa: E402
from repa_pipe.models.sit import build_sit, flops_per_sample  # noqa: E402
from repa_pipe.pipeline import dist, hardware  # noqa: E402

NUM_CLASSES = 1000
CFG_SCALE = 1.8
VARIANTS = {"interval [0, 0.7]": (0.0, 0.7), "every step [0, 1]": (0.0, 1.0)}


def build_model(name: str, size: int, channels: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_sit(name, input_size=size, in_channels=channels, num_classes=NUM_CLASSES, encoder_depth=1,
                  z_dims=[], projector_dim=16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n != "pos_embed":
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return m.eval().requires_grad_(False).to(device)


def run_once(model, batch: int, steps: int, interval: tuple[float, float], channels: int, size: int):
    """One batch through the SDE sampler; (wall seconds, process CPU seconds, sampler stats)."""
    device = next(model.parameters()).device
    randn = PerSampleRandn(range(batch), device)
    z = randn((channels, size, size))  # (B, C, H, W)
    y = randn.randint(NUM_CLASSES)
    stats: dict = {}
    t0, c0 = time.perf_counter(), time.process_time()
    sample(model.forward_velocity, z, y, mode="sde", num_steps=steps, cfg_scale=CFG_SCALE,
           guidance_interval=interval, null_class=NUM_CLASSES, randn=randn, stats=stats)
    hardware.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="SiT-T/2")
    ap.add_argument("--size", type=int, default=32, help="latent side (32: a 256 px image through the SD VAE)")
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None, help="SDE steps (default 250, 50 with --quick)")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (default 8, 4 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, 1 with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="default: REPA_PIPE_DEVICE, else a GPU when present (pipeline.dist.device)")
    C.add_docs_args(ap)
    args = ap.parse_args()
    steps = args.steps or (50 if args.quick else 250)
    batch = args.batch or (4 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)

    device = torch.device(args.device) if args.device else dist.device()
    model = build_model(args.model, args.size, args.channels, device)
    info = C.machine({"device": hardware.device_name(device),
                      "model": f"{args.model} on {args.channels}x{args.size}x{args.size}", "batch": batch,
                      "steps": steps, "rounds": rounds})
    print(C.machine_line(info))
    run_once(model, batch, 3, (0.0, 1.0), args.channels, args.size)  # warm-up

    wall: dict[str, list[float]] = {k: [] for k in VARIANTS}
    cpu: dict[str, list[float]] = {k: [] for k in VARIANTS}
    stats: dict[str, dict] = {}
    for r in range(rounds):
        for name, interval in VARIANTS.items():
            dt, dc, st = run_once(model, batch, steps, interval, args.channels, args.size)
            wall[name].append(dt)
            cpu[name].append(dc)
            stats[name] = st
            print(f"round {r + 1}/{rounds} {name}: {dt:.2f} s wall, {dc:.2f} s CPU, {batch / dt:.3f} images/s, {st}",
                  flush=True)
    info["load_end"] = C.loadavg()

    for name, interval in VARIANTS.items():  # the sampler's counts agree with the closed-form gate count
        assert stats[name]["evals"] == steps
        assert stats[name]["guided_evals"] == guided_steps(steps, "sde", interval), stats[name]
        assert stats[name]["rows"] == batch * (steps + stats[name]["guided_evals"])
    gflop_row = flops_per_sample(model, with_projectors=False) / 1e9
    rows = []
    for name in VARIANTS:
        st, tw, tc = stats[name], C.median(wall[name]), C.median(cpu[name])
        rows.append([name, st["evals"], st["guided_evals"], st["rows"], st["rows"] / batch,
                     st["rows"] * gflop_row / batch, f"{batch / tw:.3f}",
                     f"{batch / max(wall[name]):.3f}-{batch / min(wall[name]):.3f}", f"{batch / tc:.3f}",
                     1e3 * tc / st["rows"]])
    a, b = (stats[k]["rows"] for k in VARIANTS)
    ratio = {kind: C.median(t1 / t0 for t0, t1 in zip(*d.values())) for kind, d in (("wall", wall), ("cpu", cpu))}
    spread = {kind: [t1 / t0 for t0, t1 in zip(*d.values())] for kind, d in (("wall", wall), ("cpu", cpu))}
    ms_row = [1e3 * C.median(cpu[k]) / stats[k]["rows"] for k in VARIANTS]
    saved = 1 - a / b

    text = f"""## Sampling: guidance interval [0, 0.7] vs guidance on every step

`python bench/sampling.py` ({'quick run' if args.quick else 'full run'}). {C.machine_line(info)}

{args.model} (random weights) on {args.channels}x{args.size}x{args.size} latents, SDE (Euler-Maruyama) {steps} steps,
cfg scale {CFG_SCALE}, batch {batch}, fp32 on {hardware.device_name(device)}, the same per-sample noise
and labels for both variants, medians of {rounds} interleaved round(s); VAE decode not included (identical for both).
"Rows" are the batch rows handed to the model (the sampler's `stats`): a guided evaluation runs [cond, uncond] as
one forward on 2B rows.

{C.table(["guidance", "model evals", "guided evals", "rows", "rows per image", "GFLOP per image",
          "images/s (wall)", "range (wall)", "images/s (CPU time)", "CPU ms per row"], rows)}

The interval saves {saved:.1%} of the rows ({a:,} vs {b:,}: {stats['interval [0, 0.7]']['guided_evals']} of {steps}
evaluations guided instead of all {steps}), so a sampler whose time is proportional to rows would be {b / a:.3f}x
faster. Measured speed-up (time on every step / time on the interval, median of the per-round ratios):
**{ratio['cpu']:.3f}x in process CPU time** (rounds {min(spread['cpu']):.3f}-{max(spread['cpu']):.3f}) and
{ratio['wall']:.3f}x in wall-clock time (rounds {min(spread['wall']):.3f}-{max(spread['wall']):.3f}); CPU ms per row
{ms_row[0]:.2f} vs {ms_row[1]:.2f}. CPU time is the headline because the machine is shared: wall-clock time
includes the time this process waited for a core. What this does not show: a GPU, where a 2B-row forward of a
small batch can cost less than twice a B-row one, so the saving there can be smaller than the row count says
(not measured here).
"""
    print(text)
    if C.should_write_docs(args):
        C.update_section("sampling", text)


if __name__ == "__main__":
    main()
