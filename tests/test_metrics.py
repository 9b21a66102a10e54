"""Metrics tests against ADM's evaluator (https://github.com/openai/guided-diffusion `evaluations/evaluator.py`),
torch-fidelity, dgm-eval and platonic-rep: CPU, offline, random-weight Inception.

Every metric is compared with an independent computation written here (closed forms, brute force, the
torch-fidelity extractor called directly, ADM's formulas in plain numpy), never with the code's own output.
"""
from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
import torch
from scipy import linalg

import repa_pipe.metrics.fd as fd_mod
from repa_pipe.metrics.cknna import cknna, hsic_unbiased
from repa_pipe.metrics.dinov2 import dinov2_preprocess, fd_dinov2_features
from repa_pipe.metrics.evaluate import evaluate
from repa_pipe.metrics.fd import FrechetDistanceError, compute_stats, frechet_distance
from repa_pipe.metrics.inception import load_inception, make_random_inception_weights, spatial_from_mixed6
from repa_pipe.metrics.inception_score import inception_score, inception_score_from_probs, split_bounds
from repa_pipe.metrics.npz_io import iter_batches, iter_npz_images, load_sample_npz, npz_image_count
from repa_pipe.metrics.precision_recall import distance_block, manifold_radii, precision_recall
from repa_pipe.metrics.reference import ReferenceStats
from repa_pipe.pipeline.errors import BadInputError, ConfigError, MissingWeightsError

N_SAMPLE, N_REF, N_ADM_REF = 12, 10, 4


@pytest.fixture(autouse=True, scope="module")
def _single_thread_blas():
    """One BLAS thread: the 2048-d eigendecompositions barely gain from a second core, and on a shared 2-core
    machine a spinning second thread made them 3-4x slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ----------------------------------------------------------------------------------------------------------
# independent oracles
# ----------------------------------------------------------------------------------------------------------
def fd_lowrank_oracle(x1: np.ndarray, x2: np.ndarray) -> float:
    """Exact FD of the sample Gaussians of x1 (n1, d), x2 (n2, d) for n << d.

    With centred C_i and S_i = C_i^T C_i / (n_i - 1), the non-zero eigenvalues of S1 S2 are the squared
    singular values of C1 C2^T / sqrt((n1-1)(n2-1)), so tr sqrt(S1 S2) is that matrix's nuclear norm.
    """
    x1, x2 = x1.astype(np.float64), x2.astype(np.float64)
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    n1, n2 = len(x1), len(x2)
    tr1, tr2 = (c1 ** 2).sum() / (n1 - 1), (c2 ** 2).sum() / (n2 - 1)
    nuc = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    dmu = x1.mean(0) - x2.mean(0)
    return float(dmu @ dmu + tr1 + tr2 - 2 * nuc)


def fd_eigh_oracle(mu1, s1, mu2, s2) -> float:
    """tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), all symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    r = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(r @ s2 @ r)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def is_adm_oracle(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM evaluator's IS, literally: float32 softmax, contiguous splits, mean of exp(mean KL)."""
    lg = logits.astype(np.float32)
    e = np.exp(lg - lg.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def pr_bruteforce(ref: np.ndarray, smp: np.ndarray, k: int = 3):
    """float64, plain (not squared) distances, k-th nearest *other* point by index, inclusion with <=."""
    ref, smp = ref.astype(np.float64), smp.astype(np.float64)

    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        out = []
        for i in range(len(x)):
            others = np.sort(np.delete(d[i], i))
            out.append(others[k - 1])
        return np.array(out)

    r_ref, r_smp = radii(ref), radii(smp)
    d = np.sqrt(((ref[:, None, :] - smp[None, :, :]) ** 2).sum(-1))  # (R, S)
    precision = np.mean([any(d[i, j] <= r_ref[i] for i in range(len(ref))) for j in range(len(smp))])
    recall = np.mean([any(d[i, j] <= r_smp[j] for j in range(len(smp))) for i in range(len(ref))])
    return float(precision), float(recall), r_ref, r_smp


def spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


# ----------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------
def test_fd_identical_is_zero():
    rng = np.random.default_rng(0)
    s, mu = spd(rng, 40), rng.standard_normal(40)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)


def test_fd_equal_covariance_is_mean_distance():
    rng = np.random.default_rng(1)
    s = spd(rng, 64)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(float((mu1 - mu2) @ (mu1 - mu2)), rel=1e-10)


def test_fd_diagonal_and_commuting_closed_form():
    rng = np.random.default_rng(2)
    d = 32
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expect = float((mu1 - mu2) @ (mu1 - mu2) + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-10)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T  # commuting, not diagonal
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-10)
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(expect, rel=1e-10)


def test_fd_one_dimensional():
    # (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)


def test_fd_noncommuting_matches_eigh_oracle_and_is_symmetric():
    rng = np.random.default_rng(3)
    d = 48
    s1, s2 = spd(rng, d), spd(rng, d, 2.0)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expect = fd_eigh_oracle(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expect, rel=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(expect, rel=1e-9)


def test_fd_rank_deficient_matches_lowrank_oracle():
    rng = np.random.default_rng(4)
    x1, x2 = rng.standard_normal((10, 96)), rng.standard_normal((9, 96)) * 1.5 + 0.3
    expect = fd_lowrank_oracle(x1, x2)
    for method in ("sqrtm", "eigh"):
        got = frechet_distance(*compute_stats(x1), *compute_stats(x2), method=method)
        assert np.isfinite(got) and got > -1e-6
        assert got == pytest.approx(expect, rel=1e-4)


def test_fd_nonfinite_sqrtm_retries_with_eps_on_both(monkeypatch):
    rng = np.random.default_rng(5)
    s1, s2, mu = spd(rng, 6), spd(rng, 6), np.zeros(6)
    calls = []
    real = linalg.sqrtm

    def fake(a, *args, **kw):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

    monkeypatch.setattr(fd_mod.linalg, "sqrtm", fake)
    with pytest.warns(UserWarning, match="singular product"):
        got = frechet_distance(mu, s1, mu, s2, eps=1e-3)
    off = np.eye(6) * 1e-3
    np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off), rtol=1e-14)
    expect = np.trace(s1) + np.trace(s2) - 2 * np.trace(real((s1 + off) @ (s2 + off))).real
    assert got == pytest.approx(float(expect), rel=1e-10)


def test_fd_large_imaginary_part_raises():
    # S1 S2 = diag(1, -1): sqrtm has an imaginary diagonal entry of 1 >> 1e-3.
    with pytest.raises(FrechetDistanceError, match="maginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_fd_shape_mismatch_is_bad_input():
    with pytest.raises(BadInputError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fd_monte_carlo_close_to_closed_form():
    rng = np.random.default_rng(6)
    d = 8
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    mu2 = rng.standard_normal(d)
    x1 = rng.standard_normal((200_000, d)) * np.sqrt(a)
    x2 = rng.standard_normal((200_000, d)) * np.sqrt(b) + mu2
    expect = mu2 @ mu2 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(*compute_stats(x1), *compute_stats(x2))
    assert abs(got - expect) < 0.02 * expect


def test_compute_stats_mean_and_unbiased_covariance():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((50, 5)).astype(np.float32)
    mu, sigma = compute_stats(x)
    xd = x.astype(np.float64)
    m = xd.sum(0) / 50
    cov = sum(np.outer(r - m, r - m) for r in xd) / 49
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, m, rtol=1e-12)
    np.testing.assert_allclose(sigma, cov, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------------
def _one_hot(labels, c=10):
    return np.eye(c)[labels]


def test_is_equal_rows_is_one_and_balanced_one_hot_is_c():
    rng = np.random.default_rng(8)
    row = rng.dirichlet(np.ones(1008))
    assert inception_score_from_probs(np.tile(row, (300, 1))) == pytest.approx(1.0, abs=1e-12)
    labels = np.tile(np.arange(10), 60)
    assert inception_score_from_probs(_one_hot(labels)) == pytest.approx(10.0, rel=1e-12)
    # the same through logits: huge one-hot logits give one-hot softmax
    assert inception_score(_one_hot(labels) * 1000.0) == pytest.approx(10.0, rel=1e-9)


def test_is_contiguous_splits_no_shuffle():
    # first 25k rows balanced one-hot, last 25k uniform: 5 splits score 10, 5 score 1 -> 5.5 exactly.
    probs = np.concatenate([_one_hot(np.tile(np.arange(10), 2500)), np.full((25_000, 10), 0.1)])
    assert inception_score_from_probs(probs) == pytest.approx(5.5, rel=1e-12)
    shuffled = probs[np.random.default_rng(9).permutation(len(probs))]
    assert abs(inception_score_from_probs(shuffled) - 5.5) > 0.5  # guard: the test sees shuffling


def test_is_partial_last_split_is_unweighted():
    # N = 12000 -> splits of 5000, 5000, 2000 scoring 10, 5, 2: ADM averages them unweighted.
    probs = np.concatenate([_one_hot(np.tile(np.arange(10), 500)),
                            _one_hot(np.tile(np.arange(5), 1000)),
                            _one_hot(np.tile(np.arange(2), 1000))])
    assert split_bounds(12_000) == [(0, 5000), (5000, 10_000), (10_000, 12_000)]
    assert inception_score_from_probs(probs) == pytest.approx((10 + 5 + 2) / 3, rel=1e-12)
    assert split_bounds(50_000) == [(i, i + 5000) for i in range(0, 50_000, 5000)]


def test_is_matches_adm_formula_on_random_logits():
    rng = np.random.default_rng(10)
    logits = rng.standard_normal((7000, 1008)).astype(np.float32) * 3
    assert inception_score(logits) == pytest.approx(is_adm_oracle(logits), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Precision / recall
# ----------------------------------------------------------------------------------------------------------
def test_pr_matches_bruteforce_2d():
    rng = np.random.default_rng(11)
    ref = rng.standard_normal((80, 2))
    smp = np.concatenate([rng.standard_normal((40, 2)) * 0.7 + 0.5, rng.standard_normal((30, 2)) * 2 + 2])
    p, r, r_ref, r_smp = pr_bruteforce(ref, smp)
    assert 0.05 < p < 0.95 and 0.05 < r < 0.95  # informative case
    for dt in ("float64", "float32"):
        assert precision_recall(ref, smp, distance_dtype=dt) == (p, r)
    # radii are squared distances to the 3rd nearest other point, each within its own set
    np.testing.assert_allclose(manifold_radii(ref, distance_dtype="float64").numpy(), r_ref ** 2, rtol=1e-10)
    np.testing.assert_allclose(manifold_radii(smp, distance_dtype="float64").numpy(), r_smp ** 2, rtol=1e-10)


def test_pr_tie_on_radius_counts_as_inside():
    # refs on a line: radius^2 of (0,0) is 9 (3rd neighbour at (3,0)). A sample at (0,3) is exactly on it.
    ref = np.array([[0, 0], [1, 0], [2, 0], [3, 0], [4, 0]], dtype=np.float64)
    smp = np.array([[0, 3], [0, 3.001], [100, 100], [101, 100], [102, 100]], dtype=np.float64)
    for dt in ("float64", "float32"):
        p, _ = precision_recall(ref, smp, distance_dtype=dt)
        assert p == pytest.approx(1 / 5, abs=0)  # with "<" it would be 0


def test_pr_tight_cluster_inside_wide_cloud():
    rng = np.random.default_rng(12)
    real = rng.standard_normal((400, 8)) * 3
    fake = rng.standard_normal((400, 8)) * 0.3
    p, r = precision_recall(real, fake, distance_dtype="float32")
    assert p > 0.8 and r < 0.3  # swapped arguments would flip these


def test_pr_block_size_invariance():
    rng = np.random.default_rng(13)
    ref, smp = rng.standard_normal((150, 16)), rng.standard_normal((120, 16)) * 1.2
    base = precision_recall(ref, smp, distance_dtype="float32")
    for bs in (7, 100, 10000):
        assert precision_recall(ref, smp, row_batch_size=bs, col_batch_size=bs, distance_dtype="float32") == base


def test_pr_fp16_overflow_falls_back_to_fp32():
    rng = np.random.default_rng(14)
    ref, smp = rng.standard_normal((60, 64)) * 100, rng.standard_normal((50, 64)) * 110  # |f|^2 > 65504
    u, v = torch.tensor(ref[:5]), torch.tensor(smp[:5])
    assert torch.equal(distance_block(u, v, "float16"), distance_block(u, v, "float32"))
    assert precision_recall(ref, smp) == precision_recall(ref, smp, distance_dtype="float32")


def test_pr_fp16_path_is_used_on_ordinary_features():
    rng = np.random.default_rng(15)
    u, v = torch.tensor(rng.standard_normal((20, 64))), torch.tensor(rng.standard_normal((30, 64)))
    d16, d32 = distance_block(u, v, "float16"), distance_block(u, v, "float32")
    exact = ((u[:, None] - v[None]) ** 2).sum(-1).float()
    assert d16.dtype == torch.float32
    assert not torch.equal(d16, d32)  # fp16 rounding is visible ...
    torch.testing.assert_close(d16, exact, rtol=2e-2, atol=0.2)  # ... but small


def test_pr_needs_k_plus_one_points():
    with pytest.raises(BadInputError):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


# ----------------------------------------------------------------------------------------------------------
# sample npz validation
# ----------------------------------------------------------------------------------------------------------
def _imgs(n=3, h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_sample_npz_roundtrip_and_streaming(tmp_path, save):
    imgs, labels = _imgs(7), np.arange(7) % 3
    path = tmp_path / "s.npz"
    save(path, imgs, labels)  # arr_0, arr_1 as ADM writes them
    got, got_labels = load_sample_npz(path)
    assert got.dtype == np.uint8 and np.array_equal(got, imgs) and np.array_equal(got_labels, labels)
    assert npz_image_count(path) == 7
    streamed = list(iter_npz_images(path, batch_size=3))
    assert [b.shape[0] for b in streamed] == [3, 3, 1]
    assert np.array_equal(np.concatenate(streamed), imgs)
    save(tmp_path / "nolabels.npz", imgs)
    assert load_sample_npz(tmp_path / "nolabels.npz")[1] is None


def test_sample_npz_int_in_range_accepted_as_uint8(tmp_path):
    imgs = _imgs().astype(np.int64)
    np.savez(tmp_path / "i.npz", imgs)
    got, _ = load_sample_npz(tmp_path / "i.npz")
    assert got.dtype == np.uint8 and np.array_equal(got, imgs)


@pytest.mark.parametrize("arr, pattern", [
    (_imgs().astype(np.float32) / 255, r"float32 is rejected"),
    (_imgs().astype(np.float64), r"float64 is rejected"),
    (np.where(_imgs() > 128, 300, 0).astype(np.int32), r"outside 0\.\.255"),
    (np.full((2, 4, 4, 3), -1, np.int16), r"outside 0\.\.255"),
    (_imgs()[0], r"rank 3"),
    (_imgs()[..., :2], r"2 channels"),
    (np.concatenate([_imgs(), _imgs()[..., :1]], -1), r"4 channels"),
    (_imgs(h=3, w=8).transpose(0, 3, 1, 2), r"NCHW"),
    (np.zeros((0, 8, 8, 3), np.uint8), r"no images"),
])
def test_bad_sample_npz_rejected(tmp_path, arr, pattern):
    path = tmp_path / "bad.npz"
    np.savez(path, arr)
    with pytest.raises(BadInputError, match=pattern) as e:
        load_sample_npz(path)
    assert str(path) in str(e.value)
    with pytest.raises(BadInputError, match=pattern):  # the streaming reader refuses the same files
        list(iter_npz_images(path, batch_size=2))


def test_sample_npz_missing_arr0_and_not_npz(tmp_path):
    np.savez(tmp_path / "k.npz", images=_imgs())
    with pytest.raises(BadInputError, match=r"no 'arr_0'.*images"):
        load_sample_npz(tmp_path / "k.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BadInputError, match="not a readable .npz"):
        load_sample_npz(tmp_path / "junk.npz")
    with pytest.raises(BadInputError, match="no such file"):
        load_sample_npz(tmp_path / "absent.npz")
    np.savez(tmp_path / "lab.npz", _imgs(3), np.zeros(2, np.int64))
    with pytest.raises(BadInputError, match="arr_1"):
        load_sample_npz(tmp_path / "lab.npz")


def test_iter_batches_rechunks_and_validates():
    imgs = _imgs(10)
    chunks = [imgs[:3], imgs[3:4], imgs[4:10]]
    out = list(iter_batches(iter(chunks), 4))
    assert [b.shape[0] for b in out] == [4, 4, 2] and np.array_equal(np.concatenate(out), imgs)
    with pytest.raises(BadInputError, match="float"):
        list(iter_batches(imgs.astype(np.float32), 4))
    assert np.array_equal(np.concatenate(list(iter_batches(torch.from_numpy(imgs), 3))), imgs)


# ----------------------------------------------------------------------------------------------------------
# Inception: weights, layout, features, end to end
# ----------------------------------------------------------------------------------------------------------
URL_LOADER = "torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url"


def _no_download(*a, **k):
    raise AssertionError("torch-fidelity tried to download weights")


def test_missing_weights_names_the_option(tmp_path):
    with mock.patch(URL_LOADER, _no_download):
        for p in (None, tmp_path / "weights-inception-2015-12-05-6726825d.pth"):
            with pytest.raises(MissingWeightsError, match="--inception-weights"):
                load_inception(p)


def test_bad_weights_file_is_bad_input(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"garbage")
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "partial.pth")
    with mock.patch(URL_LOADER, _no_download):
        for name in ("w.pth", "partial.pth"):
            with pytest.raises(BadInputError, match="not usable as InceptionV3 weights"):
                load_inception(tmp_path / name)


def test_spatial_layout_is_hwc_first_seven_channels():
    c, h, w = np.meshgrid(np.arange(192), np.arange(17), np.arange(17), indexing="ij")
    act = torch.tensor(10000 * c + 100 * h + w, dtype=torch.float64)[None].repeat(2, 1, 1, 1)  # (2, 192, 17, 17)
    flat = spatial_from_mixed6(act)
    assert flat.shape == (2, 2023)
    for hh in range(17):
        for ww in range(17):
            for cc in range(7):
                assert flat[1, (hh * 17 + ww) * 7 + cc] == 10000 * cc + 100 * hh + ww


def _smooth_images(rng, n, size=32):
    """Low-frequency colour images (upsampled 4x4 noise) so the two image sets differ in distribution."""
    base = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float64)
    up = np.kron(base, np.ones((1, size // 4, size // 4, 1)))
    return np.clip(up + rng.normal(0, 8, up.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def inception_setup(tmp_path_factory):
    """Random-weight Inception saved like the real file, loaded through load_inception, plus an oracle run
    of torch-fidelity's extractor on the same file (direct, one batch, its own hook and flatten)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    tmp = tmp_path_factory.mktemp("inception")
    wpath = tmp / "weights-inception-2015-12-05-6726825d.pth"
    rng = np.random.default_rng(0)
    calib = np.concatenate([_smooth_images(rng, 2), rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)])
    make_random_inception_weights(wpath, seed=0, calibration_images=calib)
    ref_imgs = _smooth_images(rng, N_REF)
    smp_imgs = np.concatenate([_smooth_images(rng, N_SAMPLE // 2),
                               rng.integers(0, 256, (N_SAMPLE // 2, 32, 32, 3), dtype=np.uint8)])
    with mock.patch(URL_LOADER, _no_download):
        inc = load_inception(wpath, "cpu")
        oracle = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                             feature_extractor_weights_path=str(wpath))
    grabbed = []
    oracle.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: grabbed.append(o.detach().clone()))
    all_imgs = np.concatenate([ref_imgs, smp_imgs])
    with torch.no_grad():
        (pool,) = oracle(torch.from_numpy(all_imgs).permute(0, 3, 1, 2).contiguous())
    pool = pool.double().numpy()  # (N, 2048)
    sd = torch.load(wpath)
    logits = pool @ sd["fc.weight"].double().numpy().T  # (N, 1008), no bias
    logits_biased = logits + sd["fc.bias"].double().numpy()
    act = grabbed[0].double().numpy()  # (N, 192, 17, 17)
    spatial = np.empty((len(all_imgs), 2023))
    for hh in range(17):
        for ww in range(17):
            for cc in range(7):
                spatial[:, (hh * 17 + ww) * 7 + cc] = act[:, cc, hh, ww]
    o = {"pool": pool, "logits": logits, "logits_biased": logits_biased, "spatial": spatial}
    split = lambda d: ({k: v[:N_REF] for k, v in d.items()}, {k: v[N_REF:] for k, v in d.items()})  # noqa: E731
    o_ref, o_smp = split(o)
    return dict(wpath=wpath, inc=inc, ref_imgs=ref_imgs, smp_imgs=smp_imgs, o_ref=o_ref, o_smp=o_smp, tmp=tmp)


def _fake_dino(x: torch.Tensor) -> torch.Tensor:
    """Stand-in for a DINOv2 CLS forward: (B, 3, 224, 224) -> (B, 6)."""
    return torch.cat([x.mean((2, 3)), (x ** 2).mean((2, 3))], dim=1)


def _torchvision_dino_preprocess(images: np.ndarray) -> torch.Tensor:
    from PIL import Image
    from torchvision import transforms as T
    tf = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return torch.stack([tf(Image.fromarray(im)) for im in images])


def test_random_weights_give_informative_features(inception_setup):
    o = inception_setup["o_smp"]
    assert 0.01 < o["pool"].mean() < 10 and o["pool"].std(0).mean() > 1e-3
    assert 1 < o["logits"].std() < 30  # softmax neither flat nor one-hot
    assert 0.05 < (o["spatial"] == 0).mean() < 0.95  # post-ReLU: some zeros, not all
    assert inception_setup["inc"].weights_sha256 and not inception_setup["inc"].official_weights


def test_evaluate_end_to_end_matches_oracle(inception_setup):
    s = inception_setup
    inc, o_ref, o_smp = s["inc"], s["o_ref"], s["o_smp"]

    # reference: computed from images, saved in our format, loaded back
    ref = ReferenceStats.from_images(s["ref_imgs"], inc, batch_size=4, dinov2_forward=_fake_dino)
    np.testing.assert_allclose(ref.pool, o_ref["pool"], rtol=1e-5, atol=1e-6)
    ref_mu_s, _ = compute_stats(o_ref["spatial"])
    np.testing.assert_allclose(ref.mu_s, ref_mu_s, rtol=1e-5, atol=1e-6)
    ref.save(s["tmp"] / "ref.npz")
    loaded = ReferenceStats.load(s["tmp"] / "ref.npz")
    for k in ("mu", "sigma", "mu_s", "sigma_s", "pool", "mu_dinov2", "sigma_dinov2"):
        assert np.array_equal(getattr(loaded, k), getattr(ref, k)), k
    assert loaded.meta["num_images"] == N_REF

    # samples arrive as uneven chunks, re-batched by 5
    chunks = iter([s["smp_imgs"][:7], s["smp_imgs"][7:]])
    res = evaluate(chunks, loaded, inc, batch_size=5, fd_dinov2=_fake_dino, pr_distance_dtype="float32",
                   fd_method="eigh", return_features=True)
    f = res["features"]
    np.testing.assert_allclose(f["pool"], o_smp["pool"], rtol=1e-5, atol=1e-6)
    # logits are sums of 2048 products: compare on the scale of the row, not element by element
    np.testing.assert_allclose(f["logits"], o_smp["logits"], rtol=0, atol=1e-5 * np.abs(o_smp["logits"]).max())
    np.testing.assert_allclose(f["spatial"], o_smp["spatial"], rtol=1e-5, atol=1e-6)
    assert f["logits"].shape == (N_SAMPLE, 1008) and f["spatial"].shape == (N_SAMPLE, 2023)

    assert res["num_samples"] == N_SAMPLE
    assert res["fid"] == pytest.approx(fd_lowrank_oracle(o_smp["pool"], o_ref["pool"]), rel=1e-4)
    assert res["sfid"] == pytest.approx(fd_lowrank_oracle(o_smp["spatial"], o_ref["spatial"]), rel=1e-4)
    is_expect = is_adm_oracle(o_smp["logits"])
    assert res["inception_score"] == pytest.approx(is_expect, rel=1e-4)
    assert 1.05 < is_expect  # softmax not flat: IS is informative
    assert abs(is_adm_oracle(o_smp["logits_biased"]) - is_expect) > 1e-3  # guard: the bias would show
    p, r, _, _ = pr_bruteforce(o_ref["pool"], o_smp["pool"])
    assert (res["precision"], res["recall"]) == (p, r)
    # FD_DINOv2: torchvision's PIL pipeline + the same stand-in model, FD by the eigh oracle (d = 6)
    d_smp = _fake_dino(_torchvision_dino_preprocess(s["smp_imgs"])).double().numpy()
    d_ref = _fake_dino(_torchvision_dino_preprocess(s["ref_imgs"])).double().numpy()
    np.testing.assert_allclose(f["dinov2"], d_smp, rtol=1e-6, atol=1e-7)
    expect = fd_lowrank_oracle(d_smp, d_ref)
    assert res["fd_dinov2"] == pytest.approx(expect, rel=1e-6)
    assert any("50000" in n for n in res["notes"])
    json.dumps({k: v for k, v in res.items() if k != "features"})  # stage writes this as metrics.json


def test_adm_reference_npz(inception_setup, tmp_path):
    s = inception_setup
    inc, o_ref = s["inc"], s["o_ref"]
    imgs = s["ref_imgs"][:N_ADM_REF]
    rng = np.random.default_rng(1)
    stats = dict(mu=rng.standard_normal(2048).astype(np.float32), sigma=np.eye(2048),
                 mu_s=rng.standard_normal(2023).astype(np.float32), sigma_s=np.eye(2023))

    # images + stored stats (VIRTUAL_imagenet256_labeled.npz layout): stats as stored, pool from arr_0
    np.savez(tmp_path / "adm.npz", arr_0=imgs, **stats)
    ref = ReferenceStats.load(tmp_path / "adm.npz", inc, batch_size=3)
    for k, v in stats.items():
        assert np.array_equal(getattr(ref, k), v.astype(np.float64)), k
    np.testing.assert_allclose(ref.pool, o_ref["pool"][:N_ADM_REF], rtol=1e-5, atol=1e-6)
    # without Inception only the stats can be had
    assert ReferenceStats.load(tmp_path / "adm.npz", need_pool=False).pool is None
    with pytest.raises(MissingWeightsError, match="--inception-weights"):
        ReferenceStats.load(tmp_path / "adm.npz")

    # images only: ADM computes the reference stats from arr_0's features
    np.savez(tmp_path / "imgs.npz", imgs)
    ref2 = ReferenceStats.load(tmp_path / "imgs.npz", inc, batch_size=3)
    mu, sigma = compute_stats(o_ref["pool"][:N_ADM_REF])
    mu_s, sigma_s = compute_stats(o_ref["spatial"][:N_ADM_REF])
    np.testing.assert_allclose(ref2.mu, mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref2.sigma, sigma, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ref2.mu_s, mu_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref2.sigma_s, sigma_s, rtol=1e-4, atol=1e-6)


def test_reference_files_rejected_with_reasons(tmp_path):
    np.savez(tmp_path / "partial.npz", arr_0=_imgs(4), mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(BadInputError, match=r"lacks \['mu_s', 'sigma_s'\]"):
        ReferenceStats.load(tmp_path / "partial.npz", need_pool=False)
    np.savez(tmp_path / "shape.npz", mu=np.zeros(10), sigma=np.eye(10))
    with pytest.raises(BadInputError, match=r"expected \(2048,\)"):
        ReferenceStats.load(tmp_path / "shape.npz", need_pool=False)
    np.savez(tmp_path / "other.npz", foo=np.zeros(3))
    with pytest.raises(BadInputError, match="not a reference file"):
        ReferenceStats.load(tmp_path / "other.npz")
    # stats-only (MAR-style mu/sigma): loads for FID, P/R inputs are absent
    np.savez(tmp_path / "mar.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    ref = ReferenceStats.load(tmp_path / "mar.npz", need_pool=False)
    assert ref.mu_s is None and ref.pool is None
    with pytest.raises(BadInputError, match="statistics only"):
        ReferenceStats.load(tmp_path / "mar.npz", need_pool=True)


def test_fd_dinov2_needs_reference_stats(inception_setup):
    ref = ReferenceStats(mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ConfigError, match="mu_dinov2"):
        evaluate(_imgs(4), ref, inception_setup["inc"], fd_dinov2=_fake_dino)


# ----------------------------------------------------------------------------------------------------------
# DINOv2 preprocessing
# ----------------------------------------------------------------------------------------------------------
def test_dinov2_preprocess_matches_torchvision_pil_pipeline():
    imgs = _smooth_images(np.random.default_rng(2), 3, size=256)
    got = dinov2_preprocess(imgs)
    assert got.shape == (3, 3, 224, 224) and got.dtype == torch.float32
    assert torch.equal(got, _torchvision_dino_preprocess(imgs))
    feats = fd_dinov2_features(_fake_dino, imgs, batch_size=2)
    np.testing.assert_allclose(feats, _fake_dino(_torchvision_dino_preprocess(imgs)).double().numpy(), rtol=1e-6,
                               atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# CKNNA
# ----------------------------------------------------------------------------------------------------------
def cknna_loop_oracle(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Explicit mutual-neighbour sets and the HSIC_u sum written out element by element."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    n = len(a)

    def nbrs(x):
        out = []
        for i in range(n):
            row = [(x[i, j], j) for j in range(n) if j != i]
            out.append({j for _, j in sorted(row, reverse=True)[:k]})
        return out

    def hsic(kk, ll):
        kt, lt = kk.copy(), ll.copy()
        np.fill_diagonal(kt, 0)
        np.fill_diagonal(lt, 0)
        t1 = sum(kt[i, j] * lt[j, i] for i in range(n) for j in range(n))
        t2 = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
        t3 = 2 * sum(kt[i, j] * lt[j, l] for i in range(n) for j in range(n) for l in range(n)) / (n - 2)
        return (t1 + t2 - t3) / (n * (n - 3))

    def sim(x, y):
        nx, ny = nbrs(x), nbrs(y)
        m = np.array([[1.0 if (j in nx[i] and j in ny[i]) else 0.0 for j in range(n)] for i in range(n)])
        return hsic(m * x, m * y)

    kk, ll = a @ a.T, b @ b.T
    return sim(kk, ll) / (np.sqrt(sim(kk, kk) * sim(ll, ll)) + 1e-6)


def test_cknna_matches_loop_oracle_and_properties():
    rng = np.random.default_rng(16)
    a = rng.standard_normal((24, 6))
    b = a @ rng.standard_normal((6, 9)) + 0.5 * rng.standard_normal((24, 9))
    got = cknna(a, b, topk=4)
    assert got == pytest.approx(cknna_loop_oracle(a, b, 4), abs=1e-10)
    assert 0.05 < got < 0.99
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    assert cknna(a @ q, b, topk=4) == pytest.approx(got, abs=1e-12)
    perm = rng.permutation(24)
    assert cknna(a[perm], b[perm], topk=4) == pytest.approx(got, abs=1e-12)
    with pytest.raises(BadInputError):
        cknna(a, b, topk=1)


def test_cknna_self_and_independent():
    rng = np.random.default_rng(17)
    a = rng.standard_normal((500, 32))
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    kk = torch.tensor(an @ an.T)
    idx = torch.topk(kk.clone().fill_diagonal_(-np.inf), 10, dim=1).indices
    m = torch.zeros_like(kk).scatter_(1, idx, 1.0)
    s = float(hsic_unbiased(m * kk, m * kk))
    assert cknna(a, a) == pytest.approx(s / (s + 1e-6), rel=1e-10)
    assert abs(cknna(a, rng.standard_normal((500, 32)))) < 0.05


def test_hsic_uses_transposed_second_kernel():
    rng = np.random.default_rng(18)
    kk, ll = rng.standard_normal((8, 8)), rng.standard_normal((8, 8))  # asymmetric, like masked kernels
    n = 8
    kt, lt = kk - np.diag(np.diag(kk)), ll - np.diag(np.diag(ll))
    rest = kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2 * (kt @ lt).sum() / (n - 2)
    expect = ((kt * lt.T).sum() + rest) / (n * (n - 3))
    wrong = ((kt * lt).sum() + rest) / (n * (n - 3))
    got = float(hsic_unbiased(torch.tensor(kk), torch.tensor(ll)))
    assert got == pytest.approx(expect, rel=1e-12) and abs(got - wrong) > 1e-6


def test_cknna_outlier_clamp_is_mean_of_row_quantiles():
    from repa_pipe.metrics.cknna import clamp_outliers
    rng = np.random.default_rng(19)
    x = rng.standard_t(2, (40, 16))
    bound = np.mean(np.quantile(np.abs(x), 0.95, axis=1))
    np.testing.assert_allclose(clamp_outliers(torch.tensor(x), 0.95).numpy(), np.clip(x, -bound, bound), rtol=1e-12)
    assert cknna(x, x[:, ::-1] * 2, topk=5, outlier_quantile=0.95) == pytest.approx(
        cknna(np.clip(x, -bound, bound), np.clip(x[:, ::-1] * 2, -2 * bound, 2 * bound), topk=5), abs=1e-12)
