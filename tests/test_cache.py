"""Cache layout, writer, pread reader, sampler and verify, without any model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from repa_pipe.cache import inspect, layout, reader, writer
from repa_pipe.pipeline.errors import CacheMismatchError, NotACacheError

N, S = 23, 8


def _dataset(n=N, sha="a"):
    return {"kind": "imagefolder", "root": "/x", "N": n, "file_list_sha256": sha, "labels_sha256": "b"}


def _entry(shape=(N, 4, 3), dtype="float16", model="t"):
    return {"kind": "features", "model": {"id": model}, "dtype": dtype, "shape": list(shape),
            "chunk": [1, *shape[1:]], "preprocessing": {}, "extra": {}}


def _make(root, data, bad_rows=(), name="features/t"):
    keys = [f"k{i}" for i in range(N)]
    m = writer.open_or_create(root, _dataset(), keys, np.arange(N) % 3, 32, S)
    m = writer.ensure_array(root, m, name, _entry(data.shape, str(data.dtype)))
    w = writer.ShardWriter(root, m, name)
    for k in range(m["num_shards"]):
        s, e = layout.shard_range(k, N, S)
        d = data[s:e].copy()
        bad = []
        for r in bad_rows:
            if s <= r < e:
                d[r - s] = np.nan
                bad.append({"index": r, "key": keys[r], "reason": "test"})
        w.write(k, d, bad)
    return writer.finalize(root, name)


@pytest.fixture
def data():
    return np.random.default_rng(0).standard_normal((N, 4, 3)).astype(np.float16)


def test_roundtrip_matches_zarr_and_pread(tmp_path, data):
    m = _make(tmp_path / "c", data, bad_rows=[5])
    assert m["arrays"]["features/t"]["status"] == "complete"
    # zarr itself reads what we wrote: the file is a standard Zarr v3 array
    z = zarr.open_array(str(tmp_path / "c" / "cache.zarr"), path="features/t", mode="r")
    ref = data.copy()
    ref[5] = np.nan
    np.testing.assert_array_equal(z[:], ref)
    r = reader.CacheReader(tmp_path / "c", ["features/t"])
    assert 5 not in r.valid_indices() and len(r.valid_indices()) == N - 1
    idx = np.array([22, 0, 7, 8, 7, 16])  # unsorted, repeated, across shards, last partial shard
    got = r.gather(idx)
    np.testing.assert_array_equal(got["features/t"], data[idx])
    np.testing.assert_array_equal(got["labels"], idx % 3)
    with pytest.raises(ValueError, match="invalid rows"):
        r.gather(np.array([5]))


def test_pread_reader_single_thread_matches(tmp_path, data):
    m = _make(tmp_path / "c", data)
    a = reader.ArrayReader(tmp_path / "c", m, "features/t", threads=1)
    idx = np.random.default_rng(1).integers(0, N, 50)
    np.testing.assert_array_equal(a.gather(idx), data[idx])


def test_resume_skips_done_shards_and_marker_follows_fsync(tmp_path, data):
    root = tmp_path / "c"
    keys = [f"k{i}" for i in range(N)]
    m = writer.open_or_create(root, _dataset(), keys, np.zeros(N), 32, S)
    m = writer.ensure_array(root, m, "features/t", _entry())
    w = writer.ShardWriter(root, m, "features/t")
    w.write(1, data[8:16], [])
    assert w.pending([0, 1, 2]) == [0, 2]
    m = writer.finalize(root, "features/t")
    assert m["arrays"]["features/t"]["status"] == "in_progress"
    # reopening the same cache with the same array keeps the done shard
    m = writer.open_or_create(root, _dataset(), keys, np.zeros(N), 32, None)
    m = writer.ensure_array(root, m, "features/t", _entry())
    assert writer.ShardWriter(root, m, "features/t").pending([0, 1, 2]) == [0, 2]


def test_mismatches_are_clear_errors(tmp_path, data):
    root = tmp_path / "c"
    _make(root, data)
    keys = [f"k{i}" for i in range(N)]
    with pytest.raises(CacheMismatchError, match="another source"):
        writer.open_or_create(root, _dataset(sha="other"), keys, np.zeros(N), 32, None)
    with pytest.raises(CacheMismatchError, match="resolution is 32"):
        writer.open_or_create(root, _dataset(), keys, np.zeros(N), 64, None)
    with pytest.raises(CacheMismatchError, match="shard size is 8"):
        writer.open_or_create(root, _dataset(), keys, np.zeros(N), 32, 16)
    m = layout.load_manifest(root)
    with pytest.raises(CacheMismatchError, match="made differently"):
        writer.ensure_array(root, m, "features/t", _entry(model="other"))


def test_not_a_cache(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("hello")
    with pytest.raises(NotACacheError, match="not empty and is not a repa-pipe cache"):
        writer.open_or_create(tmp_path / "junk", _dataset(), [], np.zeros(0), 32, S)
    assert (tmp_path / "junk" / "file.txt").read_text() == "hello"  # nothing touched
    with pytest.raises(NotACacheError, match="no manifest.json"):
        layout.load_manifest(tmp_path / "junk")
    (tmp_path / "junk" / "manifest.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(NotACacheError, match="not a repa-pipe cache manifest"):
        layout.load_manifest(tmp_path / "junk")
    with pytest.raises(NotACacheError, match="no such folder"):
        layout.load_manifest(tmp_path / "missing")


def test_verify_finds_every_problem(tmp_path, data):
    root = tmp_path / "c"
    _make(root, data, bad_rows=[3])
    assert inspect.verify(root).ok
    paths = layout.CachePaths(root)
    # a valid row turned NaN behind the writer's back: file changed -> reported
    shard = paths.shard_file("features/t", 2, 3)
    raw = bytearray(shard.read_bytes())
    raw[0:2] = np.array([np.nan], dtype=np.float16).tobytes()
    shard.write_bytes(bytes(raw))
    paths.done_marker("features/t", 0).unlink()
    report = inspect.verify(root)
    assert any("shard 0 not done" in p for p in report.problems)
    assert any("shard 2 changed" in p for p in report.problems)
    assert not any("shard 1" in p for p in report.problems)


def test_verify_reports_nan_in_valid_row(tmp_path, data):
    bad = data.copy()
    bad[9] = np.nan  # written NaN but not recorded as bad
    _make(tmp_path / "c", bad)
    report = inspect.verify(tmp_path / "c")
    assert any("NaN in valid rows [9]" in p for p in report.problems)


def test_corrupt_shard_index_detected(tmp_path, data):
    root = tmp_path / "c"
    m = _make(root, data)
    shard = layout.CachePaths(root).shard_file("features/t", 0, 3)
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # inside the index
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheMismatchError, match="checksum"):
        reader.ArrayReader(root, m, "features/t").gather(np.array([0]))


def test_owned_shards_partition():
    owned = [layout.owned_shards(10, r, 3) for r in range(3)]
    assert sorted(sum(owned, [])) == list(range(10))
    assert owned[1] == [1, 4, 7]


class TestSampler:
    def test_exact_resume_and_epochs(self):
        idx = np.arange(100)
        s = reader.IndexSampler(idx, 8, seed=3)
        assert s.batches_per_epoch == 12
        first = [s.batch_at(i) for i in range(30)]
        s2 = reader.IndexSampler(idx, 8, seed=3)  # a fresh sampler resumed at step 17
        np.testing.assert_array_equal(s2.batch_at(17), first[17])
        # one epoch covers distinct rows; the next epoch is another permutation
        ep0 = np.concatenate(first[:12])
        assert len(set(ep0.tolist())) == 96
        assert not np.array_equal(first[0], first[12])

    def test_ranks_are_disjoint_slices_of_the_global_batch(self):
        idx = np.arange(3, 67)
        one = reader.IndexSampler(idx, 8, seed=0)
        ranks = [reader.IndexSampler(idx, 8, seed=0, rank=r, world_size=2) for r in range(2)]
        for step in range(20):
            both = np.concatenate([r.batch_at(step) for r in ranks])
            np.testing.assert_array_equal(both, one.batch_at(step))
            assert not set(ranks[0].batch_at(step)) & set(ranks[1].batch_at(step))

    def test_only_valid_rows_and_errors(self):
        idx = np.array([0, 2, 4, 6, 8, 10])
        s = reader.IndexSampler(idx, 2, seed=0)
        seen = np.concatenate([s.batch_at(i) for i in range(6)])
        assert set(seen.tolist()) <= set(idx.tolist())
        with pytest.raises(ValueError, match="divisible"):
            reader.IndexSampler(idx, 3, seed=0, world_size=2)
        with pytest.raises(ValueError, match="fewer than one global batch"):
            reader.IndexSampler(idx, 8, seed=0)


def test_atomic_writes_get_normal_file_permissions(tmp_path):
    import os

    from repa_pipe.pipeline.fileio import atomic_write_bytes
    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_bytes(tmp_path / "out.bin", b"x")
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o666 & ~mask
    assert not list(tmp_path.glob(".*.tmp"))
