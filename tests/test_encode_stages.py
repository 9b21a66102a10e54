"""encode-latents / encode-features end to end, through the real CLI (in-process CliRunner, or real processes where
a real process is the point: SIGKILL, torchrun, a fresh interpreter offline).

Tiny everything: 16 px crops, 8-sample shards, the `pixel`/`tiny` codecs and the `tiny` encoder, one torch thread.
Expected values never come from the stage itself: rows are compared with a direct call of the same model on the
same preprocessed images, pixels with an independent copy of the ADM crop, arrays are read back with zarr itself.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import (RES, SHARD, VENV_BIN, done_marker, forbid_network, imagefolder_index, invoke, make_imagefolder, ok, png_bytes,
                      rand_rgb, read_array, ref_adm_crop, strip_times, subprocess_env, tree, tree_stat,
                      write_tar)
from repa_pipe.cache import layout
from repa_pipe.cache.reader import CacheReader
from repa_pipe.cache.sources import load_preprocessed, open_source


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """One torch thread for the whole module (conftest.py), in force before its module-scoped fixtures run."""
    yield


def common(src, cache, *extra, shard=SHARD, res=RES, workers=0, batch=5):
    # batch 5 does not divide the shard size 8: batches must still stop at shard boundaries
    return ["--source", src, "--cache", cache, "--resolution", res, "--shard-size", shard, "--workers", workers,
            "--batch-size", batch, *extra]


def latents_cmd(src, cache, vae="tiny", *extra, **kw):
    return ["encode-latents", *common(src, cache, **kw), "--vae", vae, *extra]


def features_cmd(src, cache, encoder="tiny", *extra, **kw):
    return ["encode-features", *common(src, cache, **kw), "--encoder", encoder, *extra]


def images_tensor(src_root, n=None) -> torch.Tensor:
    """(N, 3, R, R) uint8 via load_preprocessed, checked against the independent reference ADM crop."""
    src = open_source(str(src_root))
    rows = []
    for i in range(len(src) if n is None else n):
        a = load_preprocessed(src, i, RES)
        np.testing.assert_array_equal(a, ref_adm_crop(Image.open(src.where(i)), RES))
        rows.append(a)
    return torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2).contiguous()


def pixel_expected(img: Image.Image) -> np.ndarray:
    """The pixel codec's moments for one image, computed independently: (crop/127.5 - 1, zeros), (6, R, R)."""
    mean = ref_adm_crop(img, RES).astype(np.float32).transpose(2, 0, 1) / np.float32(127.5) - np.float32(1)
    return np.concatenate([mean, np.zeros_like(mean)])


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """24 images, 3 classes, varied sizes: 3 shards of 8."""
    return make_imagefolder(tmp_path_factory.mktemp("src") / "imgs")


@pytest.fixture(scope="module")
def x(folder) -> torch.Tensor:
    return images_tensor(folder)


@pytest.fixture(scope="module")
def tiny_cache(folder, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("tiny") / "cache"
    ok(latents_cmd(folder, cache, "tiny"))
    ok(features_cmd(folder, cache, "tiny"))  # default grid: a patch-2 model on the 4x4 latents -> 2
    return cache


# ------------------------------------------------------------------------------ 1. cache == direct model call
def test_cache_holds_direct_model_outputs_and_index(folder, tiny_cache, x):
    from repa_pipe.models.feature_encoders import load_encoder
    from repa_pipe.models.latent_codecs import load_codec

    keys, labels = imagefolder_index(folder)
    assert layout.read_keys(tiny_cache) == keys
    np.testing.assert_array_equal(np.load(tiny_cache / "index" / "labels.npy"), labels)
    m = json.loads((tiny_cache / "manifest.json").read_text())
    assert m["dataset"]["n"] == 24 and m["dataset"]["class_names"] == ["cat", "dog", "eel"]
    assert m["shard_size"] == SHARD and m["num_shards"] == 3 and m["resolution"] == RES

    lat = read_array(tiny_cache, "latents/tiny")
    want = load_codec("tiny").encode_moments(x).numpy()
    assert lat.dtype == np.float32 and lat.shape == (24, 8, 4, 4) == want.shape
    np.testing.assert_allclose(lat, want, rtol=1e-5, atol=1e-6)
    assert (lat[:, 4:] > 0).all()  # second half of the channels is the posterior std
    e = m["arrays"]["latents/tiny"]
    assert e["spec"]["latent"]["moments"] == "mean_std" and e["spec"]["latent"]["scaling_factor"] == 0.18215
    assert e["status"] == "complete" and e["spec"]["model"]["random_init"] is True
    assert e["spec"]["row_codec"] == "bytes+crc32c"

    feats = read_array(tiny_cache, "features/tiny")
    want_f = load_encoder("tiny", grid=2)(x).numpy()
    assert feats.dtype == np.float16 and feats.shape == (24, 4, 64) == want_f.shape
    np.testing.assert_allclose(feats.astype(np.float32), want_f, rtol=2e-3, atol=2e-3)
    assert m["arrays"]["features/tiny"]["spec"]["feature"]["grid"] == 2

    # the training reader returns the same rows and labels
    r = CacheReader(tiny_cache, ["latents/tiny", "features/tiny"], threads=1)
    idx = np.array([23, 0, 9, 9, 16])
    got = r.gather(idx)
    np.testing.assert_array_equal(got["latents/tiny"], lat[idx])
    np.testing.assert_array_equal(got["features/tiny"], feats[idx])
    np.testing.assert_array_equal(got["labels"], labels[idx])
    r.close()



def test_encode_functions_return_where_the_array_ended(folder, tmp_path):
    """encoding/latents.py and encoding/features.py do the work and return it; the stage only prints summary()."""
    from repa_pipe.encoding.config import EncodeFeaturesConfig, EncodeLatentsConfig
    from repa_pipe.encoding.features import encode_features
    from repa_pipe.encoding.latents import encode_latents

    cache = tmp_path / "cache"
    common_ = dict(source=str(folder), cache=cache, resolution=RES, shard_size=SHARD, workers=0, batch_size=5)
    lat = encode_latents(EncodeLatentsConfig(**common_, vae="pixel"))
    assert (lat.name, lat.status, lat.shards_done, lat.num_shards, lat.bad) == ("latents/pixel", "complete", 3, 3, 0)
    assert lat.summary() == "encode-latents pixel: latents/pixel complete (3/3 shards)"
    feat = encode_features(EncodeFeaturesConfig(**common_, encoder="tiny", grid=2))
    assert (feat.name, feat.status, feat.shards_done) == ("features/tiny", "complete", 3)
    r = ok(latents_cmd(folder, cache, "pixel"))  # everything done: the stage prints the same summary
    assert "encode-latents pixel: latents/pixel complete (3/3 shards)" in " ".join(r.output.split()), r.output

# ------------------------------------------------------------------------------------ 2. real loading paths
def test_vae_weights_folder_loads_through_cli_without_download(folder, x, tmp_path, monkeypatch):
    from repa_pipe.models.latent_codecs import build_tiny_vae

    vae = build_tiny_vae(seed=5).eval()  # not the `tiny` codec's seed-0 weights: the folder must really be used
    weights = tmp_path / "sd-vae-ft-ema"
    vae.save_pretrained(str(weights))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    attempts = forbid_network(monkeypatch)

    cache = tmp_path / "cache"
    ok(latents_cmd(folder, cache, "sd-vae-ft-ema", "--vae-weights", weights))
    assert attempts == []

    with torch.no_grad():
        d = vae.encode(x.float() / 127.5 - 1).latent_dist
    want = torch.cat([d.mean, d.std], 1).numpy()
    got = read_array(cache, "latents/sd-vae-ft-ema")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    model = json.loads((cache / "manifest.json").read_text())["arrays"]["latents/sd-vae-ft-ema"]["spec"]["model"]
    assert model["random_init"] is False and model["weights_id"] == str(weights.resolve())


def test_tiny_encoder_weights_file_loads_through_cli(folder, x, tmp_path, monkeypatch):
    from repa_pipe.models import feature_encoders as FE

    torch.manual_seed(7)  # other weights than the random-init `tiny`, at its native 16x16 grid (resampled on load)
    sd = FE._build_model(FE.ENCODERS["tiny"], 16).state_dict()
    path = tmp_path / "tiny.pth"
    torch.save(sd, path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    attempts = forbid_network(monkeypatch)

    cache = tmp_path / "cache"
    ok(features_cmd(folder, cache, "tiny", "--encoder-weights", path, "--grid", 3))
    assert attempts == []
    got = read_array(cache, "features/tiny").astype(np.float32)
    want = FE.load_encoder("tiny", str(path), grid=3)(x).numpy()
    assert got.shape == (24, 9, 64)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    assert not np.allclose(got, FE.load_encoder("tiny", grid=3)(x).numpy(), atol=1e-2)  # the file was used
    model = json.loads((cache / "manifest.json").read_text())["arrays"]["features/tiny"]["spec"]["model"]
    assert model["random_init"] is False and model["weights_id"] == str(path.resolve())
    # the same weights from another place are the same array: a re-run is done at once, not refused
    moved = tmp_path / "elsewhere" / "tiny.pth"
    moved.parent.mkdir()
    path.rename(moved)
    r = ok(features_cmd(folder, cache, "tiny", "--encoder-weights", moved, "--grid", 3))
    assert "already done" in r.output, r.output
    # other weights are another array: refused, naming the difference
    torch.save({k: v + 1 for k, v in sd.items()}, path)
    r = invoke(features_cmd(folder, cache, "tiny", "--encoder-weights", path, "--grid", 3))
    assert r.exit_code == 1 and "made differently" in r.output and "model" in r.output, r.output


def test_dinov2_b_weights_file_loads_through_cli(folder, x, tmp_path, monkeypatch):
    """The real dinov2-b architecture (timm, 37x37 pos-embed as on the hub) from a safetensors file, at grid 2."""
    from safetensors.torch import save_file

    from repa_pipe.models import feature_encoders as FE

    shapes = FE._build_model(FE.ENCODERS["dinov2-b"], 37, device="meta").state_dict()
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.ones(v.shape) if k.endswith("norm.weight") or ".norm1.weight" in k or ".norm2.weight" in k
              else torch.randn(v.shape, generator=g) * 0.02) for k, v in shapes.items()}
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    del sd
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    attempts = forbid_network(monkeypatch)

    cache = tmp_path / "cache"
    ok(features_cmd(folder, cache, "dinov2-b", "--encoder-weights", path, "--grid", 2, batch=12))
    assert attempts == []
    got = read_array(cache, "features/dinov2-b").astype(np.float32)
    want = FE.load_encoder("dinov2-b", str(path), grid=2)(x).numpy()
    assert got.shape == (24, 4, 768)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------------- 3. offline, no weights
@pytest.mark.parametrize("cmd,option", [
    (["encode-latents", "--vae", "sd-vae-ft-ema"], "--vae-weights"),
    (["encode-latents", "--vae", "sd-vae-ft-mse"], "--vae-weights"),
    (["encode-features", "--encoder", "dinov2-b"], "--encoder-weights"),
    (["encode-features", "--encoder", "mocov3-b"], "--encoder-weights"),
])
def test_hub_model_offline_without_weights_is_one_line_error(cmd, option, folder, tmp_path):
    cache = tmp_path / "cache"
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-hub")}
    t0 = time.monotonic()
    r = invoke([*cmd, "--source", folder, "--cache", cache, "--resolution", RES, "--workers", 0], env=env)
    assert time.monotonic() - t0 < 20
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and option in lines[0], r.output
    assert "Traceback" not in r.output
    assert not cache.exists()  # nothing was created before the weights were found missing


# slow: a real process importing diffusers (~4 s); test_hub_model_offline_without_weights_is_one_line_error covers
# the same refusal in-process with every network call forbidden
@pytest.mark.slow
def test_hub_vae_offline_real_process_fails_fast(folder, tmp_path):
    cache = tmp_path / "cache"
    t0 = time.monotonic()
    p = subprocess.run([str(VENV_BIN / "repa-pipe"), *map(str, latents_cmd(folder, cache, "sd-vae-ft-ema"))],
                       env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert p.returncode == 1, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--vae-weights" in lines[0] and "stabilityai/sd-vae-ft-ema" in lines[0], p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert elapsed < 60  # interpreter start + imports on a busy 2-core box; no network wait, no retries
    assert not cache.exists()


# ----------------------------------------------------------------------------------- 4. SIGKILL + resume
# slow: test_cache_integrity.py's test_sigkilled_encode_leaves_no_loader_worker_alive_and_resumes covers a SIGKILLed
# encode resuming from its done shards
@pytest.mark.slow
def test_sigkilled_run_resumes_to_identical_cache(tmp_path):
    src = make_imagefolder(tmp_path / "imgs", classes=("a", "b", "c", "d"), per_class=24, seed=4)  # 96 images
    # 24 shards of 4; grid 8 so that the ~0.7 s between the first marker and the end leave time for the kill
    args = lambda cache: features_cmd(src, cache, "tiny", "--grid", 8, shard=4, batch=2)
    killed = tmp_path / "killed"
    env = subprocess_env(tmp_path)
    proc = subprocess.Popen([str(VENV_BIN / "repa-pipe"), *map(str, args(killed))], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_dir = killed / "done" / "features" / "tiny"
    deadline = time.monotonic() + 90
    try:
        while not (done_dir.is_dir() and any(done_dir.glob("*.json"))):
            assert proc.poll() is None, f"finished before the first marker was seen: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no done marker within 90 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    n_done = len(list(done_dir.glob("*.json")))
    assert 1 <= n_done < 24, f"{n_done} shards done: the kill came too late to interrupt anything"
    # the interrupted cache is not complete, and verify says so
    r = invoke(["cache", "verify", killed])
    assert r.exit_code == 1 and "not done" in r.output
    finished = {p: st for p, st in tree_stat(killed).items() if p.startswith("done/")}

    ok(args(killed))  # the same command again
    after = tree_stat(killed)
    assert {p: after[p] for p in finished} == finished  # shards done before the kill are skipped, not redone
    full = tmp_path / "full"
    ok(args(full))  # an uninterrupted run elsewhere

    assert tree(killed, "cache.zarr") == tree(full, "cache.zarr") and len(tree(full, "cache.zarr")) == 24 + 3
    assert tree(killed, "index") == tree(full, "index")
    assert not list(killed.rglob("*.partial")) and not list(killed.rglob(".*.tmp"))
    ma, mb = (json.loads((c / "manifest.json").read_text()) for c in (killed, full))
    assert strip_times(ma) == strip_times(mb)
    for k in range(24):
        mk = [json.loads(done_marker(c, "features/tiny", k).read_text()) for c in (killed, full)]
        assert strip_times(mk[0]) == strip_times(mk[1])
    ok(["cache", "verify", killed])


# ------------------------------------------------------------------------------------- 5. torchrun, 2 ranks
def test_two_gloo_ranks_under_torchrun_equal_one_process(folder, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    lat = lambda c: latents_cmd(folder, c, "tiny", shard=4, batch=3)  # 6 shards, 3 per rank
    feat = lambda c: features_cmd(folder, c, "tiny", shard=4, batch=3)
    ok(lat(one))
    ok(feat(one))

    # One torchrun job per stage (a second process group inside the same torchrun job would find the first one's
    # stale keys in torchrun's store); latents through `python -m repa_pipe.cli`, features through the console script.
    torchrun = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    jobs = {"encode-latents": torchrun + ["-m", "repa_pipe.cli", *map(str, lat(two))],
            "encode-features": torchrun + ["--no-python", str(VENV_BIN / "repa-pipe"), *map(str, feat(two))]}
    for stage, cmd in jobs.items():
        p = subprocess.run(cmd, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "2 process(es)" in p.stderr, p.stderr
        # not a terminal: plain progress lines "N/M (x img/s, eta Ts)", from rank 0 only (its 3 shards = 12 images)
        lines = re.findall(rf"^{stage} tiny: (\d+)/(\d+) img \([\d.]+ img/s, eta \w+\)$", p.stderr, re.M)
        assert lines and {tot for _, tot in lines} == {"12"} and lines[-1][0] == "12", p.stderr

    for name in ("latents/tiny", "features/tiny"):
        assert tree(one, f"cache.zarr/{name}") == tree(two, f"cache.zarr/{name}")
        np.testing.assert_array_equal(read_array(one, name).view(np.uint8), read_array(two, name).view(np.uint8))
    assert tree(one, "index") == tree(two, "index")
    assert strip_times(json.loads((one / "manifest.json").read_text())) == \
        strip_times(json.loads((two / "manifest.json").read_text()))
    ok(["cache", "verify", two])


# -------------------------------------------------------------------------------------------- 6. bad input
def _corrupt(path: Path, kind: str) -> None:
    good = path.read_bytes() if path.exists() else png_bytes(rand_rgb(20, 20, 99))
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "corrupt":  # header intact, image data garbage
        path.write_bytes(good[:60] + bytes(np.random.default_rng(0).integers(0, 256, len(good) - 60, np.uint8)))
    elif kind == "not-an-image":
        path.write_bytes(b"this is a text file, not a PNG\n" * 4)
    else:
        raise ValueError(kind)


REASONS = {"zero-byte": "empty file", "truncated": "truncated", "corrupt": ("corrupt", "truncated", "decodable"),
           "not-an-image": "not a decodable image"}


@pytest.mark.parametrize("kind", list(REASONS))
def test_bad_image_default_stops_with_path_and_reason(kind, tmp_path):
    src = make_imagefolder(tmp_path / "imgs", classes=("a",), per_class=4)
    bad = src / "a" / "img_001.png"
    _corrupt(bad, kind)
    cache = tmp_path / "cache"
    r = invoke(latents_cmd(src, cache, "pixel", shard=2, batch=2))
    assert r.exit_code == 1 and r.exception is not None and "Traceback" not in r.output
    err = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and str(bad) in err[0], r.output
    reasons = REASONS[kind] if isinstance(REASONS[kind], tuple) else (REASONS[kind],)
    assert any(s in err[0] for s in reasons), err[0]
    assert "--skip-bad" in err[0]


def test_bad_image_keeps_done_shards_and_skip_bad_resumes(tmp_path):
    src = make_imagefolder(tmp_path / "imgs")  # 24 images, shards of 8
    keys, labels = imagefolder_index(src)
    bad_i = 17
    bad = src / keys[bad_i]
    _corrupt(bad, "truncated")
    cache = tmp_path / "cache"
    r = invoke(latents_cmd(src, cache, "pixel"))
    assert r.exit_code == 1 and str(bad) in r.output and "truncated" in r.output

    name = "latents/pixel"
    assert done_marker(cache, name, 0).is_file() and done_marker(cache, name, 1).is_file()
    assert not done_marker(cache, name, 2).exists()
    want = np.stack([pixel_expected(Image.open(src / k)) if i != bad_i else np.full((6, RES, RES), np.nan, np.float32)
                     for i, k in enumerate(keys)])
    np.testing.assert_array_equal(read_array(cache, name)[:16], want[:16])  # shards 0 and 1 are intact
    info = json.loads(ok(["cache", "info", cache, "--json"]).stdout)
    (arr,) = info["arrays"]
    assert arr["shards_done"] == 2 and arr["num_shards"] == 3 and arr["status"] == "in_progress"
    kept = {p: s for p, s in tree_stat(cache).items() if "/c/0/" in p or "/c/1/" in p or re.search(r"00000[01]", p)}
    assert len(kept) == 4

    r = ok(latents_cmd(src, cache, "pixel", "--skip-bad"))
    assert "2/3 shards already done" in r.output
    after = tree_stat(cache)
    assert {p: after[p] for p in kept} == kept  # shards 0, 1 and their markers were not rewritten

    m = json.loads((cache / "manifest.json").read_text())
    entry = m["arrays"][name]
    assert entry["status"] == "complete"
    assert [(b["index"], b["key"], b["path"]) for b in entry["bad"]] == [(bad_i, keys[bad_i], str(bad))]
    assert "truncated" in entry["bad"][0]["reason"]
    assert layout.read_keys(cache)[bad_i] == keys[bad_i]  # the index never shifts
    np.testing.assert_array_equal(np.load(cache / "index" / "labels.npy"), labels)
    np.testing.assert_array_equal(read_array(cache, name), want)  # row 17 NaN, every other row exact

    reader = CacheReader(cache, [name], threads=1)
    assert reader.valid_indices().tolist() == [i for i in range(24) if i != bad_i]
    np.testing.assert_array_equal(reader.gather(reader.valid_indices())[name], np.delete(want, bad_i, 0))
    with pytest.raises(ValueError):
        reader.gather(np.array([bad_i]))
    reader.close()
    ok(["cache", "verify", cache])

    # features on the same cache record the same bad sample; the rows stay aligned with the latents
    ok(features_cmd(src, cache, "tiny", "--skip-bad"))
    fe = json.loads((cache / "manifest.json").read_text())["arrays"]["features/tiny"]
    assert [b["index"] for b in fe["bad"]] == [bad_i]
    f = read_array(cache, "features/tiny")
    assert np.isnan(f[bad_i]).all() and not np.isnan(np.delete(f, bad_i, 0)).any()
    ok(["cache", "verify", cache])


def test_skip_bad_records_every_kind_with_reason(tmp_path):
    src = make_imagefolder(tmp_path / "imgs", classes=("a", "b"), per_class=5)
    keys, _ = imagefolder_index(src)
    kinds = {1: "zero-byte", 3: "truncated", 6: "not-an-image", 8: "corrupt"}
    for i, kind in kinds.items():
        _corrupt(src / keys[i], kind)
    (src / "b" / "notes.txt").write_text("ignored")  # not an image extension: ignored at listing, with a warning
    cache = tmp_path / "cache"
    r = ok(latents_cmd(src, cache, "pixel", "--skip-bad", shard=4, batch=3))
    flat = " ".join(r.output.split())  # log lines are wrapped by rich at 80 columns off a terminal
    assert "4 bad sample(s) recorded" in flat and "non-image file" in flat, r.output
    bad = json.loads((cache / "manifest.json").read_text())["arrays"]["latents/pixel"]["bad"]
    assert [b["index"] for b in bad] == sorted(kinds)
    for b in bad:
        assert b["key"] == keys[b["index"]] and b["path"] == str(src / keys[b["index"]])
        want = REASONS[kinds[b["index"]]]
        assert any(s in b["reason"] for s in (want if isinstance(want, tuple) else (want,))), b
    lat = read_array(cache, "latents/pixel")
    for i in range(10):
        if i in kinds:
            assert np.isnan(lat[i]).all()
        else:
            np.testing.assert_array_equal(lat[i], pixel_expected(Image.open(src / keys[i])))
    ok(["cache", "verify", cache])


def test_non_rgb_modes_and_small_images_are_converted_not_bad(tmp_path):
    src = tmp_path / "imgs"
    (src / "m").mkdir(parents=True)
    base = rand_rgb(40, 28, 5)
    expected = {}

    def add(name, img, fmt, want=None, **kw):
        img.save(src / "m" / name, format=fmt, **kw)
        expected[f"m/{name}"] = want

    add("cmyk.jpg", base.convert("CMYK"), "JPEG", quality=95)
    add("gray.png", base.convert("L"), "PNG")
    add("graya.png", base.convert("LA"), "PNG")
    add("bw.png", base.convert("1"), "PNG")
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (28, 1))))
    add("rgba.png", rgba, "PNG")
    add("palette.png", base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")
    add("palette_t.png", base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", transparency=3)
    a16 = (np.random.default_rng(1).integers(0, 65536, (28, 40))).astype(np.uint16)
    high = Image.fromarray(np.repeat((a16 >> 8).astype(np.uint8)[:, :, None], 3, 2), "RGB")
    add("gray16.png", Image.fromarray(a16), "PNG", want=high)  # 16-bit: high byte, not clipped to white
    add("small.png", rand_rgb(9, 6, 6), "PNG")  # smaller than the 16 px crop: upsampled
    add("upper.JPEG", base, "JPEG")  # extension in any case
    add("webp.webp", base, "WEBP", lossless=True)

    cache = tmp_path / "cache"
    ok(latents_cmd(src, cache, "pixel", batch=4))
    m = json.loads((cache / "manifest.json").read_text())
    assert m["arrays"]["latents/pixel"]["bad"] == []
    keys = layout.read_keys(cache)
    assert sorted(keys) == keys == sorted(expected)
    lat = read_array(cache, "latents/pixel")
    for i, key in enumerate(keys):
        ref = expected[key] if expected[key] is not None else Image.open(src / key).convert("RGB")
        np.testing.assert_array_equal(lat[i], pixel_expected(ref), err_msg=key)
    with Image.open(src / "m" / "gray16.png") as im:
        assert im.mode.startswith("I")  # the file really is 16-bit


def test_empty_class_folder_warns_and_keeps_class_index(tmp_path):
    src = make_imagefolder(tmp_path / "imgs", classes=("a", "c"), per_class=3)
    (src / "b").mkdir()
    cache = tmp_path / "cache"
    r = ok(latents_cmd(src, cache, "pixel"))
    assert re.search(r"warning.*'b'.*no images", r.output), r.output
    np.testing.assert_array_equal(np.load(cache / "index" / "labels.npy"), [0, 0, 0, 2, 2, 2])
    ds = json.loads((cache / "manifest.json").read_text())["dataset"]
    assert ds["class_names"] == ["a", "b", "c"] and ds["num_classes"] == 3


@pytest.mark.parametrize("layout_", ["empty-folder", "empty-classes", "missing"])
def test_empty_or_missing_source_is_an_error(layout_, tmp_path):
    src = tmp_path / "imgs"
    if layout_ != "missing":
        src.mkdir()
    if layout_ == "empty-classes":
        (src / "a").mkdir()
        (src / "b").mkdir()
        (src / "b" / "readme.txt").write_text("x")
    cache = tmp_path / "cache"
    r = invoke(latents_cmd(src, cache, "pixel"))
    assert r.exit_code == 1 and str(src) in r.output and "Traceback" not in r.output, r.output
    assert ("no images" in r.output) if layout_ != "missing" else ("no such file" in r.output)
    assert not cache.exists()


def test_tar_member_without_label_is_a_bad_sample(tmp_path):
    members = []
    for j in range(6):
        members.append((f"s{j:02d}.png", png_bytes(rand_rgb(20, 24, 50 + j))))
        if j != 2:
            members.append((f"s{j:02d}.cls", b"%d" % (j % 3)))
    tar = write_tar(tmp_path / "shards" / "train-000.tar", members)
    cache = tmp_path / "cache"
    r = invoke(latents_cmd(tmp_path / "shards", cache, "pixel", shard=2, batch=2))
    assert r.exit_code == 1, r.output
    assert f"{tar}/s02.png" in r.output and "no .cls label" in r.output
    assert done_marker(cache, "latents/pixel", 0).is_file()  # the shard before it is kept

    ok(latents_cmd(tmp_path / "shards", cache, "pixel", "--skip-bad", shard=2, batch=2))
    bad = json.loads((cache / "manifest.json").read_text())["arrays"]["latents/pixel"]["bad"]
    assert [(b["index"], b["key"], b["path"], b["reason"]) for b in bad] == [
        (2, "train-000.tar/s02", f"{tar}/s02.png", "no .cls label")]
    assert layout.read_keys(cache)[2] == "train-000.tar/s02"
    np.testing.assert_array_equal(np.load(cache / "index" / "labels.npy"), [0, 1, -1, 0, 1, 2])
    assert CacheReader(cache, ["latents/pixel"], threads=1).valid_indices().tolist() == [0, 1, 3, 4, 5]
    ok(["cache", "verify", cache])


@pytest.mark.parametrize("what", ["other-files", "foreign-manifest", "a-file"])
def test_cache_folder_that_is_not_a_cache_is_an_error_and_untouched(what, folder, tmp_path):
    cache = tmp_path / "mine"
    if what == "a-file":
        cache.write_text("precious\n")
        before = cache.read_bytes()
    else:
        (cache / "sub").mkdir(parents=True)
        (cache / "sub" / "data.bin").write_bytes(b"\x00\x01")
        (cache / "notes.txt").write_text("precious\n")
        if what == "foreign-manifest":
            (cache / "manifest.json").write_text(json.dumps({"name": "someone else's"}))
        before = tree_stat(cache)
    for cmd in (latents_cmd(folder, cache, "pixel"), features_cmd(folder, cache, "tiny"),
                ["cache", "info", cache], ["cache", "verify", cache]):
        r = invoke(cmd)
        assert r.exit_code == 1 and str(cache) in r.output and "Traceback" not in r.output, (cmd, r.output)
        assert "cache" in r.output.lower()
    assert (cache.read_bytes() if what == "a-file" else tree_stat(cache)) == before


# ------------------------------------------------------------------- 7. another source / resolution: refused
def test_adding_array_from_another_source_or_resolution_is_refused(folder, tmp_path):
    cache = tmp_path / "cache"
    ok(latents_cmd(folder, cache, "pixel"))
    before = tree_stat(cache)
    other_names = make_imagefolder(tmp_path / "other", classes=("x", "y", "z"))  # same N, other file list
    cases = [
        (features_cmd(other_names, cache, "tiny"), "another source"),
        (features_cmd(folder, cache, "tiny", res=32), "resolution"),
        (latents_cmd(folder, cache, "tiny", res=32), "resolution"),
        (features_cmd(folder, cache, "tiny", shard=4), "shard size"),
        (latents_cmd(folder, cache, "pixel", "--dtype", "float16"), "made differently"),
    ]
    for cmd, words in cases:
        r = invoke(cmd)
        assert r.exit_code == 1 and words in r.output and str(cache) in r.output, (cmd, r.output)
        assert "Traceback" not in r.output
        assert tree_stat(cache) == before, cmd


# ------------------------------------------------------------------------------------------- 10. progress
def test_progress_prints_plain_periodic_lines_when_not_a_terminal(folder, tmp_path, monkeypatch):
    from repa_pipe.pipeline import progress

    defaults = progress.Tracker.__init__.__defaults__
    assert defaults[1] == 10.0  # every 10 s by default
    monkeypatch.setattr(progress.Tracker.__init__, "__defaults__", (defaults[0], 0.0, *defaults[2:]))
    r = ok(latents_cmd(folder, tmp_path / "cache", "pixel"))
    assert "\x1b[" not in r.output  # no terminal control codes in a log file
    lines = re.findall(r"^encode-latents pixel: (\d+)/24 img \(([\d.]+) img/s, eta (\d+)s\)$", r.output, re.M)
    done = [int(d) for d, _, _ in lines]
    # one line per batch of 5 within shards of 8: 5, 8, 13, 16, 21, 24
    assert done == [5, 8, 13, 16, 21, 24], r.output
    assert int(lines[-1][2]) == 0 and all(float(rate) > 0 for _, rate, _ in lines)


# --------------------------------------------------------------------------------------- 11. WebDataset
def test_webdataset_tars_encode_like_the_imagefolder(folder, tiny_cache, tmp_path):
    keys, labels = imagefolder_index(folder)
    order = np.random.default_rng(3).permutation(len(keys))
    tar_of = {}
    for t in range(3):  # 3 tars, 8 samples each, in a shuffled order; KEY = <class>_<stem>
        members = []
        for i in order[t * 8:(t + 1) * 8]:
            key = keys[i].replace("/", "_").removesuffix(".png")
            members += [(f"{key}.png", (folder / keys[i]).read_bytes()), (f"{key}.cls", b"%d" % labels[i]),
                        (f"{key}.json", b"{}")]
            tar_of[key] = f"part-{t}.tar/{key}"
        write_tar(tmp_path / "tars" / f"part-{t}.tar", members)
    cache = tmp_path / "cache"
    ok(latents_cmd(tmp_path / "tars", cache, "tiny", workers=2))  # the test that runs loader workers

    wkeys = layout.read_keys(cache)
    assert sorted(wkeys) == sorted(tar_of.values()) and wkeys != [tar_of[k] for k in sorted(tar_of)]
    pos = {k: i for i, k in enumerate(wkeys)}
    perm = np.array([pos[tar_of[k.replace("/", "_").removesuffix(".png")]] for k in keys])
    np.testing.assert_array_equal(np.load(cache / "index" / "labels.npy")[perm], labels)
    np.testing.assert_allclose(read_array(cache, "latents/tiny")[perm], read_array(tiny_cache, "latents/tiny"),
                               rtol=1e-5, atol=1e-6)
    m = json.loads((cache / "manifest.json").read_text())
    assert m["dataset"]["kind"] == "webdataset" and m["dataset"]["n"] == 24
