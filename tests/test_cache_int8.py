"""int8 features (per-token absmax, float32 scale; cache/quant.py), the class token (--with-cls), the typed
shard marker and `cache info`'s sizes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import invoke, make_imagefolder
from repa_pipe.cache import inspect, writer
from repa_pipe.cache.manifest import ArraySpec, Provenance, ShardMarker, read_manifest, training_view
from repa_pipe.cache.quant import dequantize_int8, dequantize_int8_tensor, empty_int8, quantize_int8
from repa_pipe.cache.reader import ArrayReader, CacheReader, check_labels
from repa_pipe.models.feature_encoders import load_encoder
from repa_pipe.pipeline.errors import CorruptDataError

from test_hostile_cache import _make


def _deq(q: np.ndarray) -> np.ndarray:
    return dequantize_int8(q, np.empty((*q.shape[:-1], q.shape[-1] - 4), dtype=np.float16))


def test_quantize_is_per_token_absmax_with_float32_scale():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 64)).astype(np.float32) * rng.uniform(0.01, 100, (3, 5, 1)).astype(np.float32)
    q = quantize_int8(x)
    assert q.shape == (3, 5, 68) and q.dtype == np.int8
    scale = np.ascontiguousarray(q[..., 64:]).view("<f4")[..., 0]
    np.testing.assert_array_equal(scale, (np.abs(x).max(-1) / 127).astype(np.float32))
    np.testing.assert_array_equal(np.abs(q[..., :64]).max(-1), 127)  # the absmax maps to +-127
    err = np.abs(_deq(q).astype(np.float32) - x)
    assert (err <= scale[..., None] * 0.5 + np.abs(x) * 2 ** -11).all()  # half a step, plus float16's rounding
    cos = (x * _deq(q)).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(_deq(q).astype(np.float32), axis=-1)
    assert cos.min() > 0.9999


def test_zero_and_nan_tokens():
    x = np.zeros((2, 3, 8), dtype=np.float32)
    x[1] = np.nan
    out = _deq(quantize_int8(x))
    assert (out[0] == 0).all() and np.isnan(out[1]).all()
    assert np.isnan(_deq(empty_int8((2, 3, 12)))).all()


def _int8_cache(root: Path, n: int = 20, shard: int = 4) -> tuple[Path, np.ndarray]:
    """A cache with an int8 features array written through the real writer; returns it and the float32 rows."""
    _make(root, n=n, shard=shard)
    x = np.random.default_rng(1).standard_normal((n, 6, 16)).astype(np.float32)
    spec = ArraySpec(kind="features", model=Provenance("q", "w", "h", False), dtype="int8", shape=(n, 6, 16),
                     precision="fp32", preprocessing={})
    m = writer.ensure_array(root, spec)
    w = writer.ShardWriter(root, m, spec.name)
    for k in range(m.num_shards):
        s, e = m.shard_range(k)
        w.write(k, w.store_rows(x[s:e]), [])
    writer.finalize(root, spec.name)
    return root, x


def test_int8_array_reads_back_dequantized_and_checksums_cover_the_scale(tmp_path):
    root, x = _int8_cache(tmp_path / "c")
    m = read_manifest(root)
    assert m.arrays["features/q"].spec.row_bytes == 6 * (16 + 4)
    r = CacheReader(root, ["features/q"])
    idx = np.array([19, 0, 5, 5, 12])  # unsorted, repeated, across shards
    got = r.gather(idx)["features/q"]
    assert got.dtype == np.float16 and got.shape == (5, 6, 16)
    np.testing.assert_array_equal(got, _deq(quantize_int8(x[idx])))
    buf = r.buffers(5)
    r.gather(idx, out=buf)
    np.testing.assert_array_equal(buf["features/q"], got)
    r.close()
    assert inspect.verify(root).ok
    # flip one byte of row 5's scale (the last 4 bytes of its first token)
    a = ArrayReader(root, m, "features/q", threads=1)
    off = int(a._acquire(1).offsets[1])
    path = a.shard_path(1)
    a.close()
    raw = bytearray(path.read_bytes())
    raw[off + 16 + 2] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match="row 5: checksum mismatch"):
        CacheReader(root, ["features/q"]).gather(np.array([5]))
    assert inspect.verify(root).damaged == {"features/q": {1}}


def test_shard_marker_is_typed_and_old_markers_with_a_file_crc_still_read(tmp_path):
    root = _make(tmp_path / "c")
    path = root / "done" / "features" / "t" / "000000.json"
    d = json.loads(path.read_text())
    assert set(d) == {"k", "start", "stop", "bytes", "spec_hash", "bad", "written_utc"}  # no whole-file crc32c
    d["crc32c"] = 123  # as markers written before the type had it
    path.write_text(json.dumps(d))
    mk = ShardMarker.from_json(json.loads(path.read_text()), 20)
    assert (mk.k, mk.start, mk.stop) == (0, 0, 4)
    assert inspect.verify(root).ok


def test_cache_info_gives_bytes_per_image_and_the_projected_size(tmp_path):
    root = _make(tmp_path / "c", n=20, shard=4)
    (root / "done" / "features" / "t" / "000004.json").unlink()
    writer.finalize(root, "features/t")
    a = inspect.info(root)["arrays"][0]
    assert a["bytes_per_image"] == 2 * 3 * 2
    assert a["bytes"] == 20 * a["bytes_per_image"] and a["bytes_done"] == 16 * a["bytes_per_image"]
    r = invoke(["cache", "info", str(root)])
    assert r.exit_code == 0 and "projected" in r.output and "bytes/image" in r.output, r.output


def test_encode_features_int8_with_cls_through_the_cli(tmp_path, one_torch_thread):
    src = make_imagefolder(tmp_path / "imgs", per_class=3)
    common = ["--source", str(src), "--resolution", "32", "--shard-size", "4", "--workers", "0",
              "--batch-size", "3", "--encoder", "tiny"]
    for dtype in ("float16", "int8"):
        r = invoke(["encode-features", *common, "--cache", str(tmp_path / dtype), "--feature-dtype", dtype,
                    "--with-cls"])
        assert r.exit_code == 0, r.output
    f16, i8 = (CacheReader(tmp_path / d, ["features/tiny", "cls/tiny"]) for d in ("float16", "int8"))
    m = read_manifest(tmp_path / "int8")
    assert m.arrays["features/tiny"].spec.dtype == "int8" and m.arrays["cls/tiny"].spec.shape == (9, 1, 64)
    idx = np.arange(9)
    a, b = f16.gather(idx), i8.gather(idx)
    # float16 rows are the model's own outputs; the class token is the encoder's, after its final norm
    enc = load_encoder("tiny", grid=2)
    from repa_pipe.cache.sources import load_preprocessed, open_source
    s = open_source(str(src))
    x = torch.from_numpy(np.stack([load_preprocessed(s, i, 32) for i in idx])).permute(0, 3, 1, 2)
    tokens, cls = enc.forward_with_cls(x)
    np.testing.assert_array_equal(a["features/tiny"], tokens.half().numpy())
    np.testing.assert_array_equal(a["cls/tiny"][:, 0], enc.forward_cls(x).half().numpy())
    np.testing.assert_array_equal(b["features/tiny"], _deq(quantize_int8(tokens.numpy())))
    np.testing.assert_array_equal(b["cls/tiny"][:, 0], _deq(quantize_int8(cls.numpy()[:, None]))[:, 0])
    for c in (tmp_path / "float16", tmp_path / "int8"):
        assert inspect.verify(c).ok
    # a resumed run with the same options is a no-op; a different dtype is refused naming it
    r = invoke(["encode-features", *common, "--cache", str(tmp_path / "int8"), "--feature-dtype", "float16"])
    assert r.exit_code == 1 and "dtype" in r.output


def test_training_reads_an_int8_cache_with_a_class_token(tmp_path, one_torch_thread):
    """Training takes the dequantized float16 features and ignores the class-token array."""
    from test_cache_integrity import encode, train

    src = make_imagefolder(tmp_path / "imgs", per_class=4)
    cache = tmp_path / "c"
    for args in (encode("latents", src, cache), encode("features", src, cache, "--feature-dtype", "int8",
                                                          "--with-cls")):
        r = invoke(args)
        assert r.exit_code == 0, r.output
    assert set(read_manifest(cache).arrays) == {"latents/tiny", "features/tiny", "cls/tiny"}
    r = invoke(train(cache, tmp_path / "run", 2))
    assert r.exit_code == 0, r.output
    metrics = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)


def test_int8_gathered_as_stored_is_checked_and_dequantizes_to_the_same_bits(tmp_path):
    """`stored=True`: the int8 rows as written (crc32c checked); dequantized as a tensor they equal the reader's."""
    root, x = _int8_cache(tmp_path / "c")
    r = CacheReader(root, ["features/q"])
    idx = np.array([19, 0, 5, 5, 12])
    raw = r.gather(idx, stored=True)["features/q"]
    assert raw.dtype == np.int8 and raw.shape == (5, 6, 20)
    np.testing.assert_array_equal(raw, quantize_int8(x[idx]))
    buf = r.buffers(5, stored=True)
    r.gather(idx, out=buf, stored=True)
    np.testing.assert_array_equal(buf["features/q"], raw)
    deq = dequantize_int8_tensor(torch.from_numpy(raw))
    assert deq.dtype == torch.float16 and deq.shape == (5, 6, 16)
    np.testing.assert_array_equal(deq.numpy().view(np.uint16), r.gather(idx)["features/q"].view(np.uint16))
    nan = dequantize_int8_tensor(torch.from_numpy(empty_int8((2, 3, 12))))  # a bad row reads back NaN here too
    assert torch.isnan(nan).all()
    r.close()
    m = read_manifest(root)
    a = ArrayReader(root, m, "features/q", threads=1)
    off, path = int(a._acquire(1).offsets[1]), a.shard_path(1)
    a.close()
    data = bytearray(path.read_bytes())
    data[off + 3] ^= 0x01  # one int8 value of row 5
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError, match="row 5: checksum mismatch"):
        CacheReader(root, ["features/q"]).gather(np.array([5]), stored=True)


@pytest.fixture(scope="module")
def int8_train_cache(tmp_path_factory) -> Path:
    from test_cache_integrity import encode

    tmp = tmp_path_factory.mktemp("int8train")
    src = make_imagefolder(tmp / "imgs", per_class=4)
    cache = tmp / "c"
    for args in (encode("latents", src, cache), encode("features", src, cache, "--feature-dtype", "int8")):
        r = invoke(args)
        assert r.exit_code == 0, r.output
    return cache


def test_stream_dequantizing_on_the_device_gives_the_reader_s_bits(int8_train_cache, one_torch_thread):
    """BatchStream(dequantize="device") ships int8 + scale as stored; `features_to` makes the reader's float16."""
    from repa_pipe.training.stream import BatchStream, default_dequantize, features_to

    m = read_manifest(int8_train_cache)
    view = training_view(m, check_labels(int8_train_cache, m), None, ("tiny",))
    assert default_dequantize() == "reader"  # on a CPU: the reader dequantizes, as before
    streams = {d: BatchStream(int8_train_cache, view, 8, 0, 0, 1, 0.1, 0, 3, threads=1, dequantize=d)
               for d in ("reader", "device")}
    try:
        for _ in range(3):
            a, b = (next(s) for s in streams.values())
            fa, fb = a.features[0], b.features[0]
            assert fa.dtype == torch.float16 and fb.dtype == torch.int8 and fb.shape[-1] == fa.shape[-1] + 4
            got = features_to(fb, torch.device("cpu"))
            assert got.dtype == torch.float16
            assert torch.equal(got.view(torch.int16), fa.view(torch.int16))
            assert features_to(fa, torch.device("cpu")) is fa  # float rows pass through
            assert torch.equal(a.moments, b.moments) and torch.equal(a.labels, b.labels)
    finally:
        for s in streams.values():
            s.close()
    with pytest.raises(ValueError, match="dequantize='gpu'"):
        BatchStream(int8_train_cache, view, 8, 0, 0, 1, 0.1, 0, 1, threads=1, dequantize="gpu")


def test_training_on_int8_gives_the_same_losses_dequantized_on_the_device(int8_train_cache, tmp_path, monkeypatch,
                                                                         one_torch_thread):
    """A short run with the device path forced (as on CUDA) logs bitwise the losses of the reader path."""
    from test_cache_integrity import train
    from repa_pipe.training import stream

    def losses(run: Path) -> list[float]:
        r = invoke(train(int8_train_cache, run, 3))
        assert r.exit_code == 0, r.output
        lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        return [(m["loss"], m.get("grad_norm")) for m in lines if "loss" in m]

    reader = losses(tmp_path / "reader")
    calls = []
    real = stream.dequantize_int8_tensor
    monkeypatch.setattr(stream, "default_dequantize", lambda: "device")
    monkeypatch.setattr(stream, "dequantize_int8_tensor", lambda t: calls.append(t.dtype) or real(t))
    device = losses(tmp_path / "device")
    assert calls and set(calls) == {torch.int8}  # the step dequantized the stored rows
    assert len(reader) == 3 and device == reader
