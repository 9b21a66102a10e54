"""Cache manifest, writer, checksummed pread reader, sampler and verify, without any model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from repa_pipe.cache import inspect, layout, reader, writer
from repa_pipe.cache.lock import ArrayLock
from repa_pipe.cache.manifest import (ArraySpec, BadRow, Dataset, LatentFacts, Manifest, Provenance, read_manifest,
                                      training_view)
from repa_pipe.encoding.runner import owned_shards
from repa_pipe.pipeline.errors import CacheBusyError, CacheMismatchError, CorruptDataError, NotACacheError
from repa_pipe.pipeline.hashing import hash_lines, sha256_int64

N, S = 23, 8
KEYS = [f"k{i}" for i in range(N)]
LABELS = np.arange(N) % 3


def _dataset(n=N, keys=KEYS, labels=LABELS) -> Dataset:
    return Dataset(kind="imagefolder", root="/x", n=n, num_classes=3, file_list_sha256=hash_lines(keys),
                   labels_sha256=sha256_int64(labels))


def _spec(shape=(N, 4, 3), dtype="float16", model="t", weights="w", weights_hash="h") -> ArraySpec:
    return ArraySpec(kind="features", model=Provenance(name=model, weights_id=weights, weights_hash=weights_hash,
                                                       random_init=False),
                     dtype=dtype, shape=tuple(shape), precision="fp32", preprocessing={})


def _make(root, data, bad_rows=(), spec=None) -> Manifest:
    spec = spec or _spec(data.shape, str(data.dtype))
    writer.open_or_create(root, _dataset(), KEYS, LABELS, 32, S)
    m = writer.ensure_array(root, spec)
    w = writer.ShardWriter(root, m, spec.name)
    for k in range(m.num_shards):
        s, e = m.shard_range(k)
        d = data[s:e].copy()
        bad = []
        for r in bad_rows:
            if s <= r < e:
                d[r - s] = np.nan
                bad.append(BadRow(index=r, key=KEYS[r], path=f"/x/{KEYS[r]}", reason="test"))
        w.write(k, d, bad)
    return writer.finalize(root, spec.name)


@pytest.fixture
def data():
    return np.random.default_rng(0).standard_normal((N, 4, 3)).astype(np.float16)


def test_roundtrip_matches_zarr_and_pread(tmp_path, data):
    m = _make(tmp_path / "c", data, bad_rows=[5])
    assert m.arrays["features/t"].complete and [b.index for b in m.arrays["features/t"].bad] == [5]
    # zarr itself reads what we wrote (and checks each row's crc32c): the file is a standard Zarr v3 array
    z = zarr.open_array(str(tmp_path / "c" / "cache.zarr"), path="features/t", mode="r")
    ref = data.copy()
    ref[5] = np.nan
    np.testing.assert_array_equal(z[:], ref)
    r = reader.CacheReader(tmp_path / "c", ["features/t"])
    assert 5 not in r.valid_indices() and len(r.valid_indices()) == N - 1
    idx = np.array([22, 0, 7, 8, 7, 16])  # unsorted, repeated, across shards, last partial shard
    got = r.gather(idx)
    np.testing.assert_array_equal(got["features/t"], data[idx])
    np.testing.assert_array_equal(got["labels"], LABELS[idx])
    with pytest.raises(ValueError, match="invalid rows"):
        r.gather(np.array([5]))


def test_manifest_json_roundtrip_is_exact(tmp_path, data):
    m = _make(tmp_path / "c", data, bad_rows=[3])
    again = Manifest.from_json(json.loads((tmp_path / "c" / "manifest.json").read_text()))
    assert again == m
    assert again.arrays["features/t"].spec.spec_hash == m.arrays["features/t"].spec.spec_hash


def test_pread_reader_single_thread_matches(tmp_path, data):
    m = _make(tmp_path / "c", data)
    a = reader.ArrayReader(tmp_path / "c", m, "features/t", threads=1)
    idx = np.random.default_rng(1).integers(0, N, 50)
    np.testing.assert_array_equal(a.gather(idx), data[idx])


def test_resume_skips_done_shards(tmp_path, data):
    root = tmp_path / "c"
    writer.open_or_create(root, _dataset(), KEYS, LABELS, 32, S)
    m = writer.ensure_array(root, _spec())
    w = writer.ShardWriter(root, m, "features/t")
    w.write(1, data[8:16], [])
    assert w.pending([0, 1, 2]) == [0, 2]
    m = writer.finalize(root, "features/t")
    assert m.arrays["features/t"].status == "in_progress" and m.arrays["features/t"].shards_done == 1
    # reopening the same cache with the same array keeps the done shard; an unreadable marker means "redo"
    writer.open_or_create(root, _dataset(), KEYS, LABELS, 32, None)
    m = writer.ensure_array(root, _spec())
    assert writer.ShardWriter(root, m, "features/t").pending([0, 1, 2]) == [0, 2]
    layout.CachePaths(root).done_marker("features/t", 1).write_text("{torn")
    assert writer.ShardWriter(root, m, "features/t").pending([0, 1, 2]) == [0, 1, 2]


def test_mismatches_are_clear_errors(tmp_path, data):
    root = tmp_path / "c"
    _make(root, data)
    other = Dataset(**{**_dataset().__dict__, "file_list_sha256": "other"})
    with pytest.raises(CacheMismatchError, match="another source"):
        writer.open_or_create(root, other, KEYS, LABELS, 32, None)
    with pytest.raises(CacheMismatchError, match="resolution is 32"):
        writer.open_or_create(root, _dataset(), KEYS, LABELS, 64, None)
    with pytest.raises(CacheMismatchError, match="shard size is 8"):
        writer.open_or_create(root, _dataset(), KEYS, LABELS, 32, 16)
    with pytest.raises(CacheMismatchError, match="made differently.*model"):
        writer.ensure_array(root, _spec(weights_hash="other"))
    writer.ensure_array(root, _spec(weights="/moved/w"))  # the same weights, found at another path: the same array


def test_array_with_done_shards_is_never_recreated(tmp_path, data):
    """A manifest that lost an array's entry (e.g. a lost update) must not make ensure_array recreate it empty."""
    root = tmp_path / "c"
    m = _make(root, data)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["arrays"] = {}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match="done shards but no manifest entry"):
        writer.ensure_array(root, _spec())
    z = zarr.open_array(str(root / "cache.zarr"), path="features/t", mode="r")
    np.testing.assert_array_equal(z[:], data)  # untouched
    assert m.arrays


def test_not_a_cache(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("hello")
    with pytest.raises(NotACacheError, match="not empty and is not a repa-pipe cache"):
        writer.open_or_create(tmp_path / "junk", _dataset(), KEYS, LABELS, 32, S)
    assert sorted(p.name for p in (tmp_path / "junk").iterdir()) == ["file.txt"]  # nothing touched
    with pytest.raises(NotACacheError, match="no manifest.json"):
        read_manifest(tmp_path / "junk")
    (tmp_path / "junk" / "manifest.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(NotACacheError, match="not a repa-pipe cache manifest"):
        read_manifest(tmp_path / "junk")
    with pytest.raises(NotACacheError, match="no such folder"):
        read_manifest(tmp_path / "missing")


def test_schema_1_cache_is_refused_naming_the_version(tmp_path, data):
    root = tmp_path / "c"
    _make(root, data)
    d = json.loads((root / "manifest.json").read_text())
    d["schema_version"] = 1
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(CacheMismatchError, match="schema version 1.*reads schema 2.*re-encode"):
        read_manifest(root)


# --------------------------------------------------------------------------------------------- integrity
def _flip(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_reader_refuses_a_flipped_data_byte_naming_array_shard_and_row(tmp_path, data):
    root = tmp_path / "c"
    m = _make(root, data)
    row_bytes = 4 * 3 * 2
    _flip(layout.CachePaths(root).shard_file("features/t", 1, 3), 2 * (row_bytes + 4) + 5)  # row 2 of shard 1
    a = reader.ArrayReader(root, m, "features/t")
    np.testing.assert_array_equal(a.gather(np.array([0, 9, 22])), data[[0, 9, 22]])  # other rows still read
    with pytest.raises(CorruptDataError, match=r"features/t shard 1 row 10: checksum mismatch"):
        a.gather(np.array([3, 10]))


def test_corrupt_shard_index_detected(tmp_path, data):
    root = tmp_path / "c"
    m = _make(root, data)
    _flip(layout.CachePaths(root).shard_file("features/t", 0, 3), -10)  # inside the index
    with pytest.raises(CorruptDataError, match="index checksum"):
        reader.ArrayReader(root, m, "features/t").gather(np.array([0]))


def test_reader_refuses_changed_labels(tmp_path, data):
    root = tmp_path / "c"
    _make(root, data)
    labels = layout.read_labels(root)
    labels[4] ^= 1
    np.save(layout.CachePaths(root).labels, labels)
    with pytest.raises(CorruptDataError, match="labels.npy differs"):
        reader.CacheReader(root, ["features/t"])


def test_check_ready_finds_a_missing_shard_and_an_edited_manifest(tmp_path, data):
    root = tmp_path / "c"
    m = _make(root, data)
    reader.check_ready(root, m, ["features/t"])
    d = json.loads((root / "manifest.json").read_text())
    d["arrays"]["features/t"]["spec"]["shape"] = [N, 4, 2]  # a smaller feature dim than on disk
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(CorruptDataError, match=r"shape on disk \(23, 4, 3\) but the manifest says \(23, 4, 2\)"):
        reader.check_ready(root, read_manifest(root), ["features/t"])
    _make(tmp_path / "d", data)
    layout.CachePaths(tmp_path / "d").shard_file("features/t", 2, 3).unlink()
    with pytest.raises(CorruptDataError, match="shard 2 is marked done but its file is missing"):
        reader.check_ready(tmp_path / "d", read_manifest(tmp_path / "d"), ["features/t"])


def test_verify_names_every_problem_in_one_line_each(tmp_path, data):
    root = tmp_path / "c"
    _make(root, data, bad_rows=[3])
    assert inspect.verify(root).ok
    paths = layout.CachePaths(root)
    row = 4 * 3 * 2 + 4
    _flip(paths.shard_file("features/t", 1, 3), 6 * row + 1)        # data byte of row 14
    paths.done_marker("features/t", 2).write_text("not json")        # unreadable marker
    paths.done_marker("features/t", 0).unlink()                      # not done
    labels = layout.read_labels(root)
    labels[0] = 2
    np.save(paths.labels, labels)                                     # label flip
    report = inspect.verify(root)
    text = "\n".join(report.problems)
    assert "1 of 3 shard(s) not done (e.g. [0])" in text
    assert "shard 1: checksum mismatch in 1 row(s) [14]" in text
    assert "shard 2: unreadable done marker" in text
    assert "labels.npy differs from what was written" in text
    assert all("\n" not in p for p in report.problems)
    assert report.damaged == {"features/t": {1, 2}}
    # `cache verify` (inspect.check) repairs nothing unless asked, and ends with one error naming the cache
    looked = inspect.check(root, False)
    assert looked.repaired == {} and paths.done_marker("features/t", 1).exists()
    assert str(looked.failure()).startswith(f"{root}: {len(report.problems)} problem(s) found; `repa-pipe cache verify")
    # repair removes the damaged shards' markers, so the encode command would rewrite exactly those
    assert inspect.repair(root, report) == {"features/t": [1, 2]}
    assert not paths.done_marker("features/t", 1).exists() and read_manifest(root).arrays["features/t"].status \
        == "in_progress"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_verify_reports_non_finite_valid_rows(tmp_path, data, value):
    bad = data.copy()
    bad[9, 1, 2] = value  # written so, and not recorded as bad
    _make(tmp_path / "c", bad)
    report = inspect.verify(tmp_path / "c")
    assert any("NaN or Inf in valid row(s) [9]" in p for p in report.problems)


def test_verify_accepts_a_shard_with_no_valid_rows(tmp_path, data):
    _make(tmp_path / "c", data, bad_rows=range(8, 16))  # every row of shard 1 is bad
    assert inspect.verify(tmp_path / "c").ok


def test_verify_catches_an_edited_feature_dim(tmp_path, data):
    root = tmp_path / "c"
    _make(root, data)
    d = json.loads((root / "manifest.json").read_text())
    d["arrays"]["features/t"]["spec"]["shape"] = [N, 4, 2]
    (root / "manifest.json").write_text(json.dumps(d))
    problems = inspect.verify(root).problems
    assert any("shape on disk" in p for p in problems)


# --------------------------------------------------------------------------------------------- locks, views
def test_second_writer_of_an_array_is_refused_naming_the_holder(tmp_path, data):
    root = tmp_path / "c"
    _make(root, data)
    with ArrayLock(root, "features/t"):
        with pytest.raises(CacheBusyError, match=r"features/t is being written by another job \(pid \d+ on"):
            ArrayLock(root, "features/t").acquire()
        ArrayLock(root, "latents/other").acquire().release()  # other arrays are free
    ArrayLock(root, "features/t").acquire().release()  # released with its holder


def test_training_view_ignores_labels_of_bad_rows(tmp_path, data):
    root = tmp_path / "c"
    lat = ArraySpec(kind="latents", model=Provenance("pixel", "none", "none", False), dtype="float32",
                    shape=(N, 6, 4, 4), precision="fp32", preprocessing={},
                    latent=LatentFacts(3, 8, 1.0))
    _make(root, np.zeros((N, 6, 4, 4), np.float32), bad_rows=[4], spec=lat)
    labels = LABELS.copy()
    labels[4] = -1  # e.g. an unparseable .cls recorded as a bad sample
    view = training_view(read_manifest(root), labels, None, ())
    assert view.valid == N - 1 and view.num_classes == 3
    labels[5] = 7
    with pytest.raises(CacheMismatchError, match=r"span \[0, 7\] but the dataset has 3 classes"):
        training_view(read_manifest(root), labels, None, ())


def test_owned_shards_partition():
    owned = [owned_shards(10, r, 3) for r in range(3)]
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
