"""`repa-pipe sample-eval` end to end on a tiny SiT: sampler parity through the stage, the same samples for any
world size / batch size / shard size, resume after SIGKILL, the three weight formats, evaluation and its input
checks, stored reference statistics, the manifest.

CPU only, offline, one torch thread. Inputs are built without training: a checkpoint in our format (random SiT-T/2
weights, EMA != model) under RUN/checkpoints/0000010.pt, pointing at a cache written with `cache.writer` whose
latents say codec `tiny` (4 x 8 x 8 latents -> 32 x 32 images, decoded by the seeded random VAE) and whose source
is a real 10-image ImageFolder (for reference statistics). Metric parity itself lives in tests/test_metrics.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import VENV_BIN, invoke, make_imagefolder, ok, subprocess_env
from repa_pipe.cache import writer
from repa_pipe.cache.manifest import latents_spec, read_manifest, training_view
from repa_pipe.cache.sources import open_source
from repa_pipe.metrics.evaluate import evaluate
from repa_pipe.metrics.inception import make_random_inception_weights
from repa_pipe.metrics.reference import ReferenceStats
from repa_pipe.models.latent_codecs import load_codec
from repa_pipe.models.sit import build_sit
from repa_pipe.pipeline import checkpoint, images
from repa_pipe.pipeline.config import to_dict
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.run.checkpoint import Checkpoint, TrainingState, save
from repa_pipe.run.record import CacheIdentity, new_record, write_record
from repa_pipe.sampling import evaluation
from repa_pipe.sampling import sampler as sampler_mod
from repa_pipe.sampling import session as sampling_session
from repa_pipe.sampling.config import ExportConfig, SampleEvalConfig
from repa_pipe.sampling.decode import make_decoder
from repa_pipe.stages import export, sample_eval
from repa_pipe.training.config import TrainConfig

NUM_CLASSES = 10
N = 12          # samples per run
STEPS = 4       # sampler steps (SDE: 3 noisy + 1 deterministic)
SD_SCALE = 0.18215


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread (as a torchrun rank with OMP_NUM_THREADS=1) and one BLAS thread for the 2048-d
    eigendecompositions: on a shared 2-core box a second spinning thread only slows them down."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(limits=1, user_api="blas")
    except ImportError:
        limits = None
    yield
    if limits is not None:
        limits.restore_original_limits()
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------- inputs
def tiny_sit(seed: int) -> torch.nn.Module:
    """SiT-T/2 on 4 x 8 x 8 latents with every weight perturbed: the reference init zeroes the adaLN and output
    layers, which would make the velocity 0 and the samples independent of weights, labels and guidance."""
    torch.manual_seed(seed)
    m = build_sit("SiT-T/2", input_size=8, in_channels=4, num_classes=NUM_CLASSES, encoder_depth=1, z_dims=[16],
                  projector_dim=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "pos_embed":
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


@dataclasses.dataclass
class Setup:
    root: Path
    cache: Path
    run: Path
    ckpt: Path
    ema: dict
    model: dict


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("sample_eval")
    src = open_source(make_imagefolder(root / "images", classes=[f"c{i}" for i in range(NUM_CLASSES)], per_class=1))
    cache = root / "cache"
    writer.open_or_create(cache, src.dataset(), list(src.keys), np.asarray(src.labels), 32, 16)
    codec = {"name": "tiny", "latent_channels": 4, "downsample": 4, "scaling_factor": SD_SCALE,
             "weights_id": "random-init(seed=0)", "weights_hash": "none", "is_random_init": True}
    m = writer.ensure_array(cache, latents_spec(codec, len(src), 32, "float32", "fp32"))
    moments = np.random.default_rng(0).standard_normal((len(src), 8, 8, 8)).astype(np.float32)
    writer.ShardWriter(cache, m, "latents/tiny").write(0, moments, [])
    m = writer.finalize(cache, "latents/tiny")
    view = training_view(m, np.asarray(src.labels), None, ())

    run = root / "run"
    model, ema = tiny_sit(1), tiny_sit(2)  # EMA differs from the online model: the test sees which one is used
    cfg = TrainConfig(cache=cache, run_dir=run, model="SiT-T/2", encoder=("tiny",), latents="tiny",
                      encoder_depth=1, projector_dim=16, precision="fp32", steps=10)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ckpt = checkpoint.ckpt_path(run, 10)
    identity = CacheIdentity.of(read_manifest(cache))
    save(ckpt, Checkpoint(ckpt, "checkpoint", ema.state_dict(), 10, to_dict(cfg), {}, view, identity,
                          TrainingState(model.state_dict(), opt.state_dict(), {}, {"torch": torch.get_rng_state()})),
         seed=0)
    write_record(run, new_record(run, to_dict(cfg), {}, cache, view, identity, "test"))
    return Setup(root, cache, run, ckpt, ema.state_dict(), model.state_dict())


@pytest.fixture(scope="module")
def inception(setup) -> Path:
    path = setup.root / "weights-inception-random.pth"
    make_random_inception_weights(path, seed=0)
    return path


def config(setup: Setup, out: Path, **kw) -> SampleEvalConfig:
    base = dict(out=out, run_dir=setup.run, num_samples=N, num_steps=STEPS, batch_size=4, shard_size=5)
    return SampleEvalConfig(**{**base, **kw})


def cli_args(setup: Setup, out: Path, *extra) -> list:
    return ["sample-eval", "--run-dir", setup.run, "--out", out, "--num-samples", N, "--num-steps", STEPS,
            "--batch-size", 4, "--shard-size", 5, *extra]


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        return z["arr_0"], z["arr_1"]


def error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    return lines[0]


# ------------------------------------------------------------------------ 1. sampler parity through the stage
def test_to_uint8_truncates_like_the_reference():
    want = np.array([254, 0, 255, 191, 127, 0, 255], dtype=np.uint8)
    # 255 (x+1)/2 = 254.9 -> 254 (rounding would give 255); below -1 -> 0; above 1 -> 255; 191.25 -> 191
    x = torch.tensor([2 * 254.9 / 255 - 1, -1.5, 1.5, 0.5, 2 * 127.7 / 255 - 1, -1.0, 1.0], dtype=torch.float32)
    img = x.view(1, 1, 1, -1).expand(2, 3, 1, -1).contiguous()  # (N=2, C=3, H=1, W=7)
    out = images.to_uint8(img)
    assert out.dtype == torch.uint8 and out.shape == (2, 1, 7, 3)  # NHWC
    assert (out.numpy() == want[None, None, :, None]).all()
    # the stage's decoder (pixel codec: identity, scaling 1) quantises the same way
    dec = make_decoder("pixel", None, torch.device("cpu"))(img)
    assert dec.dtype == torch.uint8 and np.array_equal(dec.numpy(), out.numpy())


def reference_sample(model: torch.nn.Module, seed: int, i: int, cfg_scale: float, interval: tuple[float, float],
                     steps: int) -> tuple[torch.Tensor, int]:
    """Sample i written out from the REPA reference's `samplers.py` (SDE) with docs/numerics.md's
    per-sample generators (deviation 7), independently of models/samplers.py: its generator
    (SeedSequence([seed, i])) draws the 4x8x8 noise, then the label, then one noise per noisy step; grid
    linspace(1, 0.04, N) + [0]; drift (2 - t) v + x, guided as u + w (c - u) iff lo <= t <= hi; last step
    deterministic; float64 state, model in fp32."""
    s = int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0] >> np.uint64(1))
    g = torch.Generator().manual_seed(s)
    x = torch.randn((4, 8, 8), generator=g).double()[None]
    y = torch.randint(NUM_CLASSES, (), generator=g).view(1)
    ts = list(np.linspace(1.0, 0.04, steps)) + [0.0]
    for k in range(steps):
        t, dt = ts[k], ts[k + 1] - ts[k]
        tt = torch.full((1,), t, dtype=torch.float32)

        def drift(label):
            v = model.forward_velocity(x.float(), tt, label).double()
            return (2 - t) * v + x

        d = drift(y)
        if cfg_scale > 1 and interval[0] <= t <= interval[1]:
            u = drift(torch.full_like(y, NUM_CLASSES))
            d = u + cfg_scale * (d - u)
        x = x + d * dt
        if k < steps - 1:
            x = x + math.sqrt(2 * t * abs(dt)) * torch.randn((4, 8, 8), generator=g).double()[None]
    return x.float(), int(y)


def test_samples_match_an_independent_sampler_decode_and_quantise(setup, tmp_path):
    out = tmp_path / "out"
    sample_eval.run(config(setup, out, cfg_scale=1.8, guidance_interval="0,0.7"))
    arr, labels = load_npz(out / "samples.npz")
    assert arr.dtype == np.uint8 and arr.shape == (N, 32, 32, 3) and labels.dtype == np.int64

    model = build_sit("SiT-T/2", input_size=8, in_channels=4, num_classes=NUM_CLASSES, encoder_depth=1,
                      z_dims=[16], projector_dim=16)
    model.load_state_dict(setup.ema)
    model.eval()
    vae = load_codec("tiny")  # the cache's codec; decode divides by 0.18215 itself
    with torch.no_grad():
        pairs = [reference_sample(model, 0, i, 1.8, (0.0, 0.7), STEPS) for i in range(N)]
        decoded = vae.decode(torch.cat([z for z, _ in pairs])).numpy()  # (N, 3, 32, 32) in [-1, 1]
    expect = np.clip(255 * (decoded + 1) / 2, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)  # truncation
    assert labels.tolist() == [y for _, y in pairs]  # noise first, then the label, per sample
    diff = np.abs(arr.astype(int) - expect.astype(int))
    # float64 op order differs from the library's score form: at most a rare flip at an integer boundary
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999, (diff.max(), (diff == 0).mean())
    assert len(np.unique(arr)) > 50  # not a constant image


def test_a_killed_runs_temp_files_are_removed(setup, tmp_path):
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    debris = [out / ".samples.npz.k1ll3d.tmp", out / "shards" / ".000001.npz.k1ll3d.tmp"]
    for p in debris:
        p.write_bytes(b"partial")
    sample_eval.run(config(setup, out, num_steps=2))
    assert not any(p.exists() for p in debris) and (out / "samples.npz").is_file()


def test_guidance_gating_and_scale_one_through_the_stage(setup, tmp_path, monkeypatch):
    real = sampler_mod.sample
    calls: list[tuple[int, int, float, list[int]]] = []  # (batch B, rows given to the model, t, labels)

    def spy(model_fn, z, y, **kw):
        def counting(x, t, yy):
            calls.append((z.shape[0], x.shape[0], float(t[0]), yy.tolist()))
            return model_fn(x, t, yy)
        return real(counting, z, y, **kw)

    monkeypatch.setattr(sampler_mod, "sample", spy)
    lo, hi, steps = 0.3, 0.7, 8
    sample_eval.run(config(setup, tmp_path / "guided", num_samples=6, shard_size=6, num_steps=steps, cfg_scale=1.8,
                           guidance_interval=f"{lo},{hi}"))
    grid = list(np.linspace(1.0, 0.04, steps)) * 2  # t_cur of each model call, for the batches of 4 and 2
    np.testing.assert_allclose([t for _, _, t, _ in calls], grid, rtol=1e-6)  # the model sees t in fp32
    assert [b for b, _, _, _ in calls] == [4] * steps + [2] * steps
    guided = 0
    for (b, rows, _, labels), t in zip(calls, grid):
        if lo <= t <= hi:
            guided += 1
            assert rows == 2 * b and labels[b:] == [NUM_CLASSES] * b and NUM_CLASSES not in labels[:b]
        else:
            assert rows == b and NUM_CLASSES not in labels
    assert guided == sum(lo <= t <= hi for t in grid) == 6 and len(calls) == 16

    calls.clear()
    sample_eval.run(config(setup, tmp_path / "scale1", num_samples=6, shard_size=6, num_steps=steps, cfg_scale=1.0,
                           guidance_interval="0,1"))
    assert len(calls) == 2 * steps and all(rows == b for b, rows, _, _ in calls)  # never doubled


# ---------------------------------------------------- 2. same samples for any world size, batch size, shard size
def assert_same_samples(a: Path, b: Path) -> None:
    """The guarantee the README states: labels exact; pixels equal up to float summation order, i.e. within 1
    (the model's matrix products may add in another order for another batch size; uint8 conversion truncates)."""
    (xa, ya), (xb, yb) = load_npz(a), load_npz(b)
    assert np.array_equal(ya, yb)
    diff = np.abs(xa.astype(int) - xb.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())


def test_same_samples_for_two_ranks_batch_and_shard_sizes(setup, tmp_path):
    one = tmp_path / "one"
    sample_eval.run(config(setup, one))  # batch 4, shards of 5 (5, 5, 2)
    other = tmp_path / "b5s4"
    sample_eval.run(config(setup, other, batch_size=5, shard_size=4))  # batches 4+1 per shard of 4
    two = tmp_path / "two"
    p = subprocess.run(  # exactly as a user types it: no "--" before the subcommand
        [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "repa_pipe.cli",
         *map(str, cli_args(setup, two))],
        env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    assert "2 process(es)" in p.stderr
    # shards 0, 2 (5 + 2 samples) on rank 0, shard 1 on rank 1; only rank 0 reports progress
    assert "sample: 7/7" in p.stderr and "sample: 12/12" not in p.stderr, p.stderr

    assert_same_samples(one / "samples.npz", two / "samples.npz")
    assert_same_samples(one / "samples.npz", other / "samples.npz")
    for out in (one, two, other):  # the draws themselves are the same, bit for bit
        assert json.loads((out / "shards" / "sampling.json").read_text())["seed"] == 0
    arr, labels = load_npz(other / "samples.npz")
    assert len(set(labels.tolist())) > 3  # random labels, drawn per sample
    for k, (lo, hi) in enumerate([(0, 4), (4, 8), (8, 12)]):  # the b5s4 shards hold exactly their samples
        with np.load(other / "shards" / f"{k:06d}.npz") as z:
            assert np.array_equal(z["images"], arr[lo:hi]) and np.array_equal(z["labels"], labels[lo:hi])

    # a prefix: sample i depends on (seed, i) only, not on how many samples are drawn
    few = tmp_path / "few"
    sample_eval.run(config(setup, few, num_samples=3, batch_size=3, shard_size=3))
    arr3, labels3 = load_npz(few / "samples.npz")
    arr1, labels1 = load_npz(one / "samples.npz")
    assert np.array_equal(labels3, labels1[:3]) and np.abs(arr3.astype(int) - arr1[:3]).max() <= 1
    # another seed: other samples and labels
    seed1 = tmp_path / "seed1"
    sample_eval.run(config(setup, seed1, num_samples=3, batch_size=3, shard_size=3, seed=1))
    arr_s1, labels_s1 = load_npz(seed1 / "samples.npz")
    assert not np.array_equal(arr_s1, arr[:3])


def test_balanced_labels_are_i_mod_num_classes(setup, tmp_path):
    out = tmp_path / "bal"
    sample_eval.run(config(setup, out, labels="balanced", num_samples=N, num_steps=2, batch_size=5))
    _, labels = load_npz(out / "samples.npz")
    assert labels.tolist() == [i % NUM_CLASSES for i in range(N)]


# --------------------------------------------------------------------------------------- 3. kill and resume
# slow: a SIGKILLed subprocess; test_user_traps.py's test_6_sigterm_during_sample_eval_keeps_finished_shards_and_resumes
# covers a stopped sample-eval resuming from its finished shards
@pytest.mark.slow
def test_killed_run_resumes_to_identical_output(setup, tmp_path):
    steps = 40  # ~1 s a shard here: time to SIGKILL between the first and the last shard
    killed, full = tmp_path / "killed", tmp_path / "full"
    args = cli_args(setup, killed, "--num-steps", steps, "--batch-size", 2, "--shard-size", 2)
    proc = subprocess.Popen([str(VENV_BIN / "repa-pipe"), *map(str, args)], env=subprocess_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = killed / "shards" / "000000.npz"
    deadline = time.monotonic() + 240
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()  # SIGKILL (a no-op if it already exited: then the returncode check below fails)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    done = {p.name: p.stat().st_mtime_ns for p in (killed / "shards").glob("0*.npz")}
    assert "000000.npz" in done and len(done) < 6, done  # killed mid-run
    assert not (killed / "samples.npz").exists()

    cfg = config(setup, killed, num_steps=steps, batch_size=2, shard_size=2)
    sample_eval.run(cfg)  # resume
    sample_eval.run(dataclasses.replace(cfg, out=full))  # uninterrupted
    assert {p: (killed / "shards" / p).stat().st_mtime_ns for p in done} == done  # finished shards not redone
    assert sorted(p.name for p in (killed / "shards").iterdir()) == \
        sorted(p.name for p in (full / "shards").iterdir())  # 6 shards + sampling.json, no temp files left
    for name in ("samples.npz", "grid.png"):
        assert (killed / name).read_bytes() == (full / name).read_bytes(), name


def test_resume_refuses_other_settings_and_accepts_another_batch_size(setup, tmp_path):
    out = tmp_path / "out"
    small = dict(num_samples=4, num_steps=2, shard_size=2)
    sample_eval.run(config(setup, out, **small))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    sample_eval.run(config(setup, out, **{**small, "batch_size": 1}))  # the same samples: nothing redone
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before
    for change in (dict(num_steps=3), dict(seed=1), dict(cfg_scale=1.5), dict(shard_size=4), dict(labels="balanced"),
                   dict(num_samples=6), dict(guidance_interval="0,1")):
        with pytest.raises(ConfigError, match=f"other settings .*{next(iter(change))}"):
            sample_eval.run(config(setup, out, **{**small, **change}))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before
    for f in (out / "shards").glob("0*.npz"):  # killed before its first shard: new settings are fine
        f.unlink()
    sample_eval.run(config(setup, out, **{**small, "num_steps": 3}))
    assert json.loads((out / "shards" / "sampling.json").read_text())["num_steps"] == 3


# ------------------------------------------------------------------------------------------ 4. weight formats
def test_checkpoint_export_and_reference_files_give_identical_samples(setup, tmp_path):
    st = tmp_path / "ema.safetensors"
    export.run(ExportConfig(run=setup.run, out=st))
    bare, with_ema, online = tmp_path / "last.pt", tmp_path / "0400000.pt", tmp_path / "online.pt"
    torch.save(setup.ema, bare)  # the published last.pt: a bare EMA state dict
    # a reference training checkpoint: {model, ema, opt, args (an argparse.Namespace), steps}
    torch.save({"model": setup.model, "ema": setup.ema, "opt": {}, "steps": 10,
                "args": argparse.Namespace(model="SiT-T/2", encoder_depth=1)}, with_ema)
    torch.save(setup.model, online)  # the non-EMA weights, to show the EMA is what gets loaded

    small = ["--num-samples", 4, "--num-steps", 3, "--batch-size", 4]
    outs = {}
    ok(["sample-eval", "--run-dir", setup.run, "--out", tmp_path / "run", *small])
    outs["run"] = tmp_path / "run"
    ok(["sample-eval", "--run-dir", setup.run, "--ckpt", "10", "--out", tmp_path / "step", *small])
    outs["step"] = tmp_path / "step"
    for name, f in (("st", st), ("bare", bare), ("ema", with_ema), ("online", online)):
        extra = [] if name == "st" else ["--model", "SiT-T/2", "--vae", "tiny"]  # safetensors carry the config
        ok(["sample-eval", "--ckpt", f, "--out", tmp_path / name, *extra, *small])
        outs[name] = tmp_path / name
    ref = (outs["run"] / "samples.npz").read_bytes()
    for name in ("step", "st", "bare", "ema"):
        assert (outs[name] / "samples.npz").read_bytes() == ref, name
    assert not np.array_equal(load_npz(outs["online"] / "samples.npz")[0], load_npz(outs["run"] / "samples.npz")[0])
    kinds = {n: json.loads((outs[n] / "manifest.json").read_text())["weights_kind"] for n in outs}
    assert kinds == {"run": "checkpoint", "step": "checkpoint", "st": "safetensors", "bare": "reference",
                     "ema": "reference", "online": "reference"}


def test_wrong_model_and_missing_checkpoint_are_clear_errors(setup, tmp_path):
    bare = tmp_path / "last.pt"
    torch.save(setup.ema, bare)
    out = tmp_path / "out"
    line = error_line(invoke(["sample-eval", "--ckpt", bare, "--model", "SiT-B/2", "--vae", "tiny", "--out", out]))
    assert "width 64" in line and "SiT-B/2" in line and "width 768" in line
    line = error_line(invoke(["sample-eval", "--ckpt", bare, "--model", "SiT-T/4", "--vae", "tiny", "--out", out]))
    assert "patch 2" in line and "patch 4" in line
    line = error_line(invoke(["sample-eval", "--ckpt", bare, "--model", "SiT-X/2", "--vae", "tiny", "--out", out]))
    assert "--model must be one of" in line
    line = error_line(invoke(["sample-eval", "--ckpt", bare, "--vae", "tiny", "--out", out]))
    assert "pass --model" in line
    line = error_line(invoke(["sample-eval", "--run-dir", setup.run, "--model", "SiT-S/2", "--out", out]))
    assert "SiT-S/2" in line and "width 64" in line  # --model also checked against our checkpoints
    line = error_line(invoke(["sample-eval", "--ckpt", tmp_path / "missing.pt", "--out", out]))
    assert "missing.pt" in line and "no such file" in line
    line = error_line(invoke(["sample-eval", "--run-dir", setup.run, "--ckpt", "20", "--out", out]))
    assert "no checkpoint at that step" in line and "[10]" in line
    line = error_line(invoke(["sample-eval", "--run-dir", tmp_path / "empty-run", "--out", out]))
    assert "no checkpoints" in line
    assert not out.exists()  # nothing sampled


# ---------------------------------------------- 5, 6, 7. metrics, stored reference statistics, manifest
METRIC_KEYS = ("fid", "sfid", "inception_score", "precision", "recall")


# slow: three Inception passes (~17 s); test_fd_dinov2_reference_stats_and_metric_through_the_stage covers stored
# reference statistics through the stage, test_metrics.py the metrics themselves
@pytest.mark.slow
def test_metrics_reference_stats_stored_and_reused_and_eval_only(setup, inception, tmp_path, monkeypatch):
    # ADM's scipy sqrtm of 2048 x 2048 costs ~30 s a call on this box; the eigh form agrees to ~1e-6
    # (tests/test_metrics.py) and keeps the two real evaluations here fast.
    monkeypatch.setattr(evaluation, "evaluate", functools.partial(evaluate, fd_method="eigh"))
    out = tmp_path / "out"
    stats_dir = setup.cache / "stats"
    assert not stats_dir.exists()
    sample_eval.run(config(setup, out, inception_weights=str(inception)))
    metrics = json.loads((out / "metrics.json").read_text())
    for k in METRIC_KEYS:
        assert isinstance(metrics[k], float) and math.isfinite(metrics[k]), k
    assert metrics["fid"] > 0 and metrics["inception_score"] >= 1 and 0 <= metrics["precision"] <= 1
    assert metrics["num_samples"] == N and metrics["num_reference_pr"] == NUM_CLASSES
    assert (out / "grid.png").is_file()

    # 6. the reference statistics of the cache's 10 source images, stored in CACHE/stats
    (stored,) = stats_dir.glob("*.npz")
    ref = ReferenceStats.load(stored)
    assert ref.meta["num_images"] == NUM_CLASSES and ref.pool.shape == (NUM_CLASSES, 2048)
    mtime = stored.stat().st_mtime_ns

    # second run: reused as stored, never recomputed
    def recompute(*a, **k):
        raise AssertionError("reference statistics recomputed")

    seen = []
    with monkeypatch.context() as mp:
        mp.setattr(ReferenceStats, "from_images", classmethod(recompute))
        mp.setattr(evaluation, "evaluate", lambda imgs, ref, inc, *a, **k: seen.append(ref) or {"fid": 1.0})
        sample_eval.run(config(setup, out, inception_weights=str(inception)))
    assert stored.stat().st_mtime_ns == mtime and seen[0].meta["source"] == str(stored)
    assert json.loads((out / "metrics.json").read_text())["fid"] == 1.0

    # 5. --eval-only with the stored statistics: the same numbers as the sampling run
    ev = tmp_path / "eval"
    ok(["sample-eval", "--eval-only", out / "samples.npz", "--out", ev, "--inception-weights", inception,
        "--ref-stats", stored])
    again = json.loads((ev / "metrics.json").read_text())
    for k in METRIC_KEYS:
        assert again[k] == pytest.approx(metrics[k], rel=1e-9, abs=1e-12), k
    assert not (ev / "manifest.json").exists() and not (ev / "shards").exists()


def test_without_inception_weights_metrics_are_skipped_in_one_line(setup, tmp_path):
    out = tmp_path / "out"
    r = ok(cli_args(setup, out, "--num-steps", 2))
    lines = [ln for ln in r.output.splitlines() if "skipped" in ln]
    assert len(lines) == 1 and "metrics skipped" in lines[0] and "--inception-weights" in lines[0], r.output
    assert (out / "grid.png").is_file() and (out / "samples.npz").is_file() and not (out / "metrics.json").exists()
    # 7. the manifest
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["num_steps"] == 2 and man["config"]["cfg_scale"] == 1.8 and man["config"]["seed"] == 0
    assert man["config"]["guidance_interval"] == "0,0.7" and man["config"]["mode"] == "sde"
    assert Path(man["weights"]).resolve() == setup.ckpt.resolve() and man["weights_kind"] == "checkpoint"
    assert man["step"] == 10 and man["num_samples"] == N and man["image_size"] == [32, 32]
    assert "truncat" in man["uint8"] and "clamp(255x" in man["uint8"]
    assert man["decoder"] == ["tiny", None] and man["metrics"] is None and len(man["weights_state_sha256"]) == 16
    # --eval-only has nothing to do without Inception: an error naming the option, not a silent exit 0
    line = error_line(invoke(["sample-eval", "--eval-only", out / "samples.npz", "--out", tmp_path / "ev"]))
    assert "--inception-weights" in line


def test_metrics_inputs_are_checked_before_any_sample_is_drawn(setup, inception, tmp_path, monkeypatch):
    """A missing Inception file, --ref-stats file or source-image folder fails in seconds, before sampling."""
    def no_sampling(*a, **k):
        raise AssertionError("sampling started")

    monkeypatch.setattr(sampling_session, "run_sampling", no_sampling)
    cases = [(["--inception-weights", tmp_path / "nope.pth"], "nope.pth does not exist"),
             (["--inception-weights", inception, "--ref-stats", tmp_path / "ref.npz"],
              f"--ref-stats {tmp_path / 'ref.npz'}: no such file")]
    for extra, words in cases:
        line = error_line(invoke(cli_args(setup, tmp_path / "o", *extra)))
        assert words in line, (extra, line)
        assert not (tmp_path / "o").exists()
    # the cache's source images moved away and no statistics are stored: say so now, name --ref-stats
    gone = tmp_path / "gone"
    monkeypatch.setattr(sampling_session, "reference_source",
                        lambda cfg, loaded: evaluation.ReferenceSource(tmp_path / "stats", str(gone), 32))
    line = error_line(invoke(cli_args(setup, tmp_path / "o", "--inception-weights", inception)))
    assert f"source images {gone} are gone" in line and "--ref-stats" in line, line
    assert not (tmp_path / "o").exists()


BAD_NPZ = {
    "float": (np.random.default_rng(0).random((4, 8, 8, 3)).astype(np.float32), "float32 is rejected"),
    "range": (np.full((4, 8, 8, 3), 300, dtype=np.int16), "outside 0..255"),
    "negative": (np.full((4, 8, 8, 3), -1, dtype=np.int64), "outside 0..255"),
    "nchw": (np.zeros((4, 3, 8, 8), dtype=np.uint8), "NCHW"),
    "rank": (np.zeros((4, 8, 8), dtype=np.uint8), "rank 3"),
}


@pytest.mark.parametrize("inception_given", [True, False], ids=["with-inception", "without"])
def test_bad_sample_npz_rejected_before_any_model_loads(setup, tmp_path, monkeypatch, inception_given):
    loaded = []
    monkeypatch.setattr(evaluation, "load_inception", lambda *a, **k: loaded.append("inception"))
    monkeypatch.setattr(sampling_session, "load_model", lambda *a, **k: loaded.append("sit"))
    weights = ["--inception-weights", tmp_path / "weights.pth"] if inception_given else []
    for name, (arr, pattern) in BAD_NPZ.items():
        np.savez(tmp_path / f"{name}.npz", arr_0=arr)
        line = error_line(invoke(["sample-eval", "--eval-only", tmp_path / f"{name}.npz", "--out", tmp_path / "o",
                                  *weights]))
        assert pattern in line and f"{name}.npz" in line, (name, line)
    assert loaded == []
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_fd_dinov2_reference_stats_and_metric_through_the_stage(setup, inception, tmp_path, monkeypatch):
    # The real DINOv2-L (300M parameters) is not built here: the stage's DINOv2 forward is swapped for the tiny
    # encoder's CLS forward, which takes the same preprocessed 224 px input. What is tested is the wiring:
    # reference statistics from the cache gain the DINOv2 part, and FD_DINOv2 is reported.
    from repa_pipe.models.feature_encoders import load_encoder
    enc = load_encoder("tiny", grid=16)
    monkeypatch.setattr(evaluation, "_dinov2_forward", lambda cfg, device: enc.cls_from_input)
    monkeypatch.setattr(evaluation, "evaluate", functools.partial(evaluate, fd_method="eigh"))
    out = tmp_path / "out"
    sample_eval.run(config(setup, out, inception_weights=str(inception), fd_dinov2=True, dinov2_weights="dino.pth"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["fd_dinov2"]) and metrics["fd_dinov2"] > 0
    (stored,) = (setup.cache / "stats").glob("*-dinov2.npz")
    ref = ReferenceStats.load(stored)
    assert ref.mu_dinov2.shape == (enc.embed_dim,) and ref.meta["num_images"] == NUM_CLASSES
