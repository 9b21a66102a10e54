"""`repa-pipe train` on a tiny SiT from synthetic caches: learning, exact resume, DDP == one process, manifest
checks, no encoder/VAE, non-finite stop, checkpoints/export, metrics/previews, and the loop's reference numerics.

CPU only, offline. Models are SiT-T/2 (hidden 64) with --projector-dim 64: the paper's 2048-wide projector
would cost ~400 GFLOP a step here.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors import safe_open
from typer.testing import CliRunner

from repa_pipe.cache.reader import IndexSampler
from repa_pipe.cli import app
from repa_pipe.models import transport
from repa_pipe.models.sit import build_sit
from repa_pipe.cache.manifest import TrainingView, read_manifest, training_view
from repa_pipe.cache.reader import check_labels
from repa_pipe.pipeline import checkpoint
from repa_pipe.pipeline.errors import CheckpointError
from repa_pipe.stages import train
from repa_pipe.training import state as st
from repa_pipe.training import step as stp
from repa_pipe.training import stream as train_data
from repa_pipe.training.config import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import SD_SCALE, CacheOpts, Features, Latents, assert_states_equal, make_cache  # noqa: E402

VENV_BIN = Path(sys.executable).parent
TINY = dict(model="SiT-T/2", encoder=("dinov2-b",), encoder_depth=2, projector_dim=64, global_batch_size=8,
            steps=4, lr=1e-3, log_every=1, ckpt_every=1000, sample_every=0, precision="fp32", loader_threads=1)
TINY_ARGS = ["--model", "SiT-T/2", "--encoder-depth", "2", "--projector-dim", "64", "--global-batch-size", "8",
             "--lr", "1e-3", "--log-every", "1", "--sample-every", "0", "--precision", "fp32", "--loader-threads", "1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """One torch thread for the whole module (conftest.py), in force before its module-scoped fixtures run."""
    yield


def tiny(cache: Path, run: Path, **kw) -> TrainConfig:
    return TrainConfig(cache=cache, run_dir=run, **{**TINY, **kw})


def view_of(cache: Path, encoders=("dinov2-b",), latents=None) -> TrainingView:
    m = read_manifest(cache)
    return training_view(m, check_labels(cache, m), latents, tuple(encoders))


def fwd_bwd(cfg: TrainConfig, view: TrainingView, state, batch, micro: int):
    return stp.forward_backward(cfg, view, state, stp.Runtime(state.model, None, micro, torch.device("cpu")), batch)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def ckpt(run: Path, step: int) -> dict:
    return torch.load(checkpoint.ckpt_path(run, step), weights_only=True)


def cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def error_line(result) -> str:
    """The CLI's error: exit code 1 and exactly one `error:` line, the last one on stderr (progress lines of a
    resumed run may come before it)."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """8 samples, pixel latents (3x8x8), dinov2-b features on a 4x4 grid (= SiT-T/2's tokens)."""
    return make_cache(tmp_path_factory.mktemp("cache") / "c")


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory) -> Path:
    """150 steps on 8 samples, one class each, lr 3e-3: shared by the learning, metrics and export tests."""
    root = tmp_path_factory.mktemp("overfit")
    c = make_cache(root / "c", CacheOpts(num_classes=8))
    run = root / "run"
    train.run(tiny(c, run, steps=150, lr=3e-3, log_every=10, sample_every=75, ckpt_every=50))
    return run


# ------------------------------------------------------------------------------------------------ 1. learning
def test_tiny_model_overfits_8_samples(overfit_run):
    recs = metrics(overfit_run)
    first, last = recs[0], recs[-1]
    assert last["denoise"] < 0.5 * first["denoise"], (first, last)
    assert last["loss"] < 0.5 * first["loss"]
    assert last["align"] < first["align"] - 0.1  # the projector learns the (random) target tokens too


# ------------------------------------------------------------------------------------------------ 2. resume
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_exact(cache, tmp_path, precision):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train.run(tiny(cache, whole, steps=6, ckpt_every=3, precision=precision))
    train.run(tiny(cache, split, steps=3, ckpt_every=3, precision=precision))
    assert checkpoint.latest(split) == checkpoint.ckpt_path(split, 3)
    train.run(tiny(cache, split, steps=6, ckpt_every=3, precision=precision))
    assert_states_equal(ckpt(whole, 6), ckpt(split, 6))
    assert_states_equal(ckpt(whole, 3), ckpt(split, 3))
    # each step logged once, with the same losses
    assert [r["step"] for r in metrics(split)] == list(range(1, 7))
    assert [r["loss"] for r in metrics(split)] == [r["loss"] for r in metrics(whole)]


def test_resume_takes_the_new_lr_and_drops_metrics_after_the_checkpoint(cache, tmp_path):
    run = tmp_path / "run"
    train.run(tiny(cache, run, steps=2, ckpt_every=2))
    with (run / "metrics.jsonl").open("a") as f:  # a run that died after logging step 3, before a checkpoint
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    train.run(tiny(cache, run, steps=4, ckpt_every=2, lr=5e-4))
    assert [g["lr"] for g in ckpt(run, 4)["opt"]["param_groups"]] == [5e-4]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4] and metrics(run)[2]["loss"] != 9.0


def test_already_trained_is_a_no_op(cache, tmp_path):
    run = tmp_path / "run"
    train.run(tiny(cache, run, steps=1))
    before = checkpoint.ckpt_path(run, 1).stat().st_mtime_ns
    train.run(tiny(cache, run, steps=1))
    assert checkpoint.ckpt_path(run, 1).stat().st_mtime_ns == before


# ------------------------------------------------------------------------------------------------ 3. DDP
def test_two_gloo_ranks_match_one_process_and_accumulation(cache, tmp_path):
    steps = 4
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    ddp_run = tmp_path / "ddp"
    proc = subprocess.run(
        # exactly as a user types it: no "--" before the subcommand
        [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "repa_pipe.cli", "train",
         "--cache", str(cache), "--run-dir", str(ddp_run), "--encoder", "dinov2-b", "--steps", str(steps), *TINY_ARGS],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, accum = tmp_path / "one", tmp_path / "accum"
    train.run(tiny(cache, one, steps=steps))
    train.run(tiny(cache, accum, steps=steps, micro_batch_size=4))  # 2 micro-batches of 4, one optimizer step
    ref = metrics(one)
    for other in (ddp_run, accum):
        recs = metrics(other)
        assert [r["step"] for r in recs] == list(range(1, steps + 1))
        for key in ("loss", "denoise", "align", "grad_norm"):
            np.testing.assert_allclose([r[key] for r in recs], [r[key] for r in ref], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{other.name} {key}")
        a, b = ckpt(other, steps), ckpt(one, steps)
        for part in ("model", "ema"):
            for k in b[part]:
                torch.testing.assert_close(a[part][k], b[part][k], atol=1e-5, rtol=1e-5, msg=f"{part} {k}")


# ------------------------------------------------------------------------------------------------ 4. manifest checks
@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory) -> Path:
    """Two latents (pixel 3x8x8, sd-vae-ft-ema 4x8x8), two complete encoders, one unfinished (mae-l)."""
    return make_cache(tmp_path_factory.mktemp("mixed") / "c", CacheOpts(
        shard_size=4,
        latents=(Latents(), Latents("sd-vae-ft-ema", 4, 8, SD_SCALE, 0.5)),
        features=(Features("dinov2-b"), Features("clip-l", 4, 24), Features("mae-l", 4, 16)),
        unfinished=("features/mae-l",)))


@pytest.mark.parametrize("args, env, expect", [
    (["--latents", "pixel", "--model", "SiT-T/4"], None,
     "features/dinov2-b has a 4x4 token grid (16 tokens) but SiT-T/4 on 8x8 latents has 2x2 (4)"),
    (["--latents", "pixel", "--encoder", "dinov2-l"], None, "no array features/dinov2-l in the cache"),
    (["--latents", "tiny"], None, "no array latents/tiny in the cache"),
    (["--latents", "pixel", "--encoder", "mae-l"], None, "features/mae-l is not complete (1/2 shards done)"),
    ([], None, "several latents (latents/pixel, latents/sd-vae-ft-ema); pass --latents"),
    (["--latents", "pixel", "--micro-batch-size", "3"], None, "not divisible by --micro-batch-size 3"),
    (["--latents", "pixel"], {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"},
     "--global-batch-size 8 is not divisible by 3 processes"),
    (["--latents", "pixel", "--global-batch-size", "16"], None, "8 usable rows (of 8) are fewer than one "
     "--global-batch-size 16"),
], ids=["token-grid", "encoder-missing", "latents-missing", "incomplete", "several-latents", "micro-batch",
        "world-size", "batch-too-big"])
def test_manifest_mismatch_is_one_clear_error(mixed_cache, tmp_path, args, env, expect):
    base = ["train", "--cache", mixed_cache, "--run-dir", tmp_path / "run", "--steps", "1", *TINY_ARGS]
    if "--encoder" not in args:
        base += ["--encoder", "dinov2-b"]
    line = error_line(cli(*base, *args, env=env))
    assert expect in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cache_without_latents_is_one_clear_error(tmp_path):
    c = make_cache(tmp_path / "c", CacheOpts(latents=()))
    line = error_line(cli("train", "--cache", c, "--run-dir", tmp_path / "run", "--encoder", "dinov2-b", *TINY_ARGS))
    assert "no latents; run encode-latents first" in line


@pytest.mark.parametrize("change, expect", [
    (["--model", "SiT-S/2"], "--model 'SiT-T/2' (now 'SiT-S/2')"),
    (["--encoder", "clip-l"], "--encoder ['dinov2-b'] (now ['clip-l'])"),
    (["--latents", "sd-vae-ft-ema"], "--latents 'pixel' (now 'sd-vae-ft-ema')"),
], ids=["model", "encoder", "latents"])
def test_resume_with_other_settings_is_refused(mixed_cache, tmp_path, change, expect):
    run = tmp_path / "run"
    first = ["train", "--cache", mixed_cache, "--run-dir", run, "--steps", "1", "--latents", "pixel", *TINY_ARGS]
    assert cli(*first, "--encoder", "dinov2-b").exit_code == 0
    again = [*first, "--steps", "2", *change] + ([] if "--encoder" in change else ["--encoder", "dinov2-b"])
    line = error_line(cli(*again))
    assert "was trained with other settings" in line and expect in line
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [1]


# ------------------------------------------------------------------------------------------------ 5. cache only
def test_trains_with_encoders_and_vae_encoder_impossible(cache, tmp_path, monkeypatch):
    import diffusers
    import diffusers.models.autoencoders.vae as vae_mod
    import timm
    import timm.models.vision_transformer as vit

    from repa_pipe.models import feature_encoders, latent_codecs

    def forbidden(*a, **k):
        raise AssertionError("training built an encoder or a VAE")

    for owner, name in [(timm, "create_model"), (vit.VisionTransformer, "__init__"),
                        (diffusers.AutoencoderKL, "__init__"), (vae_mod.Encoder, "__init__"),
                        (torch.hub, "load"), (feature_encoders, "load_encoder"), (latent_codecs, "build_tiny_vae")]:
        monkeypatch.setattr(owner, name, forbidden)
    run = tmp_path / "run"
    train.run(tiny(cache, run, steps=2, sample_every=2))
    assert (run / "samples" / "0000002.png").is_file()  # the preview (sampler + pixel decode) ran too
    assert checkpoint.latest(run) == checkpoint.ckpt_path(run, 2)


def test_unavailable_preview_decoder_does_not_stop_training(cache, tmp_path, monkeypatch, capsys):
    """E.g. SD-VAE latents on a machine without the VAE weights: previews are skipped with one warning."""
    from repa_pipe.pipeline.errors import MissingWeightsError

    def missing(*a, **k):
        raise MissingWeightsError("codec sd-vae-ft-ema: weights not here; pass --vae-weights DIR")

    monkeypatch.setattr(train, "make_decoder", missing)
    run = tmp_path / "run"
    train.run(tiny(cache, run, steps=4, sample_every=2))
    assert checkpoint.latest(run) == checkpoint.ckpt_path(run, 4)
    assert not (run / "samples").exists()
    assert capsys.readouterr().err.count("previews disabled") == 1


# ------------------------------------------------------------------------------------------------ 6. non-finite
@pytest.mark.parametrize("what", ["loss", "grad"])
def test_non_finite_stops_naming_the_step_and_keeps_the_last_checkpoint(cache, tmp_path, monkeypatch, what):
    run = tmp_path / "run"
    train.run(tiny(cache, run, steps=4, ckpt_every=4))
    good = ckpt(run, 4)
    calls = {"n": 4}  # resumed at step 4: call i is step 4 + i

    if what == "loss":
        real = transport.repa_loss

        def poisoned(*a, **k):
            out = real(*a, **k)
            calls["n"] += 1
            return {**out, "loss": out["loss"] * float("nan")} if calls["n"] >= 7 else out

        monkeypatch.setattr(transport, "repa_loss", poisoned)
    else:  # a finite loss with a NaN gradient: the weights are poisoned even though the loss is not
        real = torch.nn.utils.clip_grad_norm_

        def poisoned(params, max_norm, *a, **k):
            norm = real(params, max_norm, *a, **k)
            calls["n"] += 1
            if calls["n"] >= 7:
                for p in params:
                    p.grad.fill_(float("nan"))
                return norm * float("nan")
            return norm

        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    # log/checkpoint every 4: the NaN at step 7 is caught at the step-8 boundary, and step 7 is named
    line = error_line(cli("train", "--cache", cache, "--run-dir", run, "--encoder", "dinov2-b", "--steps", "12",
                          *TINY_ARGS, "--log-every", "4", "--ckpt-every", "4"))
    assert "at step 7" in line and str(checkpoint.ckpt_path(run, 4)) in line
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [4]
    kept = checkpoint.load(checkpoint.ckpt_path(run, 4))
    assert kept["step"] == 4 and all(torch.isfinite(v).all() for v in kept["model"].values())
    assert_states_equal(kept, good)
    assert all(np.isfinite(r["loss"]) for r in metrics(run))


def test_nan_moments_stop_at_step_1(tmp_path):
    c = make_cache(tmp_path / "c", CacheOpts(nan_latents=True))
    line = error_line(cli("train", "--cache", c, "--run-dir", tmp_path / "run", "--encoder", "dinov2-b",
                          "--steps", "3", *TINY_ARGS))
    assert "non-finite loss at step 1: the cache holds NaN/Inf in rows it fed that step" in line
    assert "latents/pixel row" in line and "cache verify" in line and "Last good checkpoint: none" in line
    assert checkpoint.list_checkpoints(tmp_path / "run") == []


# ------------------------------------------------------------------------------------------------ 7. checkpoints
def test_checkpoint_contents(overfit_run):
    assert [s for s, _ in checkpoint.list_checkpoints(overfit_run)] == [50, 100, 150]
    assert all(p.name.endswith(".pt") and not p.name.startswith(".")
               for p in (overfit_run / "checkpoints").iterdir())  # no temp files left behind
    ck = torch.load(checkpoint.ckpt_path(overfit_run, 150), weights_only=True)
    assert {"format", "model", "ema", "opt", "scaler", "step", "rng", "sampler", "config", "resolved", "cache_spec",
            "cache_identity"} <= ck.keys()
    assert ck["format"] == "repa-pipe-train/2"
    assert ck["step"] == 150 and ck["sampler"] == {"seed": 0, "step": 150}
    assert isinstance(ck["rng"]["torch"], torch.Tensor) and ck["rng"]["torch"].dtype == torch.uint8
    cfg = ck["config"]  # as typed: --latents not given; the cache's only latents array, resolved apart
    assert cfg["latents"] is None and ck["resolved"]["latents"] == {"value": "pixel",
                                                                      "why": "the cache's only latents array"}
    assert cfg["encoder"] == ["dinov2-b"] and cfg["model"] == "SiT-T/2" and cfg["encoder_depth"] == 2
    assert "encoder_depth" not in ck["resolved"]  # typed
    assert cfg["steps"] == 150 and cfg["projector_dim"] == 64
    assert ck["cache_spec"]["feature_dims"] == [32] and ck["cache_spec"]["latent_channels"] == 3
    assert ck["opt"]["state"] and "pos_embed" in ck["ema"]


def test_checkpoint_write_is_atomic(cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real, calls = torch.save, {"n": 0}

    def dies_halfway(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-2 checkpoint: some bytes, then the process "dies"
            f.write(b"PK\x03\x04 partial")
            raise OSError("disk full")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(CheckpointError, match="cannot write the checkpoint.*disk full"):
        train.run(tiny(cache, run, steps=2, ckpt_every=1))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000001.pt"]
    assert checkpoint.load(checkpoint.ckpt_path(run, 1))["step"] == 1


def test_export_writes_ema_weights_and_config(overfit_run, tmp_path):
    out = tmp_path / "ema.safetensors"
    result = cli("export", overfit_run, out)
    assert result.exit_code == 0, result.output
    ck = ckpt(overfit_run, 150)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert tensors.keys() == ck["ema"].keys()
    assert all(torch.equal(tensors[k], ck["ema"][k]) for k in tensors)
    assert any(not torch.equal(tensors[k], ck["model"][k]) for k in tensors)  # the EMA, not the online model
    assert meta["step"] == "150" and json.loads(meta["config"]) == ck["config"]
    # the metadata alone rebuilds the architecture, and the weights load strictly
    cfg, spec = json.loads(meta["config"]), json.loads(meta["cache_spec"])
    model = build_sit(cfg["model"], input_size=spec["latent_size"], in_channels=spec["latent_channels"],
                      num_classes=spec["num_classes"], encoder_depth=cfg["encoder_depth"],
                      z_dims=spec["feature_dims"], projector_dim=cfg["projector_dim"])
    model.load_state_dict(tensors, strict=True)
    assert "no checkpoints" in error_line(cli("export", tmp_path / "nowhere", tmp_path / "x.safetensors"))


# ------------------------------------------------------------------------------------------------ 8. watching
def test_metrics_previews_and_loss_curve(overfit_run):
    recs = metrics(overfit_run)
    assert [r["step"] for r in recs] == list(range(10, 151, 10))
    keys = {"step", "loss", "denoise", "align", "grad_norm", "lr", "images_per_s", "step_time_s", "data_wait_frac"}
    for r in recs:
        assert keys <= r.keys() and all(np.isfinite(r[k]) for k in keys)
        assert r["lr"] == 3e-3 and 0 <= r["data_wait_frac"] <= 1 and r["images_per_s"] > 0
    assert sorted(p.name for p in (overfit_run / "samples").iterdir()) == ["0000075.png", "0000150.png"]
    for png in [*(overfit_run / "samples").iterdir(), overfit_run / "loss.png"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ 9. numerics
def test_ema_update_is_decay_ema_plus_one_minus_decay_param():
    torch.manual_seed(0)
    kw = dict(input_size=8, in_channels=3, num_classes=4, encoder_depth=2, z_dims=[8], projector_dim=16)
    model, ema = build_sit("SiT-T/2", **kw), build_sit("SiT-T/2", **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # pos_embed too: it is frozen for the optimizer, not for the EMA
    before = {k: v.clone() for k, v in ema.named_parameters()}
    stp.update_ema(ema, model, 0.75)
    names = [k for k, _ in model.named_parameters()]
    assert "pos_embed" in names
    for (k, e), (_, m) in zip(ema.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(e, 0.75 * before[k] + 0.25 * m, atol=1e-6, rtol=1e-6, msg=k)


def test_ema_after_one_training_step(cache, tmp_path):
    cfg = tiny(cache, tmp_path / "run", steps=1, ema_decay=0.5)
    train.run(cfg)
    cfg = dataclasses.replace(cfg, latents="pixel")
    init = st.new_state(cfg, view_of(cache), torch.device("cpu")).model.state_dict()  # seeded: the run's start
    ck = ckpt(tmp_path / "run", 1)
    for k, e in ck["ema"].items():
        torch.testing.assert_close(e, 0.5 * init[k] + 0.5 * ck["model"][k], atol=1e-7, rtol=1e-6, msg=k)


def test_optimizer_and_loop_defaults_are_the_reference(cache):
    cfg = TrainConfig(cache=cache, run_dir=Path("unused"), model="SiT-T/2", encoder_depth=2, projector_dim=16)
    assert (cfg.lr, cfg.grad_clip, cfg.ema_decay, cfg.label_dropout, cfg.proj_coeff) == (1e-4, 1.0, 0.9999, 0.1, 0.5)
    assert (cfg.path, cfg.weighting, cfg.align_loss) == ("linear", "uniform", "cosine")
    state = st.new_state(cfg, view_of(cache), torch.device("cpu"))
    assert type(state.opt) is torch.optim.AdamW and len(state.opt.param_groups) == 1
    g = state.opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-4, (0.9, 0.999), 1e-8, 0.0)
    trainable = {id(p) for p in state.model.parameters() if p.requires_grad}
    assert {id(p) for p in g["params"]} == trainable and id(state.model.pos_embed) not in trainable
    assert not state.scaler.is_enabled()  # bf16 default: no grad scaler
    assert all(torch.equal(a, b) for a, b in zip(state.model.state_dict().values(), state.ema.state_dict().values()))


def _one_batch(cache: Path, cfg: TrainConfig):
    spec = view_of(cache, cfg.encoder, cfg.latents)
    state = st.new_state(cfg, spec, torch.device("cpu"))
    stream = train_data.BatchStream(cache, spec, cfg.global_batch_size, cfg.seed, 0, 1, cfg.label_dropout, 0, 1,
                                    threads=1)
    try:
        batch = next(stream)
    finally:
        stream.close()
    return spec, state, batch


@pytest.mark.parametrize("clip", [1.0, "quarter"])
def test_grad_clip_and_pre_clip_norm(cache, monkeypatch, clip):
    cfg = tiny(cache, Path("unused"))
    spec, state, batch = _one_batch(cache, cfg)
    fwd_bwd(cfg, spec, state, batch, 8)
    params = [p for p in state.model.parameters() if p.requires_grad]
    pre = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
    clip = pre / 4 if clip == "quarter" else clip
    seen = {}
    real_step = state.opt.step

    def step(*a, **k):
        seen["norm"] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
        return real_step(*a, **k)

    monkeypatch.setattr(state.opt, "step", step)
    logged = stp.optimizer_step(dataclasses.replace(cfg, grad_clip=clip), state)
    assert logged.item() == pytest.approx(pre, rel=1e-6)  # the logged norm is the pre-clip one
    assert seen["norm"] == pytest.approx(min(pre, clip), rel=1e-4)  # AdamW saw the clipped gradient


@pytest.fixture(scope="module")
def sd_cache(tmp_path_factory) -> Path:
    """4x8x8 latents with std 0.5 and the SD scaling factor: the posterior draw is visible."""
    return make_cache(tmp_path_factory.mktemp("sd") / "c", CacheOpts(
        n=16, latents=(Latents("sd-vae-ft-ema", 4, 8, SD_SCALE, 0.5),)))


@pytest.mark.parametrize("micro", [8, 4])
def test_latent_draw_time_noise_and_dropped_labels(sd_cache, monkeypatch, micro):
    cfg = tiny(sd_cache, Path("unused"), label_dropout=0.5, seed=3)
    spec, state, batch = _one_batch(sd_cache, cfg)
    seen = []
    real = transport.repa_loss

    def spy(model, x0, y, feats, noise, t, *a, **k):
        seen.append((x0, y, noise, t, feats[0]))
        return real(model, x0, y, feats, noise, t, *a, **k)

    monkeypatch.setattr(transport, "repa_loss", spy)
    fwd_bwd(cfg, spec, state, batch, micro)
    assert len(seen) == 8 // micro
    x0, y, noise, t, feats = (torch.cat(parts) for parts in zip(*seen))
    # independent recomputation from the stored arrays, the row order and the (seed, step) draws
    rows = IndexSampler(np.arange(16), 8, seed=3).global_batch_at(0)
    root = zarr.open_group(str(sd_cache / "cache.zarr"), mode="r")
    moments = torch.from_numpy(root["latents/sd-vae-ft-ema"][:][rows])
    labels = torch.from_numpy(np.load(sd_cache / "index" / "labels.npy")[rows])
    draws = train_data.draw_step(3, 0, 8, (4, 8, 8), 0.5)
    mean, std = moments[:, :4], moments[:, 4:]
    assert torch.all(std == 0.5)
    torch.testing.assert_close(x0, (mean + std * draws["eps"]) * SD_SCALE, atol=0, rtol=0)
    assert torch.equal(noise, draws["noise"]) and torch.equal(t, draws["t_uniform"])
    assert torch.equal(y, torch.where(draws["drop"], torch.full_like(labels, spec.num_classes), labels))
    assert 0 < int(draws["drop"].sum()) < 8  # both kinds of rows occur at p = 0.5 (seed 3, step 0)
    assert torch.equal(feats, torch.from_numpy(root["features/dinov2-b"][:][rows]))


def test_label_dropout_rate_and_time_distribution():
    drops, ts = [], []
    for step in range(8):
        d = train_data.draw_step(0, step, 4096, (1, 1, 1), 0.1)
        drops.append(d["drop"].float())
        ts.append(d["t_uniform"])
    frac, t = torch.cat(drops).mean().item(), torch.cat(ts)
    assert 0.09 < frac < 0.11  # 32768 draws: sd 0.0017
    assert 0.0 <= t.min().item() and t.max().item() < 1.0 and abs(t.mean().item() - 0.5) < 0.01
    # the draws belong to (seed, step, position), not to a process: same again, different at another step
    assert torch.equal(train_data.draw_step(0, 5, 4096, (1, 1, 1), 0.1)["drop"].float(), drops[5])
    assert not torch.equal(drops[4], drops[5])


def test_draws_and_rows_of_a_global_batch_position_do_not_depend_on_world_size(sd_cache):
    spec = view_of(sd_cache)

    def batches(rank: int, world: int) -> list[train_data.Batch]:
        s = train_data.BatchStream(sd_cache, spec, 8, 1, rank, world, 0.1, 0, 3, threads=1)
        try:
            return [next(s) for _ in range(3)]
        finally:
            s.close()

    one = batches(0, 1)
    r0, r1 = batches(0, 2), batches(1, 2)
    for b, x, y in zip(one, r0, r1):
        assert torch.equal(b.labels, torch.cat([x.labels, y.labels]))
        assert torch.equal(b.moments, torch.cat([x.moments, y.moments]))
        for k in b.draws:
            assert torch.equal(b.draws[k], torch.cat([x.draws[k], y.draws[k]])), k


def test_batch_stream_shortens_the_gil_switch_interval_and_restores_it(sd_cache):
    import sys
    spec = view_of(sd_cache)
    before = sys.getswitchinterval()
    s = train_data.BatchStream(sd_cache, spec, 8, 1, 0, 1, 0.1, 0, 2, threads=1)
    try:
        assert sys.getswitchinterval() <= 5e-4
        next(s)
    finally:
        s.close()
    assert sys.getswitchinterval() == before


def test_batch_stream_rows_are_right_after_its_buffer_ring_wraps(sd_cache):
    """The stream reuses a ring of buffers: every batch, consumed in order, holds exactly its rows."""
    from repa_pipe.cache.reader import CacheReader

    spec = view_of(sd_cache)
    s = train_data.BatchStream(sd_cache, spec, 8, 1, 0, 1, 0.1, 0, 14, prefetch=2, threads=1)
    reader = CacheReader(sd_cache, [spec.latents, *spec.features], threads=1)
    try:
        assert len(s._ring) == 4  # prefetch + 2: wraps 3 times in 14 steps
        for step in range(14):
            b = next(s)
            want = reader.gather(s.sampler.batch_at(step))
            assert b.step == step
            np.testing.assert_array_equal(b.moments.numpy(), want[spec.latents])
            np.testing.assert_array_equal(b.features[0].numpy(), want[spec.features[0]])
    finally:
        s.close()
        reader.close()
