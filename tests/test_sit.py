"""SiT model: parity with the REPA reference (https://github.com/sihyun-yu/REPA `models/sit.py`;
docs/numerics.md points 6-10, 12)."""
from __future__ import annotations

import math

import pytest
import torch

from repa_pipe.models.sit import (
    SIT_PRESETS,
    attention_flops_per_sample,
    build_sit,
    drop_labels,
    flops_per_sample,
    load_reference_state_dict,
    timestep_embedding,
)
from repa_pipe.models.transport import repa_loss
from repa_pipe.pipeline.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds overhead (and stalls badly on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw):
    args = dict(input_size=8, in_channels=4, num_classes=10, encoder_depth=2, z_dims=[16], projector_dim=64)
    args.update(kw)
    return build_sit("SiT-T/2", **args)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def randomize_(m: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (incl. the zero-initialised adaLN / final layer) so every block acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# --- point 8: timestep embedding -------------------------------------------------------------------------

def test_timestep_embedding_values_at_half():
    e = timestep_embedding(torch.tensor([0.5]), 256)[0]
    assert e.shape == (256,)
    # the reference's TimestepEmbedder (REPA `models/sit.py`) at t = 0.5: cos(0.5 f_k), then sin(0.5 f_k), k = 0..2
    torch.testing.assert_close(e[:3], torch.tensor([0.8775826, 0.8936933, 0.9077185]), atol=1e-6, rtol=0)
    torch.testing.assert_close(e[128:131], torch.tensor([0.4794255, 0.4486784, 0.4195797]), atol=1e-6, rtol=0)
    # all 256 values against a float64 formula: [cos(t f_k), sin(t f_k)], f_k = exp(-ln(1e4) k / 128)
    f = [math.exp(-math.log(10000) * k / 128) for k in range(128)]
    expect = torch.tensor([math.cos(0.5 * x) for x in f] + [math.sin(0.5 * x) for x in f], dtype=torch.float32)
    torch.testing.assert_close(e, expect, atol=1e-6, rtol=0)


# --- point 9: pos embed ------------------------------------------------------------------------------------

def test_pos_embed_channel_order_and_frozen():
    m = build_sit("SiT-T/2", input_size=(8, 12), in_channels=4, num_classes=10, encoder_depth=1, z_dims=[])
    pe = m.pos_embed
    assert not pe.requires_grad
    assert "pos_embed" in dict(m.named_parameters()) and "pos_embed" in m.state_dict()
    D, gh, gw = 64, 4, 6
    assert pe.shape == (1, gh * gw, D)
    q = D // 4
    omega = [1.0 / 10000 ** (k / q) for k in range(q)]
    for r in range(gh):
        for c in range(gw):
            expect = (
                [math.sin(c * w) for w in omega] + [math.cos(c * w) for w in omega]  # column index first
                + [math.sin(r * w) for w in omega] + [math.cos(r * w) for w in omega]
            )
            torch.testing.assert_close(pe[0, r * gw + c], torch.tensor(expect, dtype=torch.float32), atol=1e-6, rtol=0)


# --- point 12 / 7: parameter counts ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name,expect,proj",
    [("SiT-XL/2", 675_111_184, 8_131_328), ("SiT-L/2", 458_086_416, 7_869_184), ("SiT-B/2", 130_500_112, 7_344_896)],
)
def test_param_counts_match_reference(name, expect, proj):
    with torch.device("meta"):  # no allocation
        kw = dict(input_size=32, in_channels=4, num_classes=1000, encoder_depth=8)
        base = build_sit(name, z_dims=[], **kw)
        with_proj = build_sit(name, z_dims=[768], **kw)
    assert n_params(base) == expect
    assert n_params(with_proj) - n_params(base) == proj
    assert base.y_embedder.embedding_table.weight.shape[0] == 1001  # null row


def test_reference_state_dict_names():
    """Key set written out from the reference module tree (sihyun-yu/REPA models/sit.py)."""
    depth, m = 4, tiny(z_dims=[16, 8])
    expect = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight"}
    expect |= {f"t_embedder.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    for b in range(depth):
        for mod in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            expect |= {f"blocks.{b}.{mod}.weight", f"blocks.{b}.{mod}.bias"}
    for p in range(2):
        expect |= {f"projectors.{p}.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    expect |= {f"final_layer.{mod}.{w}" for mod in ("linear", "adaLN_modulation.1") for w in ("weight", "bias")}
    assert set(m.state_dict()) == expect


def test_load_reference_state_dict_roundtrip_and_mismatch():
    src = tiny()
    randomize_(src)
    sd = {"module." + k: v.clone() for k, v in src.state_dict().items()}  # DDP-style prefix is stripped
    dst = tiny()
    load_reference_state_dict(dst, sd)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10])
    torch.testing.assert_close(dst.forward_velocity(x, t, y), src.forward_velocity(x, t, y))
    with pytest.raises(ConfigError, match="missing"):
        load_reference_state_dict(tiny(), {k: v for k, v in src.state_dict().items() if "projectors" not in k})
    with pytest.raises(ConfigError, match="wrong shape"):
        load_reference_state_dict(tiny(z_dims=[8]), src.state_dict())


def test_init_matches_reference():
    m = tiny()
    for b in m.blocks:
        assert b.adaLN_modulation[1].weight.abs().sum() == 0 and b.adaLN_modulation[1].bias.abs().sum() == 0
    for lin in (m.final_layer.linear, m.final_layer.adaLN_modulation[1]):
        assert lin.weight.abs().sum() == 0 and lin.bias.abs().sum() == 0
    assert abs(m.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.004
    # xavier uniform bound sqrt(6 / (fan_in + fan_out)) is attained approximately
    w = m.blocks[0].mlp.fc1.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert m.blocks[0].attn.qkv.bias.abs().sum() == 0


# --- point 6: tap index, projector shape -------------------------------------------------------------------

@pytest.mark.parametrize("encoder_depth", [1, 2, 4])
def test_projector_taps_residual_after_encoder_depth_blocks(encoder_depth):
    m = tiny(encoder_depth=encoder_depth, z_dims=[16, 24])
    randomize_(m)
    outs = {}
    for i, b in enumerate(m.blocks):
        b.register_forward_hook(lambda mod, inp, out, i=i: outs.__setitem__(i, out.detach()))
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 4, 10])
    v, zs = m(x, t, y)
    assert v.shape == x.shape and len(zs) == 2
    assert zs[0].shape == (3, 16, 16) and zs[1].shape == (3, 16, 24)  # (B, T, z)
    for k, z in enumerate(zs):
        torch.testing.assert_close(z, m.projectors[k](outs[encoder_depth - 1]))
        for other in {encoder_depth - 2, encoder_depth} & set(range(4)):
            assert not torch.allclose(z, m.projectors[k](outs[other]), atol=1e-4)
    proj = m.projectors[0]
    assert [type(l).__name__ for l in proj] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    torch.testing.assert_close(m.forward_velocity(x, t, y), v)


def test_projector_shape_full_size():
    with torch.device("meta"):
        m = build_sit("SiT-XL/2", input_size=32, in_channels=4, num_classes=1000, encoder_depth=8, z_dims=[768])
    shapes = [tuple(l.weight.shape) for l in m.projectors[0] if isinstance(l, torch.nn.Linear)]
    assert shapes == [(2048, 1152), (2048, 2048), (768, 2048)]


# --- point 10: labels ------------------------------------------------------------------------------------

def test_drop_labels_and_no_dropout_inside_forward():
    y = torch.tensor([3, 7, 0, 9])
    out = drop_labels(y, torch.tensor([True, False, True, False]), num_classes=10)
    assert out.tolist() == [10, 7, 10, 9] and y.tolist() == [3, 7, 0, 9]
    m = tiny()
    randomize_(m)
    m.train()
    x, t = torch.randn(4, 4, 8, 8), torch.rand(4)
    a, b = m.forward_velocity(x, t, y), m.forward_velocity(x, t, y)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # deterministic in train mode: nothing is dropped inside
    # labels change the output (the table is used) and the null row is reachable
    assert not torch.allclose(a, m.forward_velocity(x, t, out))


def test_sit_s_builds_and_runs():
    m = build_sit("SiT-S/4", input_size=8, in_channels=4, num_classes=10, encoder_depth=4, z_dims=[8])
    assert m.final_layer.linear.in_features == 384
    v, zs = m(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([2]))
    assert v.shape == (1, 4, 8, 8) and zs[0].shape == (1, 4, 8)


def test_unpatchify_layout():
    """Final linear output channel (p, q, c) of token (h, w) lands at pixel (h*P+p, w*P+q), channel c."""
    m = build_sit("SiT-T/2", input_size=(4, 6), in_channels=3, num_classes=10, encoder_depth=1, z_dims=[])
    B, gh, gw, P, C = 1, 2, 3, 2, 3
    tokens = torch.arange(B * gh * gw * P * P * C, dtype=torch.float32).reshape(B, gh * gw, P * P * C)
    img = m.unpatchify(tokens)
    assert img.shape == (B, C, gh * P, gw * P)
    for h in range(gh):
        for w in range(gw):
            for p in range(P):
                for q in range(P):
                    for c in range(C):
                        assert img[0, c, h * P + p, w * P + q] == tokens[0, h * gw + w, (p * P + q) * C + c]


def test_config_errors():
    kw = dict(input_size=8, in_channels=4, num_classes=10, z_dims=[16])
    with pytest.raises(ConfigError, match="unknown model"):
        build_sit("SiT-XXL/2", encoder_depth=2, **kw)
    with pytest.raises(ConfigError, match="encoder_depth"):
        build_sit("SiT-T/2", encoder_depth=5, **kw)
    with pytest.raises(ConfigError, match="encoder_depth"):
        build_sit("SiT-T/2", encoder_depth=0, **kw)
    with pytest.raises(ConfigError, match="divisible"):
        build_sit("SiT-T/4", encoder_depth=2, **{**kw, "input_size": 6})
    with pytest.raises(ConfigError, match="attn_backend"):
        build_sit("SiT-T/2", encoder_depth=2, attn_backend="flash9", **kw)
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="xformers"):
            build_sit("SiT-T/2", encoder_depth=2, attn_backend="xformers", **kw)
    assert {"SiT-S/2", "SiT-B/1", "SiT-L/4", "SiT-XL/2", "SiT-T/2"} <= set(SIT_PRESETS)


# --- FLOPs ---------------------------------------------------------------------------------------------------

def _counted(fn) -> tuple[float, float]:
    """(FLOPs FlopCounterMode counts for matmuls and convolutions, for attention ops). Which ops a torch release
    counts differs (2.14 counts no attention op on CPU), so the two are compared separately."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    per_op = fc.get_flop_counts()["Global"]
    attention = sum(v for op, v in per_op.items() if "attention" in str(op))
    return sum(per_op.values()) - attention, attention


def test_flops_per_sample():
    m = tiny(z_dims=[16, 32])
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    att = attention_flops_per_sample(m)
    assert att == m.depth * 4 * m.num_tokens ** 2 * m.hidden_size  # q k^T and attn @ v, per block
    assert flops_per_sample(m) - flops_per_sample(m, with_attention=False) == att
    for fn, kw in ((lambda: m(x, t, y), {}), (lambda: m.forward_velocity(x, t, y), {"with_projectors": False})):
        dense, attention = _counted(fn)
        assert flops_per_sample(m, with_attention=False, **kw) == pytest.approx(dense / 3, rel=1e-9)
        if attention:  # a torch that counts the attention op must agree with the analytic term
            assert att == pytest.approx(attention / 3, rel=1e-9)
    with torch.device("meta"):
        xl = build_sit("SiT-XL/2", input_size=32, in_channels=4, num_classes=1000, encoder_depth=8, z_dims=[])
    assert flops_per_sample(xl) / 2 == pytest.approx(118.6e9, rel=0.005)  # DiT paper: 118.6 GMACs ("Gflops")


# --- overfit -------------------------------------------------------------------------------------------------

def test_tiny_sit_overfits_fixed_batch():
    torch.manual_seed(0)
    m = tiny(z_dims=[32], projector_dim=128)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 8, 8, generator=g)
    y = torch.arange(8)
    feats = [torch.randn(8, 16, 32, generator=g)]
    noise, t = torch.randn(8, 4, 8, 8, generator=g), torch.rand(8, generator=g)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    first = None
    for _ in range(80):
        out = repa_loss(m, x0, y, feats, noise, t, proj_coeff=0.5)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        first = first or {k: v.item() for k, v in out.items()}
    assert first["denoise"] > 1.5  # ~ E|eps - x0|^2 = 2 at init (zero output layer)
    assert out["denoise"].item() < 0.1 * first["denoise"]
    assert out["align"].item() < -0.8 and first["align"] > -0.2


# --- full forward against a hand-written formula -----------------------------------------------------------

def _manual_forward(m, x, t, y):
    """SiT forward written out from the reference equations, using only the model's weights."""
    sd = {k: v.double() for k, v in m.state_dict().items()}
    lin = lambda h, name: h @ sd[name + ".weight"].T + sd[name + ".bias"]
    ln = lambda h: (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)
    silu = lambda h: h * torch.sigmoid(h)
    gelu_tanh = lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    B, C, H, W = x.shape
    P, D, nh = m.patch_size, m.hidden_size, m.num_heads
    # patchify: token (h, w) holds x[:, :, hP:(h+1)P, wP:(w+1)P] flattened as (c, p, q) (conv weight order)
    patches = x.double().reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * P * P)
    h = patches @ sd["x_embedder.proj.weight"].reshape(D, -1).T + sd["x_embedder.proj.bias"] + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    tf = torch.cat([torch.cos(t.double()[:, None] * freqs), torch.sin(t.double()[:, None] * freqs)], -1)
    c = lin(silu(lin(tf, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    zs = None
    for i in range(m.depth):
        pre = f"blocks.{i}."
        mod = lin(silu(c), pre + "adaLN_modulation.1").chunk(6, -1)
        a = ln(h) * (1 + mod[1][:, None]) + mod[0][:, None]
        q, k, v = lin(a, pre + "attn.qkv").reshape(B, -1, 3, nh, D // nh).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // nh), -1) @ v  # (B, nh, T, hd)
        h = h + mod[2][:, None] * lin(att.transpose(1, 2).reshape(B, -1, D), pre + "attn.proj")
        a = ln(h) * (1 + mod[4][:, None]) + mod[3][:, None]
        h = h + mod[5][:, None] * lin(gelu_tanh(lin(a, pre + "mlp.fc1")), pre + "mlp.fc2")
        if i + 1 == m.encoder_depth:
            zs = lin(silu(lin(silu(lin(h, "projectors.0.0")), "projectors.0.2")), "projectors.0.4")
    shift, scale = lin(silu(c), "final_layer.adaLN_modulation.1").chunk(2, -1)
    o = lin(ln(h) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")  # (B, T, P*P*C), (p, q, c)
    o = o.reshape(B, H // P, W // P, P, P, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
    return o, zs


def test_forward_matches_reference_equations():
    m = build_sit("SiT-T/2", input_size=(4, 6), in_channels=3, num_classes=10, encoder_depth=3, z_dims=[8],
                  projector_dim=32)
    randomize_(m, seed=3)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 3, 4, 6, generator=g), torch.tensor([0.3, 0.9]), torch.tensor([4, 10])
    out, zs = m(x, t, y)
    ref_out, ref_z = _manual_forward(m, x, t, y)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(zs[0].double(), ref_z, atol=1e-5, rtol=1e-4)
