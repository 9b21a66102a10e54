"""Feature encoders: one loading path for every format, exact DINOv2 preprocessing, fast failure offline."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from repa_pipe.models import feature_encoders as FE
from repa_pipe.models import weights as W
from repa_pipe.pipeline.errors import BadInputError, ConfigError, MissingWeightsError
from fixtures import forbid_network

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _small(monkeypatch, name, **model_kwargs):
    """Shrink a registered encoder (e.g. fewer blocks) so tests stay fast; same timm class and code path."""
    spec = dataclasses.replace(FE.ENCODERS[name], model_kwargs=tuple(model_kwargs.items()))
    monkeypatch.setitem(FE.ENCODERS, name, spec)
    return spec


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def tiny():
    return FE.load_encoder("tiny")


# --------------------------------------------------------------------------------------------- registry
def test_unknown_encoder_lists_names():
    with pytest.raises(ConfigError) as err:
        FE.load_encoder("dinov3-b")
    for name in ("dinov2-b", "dinov2-g-reg", "clip-l", "mae-l", "ijepa-h", "mocov3-l", "dinov1-b", "tiny"):
        assert name in str(err.value)


@pytest.mark.parametrize("name,dim,prefix", [("dinov2-b", 768, 1), ("dinov2-g-reg", 1536, 5), ("clip-l", 1024, 1),
                                             ("ijepa-h", 1280, 0), ("mocov3-l", 1024, 1), ("mae-l", 1024, 1)])
def test_real_architectures_on_meta(name, dim, prefix):
    spec = FE.ENCODERS[name]
    for grid in (16, 32):
        m = FE._build_model(spec, grid, device="meta")
        n_pos_prefix = 0 if getattr(m, "no_embed_class", False) else prefix
        assert m.pos_embed.shape == (1, grid * grid + n_pos_prefix, dim)
        assert m.embed_dim == spec.embed_dim == dim and m.num_prefix_tokens == prefix == spec.prefix_tokens
        assert m.patch_embed.grid_size == (grid, grid)
    if name == "clip-l":
        assert type(m.blocks[0].mlp.act).__name__ == "QuickGELU" and not isinstance(m.norm_pre, torch.nn.Identity)


# -------------------------------------------------------------------------------------------- tiny model
def test_tiny_is_deterministic(tiny, images):
    again = FE.load_encoder("tiny")
    assert tiny.is_random_init and tiny.weights_id == "random-init(seed=0)"
    assert tiny.weights_hash == again.weights_hash
    out = tiny(images)
    assert out.shape == (2, 256, tiny.embed_dim) and out.dtype == torch.float32
    assert torch.equal(out, again(images))
    tokens, cls = tiny.forward_with_cls(images)
    assert torch.equal(tokens, out) and torch.equal(cls, tiny.forward_cls(images)) and cls.shape == (2, 64)


def test_tiny_from_file_same_path(tiny, images, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    sd = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    sd["norm.weight"], sd["norm.bias"] = tiny.norm.weight.clone(), tiny.norm.bias.clone()
    save_file(sd, str(tmp_path / "tiny.safetensors"))
    torch.save(sd, tmp_path / "tiny.pth")
    official = dict(sd, mask_token=torch.zeros(1, 64))  # DINOv2 hub key format
    torch.save(official, tmp_path / "tiny_dinov2_format.pth")

    seen = []
    real = FE._to_timm_state_dict
    monkeypatch.setattr(FE, "_to_timm_state_dict",
                        lambda spec, raw, model: seen.append(spec.name) or real(spec, raw, model))
    forbid_network(monkeypatch)
    ref = tiny(images)
    for f in ("tiny.safetensors", "tiny.pth", "tiny_dinov2_format.pth"):
        enc = FE.load_encoder("tiny", weights=str(tmp_path / f))
        assert not enc.is_random_init and enc.weights_id == str((tmp_path / f).resolve())
        assert enc.weights_hash == tiny.weights_hash
        torch.testing.assert_close(enc(images), ref, rtol=0, atol=0)
    assert seen == ["tiny"] * 3


def test_pos_embed_resampled_to_grid(tiny, images):
    native = tiny.model.pos_embed.detach()
    for grid in (8, 32):
        enc = FE.load_encoder("tiny", grid=grid)
        expected = resample_abs_pos_embed(native, [grid, grid])  # the reference's call (bicubic, antialias)
        torch.testing.assert_close(enc.model.pos_embed.detach(), expected, rtol=0, atol=0)
        assert enc(images).shape == (2, grid * grid, 64)
        assert enc.preprocess(images).shape == (2, 3, grid * 14, grid * 14)


def test_dinov2_preprocessing_is_exact(tiny, images):
    x = images.float() / 255.0
    try:
        from torchvision.transforms import Normalize

        x = Normalize(IMAGENET_MEAN, IMAGENET_STD)(x)
    except ImportError:  # pragma: no cover
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ref = F.interpolate(x, 224, mode="bicubic")
    got = tiny.preprocess(images)
    assert got.shape == (2, 3, 224, 224) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    for name in ("dinov2-b", "dinov2-l-reg"):
        spec = FE.ENCODERS[name]
        assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD
        assert spec.resize and spec.normalize_first and spec.final_norm and spec.patch_size == 14


def test_clip_preprocessing_resizes_then_normalizes(tiny, images):
    spec = FE.ENCODERS["clip-l"]
    enc = FE.FeatureEncoder(spec, FE._build_model(FE.ENCODERS["tiny"], 16), 16, weights_id="t",
                            weights_hash="t", is_random_init=True)
    x = F.interpolate(images.float() / 255.0, 224, mode="bicubic")
    ref = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    torch.testing.assert_close(enc.preprocess(images), ref, rtol=0, atol=1e-6)


def test_bad_input_and_bad_grid(tiny, images):
    with pytest.raises(BadInputError):
        tiny(images.float())
    with pytest.raises(ConfigError):
        FE.load_encoder("tiny", grid=0)


# ------------------------------------------------------------------------- official formats, real classes
def _official_dinov2(depth, dim, heads, *, reg=0, swiglu=False, seed=0):
    """Random weights with DINOv2 torch.hub key names and shapes (pos-embed 37x37 at 518 px)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + 37 * 37, dim), "mask_token": r(1, dim),
          "patch_embed.proj.weight": r(dim, 3, 14, 14), "patch_embed.proj.bias": r(dim),
          "norm.weight": 1 + r(dim, std=0.1), "norm.bias": r(dim)}
    if reg:
        sd["register_tokens"] = r(1, reg, dim)
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(dim, std=0.1), p + "norm1.bias": r(dim),
                   p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
                   p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "ls1.gamma": r(dim, std=0.5), p + "ls2.gamma": r(dim, std=0.5),
                   p + "norm2.weight": 1 + r(dim, std=0.1), p + "norm2.bias": r(dim)})
        if swiglu:
            hidden = (int(dim * 4 * 2 / 3) + 7) // 8 * 8
            sd.update({p + "mlp.w12.weight": r(2 * hidden, dim), p + "mlp.w12.bias": r(2 * hidden),
                       p + "mlp.w3.weight": r(dim, hidden), p + "mlp.w3.bias": r(dim)})
        else:
            sd.update({p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
                       p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim)})
    return sd


def _dinov2_reference(sd, x, heads, grid, reg=0, swiglu=False):
    """Independent DINOv2 forward (facebookresearch/dinov2 semantics), pos-embed resampled like REPA."""
    dim = sd["cls_token"].shape[-1]
    pos = resample_abs_pos_embed(sd["pos_embed"], [grid, grid])  # REPA utils.py, num_prefix_tokens=1
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    b = t.shape[0]
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], 1) + pos
    if reg:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(b, -1, -1), t[:, 1:]], 1)
    n = t.shape[1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).view(
            b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * (dim // heads) ** -0.5).softmax(-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(b, n, dim), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        t = t + sd[p + "ls1.gamma"] * a
        h = F.layer_norm(t, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        if swiglu:
            x1, x2 = F.linear(h, sd[p + "mlp.w12.weight"], sd[p + "mlp.w12.bias"]).chunk(2, dim=-1)
            m = F.linear(F.silu(x1) * x2, sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"])
        else:
            m = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        t = t + sd[p + "ls2.gamma"] * m
    t = F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return t[:, 1 + reg:], t[:, 0]  # x_norm_patchtokens, x_norm_clstoken


@pytest.mark.parametrize("name,depth,dim,heads,reg,swiglu", [
    ("dinov2-b", 2, 768, 12, 0, False),  # the real ViT-B/14 width, fewer blocks
    ("dinov2-s-reg", 1, 384, 6, 4, False),  # registers
    ("dinov2-g", 1, 384, 6, 0, True),  # the giant's SwiGLU (w12/w3) layout at a small width
])
def test_dinov2_official_checkpoint_matches_reference(name, depth, dim, heads, reg, swiglu, images, tmp_path,
                                                      monkeypatch):
    kwargs = {} if dim == FE.ENCODERS[name].embed_dim else {"embed_dim": dim, "num_heads": heads}
    _small(monkeypatch, name, depth=depth, **kwargs)
    sd = _official_dinov2(depth, dim, heads, reg=reg, swiglu=swiglu)
    path = tmp_path / f"{name}_pretrain.pth"
    torch.save(sd, path)
    forbid_network(monkeypatch)
    enc = FE.load_encoder(name, weights=str(path))
    assert enc.grid == 16 and not enc.is_random_init and enc.num_prefix_tokens == 1 + reg
    x = enc.preprocess(images[:1])
    ref_tokens, ref_cls = _dinov2_reference(sd, x, heads, 16, reg=reg, swiglu=swiglu)
    tokens, cls = enc.forward_with_cls(images[:1])
    assert tokens.shape == (1, 256, dim)
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cls, ref_cls, rtol=1e-4, atol=1e-4)


def test_mocov3_checkpoint_key_mapping(tmp_path, monkeypatch, images):
    from timm.models.vision_transformer import VisionTransformer

    spec = _small(monkeypatch, "mocov3-b", depth=1, embed_dim=64, num_heads=2)
    torch.manual_seed(0)
    src = FE._build_model(dataclasses.replace(spec), 14)  # the MoCo release: 224 px, 14x14 pos-embed
    sd = src.state_dict()
    ckpt = {"epoch": 300, "arch": "vit_base",
            "state_dict": {**{f"module.base_encoder.{k}": v for k, v in sd.items()},
                           "module.base_encoder.head.0.weight": torch.zeros(4096, 64),
                           **{f"module.momentum_encoder.{k}": v + 1 for k, v in sd.items()},
                           "module.predictor.0.weight": torch.zeros(4096, 256)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}
    torch.save(ckpt, tmp_path / "vit-b-300ep.pth.tar")
    forbid_network(monkeypatch)
    enc = FE.load_encoder("mocov3-b", weights=str(tmp_path / "vit-b-300ep.pth.tar"))
    assert enc.image_size == 256 and enc.grid == 16
    pos = resample_abs_pos_embed(sd["pos_embed"], [16, 16])  # fix_mocov3_state_dict's call
    torch.testing.assert_close(enc.model.pos_embed.detach(), pos, rtol=0, atol=0)
    torch.testing.assert_close(enc.model.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"], rtol=0, atol=0)
    assert enc(images[:1]).shape == (1, 256, 64)
    # 256 px in, no resize
    assert torch.equal(enc.preprocess(images[:1]),
                       (images[:1].float() / 255 - enc.mean) / enc.std)

    # RCG's key-naming bug (blocks.13.norm13 ...) is repaired like the reference does
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=15, num_heads=2, num_classes=0)
    good = model.state_dict()
    bad = {}
    for k, v in good.items():
        k2 = (k.replace("blocks.13.norm1.", "blocks.13.norm13.").replace("blocks.13.mlp.fc1.", "blocks.13.mlp.fc13.")
               .replace("blocks.14.norm2.", "blocks.14.norm14.").replace("blocks.14.mlp.fc2.", "blocks.14.mlp.fc14."))
        bad["module.base_encoder." + k2] = v
    assert set(bad) != {"module.base_encoder." + k for k in good}
    fixed = FE._to_timm_state_dict(spec, {"state_dict": bad}, model)
    assert set(fixed) == set(good)


def test_mae_checkpoint_gives_block_outputs_without_final_norm(tmp_path, monkeypatch, images):
    spec = _small(monkeypatch, "mae-l", depth=1, embed_dim=64, num_heads=2)
    torch.manual_seed(0)
    src = FE._build_model(spec, 14)
    sd = {k: v + 0.01 * torch.randn_like(v) for k, v in src.state_dict().items()}
    ckpt = {"model": {**sd, "mask_token": torch.zeros(1, 1, 512), "decoder_embed.weight": torch.zeros(512, 64)}}
    torch.save(ckpt, tmp_path / "mae_pretrain_vit_large.pth")
    forbid_network(monkeypatch)
    enc = FE.load_encoder("mae-l", weights=str(tmp_path / "mae_pretrain_vit_large.pth"))
    m = enc.model
    x = enc.preprocess(images[:1])
    ref = m.blocks(m._pos_embed(m.patch_embed(x)))[:, 1:]
    out = enc(images[:1])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, enc.norm(ref), atol=1e-3)


def test_ijepa_checkpoint_format(tmp_path, monkeypatch, images):
    spec = _small(monkeypatch, "ijepa-h", depth=1, embed_dim=64, num_heads=2)
    torch.manual_seed(0)
    src = FE._build_model(spec, 16)
    ckpt = {"encoder": {f"module.{k}": v for k, v in src.state_dict().items()},
            "target_encoder": {f"module.{k}": v + 1 for k, v in src.state_dict().items()},
            "predictor": {"module.predictor_embed.weight": torch.zeros(3, 3)}, "epoch": 300}
    torch.save(ckpt, tmp_path / "IN1K-vit.h.14-300e.pth.tar")
    forbid_network(monkeypatch)
    enc = FE.load_encoder("ijepa-h", weights=str(tmp_path / "IN1K-vit.h.14-300e.pth.tar"))
    torch.testing.assert_close(enc.model.patch_embed.proj.weight, src.patch_embed.proj.weight, rtol=0, atol=0)
    out = enc(images[:1])
    assert out.shape == (1, 256, 64)
    with torch.no_grad():
        ref = src.forward_features(enc.preprocess(images[:1]))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="CLS"):
        enc.forward_cls(images[:1])


def test_wrong_file_for_encoder(tiny, tmp_path):
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="does not fit"):
        FE.load_encoder("tiny", weights=str(tmp_path / "other.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        FE.load_encoder("tiny", weights=str(tmp_path / "garbage.pth"))


# ------------------------------------------------------------------------------------ missing weights
def test_missing_local_file_names_path_and_option(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        FE.load_encoder("dinov2-b", weights=str(tmp_path / "dinov2_vitb14_pretrain.pth"))
    assert "dinov2_vitb14_pretrain.pth" in str(err.value) and "--encoder-weights" in str(err.value)


@pytest.mark.parametrize("name", ["mocov3-b", "mocov3-l", "ijepa-h"])
def test_encoders_without_hub_copy_need_weights(name, monkeypatch):
    forbid_network(monkeypatch)
    with pytest.raises(MissingWeightsError, match="--encoder-weights"):
        FE.load_encoder(name)


def test_offline_hub_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    forbid_network(monkeypatch)
    t0 = time.monotonic()
    with pytest.raises(MissingWeightsError) as err:
        FE.load_encoder("dinov2-b")
    assert "--encoder-weights" in str(err.value) and "timm/vit_base_patch14_dinov2.lvd142m" in str(err.value)
    assert time.monotonic() - t0 < 30  # generous; the guarantee is: cache lookup only, no probe, no download


def test_unreachable_hub_fails_without_download(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(W, "hub_offline", lambda: False)
    monkeypatch.setattr(W, "hub_reachable", lambda *a, **k: False)
    calls = []
    real = huggingface_hub.hf_hub_download

    def spy(*args, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        if not kwargs.get("local_files_only"):
            raise AssertionError("download attempted although the hub is unreachable")
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    with pytest.raises(MissingWeightsError) as err:
        FE.load_encoder("clip-l")
    assert calls and all(calls)
    assert "cannot be reached" in str(err.value) and "timm/vit_large_patch14_clip_224.openai" in str(err.value)


def test_failed_download_is_missing_weights(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(W, "hub_offline", lambda: False)
    monkeypatch.setattr(W, "hub_reachable", lambda *a, **k: True)

    def fail(*args, **kwargs):
        raise ConnectionError("connection reset")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(MissingWeightsError, match="--encoder-weights"):
        FE.load_encoder("dinov1-b")


def test_hub_weights_from_local_cache_only(tmp_path, monkeypatch, images):
    """Offline, a timm hub file already in the HF cache is used (and resampled 37x37 -> grid) with no network."""
    from safetensors.torch import save_file

    spec = _small(monkeypatch, "dinov2-s", depth=1)
    torch.manual_seed(0)
    src = FE._build_model(spec, 37)  # the hub copy is stored at 518 px
    repo = tmp_path / ("models--" + spec.hub_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(src.state_dict(), str(repo / "snapshots" / commit / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    real = huggingface_hub.hf_hub_download
    forbid_network(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *a, **k: real(*a, **k) if k.get("local_files_only") else pytest.fail("download"))
    enc = FE.load_encoder("dinov2-s", dtype="bf16")
    assert enc.weights_id == spec.hub_id and not enc.is_random_init
    expected = resample_abs_pos_embed(src.pos_embed.detach(), [16, 16])
    torch.testing.assert_close(enc.model.pos_embed.detach().float(), expected, rtol=1e-2, atol=1e-2)
    out = enc(images[:1])
    assert out.shape == (1, 256, 384) and out.dtype == torch.float32


def test_preprocessed_input_entry_points(tiny, images):
    images = images[:1]
    x = tiny.preprocess(images)
    torch.testing.assert_close(tiny.tokens_from_input(x), tiny(images), rtol=0, atol=0)
    torch.testing.assert_close(tiny.cls_from_input(x), tiny.forward_cls(images), rtol=0, atol=0)
    with pytest.raises(BadInputError):
        tiny.cls_from_input(x[:, :, :112, :112])
    bf16 = FE.load_encoder("tiny", dtype=torch.bfloat16)
    out = bf16(images)
    assert out.dtype == torch.float32 and bf16.mean.dtype == torch.float32
    assert (out - tiny(images)).abs().max() < 0.2
