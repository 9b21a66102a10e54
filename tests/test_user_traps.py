"""The traps a new user's first trial fell into, replayed through the real CLI, each with its new outcome.

1. a run folder is self-contained and portable     6. SIGTERM / SIGINT stop cleanly; the same command resumes
2. torchrun needs no `--`                              exactly (train, sample-eval, encode)
3. --encoder-depth defaults to the preset's        7. the terminal: --help, progress lines off a terminal
4. a refused command writes nothing                 8. resume with changed hyperparameters
5. one line, exit 1, no traceback (--debug: it)     9. the default VAEs are the reference's

Commands run in-process through the Typer app where that is the same thing, and as real processes where the process
is the point: another working folder, signals to a process group, a file-size limit, a traceback on stderr.
CPU only, offline, one torch thread; tiny SiT-T/2 runs on synthetic caches written by the real cache writer.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer.main

from fixtures import VENV_BIN, invoke, make_imagefolder, ok, strip_times, subprocess_env, tree, tree_stat
from repa_pipe.cache.manifest import Provenance
from repa_pipe.cli import FLOW, app
from repa_pipe.models.registry import SIT_PRESETS, sampling_decoder
from repa_pipe.pipeline import checkpoint, progress
from repa_pipe.pipeline.errors import CorruptDataError
from repa_pipe.sampling import sampler as sampler_mod
from repa_pipe.sampling import session as sampling_session
from repa_pipe.sampling.decode import choose_decoder
from repa_pipe.run.record import locate_cache, read_record
from repa_pipe.training.config import TrainConfig, encoder_depth_for
from train_fixtures import SD_SCALE, CacheOpts, Latents, assert_states_equal, make_cache, train_args

SAMPLE_ARGS = ["--num-samples", "4", "--num-steps", "2", "--batch-size", "4", "--shard-size", "4"]
STOP_LINE = "; run the same command to resume"


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """One torch thread for the whole module (conftest.py), in force before its module-scoped fixtures run."""
    yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """8 samples, pixel latents 3x8x8, dinov2-b features on a 4x4 grid (SiT-T/2's tokens)."""
    return make_cache(tmp_path_factory.mktemp("traps") / "cache")


@pytest.fixture(scope="module")
def trained_run(cache) -> Path:
    run = cache.parent / "run"
    ok(train_args(cache, run, 2))
    return run


# ------------------------------------------------------------------------------------------------------ helpers
def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def error_line(result, alone: bool = True) -> str:
    """The CLI's error: exit 1, exactly one `error:` line, the last line on stderr (`alone`: the only one), and no
    traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = lines_of(result.stderr)
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert not alone or lines == errors, result.stderr
    assert "Traceback" not in result.output
    return errors[0]


def record(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def ckpt(run: Path, step: int) -> dict:
    return torch.load(checkpoint.ckpt_path(run, step), weights_only=True)


def steps_of(run: Path) -> list[int]:
    return [s for s, _ in checkpoint.list_checkpoints(run)]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return z["arr_0"], z["arr_1"]


class Running:
    """`repa-pipe ARGS` as a process in a session of its own (a signal can go to its whole process group, as
    Ctrl-C in a terminal sends it), stderr collected line by line. A context manager: whatever is left of the group
    is SIGKILLed on the way out."""

    def __init__(self, args: list, cwd: Path | None = None, env: dict | None = None):
        self.proc = subprocess.Popen([str(VENV_BIN / "repa-pipe"), *map(str, args)], cwd=cwd, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_until(self, cond, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                self._reader.join(timeout=10)
                assert cond(), f"exited ({self.proc.returncode}) before {what}:\n" + "\n".join(self.lines[-30:])
                return
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.005)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float = 60.0) -> int:
        """The exit code; a process that does not exit within `timeout` fails the test (it hangs)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout} s later (hangs):\n" + "\n".join(self.lines[-30:]))
        self._reader.join(timeout=10)
        return rc

    def __enter__(self) -> "Running":
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the process and any loader worker it left
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._reader.join(timeout=10)
        self.proc.stderr.close()


def stop_line(lines: list[str]) -> str:
    """A clean stop: exactly one `stopped:` line, the last, and no error or traceback."""
    text = "\n".join(lines)
    stops = [line for line in lines if line.startswith("stopped: ")]
    assert len(stops) == 1 and lines[-1] == stops[0], text
    assert "Traceback" not in text and "error:" not in text, text
    return stops[0]


# ------------------------------------------------------------------------------------------- 1. portable run folder
def test_1_run_folder_is_self_contained_and_portable(tmp_path, monkeypatch):
    old = tmp_path / "old"
    cache, run = make_cache(old / "cache"), old / "run"
    ok(train_args(cache, run, 2))
    rec = record(run)
    assert rec["cache"]["path"] == str(cache.resolve()) and rec["cache"]["run_relative"] == "../cache"
    view = rec["cache"]["view"]
    assert view["codec"]["name"] == "pixel" and view["latents"] == "latents/pixel"
    assert (view["latent_channels"], view["latent_size"], view["num_classes"], view["n"]) == (3, 8, 4, 8)
    assert view["feature_dims"] == [32] and view["dataset_root"] == "/synthetic" and rec["history"] == []
    ok(["sample-eval", "--run-dir", run, "--out", tmp_path / "before", *SAMPLE_ARGS])

    # the run and its cache move together; a user samples from a third folder, typing relative paths
    new = tmp_path / "moved" / "place"
    new.parent.mkdir()
    shutil.move(old, new)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = subprocess.run([str(VENV_BIN / "repa-pipe"), "sample-eval", "--run-dir", "../moved/place/run", "--out",
                        "samples", *SAMPLE_ARGS], cwd=elsewhere, env=subprocess_env(tmp_path), capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    moved_arr, moved_labels = load_npz(elsewhere / "samples" / "samples.npz")
    arr, labels = load_npz(tmp_path / "before" / "samples.npz")
    assert moved_arr.shape == (4, 8, 8, 3) and np.array_equal(moved_arr, arr) and np.array_equal(moved_labels, labels)
    # its cache is found where it moved with the run (for reference statistics)
    assert locate_cache(new / "run", read_record(new / "run"), None) == new / "run" / "../cache"

    # the cache moves on alone: metrics (which read it) say so before sampling, naming --cache
    monkeypatch.chdir(elsewhere)
    shutil.move(new / "cache", tmp_path / "cache2")
    (elsewhere / "inception.pth").write_bytes(b"")  # not read: the cache is looked for first
    line = error_line(invoke(["sample-eval", "--run-dir", "../moved/place/run", "--out", "o", *SAMPLE_ARGS,
                              "--inception-weights", "inception.pth"]))
    assert f"its cache is neither at {rec['cache']['path']} nor at" in line and "pass --cache" in line
    assert not (elsewhere / "o").exists()
    ok(["sample-eval", "--run-dir", "../moved/place/run", "--out", "o", *SAMPLE_ARGS, "--cache", "../cache2"])
    line = error_line(invoke(["sample-eval", "--run-dir", "../moved/place/run", "--out", "o2", *SAMPLE_ARGS,
                              "--cache", "../cahce2"]))
    assert "--cache ../cahce2: not a repa-pipe cache" in line and not (elsewhere / "o2").exists()

    # training resumes from the moved run given the cache's new place; the record keeps the first config and
    # adds the move (not the working folder's spelling of --run-dir) to its history
    r = ok(train_args("../cache2", "../moved/place/run", 3))
    assert "resumed from ../moved/place/run/checkpoints/0000002.pt at step 2 with changed options: --steps 2 -> 3" \
        in r.stderr
    assert steps_of(new / "run") == [2, 3]
    after = record(new / "run")
    assert after["config"] == rec["config"] and after["cache"]["view"] == rec["cache"]["view"]
    moved_to = str((tmp_path / "cache2").resolve())
    assert after["cache"]["path"] == moved_to and after["cache"]["run_relative"] == "../../../cache2"
    assert [{k: v for k, v in h.items() if k != "utc"} for h in after["history"]] == [
        {"step": 2, "changed": {"steps": [2, 3], "cache": [rec["cache"]["path"], moved_to]}}]


# ------------------------------------------------------------------------------------------- 2. torchrun, no `--`
def repa_option_strings() -> dict[str, str]:
    """{option string: command} for every option of every command, found by walking the click tree (--help is
    click's own on every command, and the same string as torchrun's: torchrun passes it on, see below)."""
    out: dict[str, str] = {}

    def walk(cmd, path: list[str]) -> None:
        for p in cmd.params:
            if p.param_type_name == "option":
                for o in (*p.opts, *p.secondary_opts):
                    out[o] = " ".join(path) or "repa-pipe"
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, path + [name])

    walk(typer.main.get_command(app), [])
    return out


def test_2_no_repa_pipe_option_is_a_torchrun_option_or_its_abbreviation():
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    theirs = {o for a in parser._actions for o in a.option_strings}
    ours = repa_option_strings()
    assert {"--run-dir", "--out", "--cache", "--debug", "--no-tf32"} <= ours.keys() and len(ours) > 50
    clashes = sorted(f"{cmd} {o} ~ torchrun {t}" for o, cmd in ours.items() for t in theirs if t.startswith(o))
    assert clashes == [], clashes  # argparse (allow_abbrev) would take a prefix of its own option as that option
    # and torchrun hands every one of them to the script, as a user types them (no `--`)
    for cmd in ("train", "sample-eval", "encode-latents"):
        args = [x for o in sorted(ours) for x in (o, "1")]
        got = get_args_parser().parse_args(["--standalone", "--nproc_per_node", "2", "-m", "repa_pipe.cli", cmd, *args])
        assert got.training_script_args == [cmd, *args] and got.nproc_per_node == "2" and got.nnodes == "1:1"


# ---------------------------------------------------------------------------------------- 3. --encoder-depth default
def test_3_encoder_depth_defaults_to_the_presets_and_a_bad_one_is_one_line(cache, tmp_path):
    run = tmp_path / "run"
    args = [a for a in train_args(cache, run, 1)]
    i = args.index("--encoder-depth")
    del args[i:i + 2]
    ok(args)
    # saved as typed (not given), with the derived value and why apart
    for saved in (record(run), ckpt(run, 1)):
        assert saved["config"]["encoder_depth"] is None
        assert saved["resolved"]["encoder_depth"]["value"] == 2 and "SiT-T/2" in saved["resolved"]["encoder_depth"]["why"]
    # the paper's 8 for L and XL, 4 for B; a third of the blocks for S (12); 2 of 4 for the tiny test preset
    want = {"T": 2, "S": 4, "B": 4, "L": 8, "XL": 8}
    for name in SIT_PRESETS:
        size = name[4:].split("/")[0]
        assert encoder_depth_for(TrainConfig(cache=cache, run_dir=run, model=name)) == want[size], name
    for model, depth, blocks in (("SiT-T/2", 5, 4), ("SiT-B/2", 13, 12)):
        bad = tmp_path / f"bad{depth}"
        line = error_line(invoke(["train", "--cache", cache, "--run-dir", bad, "--model", model,
                                  "--encoder-depth", depth]))
        assert line == f"error: --encoder-depth {depth} must be in [1, {blocks}]: {model} has {blocks} blocks"
        assert not bad.exists()


# ------------------------------------------------------------------------------------ 4. refused: no new files
@pytest.mark.parametrize("vae, res, multiple", [("pixel", 33, 2), ("tiny", 33, 8), ("tiny", 36, 8)])
def test_4_encode_latents_refuses_an_odd_latent_side_and_writes_nothing(tmp_path, monkeypatch, vae, res, multiple):
    make_imagefolder(tmp_path / "imgs", classes=("a", "b"), per_class=2)
    monkeypatch.chdir(tmp_path)
    before = tree_stat(tmp_path)
    line = error_line(invoke(["encode-latents", "--source", "imgs", "--cache", "cache", "--vae", vae,
                              "--resolution", res, "--workers", 0]))
    assert f"--resolution {res} must be a multiple of {multiple} for --vae {vae}" in line and "even latent" in line
    assert tree_stat(tmp_path) == before and not (tmp_path / "cache").exists()


def test_4_encode_features_refuses_a_cache_no_codec_could_fill(tmp_path, monkeypatch):
    make_imagefolder(tmp_path / "imgs", classes=("a", "b"), per_class=2)
    monkeypatch.chdir(tmp_path)
    before = tree_stat(tmp_path)
    line = error_line(invoke(["encode-features", "--source", "imgs", "--cache", "cache", "--encoder", "tiny",
                              "--resolution", 9, "--workers", 0]))
    assert "--resolution 9: no latent codec encodes an odd image side" in line, line
    assert tree_stat(tmp_path) == before and not (tmp_path / "cache").exists()
    # a cache made at 12 px takes pixel latents but not tiny ones; the message names the cache, not a flag
    ok(["encode-features", "--source", "imgs", "--cache", "cache", "--encoder", "tiny", "--resolution", 12,
        "--workers", 0, "--grid", 2])
    line = error_line(invoke(["encode-latents", "--source", "imgs", "--cache", "cache", "--vae", "tiny",
                              "--workers", 0]))
    assert "the cache's resolution 12 (set when it was made) must be a multiple of 8 for --vae tiny" in line, line


def test_4_a_model_whose_patch_cannot_tile_the_latents_names_the_flag(tmp_path):
    from train_fixtures import Features

    four = make_cache(tmp_path / "four", CacheOpts(latents=(Latents(size=4),), features=(Features(grid=2),)))
    run = tmp_path / "run"
    line = error_line(invoke(train_args(four, run, 1, "--model", "SiT-T/8")))
    assert "--model SiT-T/8 (patch 8) cannot tile the cache's latents (latents/pixel, 4x4)" in line, line
    assert not run.exists()


def test_4_refused_train_writes_nothing_new(cache, tmp_path):
    fresh = tmp_path / "fresh"
    line = error_line(invoke(train_args(cache, fresh, 1, "--micro-batch-size", 3)))
    assert "a rank's share 8" in line and "not divisible by --micro-batch-size 3" in line
    assert not fresh.exists()
    run = tmp_path / "run"
    ok(train_args(cache, run, 1))
    before = tree_stat(run)
    for extra, words in ((["--micro-batch-size", 3], "not divisible by --micro-batch-size 3"),
                         (["--seed", 1], "--seed 0 (now 1)"),
                         (["--model", "SiT-S/2"], "--model 'SiT-T/2' (now 'SiT-S/2')")):
        line = error_line(invoke(train_args(cache, run, 2, *extra)))
        assert words in line, (extra, line)
        assert tree_stat(run) == before, extra


# ------------------------------------------------------------------------------------ 5. one line, exit 1
def test_5_missing_tensorboard_is_one_line(cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import torch.utils.tensorboard` fails
    line = error_line(invoke(train_args(cache, tmp_path / "run", 1, "--tensorboard")))
    assert line == ("error: --tensorboard needs the tensorboard package: pip install tensorboard (or pip install "
                    "'repa-pipe[tensorboard]')")
    assert not (tmp_path / "run").exists()


def test_5_deleted_shard_is_one_line_and_debug_shows_the_traceback(cache, tmp_path):
    damaged = tmp_path / "cache"
    shutil.copytree(cache, damaged)
    shard = damaged / "cache.zarr" / "latents" / "pixel" / "c" / "0" / "0" / "0" / "0"
    shard.unlink()
    line = error_line(invoke(train_args(damaged, tmp_path / "run", 1)))
    assert f"latents/pixel: shard 0 is marked done but its file is missing ({shard})" in line
    assert line.endswith(f"run `repa-pipe cache verify {damaged}`")
    assert not (tmp_path / "run").exists()
    args = list(map(str, train_args(damaged, tmp_path / "run", 1)))
    # --debug before the command, in-process: the error itself escapes, not a line
    r = invoke(["--debug", *args])
    assert isinstance(r.exception, CorruptDataError) and "error:" not in r.output, r.output
    # --debug after the command, as users type it, in a real process: the traceback on stderr
    p = subprocess.run([str(VENV_BIN / "repa-pipe"), *args, "--debug"], env=subprocess_env(tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback (most recent call last)" in p.stderr, p.stderr[-3000:]
    assert lines_of(p.stderr)[-1].startswith("repa_pipe.pipeline.errors.CorruptDataError: ")
    assert "error:" not in p.stderr


def test_5_no_space_for_a_checkpoint_is_one_line(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 10**6))
    run = tmp_path / "run"
    line = error_line(invoke(train_args(cache, run, 2)), alone=False)  # progress lines come first
    assert line.startswith(f"error: {checkpoint.ckpt_path(run, 2)}: no space left for the checkpoint (about 0.01 GB "
                           "needed, 0.00 GB free)")
    assert list((run / "checkpoints").iterdir()) == []


def test_5_file_system_refusals_are_one_line_naming_the_path(cache, tmp_path, monkeypatch):
    """A folder that cannot be created, and a disk that fills while a shard is written: one line each."""
    src = make_imagefolder(tmp_path / "imgs", per_class=2)
    bad = Path("/proc/no-such-cache")  # mkdir fails here even as root
    line = error_line(invoke(["encode-latents", "--source", src, "--cache", bad, "--vae", "pixel",
                              "--resolution", "16", "--workers", "0"]), alone=False)
    assert line.startswith(f"error: {bad}") and "Traceback" not in line, line
    assert not bad.exists()

    import errno

    from repa_pipe.cache import writer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "c" / "shard"))

    monkeypatch.setattr(writer.ShardWriter, "write", full)
    line = error_line(invoke(["encode-latents", "--source", src, "--cache", tmp_path / "c", "--vae", "pixel",
                              "--resolution", "16", "--workers", "0"]), alone=False)
    assert line == (f"error: {tmp_path / 'c' / 'shard'}: No space left on device; free space and run the same "
                    "command again (finished work is kept)"), line


def test_5_a_failed_checkpoint_write_is_one_line_and_leaves_no_temp_file(cache, tmp_path):
    """A real write failure: a 1 MiB file-size limit (SIGXFSZ ignored) makes torch.save fail half-way (EFBIG)."""
    run = tmp_path / "run"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); sys.argv[0] = 'repa-pipe'; "
            "from repa_pipe.cli import main; main()")
    p = subprocess.run([sys.executable, "-c", code, *map(str, train_args(cache, run, 2))], env=subprocess_env(tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr[-3000:]
    lines = lines_of(p.stderr)
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:] and "Traceback" not in p.stderr
    assert lines[-1].startswith(f"error: {checkpoint.ckpt_path(run, 2)}: file too large: the checkpoint (about "
                                "0.01 GB) exceeds the largest file this process may write (see `ulimit -f`)"), lines
    assert list((run / "checkpoints").iterdir()) == []  # no checkpoint, no temp file


def test_5_a_bad_image_with_loader_workers_is_one_line_and_the_process_exits(tmp_path):
    """The default --workers 4: the process used to print its line, then wait for its loader workers forever."""
    src = make_imagefolder(tmp_path / "imgs", classes=("a", "b"), per_class=3)
    bad = src / "a" / "img_001.png"
    bad.write_bytes(b"not an image")
    cache = tmp_path / "cache"
    with Running(["encode-latents", "--source", src, "--cache", cache, "--vae", "pixel", "--resolution", 16,
                  "--shard-size", 2, "--batch-size", 2, "--workers", 2], env=subprocess_env(tmp_path)) as p:
        rc = p.finish()
    errors = [line for line in p.lines if line.startswith("error: ")]
    assert rc == 1 and errors == [p.lines[-1]] and "Traceback" not in "\n".join(p.lines), p.lines
    assert errors[0].startswith(f"error: {bad}: not a decodable image") and "--skip-bad" in errors[0]


@pytest.mark.parametrize("args, words", [
    (["train", "--bogus"], "No such option: --bogus"),
    (["train", "--run-dir", "r"], "Missing option '--cache'"),
    (["sample-eval", "--run-dir", "r"], "Missing option '--out'"),
    (["train", "--cache", "c", "--run-dir", "r", "--steps", "many"], "Invalid value for '--steps'"),
    (["trian"], "No such command 'trian'"),
    (["cache", "verify", "--bogus"], "No such option: --bogus"),
    (["train", "--cache"], "Option '--cache' requires an argument"),
], ids=["unknown-option", "missing-cache", "missing-out", "bad-int", "unknown-command", "subgroup",
        "missing-value"])
def test_5_usage_errors_are_one_line(tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    line = error_line(invoke(args))
    commands = [a for a in args if not a.startswith("-") and a in ("train", "sample-eval", "cache", "verify")]
    assert words in line and line.endswith(f"{''.join(' ' + c for c in commands)} --help`)"), line  # the command's
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ 6. stop on a signal, resume
TRAIN_LINE = re.compile(r"^train: step (\d+)/(\d+) \(\d+\.\d step/s, eta (\d+s|\d+m\d\ds|\d+h\d\dm|\?)\)  "
                        r"loss \d+\.\d{4}  denoise ")


# slow: two subprocess trainings (~10 s); test_6_ctrl_c_during_train_saves_and_exits_130 covers the save on a
# signal and test_train.py's test_resume_is_exact the exact resume
@pytest.mark.slow
def test_6_sigterm_during_train_saves_and_the_same_command_resumes_exactly(cache, tmp_path):
    steps = 120
    run = tmp_path / "run"
    args = train_args(cache, run, steps)
    env = subprocess_env(tmp_path)
    with Running(args, env=env) as p:
        p.wait_until(lambda: any(TRAIN_LINE.match(line) for line in p.lines), "first progress line")
        p.signal_group(signal.SIGTERM)
        rc = p.finish()
    assert rc == 143, p.lines
    m = re.fullmatch(r"stopped: saved step (\d+) to (\S+)" + re.escape(STOP_LINE), stop_line(p.lines))
    assert m, p.lines
    n = int(m.group(1))
    assert 1 <= n < steps and m.group(2) == str(checkpoint.ckpt_path(run, n))
    assert steps_of(run) == [n] and [r["step"] for r in metrics(run)] == list(range(1, n + 1))
    shown = [int(TRAIN_LINE.match(line).group(1)) for line in p.lines if TRAIN_LINE.match(line)]
    assert shown == list(range(1, n + 1))  # off a terminal: one plain line per --log-every, step/total and ETA

    again = subprocess.run([str(VENV_BIN / "repa-pipe"), *map(str, args)], env=env, capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {checkpoint.ckpt_path(run, n)} at step {n}\n" in again.stderr  # nothing changed
    whole = tmp_path / "whole"
    ok(train_args(cache, whole, steps))
    assert steps_of(run) == [n, steps]
    assert_states_equal(ckpt(run, steps), ckpt(whole, steps))
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(whole)]


def test_6_ctrl_c_during_train_saves_and_exits_130(cache, tmp_path):
    run = tmp_path / "run"
    with Running(train_args(cache, run, 120), env=subprocess_env(tmp_path)) as p:
        p.wait_until(lambda: any(TRAIN_LINE.match(line) for line in p.lines), "first progress line")
        p.signal_group(signal.SIGINT)  # what Ctrl-C sends: the whole foreground process group
        rc = p.finish()
    assert rc == 130, p.lines
    m = re.fullmatch(r"stopped: saved step (\d+) to (\S+)" + re.escape(STOP_LINE), stop_line(p.lines))
    assert m and m.group(2) == str(checkpoint.ckpt_path(run, int(m.group(1)))) and steps_of(run) == [int(m.group(1))]


def test_6_sigterm_during_sample_eval_keeps_finished_shards_and_resumes(trained_run, tmp_path):
    args = ["sample-eval", "--run-dir", trained_run, "--num-samples", 10, "--num-steps", 20, "--batch-size", 2,
            "--shard-size", 2]
    out = tmp_path / "stopped"
    with Running([*args, "--out", out], env=subprocess_env(tmp_path)) as p:
        p.wait_until(lambda: (out / "shards" / "000000.npz").is_file(), "first shard")
        p.signal_group(signal.SIGTERM)
        rc = p.finish()
    assert rc == 143, p.lines
    m = re.fullmatch(r"stopped: on SIGTERM, (\d)/5 sample shards are done and kept" + re.escape(STOP_LINE),
                     stop_line(p.lines))
    assert m, p.lines
    done = {q.name: q.stat().st_mtime_ns for q in (out / "shards").glob("0*.npz")}
    assert 1 <= len(done) == int(m.group(1)) < 5 and not (out / "samples.npz").exists()
    assert sorted(q.name for q in (out / "shards").iterdir()) == sorted([*done, "sampling.json"])  # no temp file

    ok([*args, "--out", out])  # the same command again
    ok([*args, "--out", tmp_path / "whole"])  # uninterrupted
    assert {q: (out / "shards" / q).stat().st_mtime_ns for q in done} == done  # finished shards not redone
    for a, b in zip(load_npz(out / "samples.npz"), load_npz(tmp_path / "whole" / "samples.npz")):
        assert np.array_equal(a, b)
    assert (out / "grid.png").read_bytes() == (tmp_path / "whole" / "grid.png").read_bytes()


def test_6_sigterm_during_encode_with_loader_workers_stops_and_resumes(tmp_path):
    """SIGTERM to the process group, loader workers included (they leave the stop to the parent). The process used to
    print its line and then wait for its workers forever."""
    src = make_imagefolder(tmp_path / "imgs", classes=("a", "b", "c", "d"), per_class=24, seed=4)  # 96 images

    def args(c: Path, workers: int) -> list:
        return ["encode-features", "--source", src, "--cache", c, "--encoder", "tiny", "--grid", 8, "--resolution", 16,
                "--shard-size", 4, "--batch-size", 2, "--workers", workers]

    cache = tmp_path / "stopped"
    done_dir = cache / "done" / "features" / "tiny"
    with Running(args(cache, 1), env=subprocess_env(tmp_path)) as p:
        p.wait_until(lambda: done_dir.is_dir() and any(done_dir.glob("*.json")), "first done shard")
        p.signal_group(signal.SIGTERM)
        rc = p.finish()
    assert rc == 143, p.lines
    m = re.fullmatch(r"stopped: on SIGTERM, (\d+)/24 shards of features/tiny are done and kept"
                     + re.escape(STOP_LINE), stop_line(p.lines))
    assert m and 1 <= int(m.group(1)) == len(list(done_dir.glob("*.json"))) < 24, p.lines
    finished = {k: v for k, v in tree_stat(cache).items() if k.startswith("done/")}

    ok(args(cache, 0))  # the same command (the bytes do not depend on --workers)
    ok(args(tmp_path / "whole", 0))
    after = tree_stat(cache)
    assert {k: after[k] for k in finished} == finished  # kept, not redone
    assert tree(cache, "cache.zarr") == tree(tmp_path / "whole", "cache.zarr")
    assert strip_times(json.loads((cache / "manifest.json").read_text())) == \
        strip_times(json.loads((tmp_path / "whole" / "manifest.json").read_text()))
    assert not list(cache.rglob(".*.tmp")) and not list(cache.rglob("*.partial"))


# ------------------------------------------------------------------------------------ 7. the terminal
def _commands() -> list[tuple[list[str], object]]:
    out = []

    def walk(cmd, path):
        out.append((path, cmd))
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            walk(sub, path + [name])

    walk(typer.main.get_command(app), [])
    return out


def test_7_help_shows_no_value_placeholder_for_flags():
    checked = 0
    for path, cmd in _commands():
        r = invoke([*path, "--help"], env={"COLUMNS": "220", "TERMINAL_WIDTH": "220"})
        assert r.exit_code == 0, (path, r.output)
        assert "<bool>" not in r.output and "BOOLEAN" not in r.output, (path, r.output)
        ctx = cmd.make_context(" ".join(["repa-pipe", *path]), [], resilient_parsing=True)
        for p in cmd.get_params(ctx):
            if p.param_type_name != "option":
                continue
            names = {*p.opts, *p.secondary_opts}
            rows = [[t for t in line.replace("│", " ").split() if t != "*"] for line in r.output.splitlines()]
            tokens = next((t for t in rows if t and t[0] == p.opts[0]), None)  # the option's own row
            assert tokens is not None, (path, p.opts, r.output)
            k = next(i for i, t in enumerate(tokens) if t not in names)
            # a flag: its help text right after its names; any other option: its value's name first
            if p.is_flag:
                assert tokens[k] == p.help.split()[0], (path, p.opts, tokens)
                checked += 1
            elif p.metavar:
                assert tokens[k] == p.metavar, (path, p.opts, tokens)
    assert checked > 12  # --help of every command, --debug, --compile, --tf32/--no-tf32, --heun, ...


def test_7_top_level_help_lists_commands_in_pipeline_order_with_the_flow():
    r = invoke(["--help"], env={"COLUMNS": "220", "TERMINAL_WIDTH": "220"})
    assert r.exit_code == 0
    listed = re.findall(r"^│ ([a-z][a-z-]+) {2,}\S", r.output, re.M)
    pipeline = ["encode-latents", "encode-features", "cache", "train", "sample-eval", "export", "demo"]
    assert [c for c in listed if c in pipeline] == pipeline, listed
    assert set(listed) == set(typer.main.get_command(app).commands), listed
    flat = " ".join(r.output.replace("│", " ").split())
    assert " ".join(FLOW.split()) in flat and flat.count("Typical flow:") == 1


def test_7_train_off_a_terminal_prints_step_total_and_eta(cache, tmp_path):
    r = ok(train_args(cache, tmp_path / "run", 3))
    shown = [TRAIN_LINE.match(line) for line in lines_of(r.stderr) if line.startswith("train: step")]
    assert all(shown) and [(int(m.group(1)), int(m.group(2))) for m in shown] == [(1, 3), (2, 3), (3, 3)], r.stderr


def test_7_sampling_reports_progress_within_a_batch(trained_run, tmp_path, monkeypatch):
    periods = []

    class EveryUpdate(progress.Tracker):  # the Tracker's period set to 0: a line on every update
        def __init__(self, *a, every_s=10.0, **k):
            periods.append(every_s)
            super().__init__(*a, every_s=0.0, **k)

    monkeypatch.setattr(sampler_mod, "Tracker", EveryUpdate)
    r = ok(["sample-eval", "--run-dir", trained_run, "--out", tmp_path / "out", "--num-samples", 8, "--num-steps", 4,
            "--batch-size", 4, "--shard-size", 8])
    assert periods and all(0 < s <= 5 for s in periods)  # off a terminal: a line at least every 5 s
    done = [int(n) for n in re.findall(r"^sample: (\d+)/8 img \(", r.stderr, re.M)]
    assert done == [1, 2, 3, 4, 5, 6, 7, 8], r.stderr  # a quarter batch per sampler step, not one jump per batch


# ------------------------------------------------------------------------------------ 8. resume with changes
def test_8_resume_with_changed_hyperparameters_is_printed_and_recorded(cache, tmp_path):
    run = tmp_path / "run"
    ok(train_args(cache, run, 2))
    first = record(run)
    r = ok(train_args(cache, run, 3, "--lr", "5e-4", "--ema-decay", "0.99", "--proj-coeff", "0.25", "--precision",
                      "bf16", "--micro-batch-size", "4"))
    line = next(line for line in lines_of(r.stderr) if line.startswith("resumed from"))
    assert line == (f"resumed from {checkpoint.ckpt_path(run, 2)} at step 2 with changed options: --steps 2 -> 3, "
                    "--micro-batch-size None -> 4, --lr 0.001 -> 0.0005, --proj-coeff 0.5 -> 0.25, "
                    "--ema-decay 0.9999 -> 0.99, --precision 'fp32' -> 'bf16'")
    after = record(run)
    assert after["config"] == first["config"] and after["cache"] == first["cache"]  # never overwritten
    assert [{k: v for k, v in h.items() if k != "utc"} for h in after["history"]] == [
        {"step": 2, "changed": {"steps": [2, 3], "micro_batch_size": [None, 4], "lr": [0.001, 0.0005],
                                "proj_coeff": [0.5, 0.25], "ema_decay": [0.9999, 0.99], "precision": ["fp32", "bf16"]}}]
    ck = ckpt(run, 3)
    assert ck["config"]["lr"] == 5e-4 and [g["lr"] for g in ck["opt"]["param_groups"]] == [5e-4]

    before = tree_stat(run)
    for change, words in ((["--model", "SiT-S/2"], "--model 'SiT-T/2' (now 'SiT-S/2')"),
                          (["--global-batch-size", "4"], "--global-batch-size 8 (now 4)"),
                          (["--seed", "7"], "--seed 0 (now 7)"),
                          (["--projector-dim", "32"], "--projector-dim 64 (now 32)"),
                          ([], "--encoder ['dinov2-b'] (now [])")):
        line = error_line(invoke(train_args(cache, run, 4, *change, encoder="dinov2-b" if change else "none")))
        assert "this run was trained with other settings" in line and words in line, (change, line)
        assert tree_stat(run) == before, change


# ------------------------------------------------------------------------------------ 9. default VAEs
def test_9_default_vaes_are_the_references(tmp_path):
    enc = typer.main.get_command(app).commands["encode-latents"]
    assert next(p for p in enc.params if p.name == "vae").default == "sd-vae-ft-mse"

    def prov(name: str, weights_id: str) -> Provenance:
        return Provenance(name=name, weights_id=weights_id, weights_hash="h", random_init=False)

    mse, ema = prov("sd-vae-ft-mse", "stabilityai/sd-vae-ft-mse"), prov("sd-vae-ft-ema", "stabilityai/sd-vae-ft-ema")
    assert sampling_decoder("sd-vae-ft-mse") == sampling_decoder("sd-vae-ft-ema") == "sd-vae-ft-ema"
    assert choose_decoder(mse, None, None) == ("sd-vae-ft-ema", None)  # sample-eval: the reference's pairing
    assert choose_decoder(ema, None, None) == ("sd-vae-ft-ema", None)
    assert choose_decoder(mse, None, "/w/ema") == ("sd-vae-ft-ema", "/w/ema")
    assert choose_decoder(mse, "sd-vae-ft-mse", None) == ("sd-vae-ft-mse", None)  # --vae wins
    assert choose_decoder(mse, None, None, pair=False) == ("sd-vae-ft-mse", None)  # training previews: the codec
    local_mse, local_ema = tmp_path / "mse", tmp_path / "ema"
    local_mse.mkdir()
    local_ema.mkdir()
    assert choose_decoder(prov("sd-vae-ft-mse", str(local_mse)), None, None) == ("sd-vae-ft-ema", None)  # not ft-mse's
    assert choose_decoder(prov("sd-vae-ft-ema", str(local_ema)), None, None) == ("sd-vae-ft-ema", str(local_ema))
    for other in ("pixel", "tiny"):
        assert choose_decoder(prov(other, "none"), None, None) == (other, None)


def test_9_sample_eval_decodes_ft_mse_latents_with_ft_ema(tmp_path, monkeypatch):
    """Through the stage: a run on SD-VAE (ft-mse) latents samples with the ft-ema decoder unless told otherwise."""
    cache = make_cache(tmp_path / "cache", CacheOpts(latents=(Latents("sd-vae-ft-mse", 4, 8, SD_SCALE, 0.5),)))
    run = tmp_path / "run"
    ok(train_args(cache, run, 1))
    built = []

    def fake_decoder(name, weights, device):  # no VAE weights offline: record the choice, decode to gray
        built.append((name, weights))
        return lambda z: torch.full((z.shape[0], 64, 64, 3), 128, dtype=torch.uint8)

    monkeypatch.setattr(sampling_session, "make_decoder", fake_decoder)
    ok(["sample-eval", "--run-dir", run, "--out", tmp_path / "out", *SAMPLE_ARGS])
    ok(["sample-eval", "--run-dir", run, "--out", tmp_path / "out2", *SAMPLE_ARGS, "--vae", "sd-vae-ft-mse"])
    assert built == [("sd-vae-ft-ema", None), ("sd-vae-ft-mse", None)]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["decoder"] == ["sd-vae-ft-ema", None]
