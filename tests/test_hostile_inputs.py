"""Hostile and careless inputs (issue 17), the run's share: each case is refused with one red line naming the path
or option, exit 1, and nothing already written is lost. Numbered as in the issue.

CPU only, offline, one torch thread; tiny SiT-T/2 runs on synthetic caches written by the real cache writer.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from fixtures import invoke, ok
from train_fixtures import CacheOpts, make_cache

from repa_pipe.pipeline import checkpoint
from repa_pipe.training.guard import NonFiniteGuard, NonFiniteLossError
from repa_pipe.training.session import run_lock

TINY_ARGS = ["--model", "SiT-T/2", "--encoder-depth", "2", "--projector-dim", "16", "--global-batch-size", "8",
             "--lr", "1e-3", "--log-every", "1", "--sample-every", "0", "--precision", "fp32", "--loader-threads", "1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("hostile") / "cache")


@pytest.fixture(scope="module")
def trained_run(cache) -> Path:
    """2 steps, a checkpoint after each."""
    run = cache.parent / "run"
    ok(train_args(cache, run, 2, "--ckpt-every", "1"))
    return run


def train_args(cache: Path, run: Path, steps: int, *extra: str) -> list:
    return ["train", "--cache", cache, "--run-dir", run, "--encoder", "dinov2-b", "--steps", steps, *TINY_ARGS, *extra]


def error_line(result) -> str:
    """Exit 1, exactly one line on stderr, an `error:` line, and no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in result.output
    return lines[-1]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# ------------------------------------------------------------------------------------------------ 1. export targets
def test_1_export_into_the_runs_checkpoints_is_refused_and_the_checkpoint_kept(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    newest = checkpoint.ckpt_path(run, 2)
    before = sha(newest)
    for target in (newest, run / "checkpoints" / "ema.safetensors"):
        line = error_line(invoke(["export", run, target]))
        assert str(target) in line and "checkpoints folder" in line
    assert sha(newest) == before and not (run / "checkpoints" / "ema.safetensors").exists()


def test_1_export_onto_a_non_regular_file_is_refused_and_the_node_kept(trained_run, tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    for target in (fifo, folder):
        line = error_line(invoke(["export", trained_run, target]))
        assert str(target) in line and "not a regular file" in line
    assert fifo.is_fifo() and folder.is_dir()


def test_1_export_into_a_missing_folder_is_refused_and_nothing_created(trained_run, tmp_path):
    target = tmp_path / "no" / "such" / "ema.safetensors"
    line = error_line(invoke(["export", trained_run, target]))
    assert str(target) in line and "does not exist" in line
    assert not (tmp_path / "no").exists()


# ------------------------------------------------------------------------------------------------ 3. one run, one train
def test_3_a_second_train_on_a_run_folder_in_use_is_refused_naming_the_holder(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    before = {p.name: sha(p) for p in (run / "checkpoints").iterdir()}
    metrics = (run / "metrics.jsonl").read_text()
    with run_lock(run):  # this test process is the first train
        line = error_line(invoke(train_args(trained_run.parent / "cache", run, 4)))
    assert str(run) in line and f"pid {os.getpid()}" in line and "another train" in line
    assert {p.name: sha(p) for p in (run / "checkpoints").iterdir()} == before
    assert (run / "metrics.jsonl").read_text() == metrics
    ok(train_args(trained_run.parent / "cache", run, 3))  # released with its holder: the run goes on


# ------------------------------------------------------------------------------------------------ 9. another cache
def test_9_resume_on_a_cache_with_other_images_is_refused_unless_allowed_and_recorded(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    other = make_cache(tmp_path / "other", CacheOpts(file_list_sha256="e" * 64))  # same shape and classes
    line = error_line(invoke(train_args(other, run, 3)))
    assert f"--cache {other}" in line and "--allow-other-cache" in line and "not the cache this run trained on" in line
    assert checkpoint.latest(run) == checkpoint.ckpt_path(run, 2)
    ok(train_args(other, run, 3, "--allow-other-cache"))
    record = json.loads((run / "config.json").read_text())
    change = record["history"][-1]["changed"]["cache_identity"]
    assert change[0]["file_list_sha256"] == "f" * 64 and change[1]["file_list_sha256"] == "e" * 64
    assert record["cache"]["identity"]["file_list_sha256"] == "e" * 64
    # from now on the run's cache is the other one: going on with it needs no permission
    ok(train_args(other, run, 4))


# ------------------------------------------------------------------------------------------------ 10. one line each
@pytest.mark.parametrize("damage, expect", [
    (lambda d: d.pop("config"), "'config' entry is missing"),
    (lambda d: d.pop("model"), "'model' entry is missing"),
    (lambda d: d.update(step="2"), "'step' is '2'"),
    (lambda d: d.update(step=2.5), "'step' is 2.5"),
    (lambda d: d.update(format="repa-pipe-train/9"), "format repa-pipe-train/9 is not one this repa-pipe reads"),
])
def test_10_a_damaged_checkpoint_with_the_right_tag_is_one_line(trained_run, tmp_path, damage, expect):
    d = torch.load(checkpoint.ckpt_path(trained_run, 2), weights_only=True)
    damage(d)
    bad = tmp_path / "bad.pt"
    torch.save(d, bad)
    line = error_line(invoke(["sample-eval", "--ckpt", bad, "--out", tmp_path / "out", "--num-samples", "2"]))
    assert str(bad) in line and expect in line
    run = copy_run(trained_run, tmp_path / "run")  # the same refusal when train resumes from it
    shutil.copy(bad, checkpoint.ckpt_path(run, 3))
    line = error_line(invoke(train_args(trained_run.parent / "cache", run, 4)))
    assert expect in line


@pytest.mark.parametrize("seed", ["-1", str(2 ** 64)])
def test_10_a_seed_outside_64_bits_is_refused_before_anything_is_written(cache, tmp_path, seed):
    run = tmp_path / "run"
    line = error_line(invoke(train_args(cache, run, 1, "--seed", seed)))
    assert "--seed" in line and seed in line
    assert not run.exists()


def test_10_the_largest_seed_trains_and_previews(cache, tmp_path):
    run = tmp_path / "run"
    ok(train_args(cache, run, 1, "--seed", str(2 ** 64 - 1), "--sample-every", "1", "--preview-samples", "2",
                  "--preview-steps", "2"))
    assert (run / "samples" / "0000001.png").is_file()


@pytest.mark.parametrize("option, value", [("--lr", "inf"), ("--proj-coeff", "nan"), ("--proj-coeff", "inf")])
def test_10_non_finite_lr_and_proj_coeff_are_refused(cache, tmp_path, option, value):
    run = tmp_path / "run"
    line = error_line(invoke(train_args(cache, run, 1, option, value)))
    assert option in line and not run.exists()


def test_10_the_non_finite_loss_hint_names_proj_coeff():
    guard = NonFiniteGuard(torch.device("cpu"), check_grad=True, bad_rows=lambda step: [])
    guard.update(3, torch.tensor(float("nan")), torch.tensor(1.0))
    with pytest.raises(NonFiniteLossError, match="--proj-coeff"):
        guard.check(None, Path("cache"))


# ------------------------------------------------------------------------------------------------ 11. truncated checkpoint
def test_11_a_truncated_newest_checkpoint_names_the_intact_one_and_the_way_on(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    newest, intact = checkpoint.ckpt_path(run, 2), checkpoint.ckpt_path(run, 1)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    line = error_line(invoke(train_args(trained_run.parent / "cache", run, 3)))
    assert str(newest) in line and f"newest intact checkpoint is {intact} (step 1)" in line
    assert f"mv {newest} {newest}.damaged" in line
    newest.rename(newest.with_name(newest.name + ".damaged"))  # as the line says
    result = ok(train_args(trained_run.parent / "cache", run, 3))
    assert f"resumed from {intact} at step 1" in result.stderr
