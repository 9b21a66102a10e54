"""Hostile and careless inputs to train, export, sample-eval's checkpoint and the run folder: each case is refused
with one red line naming the path or option, exit 1, and nothing already written is lost. The cases, by the number
in the test names:

 1. export targets: a run's checkpoints or any file of a run or a cache, a non-regular file, a missing folder, a
    name not ending in .safetensors, the input itself, a broken link, an existing file that is no earlier export
 3. one run, one train: a second train on a run folder in use is refused naming the first; the run's lock is
    RUN/.train.lock, not the cache's `.lock`
 5. a checkpoint that is not one: one line, never torch's advice to load it with weights_only=False; a safetensors
    file is told by its header, whatever its suffix
 6. --ckpt with digits that are not ASCII (a '²') is a file name, not a step
 7. --run-dir a cache, inside one, or an existing file
 9. resume on another cache
10. a damaged checkpoint with the right format tag (a missing or non-fitting entry, a non-integer step, a format
    field that is no tag), seeds, non-finite options
11. a truncated newest checkpoint names the intact one and the (quoted) command to go on from it

CPU only, offline, one torch thread; tiny SiT-T/2 runs on synthetic caches written by the real cache writer.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from fixtures import invoke, ok
from train_fixtures import CacheOpts, make_cache, train_args

from repa_pipe.pipeline import checkpoint
from repa_pipe.training.guard import NonFiniteGuard, NonFiniteLossError
from repa_pipe.run.checkpoint import load as load_checkpoint
from repa_pipe.training.session import run_lock

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # one torch thread, set before the module's fixtures run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny cache (RUN/../cache) and a run of 2 steps on it, a checkpoint after each."""
    cache = make_cache(tmp_path_factory.mktemp("hostile") / "cache")
    run = cache.parent / "run"
    ok(train_args(cache, run, 2, "--ckpt-every", "1"))
    return run


@pytest.fixture(scope="module")
def cache(trained_run) -> Path:
    return trained_run.parent / "cache"


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


def test_1_export_onto_a_file_of_the_run_or_the_cache_is_refused_and_the_file_kept(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    cache = trained_run.parent / "cache"
    for target, where in ((run / "config.json", f"inside run {run}"), (run / "ema.safetensors", f"inside run {run}"),
                          (cache / "manifest.json", f"inside the cache {cache}"),
                          (cache / "index" / "ema.safetensors", f"inside the cache {cache}")):
        before = sha(target) if target.exists() else None
        line = error_line(invoke(["export", run, target]))
        assert str(target) in line and where in line
        assert (sha(target) if target.exists() else None) == before


def test_1_export_onto_a_checkpoint_or_a_foreign_file_is_refused_and_the_file_kept(trained_run, tmp_path):
    ck = tmp_path / "ck.pt"
    shutil.copy(checkpoint.ckpt_path(trained_run, 2), ck)
    other = tmp_path / "model.safetensors"  # someone else's safetensors file
    save_file({"w": torch.zeros(2)}, other)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    kept = {p: sha(p) for p in (ck, other, notes)}
    for args, expect in (([ck, ck], "not a .safetensors file name"), ([ck, notes], "not a .safetensors file name"),
                         ([trained_run, other], "exists and is not a repa-pipe export")):
        line = error_line(invoke(["export", *args]))
        assert str(args[1]) in line and expect in line
    assert {p: sha(p) for p in kept} == kept


def test_1_export_replaces_an_earlier_export_but_never_its_own_input(trained_run, tmp_path):
    out = tmp_path / "ema.safetensors"
    ok(["export", checkpoint.ckpt_path(trained_run, 1), out])
    ok(["export", trained_run, out])  # an earlier export is replaced
    assert load_checkpoint(out).step == 2
    before = sha(out)
    line = error_line(invoke(["export", out, out]))
    assert f"{out}: the same file as the input" in line and sha(out) == before


def test_1_export_onto_a_broken_link_is_refused_and_the_link_kept(trained_run, tmp_path):
    link = tmp_path / "ema.safetensors"
    link.symlink_to(tmp_path / "gone" / "ema.safetensors")
    line = error_line(invoke(["export", trained_run, link]))
    assert str(link) in line and "a broken symbolic link" in line
    assert link.is_symlink() and not (tmp_path / "gone").exists()


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


def test_3_the_run_lock_is_not_the_cache_lock_and_an_old_one_is_ignored(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / ".lock").write_text("left by repa-pipe 0.3\n")  # the old name of the run's lock: never read
    with run_lock(run):
        assert (run / ".train.lock").is_file()
        fd = os.open(run / ".lock", os.O_RDWR)  # the cache's lock file name (CACHE/.lock) is free: no wait on it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    ok(train_args(trained_run.parent / "cache", run, 3))
    assert (run / ".lock").read_text() == "left by repa-pipe 0.3\n"


# ------------------------------------------------------------------------------------------------ 5. not a checkpoint
def test_5_a_pickle_the_weights_only_loader_refuses_is_one_line_without_torchs_advice(trained_run, tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"ema": {"w": torch.zeros(1)}, "when": datetime.date(2020, 1, 1)}, bad)
    line = error_line(invoke(["sample-eval", "--ckpt", bad, "--out", tmp_path / "out", "--num-samples", "2"]))
    assert f"{bad}: not a readable checkpoint (it holds objects other than tensors and plain values" in line
    assert "datetime.date was not an allowed global" in line
    assert "weights_only" not in line and "False" not in line and "safe_globals" not in line
    assert not (tmp_path / "out").exists()


def test_5_a_safetensors_file_is_told_by_its_header_not_its_suffix(trained_run, tmp_path):
    out = tmp_path / "ema.safetensors"
    ok(["export", trained_run, out])
    renamed = tmp_path / "ema.pt"
    shutil.copy(out, renamed)
    ck = load_checkpoint(renamed)
    assert ck.kind == "safetensors" and ck.step == 2
    cut = tmp_path / "cut.safetensors"  # a header cut short: neither kind, one line
    cut.write_bytes(out.read_bytes()[:100])
    line = error_line(invoke(["sample-eval", "--ckpt", cut, "--out", tmp_path / "out", "--num-samples", "2"]))
    assert f"{cut}: not a readable safetensors file" in line


# ------------------------------------------------------------------------------------------------ 6. --ckpt digits
def test_6_a_ckpt_of_non_ascii_digits_is_a_file_name(trained_run, tmp_path):
    line = error_line(invoke(["sample-eval", "--run-dir", trained_run, "--ckpt", "\u00b2", "--out", tmp_path / "out",
                              "--num-samples", "2"]))
    assert "--ckpt \u00b2: no such file" in line


# ------------------------------------------------------------------------------------------------ 7. --run-dir
def test_7_a_run_dir_that_is_a_cache_or_inside_one_or_a_file_is_refused(trained_run, tmp_path):
    cache = trained_run.parent / "cache"
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    for run, expect in ((cache, "a cache"), (cache / "runs" / "r1", f"inside the cache {cache}")):
        line = error_line(invoke(train_args(cache, run, 1)))
        assert f"--run-dir {run}: {expect}" in line
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    line = error_line(invoke(train_args(cache, afile, 1)))
    assert f"--run-dir {afile}: not a folder" in line and afile.read_text() == "x\n"


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


def _bad_ema(d: dict) -> None:
    d["ema"] = dict(d["ema"])
    d["ema"]["pos_embed"] = torch.zeros(1, 3, 5)  # another shape than the model's


@pytest.mark.parametrize("damage, expect", [
    (lambda d: d.update(rng={}), "its 'rng' entry does not fit (KeyError: 'torch')"),
    (lambda d: d.update(opt={}), "its 'opt' entry does not fit (KeyError: 'param_groups')"),
    (lambda d: d.update(model={}), "its 'model' entry is empty"),
    (_bad_ema, "its 'ema' entry does not fit (RuntimeError: Error(s) in loading state_dict for SiT: size mismatch for "
               "pos_embed"),
])
def test_10_resuming_from_a_checkpoint_with_a_part_that_does_not_fit_is_one_line_with_the_way_on(
        trained_run, tmp_path, damage, expect):
    run = copy_run(trained_run, tmp_path / "run")
    newest = checkpoint.ckpt_path(run, 2)
    d = torch.load(newest, weights_only=True)
    damage(d)
    torch.save(d, newest)
    line = error_line(invoke(train_args(trained_run.parent / "cache", run, 3)))
    assert f"{newest}: damaged" in line and expect in line
    assert f"newest intact checkpoint is {checkpoint.ckpt_path(run, 1)} (step 1)" in line
    assert checkpoint.latest(run) == newest


def test_10_a_format_field_that_is_no_tag_is_a_damaged_checkpoint(trained_run, tmp_path):
    d = torch.load(checkpoint.ckpt_path(trained_run, 2), weights_only=True)
    d["format"] = 3
    bad = tmp_path / "bad.pt"
    torch.save(d, bad)
    line = error_line(invoke(["sample-eval", "--ckpt", bad, "--out", tmp_path / "out", "--num-samples", "2"]))
    assert f"{bad}: damaged checkpoint: its format field is 3 (int)" in line


# ------------------------------------------------------------------------------------------------ 11. truncated checkpoint
def test_11_a_truncated_newest_checkpoint_names_the_intact_one_and_the_way_on(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "my run")  # a space: the command in the hint is quoted for a shell
    newest, intact = checkpoint.ckpt_path(run, 2), checkpoint.ckpt_path(run, 1)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    line = error_line(invoke(train_args(trained_run.parent / "cache", run, 3)))
    assert str(newest) in line and f"newest intact checkpoint is {intact} (step 1)" in line
    assert f"mv '{newest}' '{newest}.damaged'" in line
    newest.rename(newest.with_name(newest.name + ".damaged"))  # as the line says
    result = ok(train_args(trained_run.parent / "cache", run, 3))
    assert f"resumed from {intact} at step 1" in result.stderr
