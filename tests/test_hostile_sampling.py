"""Hostile and careless sample-eval / encode-features inputs, each refused with one line naming the option or
folder, before anything is written:

- two sample-evals on one --out: the second is refused naming the first (pid, host, command), and the folder's
  settings are checked before any shard is written;
- --cfg-scale inf, nan or below 1 (the sampler guides only for w > 1, so those would be recorded but sample
  black images or unguided ones), and --heun with --mode sde (Heun is an ODE correction);
- --seed -1 or over 2^64 - 1, and encode-features --grid 1000 (a 14,000 px encoder input) refused before any
  allocation.
"""
from __future__ import annotations

import os

import pytest

from fixtures import invoke, make_imagefolder
from repa_pipe.sampling import session
from repa_pipe.stages import sample_eval
from test_sample_eval import _one_thread, cli_args, config, error_line, setup  # noqa: F401 (fixtures)


# --------------------------------------------------------------------------------- 4. two sample-evals, one --out
def test_second_sample_eval_on_one_out_is_refused_naming_the_holder(setup, tmp_path):  # noqa: F811 (the fixture)
    out = tmp_path / "o"
    with session.out_lock(out):  # a first job, still running
        r = invoke(cli_args(setup, out, "--seed", 1))
    line = error_line(r)
    assert f"--out {out}: another sample-eval is writing this folder (pid {os.getpid()} on " in line
    assert "use another --out" in line
    assert [p.name for p in out.rglob("*")] == [session.OUT_LOCK]  # no shard, no settings written


def test_the_lock_is_released_after_a_run_and_other_settings_are_refused_before_any_shard(
        setup, tmp_path):  # noqa: F811 (the fixture)
    out = tmp_path / "o"
    sample_eval.run(config(setup, out))
    shards = sorted((out / "shards").glob("*.npz"))
    before = {p: p.stat().st_mtime_ns for p in shards}
    line = error_line(invoke(cli_args(setup, out, "--seed", 7)))
    assert "holds sample shards made with other settings (seed: 0 then, 7 now" in line
    assert {p: p.stat().st_mtime_ns for p in sorted((out / "shards").glob("*.npz"))} == before
    with session.out_lock(out):  # released by the finished run: a new holder gets it
        pass


# --------------------------------------------------------------------------------- 7. guidance values
@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0.5", "-inf"])
def test_cfg_scale_must_be_finite_and_at_least_one(setup, tmp_path, value):  # noqa: F811 (the fixture)
    line = error_line(invoke(cli_args(setup, tmp_path / "o", "--cfg-scale", value)))
    assert "--cfg-scale must be a finite number >= 1 (1: no guidance)" in line
    assert not (tmp_path / "o").exists()


def test_cfg_scale_one_and_above_are_accepted(setup, tmp_path):  # noqa: F811 (the fixture)
    for w in (1.0, 4.0):
        assert config(setup, tmp_path / "o", cfg_scale=w).cfg_scale == w


def test_heun_with_sde_is_refused(setup, tmp_path):  # noqa: F811 (the fixture)
    line = error_line(invoke(cli_args(setup, tmp_path / "o", "--heun")))
    assert "--heun is a correction of the ODE sampler: use it with --mode ode (got --mode sde)" in line
    assert config(setup, tmp_path / "o", mode="ode", heun=True).heun
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------- 10. one line, not a traceback
@pytest.mark.parametrize("seed", ["-1", str(2**64), str(10**30)])
def test_sample_eval_seed_out_of_range_is_one_line(setup, tmp_path, seed):  # noqa: F811 (the fixture)
    line = error_line(invoke(cli_args(setup, tmp_path / "o", "--seed", seed)))
    assert f"--seed must be in [0, 2^64 - 1], got {seed}" in line
    assert not (tmp_path / "o").exists()


def test_sample_eval_largest_seed_is_accepted(setup, tmp_path):  # noqa: F811 (the fixture)
    assert config(setup, tmp_path / "o", seed=2**64 - 1).seed == 2**64 - 1


def test_encode_features_grid_beyond_the_image_is_one_line_before_any_model(tmp_path, monkeypatch):
    from repa_pipe.encoding import features

    built = []
    monkeypatch.setattr(features, "load_encoder", lambda *a, **k: built.append(a))
    src = make_imagefolder(tmp_path / "images", per_class=1)
    r = invoke(["encode-features", "--source", src, "--cache", tmp_path / "c", "--resolution", 16, "--grid", 1000,
                "--workers", 0])
    assert r.exit_code == 1, r.output
    assert "--grid 1000: more tokens per side than the 16 px images have pixels" in r.output
    assert not built and not (tmp_path / "c").exists()
