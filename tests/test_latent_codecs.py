"""Latent codecs: real loading path from a diffusers folder, moments, pixel codec, fast failure offline."""
from __future__ import annotations

import socket
import time

import pytest
import torch

from repa_pipe.models import latent_codecs as LC
from repa_pipe.models import weights as W
from repa_pipe.pipeline.errors import BadInputError, ConfigError, MissingWeightsError
from fixtures import forbid_network


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def saved_vae(tmp_path_factory):
    """A small AutoencoderKL (not the codec's tiny config) saved as the hub's diffusers folder format."""
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
    ).eval()
    folder = tmp_path_factory.mktemp("vae") / "sd-vae-ft-ema"
    vae.save_pretrained(str(folder))
    return vae, folder


def test_unknown_codec_lists_names():
    with pytest.raises(ConfigError) as err:
        LC.load_codec("sd-vae-xl")
    for name in LC.CODEC_NAMES:
        assert name in str(err.value)


def test_local_diffusers_folder_matches_in_memory_model(saved_vae, images, monkeypatch):
    vae, folder = saved_vae
    forbid_network(monkeypatch)
    codec = LC.load_codec("sd-vae-ft-ema", weights=str(folder))
    assert codec.weights_id == str(folder.resolve()) and not codec.is_random_init
    assert (codec.latent_channels, codec.downsample, codec.scaling_factor) == (4, 2, 0.18215)
    assert codec.weights_hash == LC.hash_state_dict(vae.state_dict())

    moments = codec.encode_moments(images)
    with torch.no_grad():
        dist = vae.encode(images.float() / 127.5 - 1).latent_dist
    assert moments.dtype == torch.float32 and moments.shape == (2, 8, 16, 16)
    torch.testing.assert_close(moments[:, :4], dist.mean, rtol=0, atol=0)
    torch.testing.assert_close(moments[:, 4:], dist.std, rtol=0, atol=0)
    # std is diffusers' exp(0.5 * clamp(logvar, -30, 20))
    torch.testing.assert_close(moments[:, 4:], torch.exp(0.5 * dist.logvar.clamp(-30, 20)))

    z = moments[:, :4] * codec.scaling_factor
    out = codec.decode(z)
    with torch.no_grad():
        ref = vae.decode(moments[:, :4]).sample.clamp(-1, 1)
    assert out.shape == images.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_pipeline_folder_with_vae_subfolder(saved_vae, tmp_path, monkeypatch):
    import shutil

    _, folder = saved_vae
    shutil.copytree(folder, tmp_path / "pipe" / "vae")
    forbid_network(monkeypatch)
    codec = LC.load_codec("sd-vae-ft-mse", weights=str(tmp_path / "pipe"))
    assert codec.latent_channels == 4


def test_tiny_codec_is_deterministic_random_init(images):
    a, b = LC.load_codec("tiny"), LC.load_codec("tiny")
    assert a.is_random_init and a.weights_id == "random-init(seed=0)"
    assert a.weights_hash == b.weights_hash
    assert (a.latent_channels, a.downsample, a.scaling_factor) == (4, 4, 0.18215)
    m = a.encode_moments(images)
    assert m.shape == (2, 8, 8, 8) and torch.equal(m, b.encode_moments(images))
    assert (m[:, 4:] > 0).all()
    out = a.decode(m[:, :4] * a.scaling_factor)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1


def test_tiny_codec_bf16_returns_float32(images):
    codec = LC.load_codec("tiny", dtype="bf16")
    m = codec.encode_moments(images)
    assert m.dtype == torch.float32
    ref = LC.load_codec("tiny").encode_moments(images)
    assert (m - ref).abs().max() < 0.1
    assert codec.decode(m[:, :4]).dtype == torch.float32


def test_pixel_codec_round_trip(images):
    codec = LC.load_codec("pixel")
    assert (codec.latent_channels, codec.downsample, codec.scaling_factor) == (3, 1, 1.0)
    m = codec.encode_moments(images)
    assert m.shape == (2, 6, 32, 32) and m.dtype == torch.float32
    assert torch.equal(m[:, :3], images.float() / 127.5 - 1) and not m[:, 3:].any()
    back = codec.decode(m[:, :3] * codec.scaling_factor)
    assert torch.equal(((back + 1) * 127.5).round().to(torch.uint8), images)
    with pytest.raises(ConfigError):
        LC.load_codec("pixel", weights="x")


def test_bad_inputs(images):
    codec = LC.load_codec("tiny")
    with pytest.raises(BadInputError):
        codec.encode_moments(images.float())
    with pytest.raises(BadInputError):
        codec.encode_moments(images[:, :, :30, :30])  # not divisible by 4


def test_missing_local_path_names_path_and_option(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(MissingWeightsError) as err:
        LC.load_codec("sd-vae-ft-mse", weights=str(missing))
    assert str(missing) in str(err.value) and "--vae-weights" in str(err.value)


def test_weights_file_instead_of_folder(tmp_path):
    f = tmp_path / "vae.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ConfigError, match="folder"):
        LC.load_codec("sd-vae-ft-ema", weights=str(f))


def test_offline_hub_fails_fast(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(W, "hub_reachable", lambda *a, **k: pytest.fail("no reachability probe when offline"))
    t0 = time.monotonic()
    with pytest.raises(MissingWeightsError) as err:
        LC.load_codec("sd-vae-ft-ema")
    msg = str(err.value)
    assert "--vae-weights DIR" in msg and "stabilityai/sd-vae-ft-ema" in msg
    assert time.monotonic() - t0 < 30  # generous; the real guarantee is: no download, no retries


def test_unreachable_hub_fails_without_download(empty_hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(W, "hub_offline", lambda: False)
    # a local port nobody listens on: the connect is refused at once
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    calls = []
    real = LC._from_pretrained

    def spy(source, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        if not kwargs.get("local_files_only"):
            raise AssertionError("download attempted although the hub is unreachable")
        return real(source, **kwargs)

    monkeypatch.setattr(LC, "_from_pretrained", spy)
    with pytest.raises(MissingWeightsError) as err:
        LC.load_codec("sd-vae-ft-mse")
    assert calls == [True]
    assert "cannot be reached" in str(err.value) and "--vae-weights DIR" in str(err.value)
    assert "stabilityai/sd-vae-ft-mse" in str(err.value)


def test_reachability_probe_is_bounded(monkeypatch):
    real_hub_offline = W.hub_offline
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(W, "hub_offline", lambda: False)
    for proxy in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(proxy, raising=False)

    def hang(*args, **kwargs):  # a black-holed route / stuck DNS
        time.sleep(5)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    t0 = time.monotonic()
    assert W.hub_reachable(timeout=0.2, endpoint="https://hub.invalid") is False
    assert time.monotonic() - t0 < 2
    # HF_HUB_OFFLINE short-circuits: no probe at all
    monkeypatch.setattr(W, "hub_offline", real_hub_offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    probes = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: probes.append(a))
    assert W.hub_reachable() is False and probes == []


def test_hub_weights_from_local_cache_only(saved_vae, tmp_path, monkeypatch, images):
    """Offline, a VAE already in the HF cache loads by hub id without any network access."""
    import shutil

    vae, folder = saved_vae
    repo = tmp_path / "models--stabilityai--sd-vae-ft-ema"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("network"))
    codec = LC.load_codec("sd-vae-ft-ema")
    assert codec.weights_id == "stabilityai/sd-vae-ft-ema"
    assert codec.weights_hash == LC.hash_state_dict(vae.state_dict())
    with torch.no_grad():
        ref = vae.encode(images.float() / 127.5 - 1).latent_dist.mean
    torch.testing.assert_close(codec.encode_moments(images)[:, :4], ref, rtol=0, atol=0)
