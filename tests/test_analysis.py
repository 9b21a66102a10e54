"""`repa-pipe analyze`: CKNNA and linear-probe properties, and the command on a tiny fixture run (no image, no
encoder, no VAE is read or built)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import invoke
from repa_pipe.analysis.alignment import linear_probe, pooled_hidden_states
from repa_pipe.metrics.cknna import cknna
from repa_pipe.models.sit import build_sit
from repa_pipe.stages import train
from repa_pipe.training.config import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import CacheOpts, Features, make_cache  # noqa: E402


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def test_cknna_is_one_for_identical_near_zero_for_independent_and_rotation_invariant():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((400, 24)), rng.standard_normal((400, 16))
    assert cknna(a, a) == pytest.approx(1.0, abs=2e-3)  # s / (s + 1e-6): 1 up to the epsilon
    assert abs(cknna(a, b)) < 0.05
    related = a[:, :16] + 0.3 * b  # shares structure with a
    base = cknna(a, related)
    assert base > 0.3
    assert cknna(a @ _rotation(24, 1), related) == pytest.approx(base, abs=1e-9)
    assert cknna(a, related @ _rotation(16, 2)) == pytest.approx(base, abs=1e-9)


def test_linear_probe_scores_separable_data_perfectly_and_shuffled_labels_at_chance():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 60)
    centers = rng.standard_normal((10, 32)) * 10
    x = centers[y] + rng.standard_normal((600, 32))  # linearly separable clusters
    assert linear_probe(x, y, holdout=0.25, seed=0) == 1.0
    chance = [linear_probe(x, rng.permutation(y), holdout=0.25, seed=s) for s in range(3)]
    assert abs(np.mean(chance) - 0.1) < 0.06, chance


def test_pooled_hidden_states_are_each_blocks_token_mean():
    torch.manual_seed(0)
    m = build_sit("SiT-T/2", input_size=8, in_channels=3, num_classes=4, encoder_depth=2, z_dims=[8],
                  projector_dim=16)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t, y = torch.randn(3, 3, 8, 8), torch.full((3,), 0.5), torch.full((3,), 4)
    h = pooled_hidden_states(m, x, t, y)
    assert h.shape == (4, 3, 64)
    # recompute block by block
    z = m.x_embedder(x) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder(y)
    for i, block in enumerate(m.blocks):
        z = block(z, c)
        torch.testing.assert_close(h[i], z.mean(dim=1))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analyze")
    cache = make_cache(root / "cache", CacheOpts(n=48, num_classes=4, shard_size=16,
                                                 features=(Features("dinov2-b"), Features("clip-l", 4, 24))))
    run = root / "run"  # --encoder-depth left to the preset's default (2 for SiT-T): analyze must still know it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.run(TrainConfig(cache=cache, run_dir=run, model="SiT-T/2", encoder=("dinov2-b",),
                              projector_dim=32, global_batch_size=8, steps=6, lr=1e-3, log_every=3, ckpt_every=3,
                              sample_every=0, precision="fp32", loader_threads=1))
    finally:
        torch.set_num_threads(threads)
    return run


def test_analyze_writes_table_plot_and_json_and_reads_no_image_or_encoder(tiny_run, monkeypatch):
    import diffusers
    import PIL.Image
    import timm

    from repa_pipe.models import feature_encoders, latent_codecs

    def forbidden(*a, **k):
        raise AssertionError("analyze read an image or built an encoder / VAE")

    for owner, name in [(timm, "create_model"), (diffusers.AutoencoderKL, "__init__"), (PIL.Image, "open"),
                        (feature_encoders, "load_encoder"), (latent_codecs, "load_codec")]:
        monkeypatch.setattr(owner, name, forbidden)
    r = invoke(["analyze", tiny_run, "--num-samples", 40, "--times", "0,0.5", "--batch-size", 16])
    assert r.exit_code == 0, r.output
    assert "CKNNA t=0" in r.output and "probe t=0.5" in r.output and "2*" in r.output
    a = json.loads((tiny_run / "analysis" / "step0000006.json").read_text())
    assert a["times"] == [0.0, 0.5] and a["blocks"] == [1, 2, 3, 4] and a["aligned_block"] == 2
    assert a["num_samples"] == 40 and a["features"] == "features/dinov2-b"
    for t in range(2):
        assert all(-1.0 <= v <= 1.0 for v in a["cknna"][t]) and all(0.0 <= v <= 1.0 for v in a["probe"][t])
    assert (tiny_run / "analysis" / "step0000006.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # another encoder's features, an earlier checkpoint
    r = invoke(["analyze", tiny_run, "--ckpt", "3", "--encoder", "clip-l", "--num-samples", 40, "--times", "0.25"])
    assert r.exit_code == 0, r.output
    b = json.loads((tiny_run / "analysis" / "step0000003.json").read_text())
    assert b["features"] == "features/clip-l" and b["times"] == [0.25]


def test_analyze_bad_inputs_are_one_line(tiny_run, tmp_path):
    for args, words in ((["--times", "0,2"], "--times"), (["--encoder", "mae-l"], "no array features/mae-l"),
                        (["--topk", "1"], "--topk"), (["--ckpt", "99"], "no checkpoint at that step")):
        r = invoke(["analyze", tiny_run, *args])
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 1 and lines[-1].startswith("error:") and words in lines[-1], (args, r.output)
    r = invoke(["analyze", tmp_path])
    assert r.exit_code == 1 and "not a training run" in r.output
