"""SiT (DiT backbone, adaLN-Zero) with REPA projectors, numerically as the REPA reference (models/sit.py).

What matches the reference (https://github.com/sihyun-yu/REPA `models/sit.py`; docs/numerics.md points 6-9, 12):
- parameter names and shapes (the official EMA checkpoint loads strictly, see `load_reference_state_dict`),
- fixed 2-D sin-cos `pos_embed` (column index in the first half of the channels, [sin, cos] per half),
- timestep embedding of t in [0, 1] unscaled, [cos, sin] order, 256 frequencies,
- label table with num_classes + 1 rows (null id = num_classes),
- projectors D->2048->2048->z (SiLU) on the raw residual stream after block `encoder_depth` (1-indexed),
- initialisation (xavier, zero adaLN / final layer, N(0, 0.02) label table and timestep MLP).

Deliberate deviations:
- Label dropout is NOT done inside `forward`. The reference draws the drop mask with the global RNG of the
  rank inside the model, so the draw belongs to the rank, not to the sample, and 2 ranks x 4 samples differ
  from 1 rank x 8. Here the training loop draws the mask per sample and passes dropped labels
  (`drop_labels`); `forward` never changes `y`, in train or eval mode.
- The SiT-S presets work (the reference builds their final layer for width 768 and crashes).
- Presets also exist for patch size 1 and a tiny `SiT-T/*` for CPU tests and demos.
- Attention is a small local module using `F.scaled_dot_product_attention` (always fused), with the same
  parameter names as timm's `Attention` (`qkv`, `proj`); optional xformers backend.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed

from repa_pipe.models.registry import ATTN_BACKENDS, SIT_PRESETS, SiTPreset
from repa_pipe.pipeline.errors import ConfigError

__all__ = [
    "SiT", "SiTPreset", "SIT_PRESETS", "build_sit", "drop_labels", "timestep_embedding",
    "sincos_pos_embed_2d", "load_reference_state_dict", "flops_per_sample", "attention_flops_per_sample",
]



# ----------------------------------------------------------------------------------------------------------
# Fixed embeddings
# ----------------------------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t (fed as is, t in [0, 1]): [cos(t f_k), sin(t f_k)], f_k = max_period^(-k/half).

    t: (B,) -> (B, dim) float32. Computed in float32 like the reference.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: (M,) float64 -> (M, dim) = [sin(pos w), cos(pos w)], w_k = 10000^(-k/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    out = pos[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """MAE-style fixed 2-D embedding, (grid_h*grid_w, dim) float32, tokens in row-major order.

    Reference quirk kept for checkpoint parity: the first dim/2 channels encode the COLUMN index, the last
    dim/2 the row index (numpy meshgrid(w, h) with 'xy' indexing).
    """
    if dim % 4:
        raise ConfigError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )  # each (grid_h, grid_w)
    emb = torch.cat([_sincos_1d(dim // 2, cols.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    return emb.float()  # (T, dim)


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: (B, T, D); shift, scale: (B, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t (B,) in [0, 1] -> (B, D): sinusoidal 256-dim embedding, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (B, 256) float32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class id -> (B, D). Row `num_classes` is the null (unconditional) label. No dropout here."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention with the parameter layout of timm's Attention (qkv_bias, no qk-norm)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        if backend not in ATTN_BACKENDS:
            raise ConfigError(f"unknown attn_backend {backend!r}; choose one of {ATTN_BACKENDS}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.backend = backend
        self._xops = _import_xformers() if backend == "xformers" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)  # same split as timm
        if self._xops is not None:
            q, k, v = qkv.unbind(2)  # each (B, T, H, hd)
            out = self._xops.memory_efficient_attention(q, k, v)  # (B, T, H, hd)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd)
            out = _sdpa(q, k, v).transpose(1, 2)  # (B, T, H, hd)
        return self.proj(out.reshape(B, T, D))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Fused attention. On a CPU under reduced-precision autocast it runs in float32: torch's CPU kernels are
    slower in bf16 than in fp32 at these head sizes (the demo's SiT-T/1 step: about 1.4x), and fp32 is the more
    precise of the two. GPUs keep the autocast dtype."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu") and q.dtype != torch.float32:
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


def _import_xformers():
    try:
        import xformers.ops as xops  # noqa: PLC0415 (optional dependency, imported only when asked for)
    except ImportError as e:
        raise ConfigError("--attn-backend xformers needs the xformers package: pip install xformers, or use "
                          "--attn-backend sdpa") from e
    return xops


class Mlp(nn.Module):
    """fc1 - GELU(tanh) - fc2, names as timm's Mlp."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, attn_backend: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, backend=attn_backend)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D), c: (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C)


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector h_phi: Linear(D, 2048) - SiLU - Linear(2048, 2048) - SiLU - Linear(2048, z)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------

class SiT(nn.Module):
    """SiT velocity model with REPA projectors.

    forward(x (B,C,H,W), t (B,) in [0,1], y (B,) long, already dropped) -> (v (B,C,H,W), zs [(B,T,z_i)]).
    """

    def __init__(
        self,
        *,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        encoder_depth: int = 8,
        z_dims: Sequence[int] = (768,),
        projector_dim: int = 2048,
        attn_backend: str = "sdpa",
    ):
        super().__init__()
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if h % patch_size or w % patch_size:
            raise ConfigError(f"input size {(h, w)} is not divisible by patch size {patch_size}")
        z_dims = [int(z) for z in z_dims]
        if z_dims and not 1 <= encoder_depth <= depth:
            raise ConfigError(f"encoder_depth={encoder_depth} must be in [1, depth={depth}] (1-indexed block)")
        self.input_size = (h, w)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels  # no learned sigma
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.z_dims = z_dims
        self.projector_dim = projector_dim
        self.grid = (h // patch_size, w // patch_size)

        self.x_embedder = PatchEmbed((h, w), patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        # A parameter (not a buffer) so the reference checkpoint, which stores it, loads strictly.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio, attn_backend) for _ in range(depth)]
        )
        self.projectors = nn.ModuleList([build_projector(hidden_size, projector_dim, z) for z in z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def initialize_weights(self) -> None:
        """Reference init: xavier for all Linear (bias 0), zero adaLN and output layer, N(0, .02) embeddings."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.hidden_size, *self.grid).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear on the flattened patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W); per token the channel layout is (p, q, c)."""
        B = x.shape[0]
        (gh, gw), p, c = self.grid, self.patch_size, self.out_channels
        x = x.reshape(B, gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(B, c, gh * p, gw * p)

    def _run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, with_proj: bool):
        x = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        B, T, D = x.shape
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        zs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x, c)  # (B, T, D)
            if with_proj and (i + 1) == self.encoder_depth:
                zs = [proj(x) for proj in self.projectors]  # each (B, T, z_i), raw residual stream
        out = self.unpatchify(self.final_layer(x, c))  # (B, C, H, W)
        return out, zs

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Training forward: velocity and projected tokens. `y` must already hold null ids where dropped."""
        return self._run(x, t, y, with_proj=True)

    def forward_velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity only (sampling): skips the projectors."""
        return self._run(x, t, y, with_proj=False)[0]


def drop_labels(y: torch.Tensor, drop_mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Replace y[i] by the null id `num_classes` where drop_mask[i] is true (classifier-free guidance training).

    The caller draws drop_mask per sample (e.g. u_i < 0.1 with u_i from the sample's own generator).
    """
    return torch.where(drop_mask.to(device=y.device, dtype=torch.bool), torch.full_like(y, num_classes), y)


# ----------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------

def build_sit(
    name: str,
    *,
    input_size: int | tuple[int, int],
    in_channels: int,
    num_classes: int,
    encoder_depth: int,
    z_dims: Sequence[int],
    projector_dim: int = 2048,
    mlp_ratio: float = 4.0,
    attn_backend: str = "sdpa",
) -> SiT:
    """Build a preset, e.g. build_sit('SiT-XL/2', input_size=32, in_channels=4, num_classes=1000,
    encoder_depth=8, z_dims=[768])."""
    if name not in SIT_PRESETS:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(SIT_PRESETS)}")
    p = SIT_PRESETS[name]
    return SiT(
        input_size=input_size, patch_size=p.patch_size, in_channels=in_channels, hidden_size=p.hidden_size,
        depth=p.depth, num_heads=p.num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
        encoder_depth=encoder_depth, z_dims=z_dims, projector_dim=projector_dim, attn_backend=attn_backend,
    )


# ----------------------------------------------------------------------------------------------------------
# Reference checkpoint, FLOPs
# ----------------------------------------------------------------------------------------------------------

def load_reference_state_dict(model: SiT, sd: dict[str, torch.Tensor]) -> None:
    """Load a reference SiT state dict (e.g. `ckpt['ema']` or the released `last.pt`) strictly.

    Our parameter names equal the reference's (sihyun-yu/REPA models/sit.py), so only a DDP `module.` prefix is
    stripped. Raises ConfigError naming the missing / unexpected / mis-shaped keys (usually a wrong preset,
    encoder_depth or z_dims).
    """
    out = {k.removeprefix("module."): v for k, v in sd.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(out))
    unexpected = sorted(set(out) - set(own))
    bad_shape = sorted(k for k in set(own) & set(out) if tuple(own[k].shape) != tuple(out[k].shape))
    if missing or unexpected or bad_shape:
        raise ConfigError(
            "checkpoint does not match the model config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shape {bad_shape[:5]}{'...' if len(bad_shape) > 5 else ''}"
        )
    model.load_state_dict(out, strict=True)


def attention_flops_per_sample(model: SiT) -> float:
    """The attention-score and attention-value matmuls of one sample's forward (2 FLOPs per multiply-add)."""
    T, D = model.num_tokens, model.hidden_size
    return float(model.depth * 2 * 2 * T * T * D)


def flops_per_sample(model: SiT, *, with_projectors: bool = True, with_attention: bool = True) -> float:
    """Forward matmul FLOPs (2 per multiply-add) for one sample, including attention scores and values.

    Training step FLOPs ~ 3x this (forward + backward). `with_projectors=False` for sampling forwards.
    """
    T, D, L = model.num_tokens, model.hidden_size, model.depth
    p, C = model.patch_size, model.in_channels
    hid = int(D * model.mlp_ratio)
    f = 2 * T * (C * p * p) * D  # patch embedding
    f += 2 * (model.t_embedder.frequency_embedding_size * D + D * D)  # timestep MLP (once per sample)
    per_block = 2 * T * (3 * D * D + D * D + 2 * D * hid)  # qkv, proj, fc1, fc2
    per_block += 2 * D * 6 * D  # adaLN (once per sample)
    f += L * per_block
    f += 2 * D * 2 * D + 2 * T * D * p * p * model.out_channels  # final adaLN + linear
    if with_projectors:
        P = model.projector_dim
        f += sum(2 * T * (D * P + P * P + P * z) for z in model.z_dims)
    return float(f) + (attention_flops_per_sample(model) if with_attention else 0.0)
