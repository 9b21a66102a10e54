"""A small alignment target made offline: the `tiny` encoder (a DINOv2-shaped ViT: patch 14, width 64, 2 blocks)
trained SELF-SUPERVISED on the demo's own images, a stand-in for DINOv2 where no pretrained weights can be
downloaded.

Method: SimCLR (Chen et al. 2020). Two random views of each image (affine jitter: rotation, scale, shear,
translation; brightness/contrast jitter, pixel noise, a cutout; no flips, which change a digit's identity) go
through the encoder's own input mapping (`FeatureEncoder.preprocess`: /255, ImageNet normalisation, bicubic
resize to grid*14 px) and the ViT; the mean of the patch tokens after the final norm, through a 2-layer
projection head, must pick out its other view among the batch (NT-Xent, temperature 0.2). No label is used.
Training starts from the random-init `tiny` encoder (seed 0) and returns a timm state dict, which
`--encoder-weights` loads exactly as it loads DINOv2 weights.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from repa_pipe.models.feature_encoders import FeatureEncoder, load_encoder


def augment(images: Tensor, g: torch.Generator) -> Tensor:
    """uint8 (B, 3, R, R) -> a random view of each, uint8 (B, 3, R, R)."""
    b, _, r, _ = images.shape
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731  (uniform [0, 1) draws from g)
    x = images.float() / 255.0
    contrast = (0.6 + 0.6 * u(b)).view(b, 1, 1, 1)
    brightness = ((u(b) * 2 - 1) * 0.1).view(b, 1, 1, 1)
    x = x * contrast + brightness * (x > 0.05) + 0.06 * u(b).view(b, 1, 1, 1) * torch.randn((b, 1, r, r), generator=g)
    # cutout: with probability 1/2 a square of 25-40% of the side goes black
    side = torch.ceil(r * (0.25 + 0.15 * u(b))).long()
    cx, cy, keep = (u(b) * r).long(), (u(b) * r).long(), u(b) >= 0.5
    ar = torch.arange(r)
    box = ((ar[None, :, None] - cy[:, None, None]).abs() <= side[:, None, None] // 2) & \
          ((ar[None, None, :] - cx[:, None, None]).abs() <= side[:, None, None] // 2)  # (B, R, R)
    x = x.masked_fill((box & ~keep[:, None, None])[:, None], 0.0)
    # one affine per image: rotation +-15 deg, zoom 0.8-1.15, shear +-10 deg, shift +-15%; black outside
    ang, shear = (u(b) * 2 - 1) * math.radians(15), (u(b) * 2 - 1) * math.radians(10)
    zoom, tx, ty = 0.8 + 0.35 * u(b), (u(b) * 2 - 1) * 0.15, (u(b) * 2 - 1) * 0.15
    cos, sin, tan = torch.cos(ang), torch.sin(ang), torch.tan(shear)
    theta = torch.stack([torch.stack([cos / zoom, (cos * tan - sin) / zoom, tx], 1),
                         torch.stack([sin / zoom, (sin * tan + cos) / zoom, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [b, 3, r, r], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def nt_xent(z1: Tensor, z2: Tensor, tau: float) -> Tensor:
    """SimCLR's loss: each of the 2B embeddings must pick out its other view among the other 2B - 1."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)  # (2B, d)
    n = z1.shape[0]
    sim = (z @ z.t() / tau).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def _pooled_tokens(enc: FeatureEncoder, images: Tensor) -> Tensor:
    """(B, D): patch tokens after the final norm, averaged; with gradients (FeatureEncoder's forward has none)."""
    tokens = enc.norm(enc.model.forward_features(enc.preprocess(images)))
    return tokens[:, enc.num_prefix_tokens:].mean(dim=1)


def timm_state_dict(enc: FeatureEncoder) -> dict[str, Tensor]:
    """The encoder's weights in timm's layout (FeatureEncoder keeps the final norm beside the ViT)."""
    sd = {k: v.detach().clone() for k, v in enc.model.state_dict().items()}
    sd.update({f"norm.{k}": v.detach().clone() for k, v in enc.norm.state_dict().items()})
    return sd


def train_ssl_encoder(images: np.ndarray, grid: int, *, steps: int = 200, batch: int = 256, lr: float = 2e-3,
                      tau: float = 0.2, seed: int = 0,
                      progress: Optional[Callable[[int, float], None]] = None) -> dict[str, Tensor]:
    """SimCLR on uint8 images (N, R, R, 3) for a `grid` x `grid` token encoder; returns a timm state dict."""
    torch.manual_seed(seed)
    enc = load_encoder("tiny", grid=grid).train().requires_grad_(True)
    d = enc.embed_dim
    head = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, 2 * d))
    # Layer-scale factors start at 1e-5 (DINOv2's init): a 10x learning rate lets the blocks switch on within the
    # first few dozen steps instead of staying near the identity for the whole short run.
    gammas = [p for n, p in enc.named_parameters() if n.endswith(".gamma")]
    rest = [p for p in [*enc.parameters(), *head.parameters()] if all(p is not q for q in gammas)]
    opt = torch.optim.AdamW([{"params": rest, "scale": 1.0}, {"params": gammas, "scale": 10.0, "weight_decay": 0.0}],
                            lr=lr, weight_decay=0.05, betas=(0.9, 0.99))
    data = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, 3, R, R) uint8
    g = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    for step in range(steps):
        warm, cosine = min(1.0, (step + 1) / warmup), 1 + math.cos(math.pi * step / steps)
        for group in opt.param_groups:  # linear warmup, cosine decay
            group["lr"] = group["scale"] * lr * warm * 0.5 * cosine
        idx = torch.randperm(len(data), generator=g)[:batch]
        v1, v2 = augment(data[idx], g), augment(data[idx], g)
        loss = nt_xent(head(_pooled_tokens(enc, v1)), head(_pooled_tokens(enc, v2)), tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(enc.parameters()) + list(head.parameters()), 3.0)
        opt.step()
        if progress is not None:
            progress(step + 1, float(loss.detach()))
    return timm_state_dict(enc.eval())
