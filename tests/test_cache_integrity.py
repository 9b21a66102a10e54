"""Proven through the real CLI: the cache is a typed contract that never loses or silently serves bad data.

  a. many writers: both encode stages at once into one cache (manifest reads slowed down) lose nothing; a second
     writer of the same array is refused naming the holder; running the finished command again is a no-op.
  b. flipped data bytes: train stops naming array, shard and row; verify names them; --repair + re-encode heals.
  c. every verify hole: Inf in a valid row, an edited feature dim (train refuses it too), a flipped label, an
     unreadable done marker; a shard with no valid row is fine.
  d. labels and damaged tars: bad .cls values are bad samples (and the cache trains), --num-classes bounds them,
     a truncated or unreadable tar keeps what is readable under --skip-bad and is one line without it.
  e. no debris: a SIGKILLed checkpoint save leaves a temp file the next run removes; a SIGKILLed encode leaves no
     loader worker alive and resumes.
  f. the pixel budget refuses a huge image from its header alone; 16-bit grayscale keeps its high byte.
  g. NaN in a valid cached row stops training naming the row and pointing at `cache verify`.

Faults that need a real process (concurrency, SIGKILL, slow I/O) are injected from outside the library: a small
wrapper script patches a few functions according to RP_TEST_* variables, then runs the real `repa-pipe` CLI.
Tiny everything (16 px, 8-row shards, the `tiny` VAE and encoder, SiT-T/2, one torch thread).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

sys.path.insert(0, str(Path(__file__).parent))
from repa_pipe.pipeline.errors import BadInputError  # noqa: E402
from fixtures import (RES, SHARD, VENV_BIN, done_marker, invoke, make_imagefolder, ok, png_bytes,  # noqa: E402
                      rand_rgb, read_array, ref_adm_crop, shard_file, subprocess_env, tree_stat, write_tar)

LAT, FEAT = "latents/tiny", "features/tiny"
TRAIN = ["--model", "SiT-T/2", "--encoder", "tiny", "--encoder-depth", "2", "--projector-dim", "64",
         "--global-batch-size", "8", "--lr", "1e-3", "--log-every", "1", "--sample-every", "0", "--precision", "fp32",
         "--loader-threads", "1"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """One torch thread for the whole module (conftest.py), in force before its module-scoped fixtures run."""
    yield


# ------------------------------------------------------------------------------------------------ commands
def encode(kind: str, src, cache, *extra, workers: int = 0, vae: str = "tiny") -> list:
    """encode-latents (`vae`) or encode-features (the tiny encoder at grid 2, which a patch-2 SiT on the tiny
    VAE's 4x4 latents needs) with tiny settings."""
    model = ["--vae", vae] if kind == "latents" else ["--encoder", "tiny", "--grid", 2]
    return [f"encode-{kind}", "--source", src, "--cache", cache, "--resolution", RES, "--shard-size", SHARD,
            "--workers", workers, "--batch-size", 4, *model, *extra]


def train(cache, run, steps: int, *extra) -> list:
    return ["train", "--cache", cache, "--run-dir", run, "--steps", steps, *TRAIN, *extra]


def error_line(output: str) -> str:
    """The single `error:` line of a failed command (no traceback, nothing wrapped onto a second line)."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


def fails(args, only_line: bool = False) -> str:
    """Run the CLI in-process; it must exit 1 with one error line (and print nothing else if `only_line`)."""
    r = invoke(args)
    assert r.exit_code == 1, f"exit {r.exit_code}\n{r.output}"
    line = error_line(r.output)
    if only_line:
        assert [ln for ln in r.output.splitlines() if ln.strip()] == [line], r.output
    return line


def flat(text: str) -> str:
    """Log lines are wrapped by rich at 80 columns off a terminal: join them back."""
    return " ".join(text.split())


def manifest(cache: Path) -> dict:
    return json.loads((Path(cache) / "manifest.json").read_text())


def copy_cache(cache: Path, to: Path) -> Path:
    shutil.copytree(cache, to)
    return to


def verified(cache: Path) -> None:
    """`cache verify` finds nothing wrong."""
    r = ok(["cache", "verify", cache])
    assert r.output.startswith("ok: ") and "problem" not in r.output, r.output


def verify_problems(cache: Path) -> list[str]:
    """`cache verify` fails (exit 1, one error line): its problem lines, one per problem."""
    r = invoke(["cache", "verify", cache])
    assert r.exit_code == 1, r.output
    problems = [ln for ln in r.output.splitlines() if ln.startswith("problem: ")]
    assert f"{len(problems)} problem(s) found" in error_line(r.output), r.output
    return problems


def data_files(cache: Path) -> dict:
    """tree_stat of what the encoders write (arrays, done markers, index): not the manifest or lock files."""
    return {p: s for p, s in tree_stat(cache).items() if p.startswith(("cache.zarr/", "done/", "index/"))}


# ------------------------------------------------------------------------------------ real processes, faults
WRAPPER = r'''
"""`repa-pipe` with test faults injected from outside the library (RP_TEST_* variables)."""
import atexit
import os
import sys
import time
from pathlib import Path


def inject():
    delay = float(os.environ.get("RP_TEST_READ_DELAY", "0"))
    if delay:  # every manifest read returns `delay` s late: what it read may be stale by then, unless locked
        import repa_pipe.cache.inspect, repa_pipe.cache.reader, repa_pipe.cache.writer  # noqa: F401
        import repa_pipe.encoding.runner, repa_pipe.encoding.features, repa_pipe.encoding.latents  # noqa
        import repa_pipe.cache.manifest as M
        real, calls = M.read_manifest, [0]

        def slow_read_manifest(root):
            calls[0] += 1
            m = real(root)
            time.sleep(delay)
            return m

        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("repa_pipe") and getattr(mod, "read_manifest", 0) is real:
                mod.read_manifest = slow_read_manifest
        atexit.register(lambda: print(f"[test] slow manifest reads: {calls[0]}", file=sys.stderr, flush=True))
    pause = os.environ.get("RP_TEST_PAUSE_AFTER_SHARD")
    if pause:  # after its first shard (and done marker) the writer waits for PAUSE/go
        from repa_pipe.cache import writer
        real_write = writer.ShardWriter.write

        def write_then_wait(self, k, data, bad):
            real_write(self, k, data, bad)
            Path(pause, "paused").write_text(str(k))
            while not Path(pause, "go").exists():
                time.sleep(0.02)

        writer.ShardWriter.write = write_then_wait
    if os.environ.get("RP_TEST_NO_TORCH_WATCHDOG"):
        # torch's loader workers also notice a dead parent on their own, polling every 5 s: poll once an hour
        # instead, so only repa-pipe's own mechanism (PR_SET_PDEATHSIG) can end them quickly.
        import torch.utils.data._utils.worker as W
        W.MP_STATUS_CHECK_INTERVAL = 3600.0
    hang = os.environ.get("RP_TEST_HANG_IN_TORCH_SAVE")
    if hang:  # a checkpoint save writes some bytes and then never returns (until SIGKILL)
        import torch

        def save_some_then_hang(obj, f, *args, **kwargs):
            f.write(b"PK\x03\x04 the first bytes of a checkpoint")
            f.flush()
            Path(hang).touch()
            time.sleep(600)

        torch.save = save_some_then_hang
    barrier = os.environ.get("RP_TEST_BARRIER")
    if barrier:  # create-or-open the cache, then add the array, at the same instant as the other process
        from repa_pipe.cache import writer

        def together(fn):
            def wrapped(*args, **kwargs):
                Path(barrier, f"{fn.__name__}-{os.getpid()}").touch()
                deadline = time.monotonic() + 30
                while len(list(Path(barrier).glob(f"{fn.__name__}-*"))) < 2 and time.monotonic() < deadline:
                    time.sleep(0.002)
                return fn(*args, **kwargs)
            return wrapped

        writer.open_or_create = together(writer.open_or_create)
        writer.ensure_array = together(writer.ensure_array)


inject()
sys.argv[0] = "repa-pipe"
from repa_pipe.cli import main  # noqa: E402

main()
'''


class Proc:
    """A `repa-pipe` subprocess run through WRAPPER, its output in files (no pipe can fill up)."""

    def __init__(self, tmp: Path, name: str, args, **faults: str):
        wrapper = tmp / "rp_wrapper.py"
        if not wrapper.exists():
            wrapper.write_text(WRAPPER)
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        env = subprocess_env(tmp, **{f"RP_TEST_{k.upper()}": str(v) for k, v in faults.items()})
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.p = subprocess.Popen([str(VENV_BIN / "python"), str(wrapper), *map(str, args)], env=env,
                                      stdout=out, stderr=err)
        self.pid = self.p.pid

    def wait(self, timeout: float = 180) -> int:
        return self.p.wait(timeout=timeout)

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=30)


def wait_for(cond, what: str, procs=(), timeout: float = 120) -> None:
    """Poll `cond` until true; fail early (with its stderr) when one of `procs` fails or all of them exit."""
    deadline = time.monotonic() + timeout
    while not cond():
        codes = [p.p.poll() for p in procs]
        for p, code in zip(procs, codes):
            assert code in (None, 0), f"{what}: a process failed first (exit {code})\n{p.stderr}"
        assert not procs or any(c is None for c in codes), f"{what}: every process exited first"
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields from the state on (state, ppid, ..., starttime at [19]); None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def children(pid: int) -> dict[int, int]:
    """{child pid: start time} of every live process whose parent is `pid`."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None and int(st[1]) == pid and st[0] != "Z":
            out[int(d.name)] = int(st[19])
    return out


def alive(pid: int, start: int) -> bool:
    """The process `pid` started at `start` still runs (not gone, not a zombie, pid not reused)."""
    st = _stat(pid)
    return st is not None and st[0] != "Z" and int(st[19]) == start


# ------------------------------------------------------------------------------------------------- data
def shard_row_offset(path: Path, j: int, shard_size: int = SHARD) -> int:
    """Byte offset of inner chunk (row) j in a zarr v3 shard file, from the shard index at its end (read here
    independently of repa_pipe's reader: (offset, nbytes) little-endian uint64 pairs, then a crc32c)."""
    raw = path.read_bytes()
    index = np.frombuffer(raw[-(16 * shard_size + 4):-4], dtype="<u8").reshape(shard_size, 2)
    return int(index[j, 0])


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x5A
    path.write_bytes(bytes(raw))


def store_values(cache: Path, name: str, values: dict[int, float]) -> None:
    """Rewrite the shard holding rows `values` with one value of each row replaced, through the cache writer:
    the checksums are right, the rows are not recorded bad (what an encoder that emitted Inf would leave)."""
    from repa_pipe.cache import writer
    from repa_pipe.cache.manifest import read_manifest

    m = read_manifest(cache)
    data = read_array(cache, name)
    (k,) = {r // m.shard_size for r in values}
    for r, v in values.items():
        data[r].reshape(-1)[3] = v
    lo, hi = m.shard_range(k)
    writer.ShardWriter(cache, m, name).write(k, data[lo:hi], [])


def png16(w: int, h: int, gray: np.ndarray | None = None, idat: bytes | None = None) -> bytes:
    """A 16-bit grayscale PNG written by hand: `gray` (h, w) uint16, or zeros compressed row block by row block
    (12000 x 12000 takes a second and ~280 KB); `idat` replaces the image data (a header-only 'image')."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if idat is None:
        z = zlib.compressobj(9)
        if gray is not None:
            raw = b"".join(b"\x00" + gray[y].astype(">u2").tobytes() for y in range(h))
            idat = z.compress(raw) + z.flush()
        else:
            block = (b"\x00" + bytes(2 * w)) * 100
            idat = b"".join(z.compress(block) for _ in range(h // 100)) + z.compress(
                (b"\x00" + bytes(2 * w)) * (h % 100)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """24 images in 3 classes: 3 shards of 8."""
    return make_imagefolder(tmp_path_factory.mktemp("src") / "imgs")


@pytest.fixture(scope="module")
def base_cache(src, tmp_path_factory) -> Path:
    """A complete cache of `src` (latents/tiny, features/tiny) made by the encode commands. Copy it to change it."""
    cache = tmp_path_factory.mktemp("base") / "cache"
    ok(encode("latents", src, cache))
    ok(encode("features", src, cache))
    return cache


# ================================================================================ a. many writers, one cache
def test_both_encoders_at_once_lose_nothing_and_a_second_writer_is_refused(src, base_cache, tmp_path):
    """encode-latents and encode-features create one new cache at the same instant, then add their arrays at the
    same instant, and every manifest read returns 0.5 s late, so their read-modify-writes overlap (with the cache
    lock disabled by hand, one job's entry is lost or one job finds the other's half-created cache, every time):
    both finish, both arrays are complete, verified and byte-equal to those of one job after the other. While
    the latents job is paused after its first shard, a second encode-latents is refused naming the holder, and
    nothing of the first is lost; once it finishes, the same command again is a no-op resume."""
    cache, barrier, pause = tmp_path / "cache", tmp_path / "barrier", tmp_path / "pause"
    barrier.mkdir()
    pause.mkdir()
    procs = []
    try:
        lat = Proc(tmp_path, "latents", encode("latents", src, cache), read_delay=0.5, barrier=barrier,
                   pause_after_shard=pause)
        procs.append(lat)
        feat = Proc(tmp_path, "features", encode("features", src, cache), read_delay=0.5, barrier=barrier)
        procs.append(feat)
        wait_for(lambda: (pause / "paused").exists(), "latents paused after its first shard", [lat, feat])

        # A second writer of latents/tiny while the first holds it: one line naming the holder, nothing touched.
        marker = done_marker(cache, LAT, int((pause / "paused").read_text()))
        before = marker.read_bytes()
        line = fails(encode("latents", src, cache))
        assert f"{LAT} is being written by another job (pid {lat.pid} on " in line, line
        assert "encode-latents" in line  # the holder's command
        assert marker.read_bytes() == before

        (pause / "go").touch()
        assert lat.wait() == 0, lat.stderr
        assert feat.wait() == 0, feat.stderr
    finally:
        for p in procs:
            p.kill()
    for p in (lat, feat):  # the fault really was in force: several slowed reads per job
        n = int(p.stderr.split("[test] slow manifest reads: ")[1].split()[0])
        assert n >= 3, p.stderr
    m = manifest(cache)
    assert sorted(m["arrays"]) == [FEAT, LAT]
    for name in (LAT, FEAT):
        e = m["arrays"][name]
        assert e["status"] == "complete" and e["shards_done"] == 3 and e["bad"] == [], e
        assert read_array(cache, name).tobytes() == read_array(base_cache, name).tobytes()
    verified(cache)

    # The first job finished: running it again resumes with nothing to do and rewrites no shard or marker.
    data = data_files(cache)
    r = ok(encode("latents", src, cache))
    assert "3/3 shards already done" in flat(r.output), r.output
    assert data_files(cache) == data


# ============================================================================= b. flipped bytes: train, verify
def test_flipped_data_byte_stops_training_naming_the_row_and_repair_heals_it(src, base_cache, tmp_path):
    cache = copy_cache(base_cache, tmp_path / "cache")
    row, k = 10, 1
    path = shard_file(cache, FEAT, k, 3)
    flip_byte(path, shard_row_offset(path, row - k * SHARD) + 7)  # a data byte of row 10, not the index
    kept = {p: s for p, s in data_files(cache).items() if not p.startswith(f"cache.zarr/{FEAT}/c/{k}/")
            and p != f"done/{FEAT}/{k:06d}.json"}

    # 3 steps of 8 read all 24 rows once: training reaches row 10 and stops there, naming it.
    line = fails(train(cache, tmp_path / "run", 3))
    assert f"{FEAT} shard {k} row {row}: checksum mismatch" in line and str(path) in line, line
    assert not list((tmp_path / "run").rglob("*.pt"))

    (problem,) = verify_problems(cache)
    assert f"{FEAT}: shard {k}: checksum mismatch in 1 row(s) [{row}] ({path})" in problem, problem

    r = invoke(["cache", "verify", cache, "--repair"])
    assert r.exit_code == 1 and f"removed the done markers of 1 shard(s) of {FEAT} [{k}]" in flat(r.output), r.output
    assert not done_marker(cache, FEAT, k).exists()
    r = ok(encode("features", src, cache))  # the same command: rewrites exactly the repaired shard
    assert "2/3 shards already done" in flat(r.output), r.output
    verified(cache)
    after = data_files(cache)
    assert {p: after[p] for p in kept} == kept  # nothing else was rewritten
    np.testing.assert_array_equal(read_array(cache, FEAT), read_array(base_cache, FEAT))


@pytest.mark.parametrize("damage", ["index byte", "truncated"])
def test_damaged_shard_index_or_truncated_file_is_named_and_repair_heals_it(src, base_cache, tmp_path, damage):
    """Damage to a shard as a whole (its index, or a file cut short) is one problem naming the shard, not a list
    of rows; --repair hands it back and the same encode command rewrites it (zarr must not read the old file)."""
    cache = copy_cache(base_cache, tmp_path / "cache")
    k = 2
    path = shard_file(cache, FEAT, k, 3)
    if damage == "index byte":
        flip_byte(path, path.stat().st_size - 40)  # inside the index (16 bytes per row, then a 4-byte crc32c)
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    problems = verify_problems(cache)
    assert problems and all(f"shard {k}" in p for p in problems), problems
    assert not any("row(s)" in p for p in problems), problems  # the shard, not each of its rows
    r = invoke(["cache", "verify", cache, "--repair"])
    assert r.exit_code == 1 and f"[{k}]" in flat(r.output), r.output
    r = ok(encode("features", src, cache))
    assert "2/3 shards already done" in flat(r.output), r.output
    verified(cache)
    np.testing.assert_array_equal(read_array(cache, FEAT), read_array(base_cache, FEAT))


# ==================================================================================== c. every verify hole
def test_verify_catches_inf_in_a_valid_row(base_cache, tmp_path):
    cache = copy_cache(base_cache, tmp_path / "cache")
    store_values(cache, LAT, {13: np.inf})
    (problem,) = verify_problems(cache)
    assert f"{LAT}: shard 1: NaN or Inf in valid row(s) [13]" in problem, problem


def test_edited_feature_dim_is_caught_by_verify_and_refused_by_train(base_cache, tmp_path):
    cache = copy_cache(base_cache, tmp_path / "cache")
    m = manifest(cache)
    n, t, d = m["arrays"][FEAT]["spec"]["shape"]
    m["arrays"][FEAT]["spec"]["shape"] = [n, t, d // 2]
    m["arrays"][FEAT]["spec"]["feature"]["embed_dim"] = d // 2
    (cache / "manifest.json").write_text(json.dumps(m))
    want = f"{FEAT}: shape on disk ({n}, {t}, {d}) but the manifest says ({n}, {t}, {d // 2})"

    problems = verify_problems(cache)
    assert any(want in p for p in problems), problems
    run = tmp_path / "run"
    r = invoke(train(cache, run, 2))
    assert r.exit_code == 1 and want in error_line(r.output), r.output
    assert "train SiT" not in r.output and not run.exists()  # refused before the model is built


def test_flipped_label_bit_is_caught_by_verify_and_refused_by_train(base_cache, tmp_path):
    cache = copy_cache(base_cache, tmp_path / "cache")
    labels = cache / "index" / "labels.npy"
    raw = bytearray(labels.read_bytes())
    raw[-8 * 5] ^= 0x01  # one bit of label 19 (the data follows the .npy header), the file still parses
    labels.write_bytes(bytes(raw))
    assert np.load(labels)[19] != np.load(base_cache / "index" / "labels.npy")[19]

    (problem,) = verify_problems(cache)
    assert "labels.npy differs from what was written" in problem, problem
    assert "labels.npy differs from what was written" in fails(train(cache, tmp_path / "run", 2))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", [b'{"k": 1, "start": 8, "sto', b"\xff\xfe\x00\x01 binary", b"[1, 2]"],
                         ids=["torn-json", "binary", "not-an-object"])
def test_unreadable_done_marker_is_one_line_everywhere_and_the_encoder_rewrites_it(src, base_cache, tmp_path,
                                                                                  content):
    cache = copy_cache(base_cache, tmp_path / "cache")
    marker = done_marker(cache, LAT, 2)
    marker.write_bytes(content)

    (problem,) = verify_problems(cache)
    assert f"{LAT}: shard 2: unreadable done marker {marker}" in problem, problem
    ok(["cache", "info", cache])
    line = fails(train(cache, tmp_path / "run", 2))
    assert "unreadable done marker" in line and str(marker) in line
    r = ok(encode("latents", src, cache))  # an unreadable marker means "not done": the shard is rewritten
    assert "2/3 shards already done" in flat(r.output), r.output
    assert json.loads(marker.read_text())["k"] == 2
    verified(cache)


def test_a_shard_with_no_valid_row_verifies_and_trains(tmp_path):
    src = make_imagefolder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=8)
    for p in sorted((src / "b").iterdir()):  # shard 1 = class b: every image empty
        p.write_bytes(b"")
    cache = tmp_path / "cache"
    ok(encode("latents", src, cache, "--skip-bad"))
    ok(encode("features", src, cache, "--skip-bad"))
    m = manifest(cache)
    assert [b["index"] for b in m["arrays"][LAT]["bad"]] == list(range(8, 16))
    assert np.isnan(read_array(cache, LAT)[8:16]).all()
    verified(cache)
    ok(train(cache, tmp_path / "run", 2))


# ================================================================================= d. labels, damaged tars
def label_tar(path: Path, n: int = 16, cls: dict[int, bytes] | None = None, seed: int = 0) -> Path:
    """A tar of n samples sJJ.png + sJJ.cls (label j % 4 unless `cls` says otherwise)."""
    cls = cls or {}
    members = []
    for j in range(n):
        members += [(f"s{j:02d}.png", png_bytes(rand_rgb(20 + j % 5, 18 + j % 7, 1000 * seed + j))),
                    (f"s{j:02d}.cls", cls.get(j, b"%d" % (j % 4)))]
    return write_tar(path, members)


@pytest.mark.parametrize("text,reason", [(b"cat", "bad .cls label 'cat'"), (b"-1", "bad .cls label '-1'"),
                                         (b"1000000000", "label 1000000000 out of range [0, 100000)")])
def test_bad_label_without_skip_bad_is_one_line_naming_the_member(tmp_path, text, reason):
    tar = label_tar(tmp_path / "tars" / "l.tar", cls={5: text})
    cache = tmp_path / "cache"
    line = fails(encode("latents", tmp_path / "tars", cache, vae="pixel"))
    assert f"{tar}/s05.png: {reason}" in line and "--skip-bad" in line, line


def test_bad_labels_under_skip_bad_are_bad_rows_and_the_cache_trains(tmp_path):
    tar = label_tar(tmp_path / "tars" / "l.tar", cls={2: b"cat", 5: b"-1", 11: b"1000000000"})
    cache = tmp_path / "cache"
    ok(encode("latents", tmp_path / "tars", cache, "--skip-bad"))
    ok(encode("features", tmp_path / "tars", cache, "--skip-bad"))
    m = manifest(cache)
    for name in (LAT, FEAT):
        bad = m["arrays"][name]["bad"]
        assert [(b["index"], b["path"]) for b in bad] == [(i, f"{tar}/s{i:02d}.png") for i in (2, 5, 11)]
    assert "cat" in m["arrays"][LAT]["bad"][0]["reason"] and "out of range" in m["arrays"][LAT]["bad"][2]["reason"]
    labels = np.load(cache / "index" / "labels.npy")
    assert labels.shape == (16,) and labels[[2, 5, 11]].tolist() == [-1, -1, -1]
    assert m["dataset"]["num_classes"] == 4  # 1000000000 is a bad sample, not a billion-class label table
    r = ok(train(cache, tmp_path / "run", 2))
    assert "done: step 2" in flat(r.output)


def test_num_classes_is_an_explicit_label_bound(tmp_path):
    tar = label_tar(tmp_path / "tars" / "l.tar")  # labels 0..3
    line = fails(encode("latents", tmp_path / "tars", tmp_path / "c3", "--num-classes", 3, vae="pixel"))
    assert f"{tar}/s03.png: label 3 out of range [0, 3)" in line, line
    ok(encode("latents", tmp_path / "tars", tmp_path / "c3", "--num-classes", 3, "--skip-bad", vae="pixel"))
    m = manifest(tmp_path / "c3")
    assert [b["index"] for b in m["arrays"]["latents/pixel"]["bad"]] == [3, 7, 11, 15]
    assert m["dataset"]["num_classes"] == 3
    ok(encode("latents", tmp_path / "tars", tmp_path / "c10", "--num-classes", 10, vae="pixel"))
    m = manifest(tmp_path / "c10")
    assert m["dataset"]["num_classes"] == 10 and m["arrays"]["latents/pixel"]["bad"] == []


def _damage(tar: Path, kind: str) -> None:
    """Damage member s03.png onwards of `tar`."""
    with tarfile.open(tar) as tf:
        s03 = tf.getmember("s03.png")
    raw = tar.read_bytes()
    if kind == "cut-in-member":  # the file ends half way through s03.png's data
        tar.write_bytes(raw[:s03.offset_data + s03.size // 2])
    elif kind == "cut-at-member":  # the file ends right before s03.png's header: no end-of-archive marker
        tar.write_bytes(raw[:s03.offset])
    elif kind == "garbage-header":  # s03.png's header overwritten (members after it cannot be found)
        tar.write_bytes(raw[:s03.offset] + bytes(range(256)) * 2 + raw[s03.offset + 512:])
    elif kind == "not-a-tar":
        tar.write_bytes(b"this is not a tar file\n" * 50)
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind", ["cut-in-member", "cut-at-member", "garbage-header", "not-a-tar"])
def test_damaged_tar_keeps_its_readable_members_under_skip_bad(tmp_path, kind):
    tars = tmp_path / "tars"
    a, b, c = (label_tar(tars / f"{x}.tar", n=6, seed=s) for s, x in enumerate("abc"))
    pristine = {t.name: t.read_bytes() for t in (a, b, c)}
    _damage(b, kind)
    cache = tmp_path / "cache"

    line = fails(encode("latents", tars, cache, vae="pixel"), only_line=True)
    assert line.startswith(f"error: {b}: damaged tar shard (") and "--skip-bad" in line, line
    assert not cache.exists()  # refused before anything was written

    r = ok(encode("latents", tars, cache, "--skip-bad", vae="pixel"))
    assert f"warning: {b}: damaged tar shard" in flat(r.output), r.output
    kept_b = {"cut-in-member": 4, "cut-at-member": 3, "garbage-header": 3, "not-a-tar": 0}[kind]
    keys = (cache / "index" / "keys.txt").read_text().splitlines()
    assert keys == ([f"a.tar/s{j:02d}" for j in range(6)] + [f"b.tar/s{j:02d}" for j in range(kept_b)]
                    + [f"c.tar/s{j:02d}" for j in range(6)])
    m = manifest(cache)
    bad = m["arrays"]["latents/pixel"]["bad"]
    if kind == "cut-in-member":  # listed, its data cut short: a bad row, the index of every other sample intact
        assert [(x["index"], x["key"], x["path"]) for x in bad] == [(9, "b.tar/s03", f"{b}/s03.png")]
        assert bad[0]["reason"].startswith("tar shard truncated (")
    else:
        assert bad == []
    notes = m["dataset"]["notes"]
    assert any(n.startswith(f"damaged tar shard {b}: ") for n in notes), notes
    assert "damaged tar shard" in flat(ok(["cache", "info", cache]).output)

    # every readable member is encoded exactly: the pixel codec's rows are the crops themselves
    lat = read_array(cache, "latents/pixel")
    for i, key in enumerate(keys):
        if i in {x["index"] for x in bad}:
            assert np.isnan(lat[i]).all()
            continue
        tar, member = key.split("/")
        with tarfile.open(fileobj=io.BytesIO(pristine[tar])) as tf:
            img = Image.open(io.BytesIO(tf.extractfile(f"{member}.png").read()))
            crop = ref_adm_crop(img, RES).astype(np.float32).transpose(2, 0, 1) / np.float32(127.5) - 1
        np.testing.assert_array_equal(lat[i, :3], crop, err_msg=key)
    verified(cache)
    # the listing is deterministic: a second stage sees the same file list and the same bad samples
    ok(encode("features", tars, cache, "--skip-bad"))
    assert [x["index"] for x in manifest(cache)["arrays"][FEAT]["bad"]] == [x["index"] for x in bad]


@pytest.mark.parametrize("end,damaged,keys,bad", [
    # (where the file ends, damaged?, samples listed, {sample: reason prefix})
    ("in-end-marker", False, 4, {}),                      # every member is whole: nothing is lost
    ("after-last-member", True, 4, {}),                   # no end-of-archive marker: later members may be lost
    ("in-s03.cls-padding", True, 4, {}),                  # s03.cls is whole, its padding is not
    ("in-s03.cls-data", True, 4, {3: "tar shard truncated (its .cls member: 0 of 1 bytes present)"}),
    ("in-s03.cls-header", True, 4, {3: "no .cls label (the tar shard is damaged"}),
    ("in-s02.png-data", True, 3, {2: "tar shard truncated ("}),
])
def test_tar_damage_is_found_wherever_the_file_ends(tmp_path, end, damaged, keys, bad):
    """Listing a cut-off tar (the source alone, no CLI): what is whole is kept, what is cut is a known-bad
    sample, and the tar is recorded as damaged unless nothing can have been lost."""
    from repa_pipe.cache.sources import open_source

    tar = label_tar(tmp_path / "t.tar", n=4)
    with tarfile.open(tar) as tf:
        m = {x.name: x for x in tf.getmembers()}
    cls3, png2 = m["s03.cls"], m["s02.png"]
    cut = {"in-end-marker": cls3.offset_data + 512 + 100, "after-last-member": cls3.offset_data + 512,
           "in-s03.cls-padding": cls3.offset_data + 1, "in-s03.cls-data": cls3.offset_data,
           "in-s03.cls-header": cls3.offset + 100, "in-s02.png-data": png2.offset_data + 10}[end]
    whole = tar.read_bytes()
    tar.write_bytes(whole[:cut])
    source = open_source(str(tmp_path / "t.tar"))
    assert source.keys == [f"t.tar/s{j:02d}" for j in range(keys)]
    assert (str(tar) in source.damaged) == damaged, source.damaged
    assert set(source.known_bad) == set(bad) and all(source.known_bad[i].startswith(r) for i, r in bad.items()), \
        source.known_bad
    assert any(n.startswith(f"damaged tar shard {tar}: ") for n in source.notes()) == damaged
    assert [source.labels[i] for i in range(keys) if i not in bad] == [i % 4 for i in range(keys) if i not in bad]
    for i in range(keys):  # whole members read back exactly; cut ones raise with their reason
        if i in bad:
            with pytest.raises(BadInputError, match=re.escape(bad[i])):
                source.read(i)
        else:
            with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
                want = np.asarray(Image.open(io.BytesIO(tf.extractfile(f"s{i:02d}.png").read())).convert("RGB"))
            np.testing.assert_array_equal(np.asarray(source.read(i)), want)
    assert open_source(str(tmp_path / "t.tar")).dataset() == source.dataset()  # a deterministic listing


# ========================================================================================== e. no debris
def test_sigkill_during_checkpoint_save_leaves_a_temp_file_the_next_run_removes(base_cache, tmp_path):
    run, hung = tmp_path / "run", tmp_path / "hung"
    args = train(base_cache, run, 2, "--ckpt-every", 1)
    p = Proc(tmp_path, "train", args, hang_in_torch_save=hung)
    try:
        wait_for(hung.exists, "the step-1 checkpoint save started", [p])
        temps = list((run / "checkpoints").glob(".*.tmp"))
        assert len(temps) == 1 and temps[0].stat().st_size > 0, temps
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(30) == -signal.SIGKILL
    finally:
        p.kill()
    assert temps[0].exists() and not list((run / "checkpoints").glob("*.pt"))  # the debris a kill leaves

    r = ok(args)  # the same command again
    assert "removed temp files of an interrupted checkpoint save" in flat(r.output), r.output
    assert sorted(q.name for q in (run / "checkpoints").iterdir()) == ["0000001.pt", "0000002.pt"]


def test_sigkilled_encode_leaves_no_loader_worker_alive_and_resumes(src, tmp_path):
    cache, pause = tmp_path / "cache", tmp_path / "pause"
    pause.mkdir()
    args = encode("features", src, cache, workers=2)
    p = Proc(tmp_path, "encode", args, pause_after_shard=pause, no_torch_watchdog=1)
    workers: dict[int, int] = {}
    try:
        # Paused after shard 0 with its DataLoader iterator open: both workers are alive.
        wait_for(lambda: (pause / "paused").exists(), "first shard written", [p])
        workers = children(p.pid)
        assert len(workers) >= 2, (workers, p.stderr)
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(30) == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while any(alive(pid, t) for pid, t in workers.items()) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid, t in workers.items() if alive(pid, t)]
        assert not left, f"loader workers {left} outlived their SIGKILLed parent"
    finally:
        p.kill()
        for pid, t in workers.items():
            if alive(pid, t):
                os.kill(pid, signal.SIGKILL)
    r = ok(args)  # the same command resumes
    assert "1/3 shards already done" in flat(r.output), r.output
    verified(cache)


# ========================================================================================= f. pixel budget
def test_pixel_budget_refuses_a_huge_png_from_its_header(tmp_path, monkeypatch):
    src = tmp_path / "imgs"
    (src / "c").mkdir(parents=True)
    rand_rgb(20, 20, 1).save(src / "c" / "a.png")
    huge = src / "c" / "huge.png"
    huge.write_bytes(png16(12000, 12000))  # 144 megapixels, 16-bit: ~290 MB decoded, ~280 KB on disk
    assert huge.stat().st_size < 1_000_000
    with pytest.warns(Image.DecompressionBombWarning), Image.open(huge) as im:  # PIL warns above 89.5 Mpx
        assert im.mode == "I;16" and im.size == (12000, 12000)

    decoded = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    cache = tmp_path / "cache"
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        line = fails(encode("latents", src, cache, vae="pixel"))
    assert time.monotonic() - t0 < 20
    assert not [w for w in warned if issubclass(w.category, Image.DecompressionBombWarning)]  # no PIL noise
    assert f"{huge}: image is 12000x12000 (144.0 megapixels), over the pixel budget of 64 megapixels " \
           "(--max-megapixels)" in line, line
    assert (12000, 12000) not in decoded and (20, 20) in decoded  # refused from the header, never decoded

    # Over PIL's own warning limit (89.5 Mpx) but under its error limit (179 Mpx): with a 200 Mpx budget the
    # image decodes and is cached like any other.
    decoded.clear()
    ok(encode("latents", src, tmp_path / "cache200", "--max-megapixels", 200, vae="pixel"))
    assert (12000, 12000) in decoded
    lat = read_array(tmp_path / "cache200", "latents/pixel")
    np.testing.assert_array_equal(lat[1, :3], np.full((3, RES, RES), -1, np.float32))  # all-zero image

    # Over PIL's error limit: with the budget raised PIL's own decompression-bomb check refuses it, still
    # before any pixel is decoded (the image data here is not even valid).
    huge.write_bytes(png16(14000, 14000, idat=b"not image data"))
    decoded.clear()
    line = fails(encode("latents", src, tmp_path / "cache-bomb", "--max-megapixels", 200, vae="pixel"))
    assert f"{huge}: image too large (" in line and "196000000 pixels" in line, line
    assert (14000, 14000) not in decoded


def test_sixteen_bit_grayscale_keeps_the_high_byte(tmp_path):
    from repa_pipe.cache.sources_base import to_rgb

    rng = np.random.default_rng(7)
    gray = (rng.integers(0, 256, (18, 23)) << 8 | rng.integers(0, 256, (18, 23))).astype(np.uint16)
    high = (gray >> 8).astype(np.uint8)  # the numpy reference
    want = np.repeat(high[:, :, None], 3, axis=2)
    # I;16B (big-endian samples) and I;16 (little-endian, what PIL makes of a 16-bit PNG) both give the high byte
    big = Image.frombytes("I;16B", (23, 18), gray.astype(">u2").tobytes())
    assert big.mode == "I;16B"
    np.testing.assert_array_equal(np.asarray(to_rgb(big)), want)

    src = tmp_path / "imgs"
    (src / "c").mkdir(parents=True)
    (src / "c" / "g16.png").write_bytes(png16(23, 18, gray=gray))  # PNG stores 16-bit samples big-endian
    with Image.open(src / "c" / "g16.png") as im:
        assert im.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(im), gray)
        np.testing.assert_array_equal(np.asarray(to_rgb(im)), want)
    cache = tmp_path / "cache"
    ok(encode("latents", src, cache, vae="pixel"))
    crop = ref_adm_crop(Image.fromarray(want), RES).astype(np.float32).transpose(2, 0, 1) / np.float32(127.5) - 1
    np.testing.assert_array_equal(read_array(cache, "latents/pixel")[0, :3], crop)


# ===================================================================================== g. non-finite rows
def test_nan_in_a_valid_cached_row_stops_training_naming_it(base_cache, tmp_path):
    cache = copy_cache(base_cache, tmp_path / "cache")
    store_values(cache, LAT, {9: np.nan})
    line = fails(train(cache, tmp_path / "run", 3))  # 3 steps of 8 read every row
    assert "non-finite loss at step" in line and f"({LAT} row 9)" in line, line
    assert f"cache verify {cache}" in line and "--lr" not in line
    assert not list((tmp_path / "run").rglob("*.pt"))
    (problem,) = verify_problems(cache)
    assert f"{LAT}: shard 1: NaN or Inf in valid row(s) [9]" in problem, problem
