"""Frozen pretrained encoders that give REPA's alignment targets: patch tokens `[B, grid*grid, D]`.

Every encoder is a timm `VisionTransformer` built for its token grid (img_size = grid * patch), so the model's
native grid IS the token grid: position embeddings of the pretrained weights are resampled once, at load time,
by timm's `checkpoint_filter_fn` -> `resample_abs_pos_embed` (bicubic, antialias=True, the model's number of
prefix tokens) -- the call the reference makes on DINOv2's 37x37 table (REPA's `utils.py`,
https://github.com/sihyun-yu/REPA; docs/numerics.md point 11).

Preprocessing per encoder (x = uint8 image, S = grid * patch; reference train.py `preprocess_raw_image`):

- dinov2-*, tiny: /255 -> ImageNet mean/std -> bicubic resize to S; tokens after the final norm with CLS and
  register tokens dropped (`x_norm_patchtokens`).
- clip-l: /255 -> bicubic resize to S -> CLIP mean/std; transformer output tokens, NO ln_post, no proj, CLS dropped.
- ijepa-h: /255 -> ImageNet mean/std -> bicubic resize to S; all tokens after the final norm (it has no CLS).
- mocov3-b/l: /255 -> ImageNet mean/std, no resize when H=W=S; tokens after the final norm, CLS dropped.
- mae-l: /255 -> ImageNet mean/std, no resize when H=W=S; block outputs WITHOUT the final norm, CLS dropped.
- dinov1-b: /255 -> ImageNet mean/std, no resize when H=W=S; tokens after the final norm, CLS dropped.

"bicubic resize" is `F.interpolate(mode='bicubic', align_corners=False)`, no antialias, in float32. The
no-resize encoders (patch 16) take the image as is when it is S x S (256 px for grid 16, as in the reference);
for other sizes they resize like DINOv2 (after normalization) -- a documented extension, the reference only runs
them at 256 px. dinov1's module is missing from the reference repo; we use DINO's convention (final norm).

Architecture notes: clip-l is built as timm `vit_large_patch14_clip_quickgelu_224` (OpenAI CLIP uses QuickGELU;
timm's `vit_large_patch14_clip_224` uses GELU) and loads the weights of `timm/vit_large_patch14_clip_224.openai`.
ijepa-h is timm `vit_huge_patch14_gap_224` (no CLS token; timm has the I-JEPA url but no hub copy).
mocov3-b/l are timm `vit_{base,large}_patch16_224` built at 256 px.

Weights (`weights=` / `--encoder-weights FILE`), all read on CPU with `torch.load(weights_only=True)` or
safetensors, then through ONE path (`_to_timm_state_dict` -> timm `checkpoint_filter_fn` -> strict load):
- a timm-format state dict (`.safetensors`, `.pth`, `.bin`; e.g. the hub repo's model.safetensors, or
  `encoder.model.state_dict()` of a loaded encoder), or a downloaded hub folder holding one;
- DINOv2 torch.hub checkpoints (`dinov2_vitb14_pretrain.pth`, `..._reg4_pretrain.pth`: `mask_token`,
  `register_tokens`, SwiGLU `w12/w3` for g);
- DINO v1 `dino_vitbase16_pretrain.pth` (plain timm keys) or a DINO training checkpoint (`teacher`,
  `backbone.` prefix);
- OpenAI CLIP visual state dicts (`visual.*` keys; TorchScript archives like `ViT-L-14.pt` are refused);
- MAE `{"model": {...}}` (decoder keys ignored);
- MoCo v3 `{"state_dict": {"module.base_encoder.xxx": ...}}` (momentum encoder / predictor / projection head
  ignored; RCG's key-naming bug `blocks.13.norm13`, `fc13`, `blocks.14.norm14`, `fc14` fixed like the
  reference) -- required for mocov3-*;
- I-JEPA `{"encoder": {"module.xxx": ...}}` (the reference uses `encoder`, not `target_encoder`) -- required
  for ijepa-h.
`weights_hash` = `hash_state_dict` of the loaded fp32 timm state dict (after pos-embed resampling), so the same
weights give the same hash whatever file format they came in; a different grid gives a different hash.

`forward_cls` / `cls_from_input` give the CLS token after the final norm. Note for FD-DINOv2: dgm-eval runs the
torch.hub model, which interpolates its 37x37 pos-embed at run time (DINOv2's own `interpolate_pos_encoding`);
here the table is resampled once by timm (bicubic, antialias=True), so CLS features may differ slightly.

Without `weights`, hub models come from the local Hugging Face cache (timm's repo `timm/<model>.<tag>`), or are
downloaded only when the hub answers quickly; else MissingWeightsError naming `--encoder-weights` and the hub id.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from repa_pipe.models import weights as W
from repa_pipe.models.registry import ENCODERS, EncoderSpec
from repa_pipe.pipeline.errors import BadInputError, ConfigError, MissingWeightsError
from repa_pipe.pipeline.hashing import hash_state_dict

OPTION = "--encoder-weights FILE"
TINY_SEED = 0
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")


def get_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise ConfigError(f"unknown encoder {name!r}; valid encoders: {', '.join(ENCODERS)}") from None


# ------------------------------------------------------------------------------------------ model building
def _build_model(spec: EncoderSpec, grid: int, device: str | torch.device = "cpu"):
    """The spec's timm VisionTransformer at img_size grid*patch, head removed (random init / empty on meta)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    kwargs = spec.kwargs
    kwargs.update(img_size=grid * spec.patch_size, num_classes=0)
    with torch.device(device):
        if spec.timm_name is None:
            model = VisionTransformer(**kwargs)
        else:
            model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    return model


def _build_for_loading(spec: EncoderSpec, grid: int):
    """Build without paying for random init (meta device, then empty CPU storage) when that is safe:
    every buffer must come from the state dict (no non-persistent buffers left uninitialized)."""
    model = _build_model(spec, grid, device="meta")
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        return _build_model(spec, grid, device="cpu")
    return model.to_empty(device="cpu")


def _tiny_native_state_dict(spec: EncoderSpec) -> dict[str, Tensor]:
    """The `tiny` encoder's weights: random init from TINY_SEED at its native 16x16 grid, on CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = _build_model(spec, 224 // spec.patch_size, device="cpu")
    return model.state_dict()


# ------------------------------------------------------------------------------------ state-dict conversion
_CONTAINER_KEYS = ("model", "state_dict", "teacher", "module", "encoder", "target_encoder")
_MOCO_FIXES = (("blocks.13.norm13.", "blocks.13.norm1."), ("blocks.13.mlp.fc13.", "blocks.13.mlp.fc1."),
               ("blocks.14.norm14.", "blocks.14.norm2."), ("blocks.14.mlp.fc14.", "blocks.14.mlp.fc2."))
_DROP_PREFIXES = ("head.", "head_drop.", "fc.", "fc_norm.", "decoder", "predictor", "pre_logits.")


def _is_tensor_dict(d: Mapping) -> bool:
    return bool(d) and all(isinstance(v, Tensor) for v in d.values())


def _unwrap(sd: Any) -> dict[str, Tensor]:
    """Peel checkpoint containers ({'model': ...}, {'state_dict': ...}, {'encoder': ...}, ...) down to tensors."""
    for _ in range(4):
        if not isinstance(sd, Mapping):
            break
        if _is_tensor_dict(sd):
            return dict(sd)
        for key in _CONTAINER_KEYS:
            if isinstance(sd.get(key), Mapping):
                sd = sd[key]
                break
        else:
            break
    if isinstance(sd, Mapping):
        tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
        if tensors:
            return tensors
    raise ConfigError("the weights file holds no state dict of tensors (looked inside: "
                      f"{', '.join(_CONTAINER_KEYS)})")


def _strip_prefix(sd: dict[str, Tensor], prefix: str, only: bool = False) -> dict[str, Tensor]:
    """Remove `prefix` from keys; if `only`, keep just the keys that have it."""
    if only:
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _to_timm_state_dict(spec: EncoderSpec, raw: Any, model) -> dict[str, Tensor]:
    """Any accepted format -> the timm state dict of `model` (pos-embed resampled to the model's grid)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = _unwrap(raw)
    if any(k.startswith("module.base_encoder.") for k in sd):  # MoCo v3 / RCG: keep the base encoder only
        sd = _strip_prefix(sd, "module.base_encoder.", only=True)
        fixed = {}
        for k, v in sd.items():
            for old, new in _MOCO_FIXES:
                if k.startswith(old):
                    k = new + k[len(old):]
            fixed[k] = v
        sd = fixed
    for prefix in ("module.", "_orig_mod."):
        sd = _strip_prefix(sd, prefix)
    if any(k.startswith("backbone.") for k in sd):  # DINO training checkpoint: backbone + projection head
        sd = _strip_prefix(sd, "backbone.", only=True)
    sd = {k: v for k, v in sd.items() if not k.startswith(_DROP_PREFIXES)}
    sd = checkpoint_filter_fn(sd, model)  # DINOv2 / OpenAI-CLIP key conversion, pos-embed + patch resampling
    return {k: v for k, v in sd.items() if not k.startswith(_DROP_PREFIXES)}


def _load_into(model, spec: EncoderSpec, raw: Any, source: str) -> None:
    try:
        sd = _to_timm_state_dict(spec, raw, model)
    except ConfigError as err:
        raise ConfigError(f"{spec.name}: {source}: {err}") from err
    except Exception as err:
        raise ConfigError(f"{spec.name}: cannot convert {source} to the {spec.timm_name or 'tiny'} layout "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad_shape = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or bad_shape:
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 "shape mismatch: " + few([f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
                                           for k in bad_shape]) if bad_shape else ""]
        raise ConfigError(f"{spec.name}: {source} does not fit this encoder "
                          f"({'; '.join(p for p in parts if p)}); expected {spec.weights_formats}")
    with torch.no_grad():
        model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------- encoder
class FeatureEncoder(torch.nn.Module):
    """A frozen encoder: uint8 images -> float32 patch tokens `[B, grid*grid, D]` (see module docstring)."""

    def __init__(self, spec: EncoderSpec, model, grid: int, *, weights_id: str, weights_hash: str,
                 is_random_init: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.grid = int(grid)
        self.embed_dim = int(model.embed_dim)
        self.patch_size = spec.patch_size
        self.image_size = self.grid * spec.patch_size
        self.weights_id = weights_id
        self.weights_hash = weights_hash
        self.is_random_init = bool(is_random_init)
        self.dtype = dtype
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        if self.num_prefix_tokens != spec.prefix_tokens:
            raise ConfigError(f"{spec.name}: model has {self.num_prefix_tokens} prefix tokens, "
                              f"spec says {spec.prefix_tokens}")
        # The final norm is applied here, not inside forward_features, so that both "after the final norm"
        # and "raw block outputs" are available from one trunk pass.
        self.norm = model.norm
        model.norm = torch.nn.Identity()
        self.model = model
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def _apply(self, fn, recurse=True):
        # keep the normalization constants float32 whatever dtype the weights are cast to
        out = super()._apply(fn, recurse)
        self.mean = self.mean.float()
        self.std = self.std.float()
        return out

    def describe(self) -> dict:
        """JSON-able provenance: what a cache manifest records about the encoder and its input mapping."""
        spec = self.spec
        tokens = "patch tokens" + (" after the final norm" if spec.final_norm else " without the final norm")
        return {"name": self.name, "grid": self.grid, "embed_dim": self.embed_dim, "patch_size": self.patch_size,
                "image_size": self.image_size, "weights_id": self.weights_id, "weights_hash": self.weights_hash,
                "is_random_init": self.is_random_init, "timm_name": spec.timm_name,
                "tokens": tokens + (", CLS/registers dropped" if spec.prefix_tokens else ""),
                "input": {"range": "uint8/255", "mean": list(spec.mean), "std": list(spec.std),
                          "size": self.image_size, "interp": "bicubic", "normalize_first": spec.normalize_first}}

    # -------------------------------------------------------------------------------------------- pixels
    def preprocess(self, x: Tensor) -> Tensor:
        """uint8 [B,3,H,W] -> the model input [B,3,S,S] (S = grid*patch) in the encoder's dtype."""
        if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise BadInputError(f"encoder input must be a uint8 tensor [B, 3, H, W], got {got}")
        x = x.to(self.device).float() / 255.0
        size = (self.image_size, self.image_size)
        needs_resize = self.spec.resize or tuple(x.shape[-2:]) != size
        if self.spec.normalize_first:
            x = (x - self.mean) / self.std
            if needs_resize:
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        else:
            if needs_resize:
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
            x = (x - self.mean) / self.std
        return x.to(self.dtype)

    # -------------------------------------------------------------------------------------------- tokens
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 4 or x.shape[1] != 3 \
                or tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise BadInputError(f"{self.name}: preprocessed input must be float [B, 3, {self.image_size}, "
                                f"{self.image_size}], got {got}")

    def _trunk(self, x_input: Tensor) -> Tensor:
        """All tokens (prefix + patches) after the last block, before the final norm."""
        return self.model.forward_features(x_input.to(device=self.device, dtype=self.dtype))

    @torch.no_grad()
    def tokens_from_input(self, x_input: Tensor) -> Tensor:
        """Already-preprocessed float input [B,3,S,S] -> float32 patch tokens [B, grid*grid, D]."""
        self._check_input(x_input)
        tokens = self._trunk(x_input)
        if self.spec.final_norm:
            tokens = self.norm(tokens)
        return tokens[:, self.num_prefix_tokens:].float()

    @torch.no_grad()
    def cls_from_input(self, x_input: Tensor) -> Tensor:
        """Already-preprocessed float input [B,3,S,S] -> float32 CLS token after the final norm [B, D]
        (for metrics that do their own preprocessing, e.g. FD-DINOv2 with dinov2-l at 224 px)."""
        if not self.spec.has_cls:
            raise ConfigError(f"encoder {self.name} has no CLS token")
        self._check_input(x_input)
        return self.norm(self._trunk(x_input)[:, 0]).float()

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """uint8 [B,3,H,W] -> float32 patch tokens [B, grid*grid, D]."""
        return self.tokens_from_input(self.preprocess(x))

    @torch.no_grad()
    def forward_cls(self, x: Tensor) -> Tensor:
        """uint8 [B,3,H,W] -> float32 CLS token after the final norm [B, D] (e.g. FD-DINOv2 with dinov2-l)."""
        if not self.spec.has_cls:
            raise ConfigError(f"encoder {self.name} has no CLS token")
        return self.cls_from_input(self.preprocess(x))

    @torch.no_grad()
    def forward_with_cls(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Both outputs from one pass over uint8 images: (patch tokens [B, grid*grid, D], CLS [B, D] or None)."""
        trunk = self._trunk(self.preprocess(x))
        normed = self.norm(trunk)
        tokens = normed if self.spec.final_norm else trunk
        cls = normed[:, 0].float() if self.spec.has_cls else None
        return tokens[:, self.num_prefix_tokens:].float(), cls


# ------------------------------------------------------------------------------------------------ loading
def load_encoder(name: str, weights: str | None = None, grid: int = 16, device="cpu",
                 dtype=torch.float32) -> FeatureEncoder:
    """Build encoder `name` for a `grid` x `grid` token grid.

    `weights` (`--encoder-weights FILE`): a weights file in any accepted format (see module docstring). Without
    it: `tiny` is random-init (seed 0); hub encoders come from the local HF cache or a quick download; mocov3-*
    and ijepa-h raise MissingWeightsError. Raises ConfigError for unknown names / unusable files.
    """
    spec = get_spec(name)
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
        raise ConfigError(f"encoder grid must be a positive integer, got {grid!r}")
    dtype = W.resolve_dtype(dtype)
    what = f"encoder {name}"

    if weights is not None:
        path = W.local_path(weights, "--encoder-weights", what)
        raw, weights_id, random_init, source = W.read_state_dict(path), str(path), False, f"--encoder-weights {path}"
    elif spec.name == "tiny":
        raw, weights_id, random_init = _tiny_native_state_dict(spec), f"random-init(seed={TINY_SEED})", True
        source = "random init"
    elif spec.needs_weights or spec.hub_id is None:
        raise MissingWeightsError(
            f"{what} has no hub copy: pass {OPTION} (expected: {spec.weights_formats})")
    else:
        path = W.hub_file(what, spec.hub_id, HUB_FILENAMES, OPTION)
        raw, weights_id, random_init, source = W.read_state_dict(path), spec.hub_id, False, f"hub {spec.hub_id}"

    model = _build_for_loading(spec, grid)
    _load_into(model, spec, raw, source)
    del raw
    model.eval().requires_grad_(False)
    weights_hash = hash_state_dict(model.state_dict())
    enc = FeatureEncoder(spec, model, grid, weights_id=weights_id, weights_hash=weights_hash,
                         is_random_init=random_init, dtype=dtype)
    return enc.to(device=device, dtype=dtype)
