"""The decoder-only VAE used by training previews and sample-eval never constructs the VAE encoder."""
from __future__ import annotations

import pytest
import torch

import diffusers.models.autoencoders.vae as vae_mod
from repa_pipe.models.latent_codecs import build_tiny_vae, load_codec
from repa_pipe.models.vae_decoder import load_vae_decoder
from repa_pipe.pipeline.errors import ConfigError, MissingWeightsError


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    build_tiny_vae().save_pretrained(d)
    return d


def test_decoder_only_matches_full_vae_without_building_the_encoder(vae_dir, monkeypatch):
    full = load_codec("sd-vae-ft-ema", str(vae_dir))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expect = full.decode(z)

    def no_encoder(*a, **k):
        raise AssertionError("the VAE encoder was constructed")

    monkeypatch.setattr(vae_mod.Encoder, "__init__", no_encoder)
    dec = load_vae_decoder("sd-vae-ft-ema", str(vae_dir))
    got = dec.decode(z)
    assert got.shape == (2, 3, 32, 32)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    assert got.min() >= -1 and got.max() <= 1


def test_decoder_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="--vae-weights"):
        load_vae_decoder("sd-vae-ft-mse")
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_vae_decoder("sd-vae-ft-ema", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_vae_decoder("sd-vae-ft-ema", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="unknown codec"):
        load_vae_decoder("sd-vae-xl")
