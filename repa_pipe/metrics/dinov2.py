"""FD_DINOv2 features with dgm-eval's preprocessing (https://github.com/layer6ai-labs/dgm-eval).

uint8 image -> PIL bicubic resize to 224 x 224 (PIL antialiases, output rounded to uint8) -> /255 ->
ImageNet mean/std -> model -> CLS token after the final LayerNorm (1024-d for ViT-L/14, not L2-normalised).
The model is passed in as a callable, so this module loads no weights; the Frechet distance is ``fd.py``'s.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

from repa_pipe.metrics.npz_io import ImageBatches, iter_batches

DINOV2_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ForwardCls = Callable[[torch.Tensor], torch.Tensor]


def dinov2_preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, 224, 224), as torchvision Resize(BICUBIC) + ToTensor + Normalize."""
    resized = np.stack([np.asarray(Image.fromarray(im).resize((DINOV2_SIZE, DINOV2_SIZE), Image.BICUBIC))
                        for im in images])  # (B, 224, 224, 3) uint8
    x = torch.from_numpy(resized).permute(0, 3, 1, 2).float().div(255)  # same op order as ToTensor
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def fd_dinov2_features(model_forward_cls: ForwardCls, images: ImageBatches, batch_size: int = 50,
                       device: torch.device | str = "cpu") -> np.ndarray:
    """CLS features (N, D) float64 of uint8 images (N, H, W, 3) or an iterable of batches.

    ``model_forward_cls`` maps a normalised (B, 3, 224, 224) float tensor on ``device`` to (B, D); for a
    torch.hub DINOv2 backbone that is ``model`` itself (its head is Identity over the normed CLS token).
    """
    feats = [dinov2_batch_features(model_forward_cls, b, device) for b in iter_batches(images, batch_size)]
    return np.concatenate(feats, axis=0)


@torch.no_grad()
def dinov2_batch_features(model_forward_cls: ForwardCls, images: np.ndarray,
                          device: torch.device | str = "cpu") -> np.ndarray:
    """One batch: uint8 (B, H, W, 3) -> (B, D) float64."""
    out = model_forward_cls(dinov2_preprocess(images).to(device))
    return out.detach().double().cpu().numpy()
