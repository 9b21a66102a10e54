"""Transport: paths, time sampling, losses (the REPA reference's `train.py` and `loss.py`,
https://github.com/sihyun-yu/REPA; docs/numerics.md points 3-6)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from repa_pipe.models.transport import (
    alignment_loss,
    denoising_loss,
    interpolant,
    interpolate,
    repa_loss,
    sample_posterior,
    sample_time,
    time_from_base,
    velocity_target,
)
from repa_pipe.pipeline.errors import ConfigError


def test_linear_path_and_target():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = interpolate(x0, eps, t, "linear")
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(xt[i], (1 - ti) * x0[i] + ti * eps[i])
    torch.testing.assert_close(velocity_target(x0, eps, t, "linear"), eps - x0)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_path_derivatives_match_autograd(path):
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64, requires_grad=True)
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path)
    (ga,) = torch.autograd.grad(alpha.sum(), t, retain_graph=True)
    (gs,) = torch.autograd.grad(sigma.sum(), t)
    torch.testing.assert_close(d_alpha.detach(), ga)
    torch.testing.assert_close(d_sigma.detach(), gs)
    if path == "cosine":
        tt = t.detach()
        torch.testing.assert_close(alpha.detach(), torch.cos(tt * math.pi / 2))
        torch.testing.assert_close(sigma.detach(), torch.sin(tt * math.pi / 2))


def test_time_sampling():
    n = torch.tensor([-1.0, 0.0, 2.0])
    torch.testing.assert_close(time_from_base(n, "lognormal", "linear"), torch.tensor([1 / (1 + math.e), 0.5, 1 / (1 + math.exp(-2))]))
    expect_cos = torch.tensor([2 / math.pi * math.atan(math.exp(v)) for v in n.tolist()])
    torch.testing.assert_close(time_from_base(n, "lognormal", "cosine"), expect_cos)
    u = torch.tensor([0.0, 0.3, 0.999])
    torch.testing.assert_close(sample_time(3, "uniform", base=u), u)
    # generator path: reproducible, equal to the generator's own U[0,1) draws
    a = sample_time(1000, "uniform", generator=torch.Generator().manual_seed(5))
    b = torch.rand(1000, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert a.min() >= 0 and a.max() < 1
    ln = sample_time(4000, "lognormal", "linear", generator=torch.Generator().manual_seed(1))
    assert abs(ln.median().item() - 0.5) < 0.03 and ln.min() > 0 and ln.max() < 1
    with pytest.raises(ConfigError):
        sample_time(3, "uniform")  # neither generator nor base
    with pytest.raises(ConfigError):
        sample_time(3, "edm")


def test_denoising_loss_per_sample():
    pred = torch.zeros(2, 4, 3, 3)
    target = torch.ones(2, 4, 3, 3)
    target[1] *= 2
    target[1, 0, 0, 0] = 0.0
    out = denoising_loss(pred, target)
    assert out.shape == (2,)
    torch.testing.assert_close(out, torch.tensor([1.0, (35 * 4.0) / 36]))


def test_cosine_alignment_identical_orthogonal_and_average():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 8, generator=g)
    assert alignment_loss([z * 3.0], [z]).item() == pytest.approx(-1.0, abs=1e-6)  # scale invariant
    a = torch.zeros(2, 5, 8)
    a[..., 0] = 1.0
    b = torch.zeros(2, 5, 8)
    b[..., 1] = 2.0
    assert alignment_loss([a], [b]).item() == pytest.approx(0.0, abs=1e-7)
    # two encoders: mean of the per-encoder losses (-1 and 0)
    assert alignment_loss([z, a], [z, b]).item() == pytest.approx(-0.5, abs=1e-6)
    # against an explicit per-sample, per-token loop (reference loss.py form)
    p, q = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    total = 0.0
    for j in range(3):
        per_tok = [-(p[j, k] @ q[j, k]).item() / (p[j, k].norm().item() * q[j, k].norm().item()) for k in range(4)]
        total += sum(per_tok) / 4
    assert alignment_loss([p], [q]).item() == pytest.approx(total / 3, abs=1e-6)


def test_cosine_alignment_fp16_is_finite_and_right():
    big = torch.full((2, 4, 64), 1e4, dtype=torch.float16)  # |z|^2 = 6.4e9 overflows fp16
    zero = torch.zeros(2, 4, 64, dtype=torch.float16)  # eps 1e-12 underflows to 0 in fp16
    naive_big = (F.normalize(big, dim=-1) * F.normalize(big, dim=-1)).sum(-1).mean()
    naive_zero = (F.normalize(zero, dim=-1) * F.normalize(zero, dim=-1)).sum(-1).mean()
    assert not (torch.isfinite(naive_big) and abs(naive_big.item() - 1) < 1e-2)  # naive fp16 is wrong here
    assert not torch.isfinite(naive_zero)  # and NaN here
    out = alignment_loss([big], [big])
    assert out.dtype == torch.float32 and out.item() == pytest.approx(-1.0, abs=1e-6)
    assert torch.isfinite(alignment_loss([zero], [big]))


def test_ntxent_alignment():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    tau = 0.2
    # explicit form: per image, S_ij = cos(p_i, z_j)/tau; 1/2 [ -log softmax_j(S_i.)[i] - log softmax_i(S_.j)[j] ]
    total = 0.0
    for b in range(2):
        S = [[F.cosine_similarity(p[b, i], z[b, j], dim=0).item() / tau for j in range(5)] for i in range(5)]
        for k in range(5):
            row = S[k][k] - math.log(sum(math.exp(s) for s in S[k]))
            col = S[k][k] - math.log(sum(math.exp(S[i][k]) for i in range(5)))
            total += -0.5 * (row + col)
    assert alignment_loss([p], [z], "ntxent", tau).item() == pytest.approx(total / 10, abs=1e-5)
    # per-sample: a sample's loss does not depend on its batch mates
    one = alignment_loss([p[:1]], [z[:1]], "ntxent", tau)
    two = alignment_loss([p[1:]], [z[1:]], "ntxent", tau)
    assert alignment_loss([p], [z], "ntxent", tau).item() == pytest.approx((one + two).item() / 2, abs=1e-6)
    # aligned tokens: loss below the chance level log(T)
    assert alignment_loss([z], [z], "ntxent", 0.05).item() < 0.1 < math.log(5)


class StubModel(torch.nn.Module):
    """Returns fixed outputs and records its inputs."""

    def __init__(self, out, zs):
        super().__init__()
        self.out, self.zs, self.seen = out, zs, None

    def forward(self, x, t, y):
        self.seen = (x, t, y)
        return self.out, self.zs


def test_repa_loss_total_and_inputs():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 2, 2, generator=g), torch.randn(4, 4, 2, 2, generator=g)
    t, y = torch.tensor([0.1, 0.5, 0.7, 0.99]), torch.tensor([1, 2, 1000, 3])
    out = torch.randn(4, 4, 2, 2, generator=g)
    feats = [torch.randn(4, 3, 5, generator=g)]
    zs = [feats[0] * 2.0]  # aligned: align loss -1
    model = StubModel(out, zs)
    res = repa_loss(model, x0, y, feats, noise, t, proj_coeff=0.5)
    xt, tt, yy = model.seen
    for i in range(4):
        torch.testing.assert_close(xt[i], (1 - t[i]) * x0[i] + t[i] * noise[i])
    assert torch.equal(tt, t) and torch.equal(yy, y)
    denoise = ((out - (noise - x0)) ** 2).mean(dim=(1, 2, 3)).mean()
    assert res["denoise"].item() == pytest.approx(denoise.item(), rel=1e-6)
    assert res["align"].item() == pytest.approx(-1.0, abs=1e-6)
    assert res["loss"].item() == pytest.approx(denoise.item() - 0.5, rel=1e-6)
    base = repa_loss(model, x0, y, None, noise, t, proj_coeff=0.5)  # SiT baseline: no alignment term
    assert base["align"].item() == 0.0 and base["loss"].item() == pytest.approx(denoise.item(), rel=1e-6)


def test_sample_posterior():
    mean, std = torch.randn(2, 4, 3, 3), torch.rand(2, 4, 3, 3)
    eps = torch.randn(2, 4, 3, 3)
    moments = torch.cat([mean, std], dim=1)
    torch.testing.assert_close(sample_posterior(moments, eps, 0.18215), (mean + std * eps) * 0.18215)
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(sample_posterior(moments, eps, scale), (mean + std * eps) * scale.view(1, 4, 1, 1))
