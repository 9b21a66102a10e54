"""Interpolant paths, time sampling, the denoising loss and the REPA alignment loss (reference loss.py).

Conventions (as the reference): t = 0 is data, t = 1 is noise; x_t = alpha_t x0 + sigma_t eps; the model
predicts the velocity v = alpha'_t x0 + sigma'_t eps (linear path: eps - x0).

All randomness is drawn by the caller (per sample), and passed in as tensors or a torch.Generator: nothing
here touches the global RNG, so a sample's loss does not depend on which rank or batch it lands in.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from repa_pipe.models.registry import ALIGN_LOSSES, PATHS, TIME_SAMPLERS
from repa_pipe.pipeline.errors import ConfigError

__all__ = [
    "interpolant", "interpolate", "velocity_target", "sample_time",
    "time_from_base", "denoising_loss", "alignment_loss", "repa_loss", "sample_posterior",
]


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; choose one of {allowed}")


# ----------------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------------

def interpolant(t: torch.Tensor, path: str = "linear"):
    """(alpha_t, sigma_t, d alpha/dt, d sigma/dt), each shaped like t."""
    _check(path, PATHS, "path")
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    a = t * (math.pi / 2)
    return torch.cos(a), torch.sin(a), -(math.pi / 2) * torch.sin(a), (math.pi / 2) * torch.cos(a)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against x."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, path: str = "linear") -> torch.Tensor:
    """x_t = alpha_t x0 + sigma_t noise. x0, noise: (B, C, H, W); t: (B,)."""
    alpha, sigma, _, _ = interpolant(_bcast(t, x0), path)
    return alpha * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, path: str = "linear") -> torch.Tensor:
    """v = alpha'_t x0 + sigma'_t noise (linear: noise - x0)."""
    _, _, d_alpha, d_sigma = interpolant(_bcast(t, x0), path)
    return d_alpha * x0 + d_sigma * noise


# ----------------------------------------------------------------------------------------------------------
# Time sampling
# ----------------------------------------------------------------------------------------------------------

def time_from_base(base: torch.Tensor, weighting: str = "uniform", path: str = "linear") -> torch.Tensor:
    """Map pre-drawn base randomness to t.

    'uniform': base ~ U[0, 1) and t = base. 'lognormal': base ~ N(0, 1), sigma = exp(base) (EDM P_mean 0,
    P_std 1); linear path t = sigma / (1 + sigma) = sigmoid(base); cosine path t = (2/pi) atan(sigma).
    """
    _check(weighting, TIME_SAMPLERS, "time sampler")
    _check(path, PATHS, "path")
    if weighting == "uniform":
        return base
    if path == "linear":
        return torch.sigmoid(base)
    return (2 / math.pi) * torch.atan(torch.exp(base))


def sample_time(
    n: int,
    weighting: str = "uniform",
    path: str = "linear",
    *,
    generator: torch.Generator | None = None,
    base: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """t of shape (n,) float32. Either `base` (pre-drawn: uniform for 'uniform', normal for 'lognormal',
    e.g. one value per sample from that sample's generator) or a `generator` to draw from."""
    _check(weighting, TIME_SAMPLERS, "time sampler")
    if base is None:
        if generator is None:
            raise ConfigError("sample_time needs an explicit generator or pre-drawn base values")
        draw = torch.rand if weighting == "uniform" else torch.randn
        base = draw(n, generator=generator, device=generator.device).to(device)
    elif base.shape != (n,):
        raise ConfigError(f"base must have shape ({n},), got {tuple(base.shape)}")
    return time_from_base(base.float(), weighting, path)


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------

def denoising_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE, mean over all non-batch dims, in float32: (B, C, H, W) -> (B,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def _cosine_align(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    # p, z: (B, T, d) float32. Mean over samples and tokens of -cos.
    return -(F.normalize(p, dim=-1) * F.normalize(z, dim=-1)).sum(-1).mean()


def _ntxent_align(p: torch.Tensor, z: torch.Tensor, temperature: float) -> torch.Tensor:
    # p, z: (B, T, d) float32. Logits (B, T, T) between tokens of the SAME image only.
    logits = torch.einsum("bid,bjd->bij", F.normalize(p, dim=-1), F.normalize(z, dim=-1)) / temperature
    B, T, _ = logits.shape
    target = torch.arange(T, device=logits.device).expand(B, T)  # token i's positive is target token i
    fwd = F.cross_entropy(logits.transpose(1, 2), target)  # p_i vs all z_j
    bwd = F.cross_entropy(logits, target)  # z_j vs all p_i (logits.transpose(1,2) rows)
    return 0.5 * (fwd + bwd)


def alignment_loss(
    projected: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    kind: str = "cosine",
    temperature: float = 0.1,
) -> torch.Tensor:
    """REPA alignment loss averaged over encoders. projected[i], targets[i]: (B, T, z_i).

    'cosine' (reference): -mean over encoders, samples, tokens of cos(h(z~), z). Identical -> -1.
    'ntxent': symmetric per-token InfoNCE within each image. With P, Z the l2-normalised tokens of one
      image, S = P Z^T / temperature (T x T); loss = 1/2 [CE over rows of S + CE over columns of S] with
      the diagonal (same token position) as the positive, averaged over tokens, samples and encoders.
      Negatives are the other tokens of the same image only, so a sample's loss does not depend on which
      other samples share its batch (keeps 2 ranks x 4 == 1 rank x 8). Memory is O(B T^2) per encoder.

    Normalisation and sums run in float32: the reference normalises fp16 tensors under autocast, where the
    1e-12 eps underflows and |z|^2 can overflow (NaN / wrong values, REPA issue #46).
    """
    _check(kind, ALIGN_LOSSES, "alignment loss")
    if len(projected) != len(targets) or not projected:
        raise ConfigError(f"need one projection per encoder: got {len(projected)} projections, {len(targets)} encoders")
    losses = []
    for p, z in zip(projected, targets):
        if p.shape != z.shape:
            raise ConfigError(f"projection shape {tuple(p.shape)} != encoder feature shape {tuple(z.shape)}")
        p, z = p.float(), z.float()
        losses.append(_cosine_align(p, z) if kind == "cosine" else _ntxent_align(p, z, temperature))
    return torch.stack(losses).mean()


def repa_loss(
    model,
    x0: torch.Tensor,
    y: torch.Tensor,
    feats: Sequence[torch.Tensor] | None,
    noise: torch.Tensor,
    t: torch.Tensor,
    proj_coeff: float,
    align: str = "cosine",
    path: str = "linear",
    temperature: float = 0.1,
) -> dict[str, torch.Tensor]:
    """One REPA training loss. loss = mean_b L_diff + proj_coeff * L_align (reference total with 0.5).

    x0: (B, C, H, W) clean latents; y: (B,) labels, already dropped to the null id where needed;
    feats: per encoder (B, T, z_i) target tokens (None / empty: no alignment, e.g. the SiT baseline);
    noise: (B, C, H, W) ~ N(0, I); t: (B,) in [0, 1]. `model(x_t, t, y) -> (v, zs)`.
    Returns float32 scalars: loss, denoise (batch mean of per-sample MSE), align (0 when no feats).
    """
    x_t = interpolate(x0, noise, t, path)  # (B, C, H, W)
    target = velocity_target(x0, noise, t, path)
    out, zs = model(x_t, t, y)
    denoise = denoising_loss(out, target).mean()
    if feats:
        align_l = alignment_loss(zs, feats, align, temperature)
    else:
        align_l = torch.zeros((), device=denoise.device)
    return {"loss": denoise + proj_coeff * align_l, "denoise": denoise, "align": align_l}


def sample_posterior(
    moments: torch.Tensor, eps: torch.Tensor, scaling_factor: float | Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Training latent from stored moments: (mean + std * eps) * scale.

    moments: (B, 2C, h, w) = [mean, std] on channels; eps: (B, C, h, w); scale: float or per-channel (C,).
    """
    mean, std = moments.chunk(2, dim=1)  # each (B, C, h, w)
    scale = torch.as_tensor(scaling_factor, dtype=mean.dtype, device=mean.device)
    if scale.dim() == 1:
        scale = scale.view(1, -1, 1, 1)
    return (mean + std * eps) * scale
