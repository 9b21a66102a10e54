"""Hostile and careless inputs to the cache and a reader with more shards than open files: each case a refusal in
one line, nothing outside the cache touched, nothing already written lost.

- array names in manifest.json that leave the cache (absolute, `..`, through a symlinked folder)
- a FIFO in place of index/labels.npy (train and verify would block on it) or of a shard file
- hand-edited manifests: arrays as a list, shard_size 0, negative n, bad-row index 10^6 or -1
- `--resolution 100000`, `--num-classes 1000000000` at encode
- more shard files than the process may open (RLIMIT_NOFILE lowered), and running out of descriptors
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fixtures import invoke, make_imagefolder
from repa_pipe.cache import inspect, reader, writer
from repa_pipe.cache.manifest import ArraySpec, Dataset, Provenance, read_manifest
from repa_pipe.pipeline.errors import CorruptDataError, NotACacheError
from repa_pipe.pipeline.hashing import hash_lines, sha256_int64

N, S = 20, 4


def _make(root: Path, n: int = N, shard: int = S) -> Path:
    keys, labels = [f"k{i}" for i in range(n)], np.arange(n) % 3
    ds = Dataset(kind="imagefolder", root="/x", n=n, num_classes=3, file_list_sha256=hash_lines(keys),
                 labels_sha256=sha256_int64(labels))
    spec = ArraySpec(kind="features", model=Provenance("t", "w", "h", False), dtype="float16", shape=(n, 2, 3),
                     precision="fp32", preprocessing={})
    writer.open_or_create(root, ds, keys, labels, 32, shard)
    m = writer.ensure_array(root, spec)
    w = writer.ShardWriter(root, m, spec.name)
    data = np.arange(n * 6, dtype=np.float16).reshape(n, 2, 3)
    for k in range(m.num_shards):
        s, e = m.shard_range(k)
        w.write(k, data[s:e], [])
    writer.finalize(root, spec.name)
    return root


@pytest.fixture
def cache(tmp_path) -> Path:
    return _make(tmp_path / "c")


def _edit(cache: Path, fn) -> None:
    path = cache / "manifest.json"
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _one_line_failure(args) -> str:
    r = invoke(args)
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), r.output
    assert "Traceback" not in r.output
    return lines[-1]


# ------------------------------------------------------------------------------------ array names (17.2)
@pytest.mark.parametrize("bad", ["/abs/dir", "features/../../../../x", "latents/../../outside", "features/a/b",
                                 "other/t", "features/", "features/.."])
def test_array_name_leaving_the_cache_is_a_damaged_manifest_everywhere(cache, tmp_path, bad):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    _edit(cache, lambda d: d["arrays"].__setitem__(bad, d["arrays"]["features/t"]))
    with pytest.raises(NotACacheError, match="damaged manifest"):
        read_manifest(cache)
    for args in (["cache", "info", str(cache)], ["cache", "verify", "--repair", str(cache)]):
        assert "damaged manifest" in _one_line_failure(args)
    assert (outside / "keep.txt").read_text() == "mine"


def test_array_name_through_a_symlinked_folder_out_of_the_cache_is_refused(cache, tmp_path):
    outside = tmp_path / "elsewhere"
    (outside / "t").mkdir(parents=True)
    (outside / "t" / "keep.txt").write_text("mine")
    spec = json.loads((cache / "manifest.json").read_text())["arrays"]["features/t"]
    spec["spec"]["model"]["name"] = "u"
    _edit(cache, lambda d: d["arrays"].__setitem__("features/u", spec))
    (cache / "done" / "features" / "u").parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside / "t", cache / "done" / "features" / "u")
    with pytest.raises(NotACacheError, match="outside the cache"):
        read_manifest(cache)
    _one_line_failure(["cache", "verify", "--repair", str(cache)])
    assert (outside / "t" / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------ hand-edited manifests
@pytest.mark.parametrize("edit, what", [
    (lambda d: d.__setitem__("arrays", [d["arrays"]["features/t"]]), "arrays must be a JSON object"),
    (lambda d: d.__setitem__("shard_size", 0), "shard_size"),
    (lambda d: d["dataset"].__setitem__("n", -5), "dataset.n"),
    (lambda d: d.__setitem__("resolution", "big"), "resolution"),
    (lambda d: d["arrays"]["features/t"]["bad"].append(
        {"index": 10**6, "key": "k", "path": "p", "reason": "r"}), "bad-row index"),
    (lambda d: d["arrays"]["features/t"]["bad"].append(
        {"index": -1, "key": "k", "path": "p", "reason": "r"}), "bad-row index"),
    (lambda d: d["arrays"]["features/t"]["spec"].__setitem__("shape", [20, -2, 3]), "shape"),
    (lambda d: d["arrays"]["features/t"]["spec"].__setitem__("shape", [7, 2, 3]), "rows"),
])
def test_hand_edited_manifest_is_one_line(cache, edit, what):
    _edit(cache, edit)
    with pytest.raises(NotACacheError, match="damaged manifest") as e:
        read_manifest(cache)
    assert what in str(e.value) and "\n" not in str(e.value)
    for args in (["cache", "info", str(cache)], ["cache", "verify", str(cache)]):
        assert "damaged manifest" in _one_line_failure(args)


def test_marker_with_bad_row_outside_the_cache_is_an_unreadable_marker(cache):
    marker = cache / "done" / "features" / "t" / "000001.json"
    d = json.loads(marker.read_text())
    d["bad"] = [{"index": -1, "key": "k", "path": "p", "reason": "r"}]
    marker.write_text(json.dumps(d))
    report = inspect.verify(cache)
    assert any("unreadable done marker" in p and "bad-row index" in p for p in report.problems)
    assert report.damaged == {"features/t": {1}}


# ------------------------------------------------------------------------------------ special files (17.6)
def test_fifo_in_place_of_labels_is_refused_not_waited_on(cache):
    labels = cache / "index" / "labels.npy"
    labels.unlink()
    os.mkfifo(labels)
    with pytest.raises(CorruptDataError, match="not a regular file"):
        reader.CacheReader(cache, ["features/t"])
    report = inspect.verify(cache)  # would block in np.load on the FIFO
    assert any("labels.npy" in p and "not a regular file" in p for p in report.problems)


def test_fifo_in_place_of_keys_and_array_metadata_is_refused(cache):
    keys = cache / "index" / "keys.txt"
    keys.unlink()
    os.mkfifo(keys)
    meta = cache / "cache.zarr" / "features" / "t" / "zarr.json"
    meta.unlink()
    os.mkfifo(meta)
    report = inspect.verify(cache)
    assert any("keys.txt" in p and "not a regular file" in p for p in report.problems)
    assert any("zarr.json" in p and "not a regular file" in p for p in report.problems)


def test_fifo_in_place_of_a_shard_is_damage_to_that_shard(cache):
    m = read_manifest(cache)
    r = reader.ArrayReader(cache, m, "features/t", threads=1)
    path = r.shard_path(2)
    size = path.stat().st_size
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(CorruptDataError, match="not a regular file") as e:
        r.gather(np.array([9]))
    assert e.value.detail.startswith("is not a regular file")
    r.close()
    assert size > 0


# ------------------------------------------------------------------------------------ bounds at encode (17.10)
@pytest.mark.parametrize("args, option", [(["--resolution", "100000"], "--resolution"),
                                          (["--num-classes", "1000000000"], "--num-classes")])
@pytest.mark.parametrize("cmd, model", [("encode-latents", ["--vae", "pixel"]),
                                        ("encode-features", ["--encoder", "tiny"])])
def test_absurd_resolution_and_class_count_are_refused_before_a_cache_exists(tmp_path, cmd, model, args, option):
    src = make_imagefolder(tmp_path / "imgs", per_class=1)
    line = _one_line_failure([cmd, "--source", str(src), "--cache", str(tmp_path / "c"), *model, *args])
    assert option in line
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------ open files (16.3)
def test_reader_keeps_a_bounded_number_of_shards_open(tmp_path):
    root = _make(tmp_path / "c", n=40, shard=1)
    m = read_manifest(root)
    r = reader.ArrayReader(root, m, "features/t", threads=4, max_open=5)
    got = r.gather(np.arange(40)[::-1].copy())
    np.testing.assert_array_equal(got, np.arange(240, dtype=np.float16).reshape(40, 2, 3)[::-1])
    assert r.open_files <= 5
    r.close()


def test_more_shards_than_the_fd_soft_limit_read_in_a_fresh_process(tmp_path):
    """Soft RLIMIT_NOFILE 64, hard 64 (so it cannot be raised), 150 one-row shards: the whole array reads."""
    root = _make(tmp_path / "c", n=150, shard=1)
    code = textwrap.dedent(f"""
        import resource, numpy as np
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        from repa_pipe.cache.reader import CacheReader
        r = CacheReader({str(root)!r}, ["features/t"], threads=4)
        got = r.gather(np.arange(150))["features/t"]
        assert (got == np.arange(900, dtype=np.float16).reshape(150, 2, 3)).all()
        assert r.arrays["features/t"].open_files <= 16, r.arrays["features/t"].open_files
        print("read", len(got))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0 and "read 150" in out.stdout, out.stderr


def test_soft_fd_limit_is_raised_to_the_hard_limit(tmp_path):
    code = textwrap.dedent("""
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        from repa_pipe.cache.reader import raise_fd_limit
        assert raise_fd_limit() == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_running_out_of_descriptors_is_a_limit_not_damage(cache, monkeypatch):
    m = read_manifest(cache)
    r = reader.ArrayReader(cache, m, "features/t", threads=1)
    real_open = os.open

    def no_fds(path, *a, **k):
        if "cache.zarr" in str(path):
            raise OSError(errno.EMFILE, "Too many open files", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(reader.os, "open", no_fds)
    with pytest.raises(reader.ResourceLimitError, match="RLIMIT_NOFILE soft") as e:
        r.gather(np.array([0]))
    assert not isinstance(e.value, CorruptDataError) and "not damaged" in str(e.value)
    r.close()
    with pytest.raises(reader.ResourceLimitError):  # verify stops on the limit too, never reporting damage
        inspect.verify(cache)
    assert (cache / "done" / "features" / "t" / "000000.json").is_file()  # nothing removed


def test_a_reopened_shard_rewritten_meanwhile_is_read_from_its_new_index(tmp_path):
    """Indexes outlive their descriptors (an LRU-closed shard reopens without re-reading its index) only while
    the file is the same one."""
    root = _make(tmp_path / "c", n=8, shard=4)
    m = read_manifest(root)
    r = reader.ArrayReader(root, m, "features/t", threads=1, max_open=1)
    r.gather(np.array([0, 5]))  # shard 0 closed by the LRU when shard 1 opened
    w = writer.ShardWriter(root, m, "features/t")
    new = np.full((4, 2, 3), 7, dtype=np.float16)
    w.write(0, new, [])
    np.testing.assert_array_equal(r.gather(np.array([1]))[0], new[1])
    r.close()
