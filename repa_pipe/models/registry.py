"""The registries: every model name an option accepts, with what it means. Pure data (no torch), so the CLI
can list the choices in `--help` without importing the models."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


# ------------------------------------------------------------------------------------------------ SiT presets
@dataclass(frozen=True)
class SiTPreset:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    encoder_depth: int             # default --encoder-depth: the block whose output REPA aligns (1-indexed)


# name: (depth, hidden, heads, encoder depth). Encoder depths: the paper's 8 for L and XL, 4 for B (the author's
# choice, github.com/sihyun-yu/REPA issue #5); a third of the blocks for the sizes the paper did not train.
_SIZES = {
    "T": (4, 64, 4, 2),  # tiny: CPU tests, not in the reference
    "S": (12, 384, 6, 4),
    "B": (12, 768, 12, 4),
    "L": (24, 1024, 16, 8),
    "XL": (28, 1152, 16, 8),
}
SIT_PRESETS: dict[str, SiTPreset] = {
    f"SiT-{size}/{p}": SiTPreset(d, h, n, p, a) for size, (d, h, n, a) in _SIZES.items() for p in (1, 2, 4, 8)
}
# --help lists the 20 presets as one pattern, which reads better than the list
SIT_PRESETS_TEXT = f"SiT-{{{','.join(_SIZES)}}}/{{1,2,4,8}}"
PATHS = ("linear", "cosine")                # interpolant paths
TIME_SAMPLERS = ("uniform", "lognormal")    # training time distributions
ALIGN_LOSSES = ("cosine", "ntxent")         # REPA alignment losses
ATTN_BACKENDS = ("sdpa", "xformers")


# ------------------------------------------------------------------------------------------------ latent codecs
CODEC_NAMES = ("sd-vae-ft-mse", "sd-vae-ft-ema", "pixel", "tiny")
HUB_IDS = {"sd-vae-ft-ema": "stabilityai/sd-vae-ft-ema", "sd-vae-ft-mse": "stabilityai/sd-vae-ft-mse"}
SD_SCALING_FACTOR = 0.18215
# The SD VAEs share one encoder (stabilityai fine-tuned only the decoder), so their latents are the same; the
# reference encodes training latents with ft-mse and decodes samples with ft-ema (generate.py --vae ema).
SAMPLING_DECODER = {"sd-vae-ft-mse": "sd-vae-ft-ema", "sd-vae-ft-ema": "sd-vae-ft-ema"}


def sampling_decoder(codec: str) -> str:
    """The codec that decodes samples of latents made by `codec` (the reference's default pairing)."""
    return SAMPLING_DECODER.get(codec, codec)


# ------------------------------------------------------------------------------------------------ encoders
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    timm_name: str | None          # timm architecture (+ pretrained tag); None: VisionTransformer(**model_kwargs)
    hub_id: str | None             # HF hub repo of timm-format weights; None -> weights must be given
    patch_size: int
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: bool                   # always resize to grid*patch (else only when the size differs)
    final_norm: bool               # patch tokens after the final norm (False: raw block outputs)
    prefix_tokens: int             # CLS + register tokens dropped from the output
    needs_weights: bool            # --encoder-weights is required (no hub copy)
    normalize_first: bool = True   # normalize then resize (DINOv2, I-JEPA) vs resize then normalize (CLIP)
    has_cls: bool = True
    model_kwargs: tuple[tuple[str, Any], ...] = ()
    weights_formats: str = "timm state dict"
    notes: str = ""

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_kwargs)


def _dinov2(size: str, arch: str, dim: int, reg: bool) -> EncoderSpec:
    reg_part = "reg4_" if reg else ""
    timm_name = f"vit_{arch}_patch14_{reg_part}dinov2.lvd142m"
    suffix = "_reg4" if reg else ""
    return EncoderSpec(
        name=f"dinov2-{size}{'-reg' if reg else ''}", timm_name=timm_name, hub_id=f"timm/{timm_name}",
        patch_size=14, embed_dim=dim, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=True, final_norm=True,
        prefix_tokens=5 if reg else 1, needs_weights=False,
        weights_formats=f"timm state dict, or DINOv2 torch.hub checkpoint dinov2_vit{size}14{suffix}_pretrain.pth",
        notes="x_norm_patchtokens; pos-embed 37x37 -> grid",
    )


ENCODERS: dict[str, EncoderSpec] = {}
for _size, _arch, _dim in (("s", "small", 384), ("b", "base", 768), ("l", "large", 1024), ("g", "giant", 1536)):
    for _reg in (False, True):
        _spec = _dinov2(_size, _arch, _dim, _reg)
        ENCODERS[_spec.name] = _spec

ENCODERS.update({
    "dinov1-b": EncoderSpec(
        name="dinov1-b", timm_name="vit_base_patch16_224.dino", hub_id="timm/vit_base_patch16_224.dino",
        patch_size=16, embed_dim=768, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=False, final_norm=True,
        prefix_tokens=1, needs_weights=False,
        weights_formats="timm state dict, DINO dino_vitbase16_pretrain.pth, or a DINO checkpoint ('teacher')",
        notes="reference module missing; final norm per DINO convention"),
    "clip-l": EncoderSpec(
        name="clip-l", timm_name="vit_large_patch14_clip_quickgelu_224",
        hub_id="timm/vit_large_patch14_clip_224.openai", patch_size=14, embed_dim=1024, mean=CLIP_MEAN,
        std=CLIP_STD, resize=True, final_norm=False, prefix_tokens=1, needs_weights=False, normalize_first=False,
        weights_formats="timm state dict, or an OpenAI CLIP state dict (visual.* keys; not TorchScript)",
        notes="transformer output tokens without ln_post/proj (reference clip_vit.py)"),
    "mae-l": EncoderSpec(
        name="mae-l", timm_name="vit_large_patch16_224.mae", hub_id="timm/vit_large_patch16_224.mae",
        patch_size=16, embed_dim=1024, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=False, final_norm=False,
        prefix_tokens=1, needs_weights=False,
        weights_formats="timm state dict, or MAE mae_pretrain_vit_large.pth ({'model': ...})",
        notes="block outputs without final norm (reference mae_vit.py)"),
    "ijepa-h": EncoderSpec(
        name="ijepa-h", timm_name="vit_huge_patch14_gap_224.in1k_ijepa", hub_id=None, patch_size=14,
        embed_dim=1280, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=True, final_norm=True, prefix_tokens=0,
        needs_weights=True, has_cls=False,
        weights_formats="I-JEPA IN1K-vit.h.14-300e.pth.tar ({'encoder': {'module.*'}}), or timm state dict",
        notes="all tokens after the final norm"),
    "mocov3-b": EncoderSpec(
        name="mocov3-b", timm_name="vit_base_patch16_224", hub_id=None, patch_size=16, embed_dim=768,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=False, final_norm=True, prefix_tokens=1, needs_weights=True,
        weights_formats="MoCo v3 / RCG checkpoint ({'state_dict': {'module.base_encoder.*'}}), or timm state dict",
        notes="forward_features (with final norm), CLS dropped"),
    "mocov3-l": EncoderSpec(
        name="mocov3-l", timm_name="vit_large_patch16_224", hub_id=None, patch_size=16, embed_dim=1024,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=False, final_norm=True, prefix_tokens=1, needs_weights=True,
        weights_formats="MoCo v3 / RCG checkpoint ({'state_dict': {'module.base_encoder.*'}}), or timm state dict",
        notes="forward_features (with final norm), CLS dropped"),
    "tiny": EncoderSpec(
        name="tiny", timm_name=None, hub_id=None, patch_size=14, embed_dim=64, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, resize=True, final_norm=True, prefix_tokens=1, needs_weights=False,
        model_kwargs=(("patch_size", 14), ("embed_dim", 64), ("depth", 2), ("num_heads", 2), ("mlp_ratio", 4.0),
                      ("init_values", 1e-5), ("img_size", 224), ("num_classes", 0)),
        weights_formats="timm state dict or DINOv2 hub key format (random init, seed 0, when none is given)",
        notes="random-init DINOv2-shaped ViT (layer scale, patch 14), for tests and demos"),
})
ENCODER_NAMES = tuple(ENCODERS)
