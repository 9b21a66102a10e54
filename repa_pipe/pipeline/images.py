"""Pixel conversion and the PNGs a run writes (sample grids, loss curve), with PIL only."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from repa_pipe.pipeline import metrics_log
from repa_pipe.pipeline.fileio import atomic_write


Decoder = Callable[[torch.Tensor], torch.Tensor]  # (N, C, h, w) model-space latents -> (N, H, W, 3) uint8


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoded images (N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, as the reference: (x+1)/2, clamp(255x),
    truncation toward zero (not rounding; DiT's 127.5x+128 rounds). Kept for FID parity with the paper."""
    x = torch.clamp(255.0 * (x.float() + 1.0) / 2.0, 0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu()


def grid(images: np.ndarray | torch.Tensor, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) uint8 mosaic."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[i]
    return out


def save_png(array: np.ndarray, path: Path, upscale: int = 1) -> None:
    img = Image.fromarray(np.asarray(array))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def save_grid(images: np.ndarray | torch.Tensor, path: Path, cols: int | None = None) -> None:
    """Small images are upscaled with nearest neighbour so a 32 px grid is visible."""
    mosaic = grid(images, cols)
    save_png(mosaic, path, upscale=max(1, 256 // max(1, np.asarray(images).shape[1])))


def save_loss_curve(metrics_jsonl: Path, path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """Loss, denoising and alignment loss against step, as a PNG line chart."""
    recs = metrics_log.read(metrics_jsonl)
    if len(recs) < 2:
        return
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, w - 20, 20, h - 40
    steps = np.array([r["step"] for r in recs], dtype=float)
    series = {"loss": (31, 119, 180), "denoise": (44, 160, 44), "align": (214, 39, 40)}
    vals = np.concatenate([[r[k] for r in recs] for k in series])
    lo, hi = float(vals.min()), float(vals.max())
    hi = hi if hi > lo else lo + 1.0
    sx = lambda s: left + (s - steps[0]) / max(1e-9, steps[-1] - steps[0]) * (right - left)  # noqa: E731
    sy = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)  # noqa: E731
    d.rectangle([left, top, right, bottom], outline="black")
    for i, (k, color) in enumerate(series.items()):
        pts = [(sx(r["step"]), sy(r[k])) for r in recs]
        d.line(pts, fill=color, width=2)
        d.text((left + 10 + 90 * i, top + 5), k, fill=color)
    for v in (lo, (lo + hi) / 2, hi):
        d.text((5, sy(v) - 6), f"{v:.3f}", fill="black")
    d.text((left, bottom + 8), f"step {int(steps[0])}", fill="black")
    d.text((right - 80, bottom + 8), f"step {int(steps[-1])}", fill="black")
    atomic_write(path, lambda f: img.save(f, format="PNG"))
