"""ADM-compatible Inception features from torch-fidelity's TF-compatible InceptionV3, matching the TF
graph of ADM's evaluator (https://github.com/openai/guided-diffusion `evaluations/evaluator.py`).

torch-fidelity's ``FeatureExtractorInceptionV3`` ("inception-v3-compat") already does what the TF graph does
between ``ExpandDims:0`` and the features: uint8 -> float, TF1-legacy bilinear resize to 299 (no half-pixel
offset), (x - 128) / 128. We take from it:

- ``pool``    (N, 2048): ``pool_3:0``  = torch-fidelity feature "2048"           (FID, precision/recall)
- ``logits``  (N, 1008): pool3 @ W, no bias = torch-fidelity "logits_unbiased"   (Inception Score)
- ``spatial`` (N, 2023): ``mixed_6/conv:0[..., :7]`` = output of ``Mixed_6d.branch1x1`` (post-ReLU,
  [N, 192, 17, 17]), first 7 channels, flattened in TF's NHWC order: index (h * 17 + w) * 7 + c  (sFID).

Weights: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (a plain ``torch.save``'d state dict
with torchvision key names, converted from the TF 2015-12-05 graph; pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` is the same network). It is only ever read from a local path:
torch-fidelity downloads only when its ``feature_extractor_weights_path`` is None, which we never pass.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Dict, Optional

import numpy as np
import torch

from repa_pipe.pipeline.errors import BadInputError, MissingWeightsError
from repa_pipe.pipeline.hashing import hash_file
from repa_pipe.pipeline.precision import tf32
from repa_pipe.metrics.npz_io import ImageBatches, check_images, iter_batches

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
OFFICIAL_SHA256_PREFIX = "6726825d"
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # TF mixed_6/conv (7th mixed block), per torch-fidelity's weight converter
FEATURE_NAMES = ["2048", "logits_unbiased"]


def _extractor_class():
    # Imported lazily: torch_fidelity's package import pulls in torchvision (~2 s).
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    return FeatureExtractorInceptionV3


def spatial_from_mixed6(act: torch.Tensor) -> torch.Tensor:
    """(N, 192, 17, 17) Mixed_6d.branch1x1 output -> (N, 2023): channels [:7], NHWC flatten like TF."""
    return act[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(act.shape[0], -1)


class InceptionFeatures:
    """A loaded TF-compatible InceptionV3 that turns uint8 NHWC images into ADM's features."""

    def __init__(self, net: torch.nn.Module, device: torch.device, weights_path: str, weights_sha256: str,
                 allow_tf32: bool = False):
        self.net = net
        self.device = device
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        self.allow_tf32 = allow_tf32
        self._spatial: Optional[torch.Tensor] = None
        module = net.get_submodule(SPATIAL_MODULE)
        module.register_forward_hook(self._grab_spatial)

    @property
    def official_weights(self) -> bool:
        """True when the weights file is the published one (sha256 prefix 6726825d)."""
        return self.weights_sha256.startswith(OFFICIAL_SHA256_PREFIX)

    def _grab_spatial(self, module, inputs, output: torch.Tensor) -> None:
        # An explicit copy: the network's buffers must not be aliased past this call.
        self._spatial = spatial_from_mixed6(output).to(torch.float32, copy=True)

    @torch.no_grad()
    def extract_batch(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """uint8 (B, H, W, 3) -> {pool (B, 2048), logits (B, 1008), spatial (B, 2023)} float32 numpy."""
        images = check_images(images, "Inception input")  # float input would be silently wrong
        if not images.flags.writeable:  # e.g. streamed from an npz via np.frombuffer
            images = images.copy()
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        x = x.to(self.device)
        # TF32 off for the duration unless allowed (reproducible features on Ampere+); the caller's flags after
        with contextlib.nullcontext() if self.allow_tf32 else tf32(False):
            pool, logits = self.net(x)
        spatial, self._spatial = self._spatial, None
        return {"pool": pool.float().cpu().numpy(),  # (B, 2048)
                "logits": logits.float().cpu().numpy(),  # (B, 1008)
                "spatial": spatial.cpu().numpy()}  # (B, 2023)

    def extract(self, images: ImageBatches, batch_size: int = 64) -> Dict[str, np.ndarray]:
        """uint8 images (N, H, W, 3), or an iterable of such batches -> dict of (N, *) float32 arrays."""
        parts: Dict[str, list] = {"pool": [], "logits": [], "spatial": []}
        for batch in iter_batches(images, batch_size):
            for key, value in self.extract_batch(batch).items():
                parts[key].append(value)
        if not parts["pool"]:
            raise BadInputError("Inception features: no images given")
        return {key: np.concatenate(v, axis=0) for key, v in parts.items()}


def load_inception(weights_path: Optional[str | os.PathLike], device: torch.device | str = "cpu",
                   allow_tf32: bool = False) -> InceptionFeatures:
    """Build torch-fidelity's InceptionV3 from a local weights file; never downloads.

    Raises MissingWeightsError (naming ``--inception-weights``) when the path is None or not a file, and
    BadInputError when the file is not a compatible state dict.
    """
    if weights_path is None or not os.path.isfile(weights_path):
        where = "no path was given" if weights_path is None else f"{weights_path} does not exist"
        raise MissingWeightsError(
            f"Inception weights not found ({where}). Pass --inception-weights /path/to/{WEIGHTS_FILENAME} "
            "(torch-fidelity's release file; pytorch-fid's pt_inception-2015-12-05-6726825d.pth is the same). "
            "Nothing is downloaded.")
    cls = _extractor_class()
    try:
        # A path is always given, so torch-fidelity reads it with torch.load and never calls the URL loader.
        net = cls("inception-v3-compat", FEATURE_NAMES, feature_extractor_weights_path=str(weights_path))
    except Exception as e:  # unpickling, wrong keys or shapes: all mean "wrong file"
        raise BadInputError(f"{weights_path}: not usable as InceptionV3 weights "
                            f"(expected a torch state dict like {WEIGHTS_FILENAME}): {e}") from e
    device = torch.device(device)
    net = net.to(device).eval()
    return InceptionFeatures(net, device, str(weights_path), hash_file(weights_path), allow_tf32=allow_tf32)


def make_random_inception_weights(path: str | os.PathLike, seed: int = 0,
                                  calibration_images: Optional[np.ndarray] = None,
                                  logit_scale: float = 10.0) -> None:
    """Save a random-init InceptionV3 state dict in the format of the real weights file (tests, offline demo).

    BatchNorm running statistics are set from one pass over ``calibration_images`` (uint8 NHWC; 2 noise
    and 2 smooth images if None) so activations neither vanish (default BN stats give pool3 ~1e-8) nor
    explode through the 94 conv layers, then slightly jittered. ``fc`` is scaled so the 1008-way softmax
    is not flat and the Inception Score is not trivially 1. Numbers computed with these weights mean nothing.
    """
    cls = _extractor_class()

    class _RandomInit(cls):  # keep PyTorch's default init when handed an empty state dict
        def load_state_dict(self, state_dict, strict=True, assign=False):
            if not state_dict:
                return None
            return super().load_state_dict(state_dict, strict, assign)

    gen = torch.Generator().manual_seed(seed)
    # Default module init draws from the global generator: seed it without disturbing the caller's state.
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        empty = os.path.join(tmp, "empty.pth")
        torch.save({}, empty)
        net = _RandomInit("inception-v3-compat", FEATURE_NAMES, feature_extractor_weights_path=empty)
    if calibration_images is None:  # 2 noise + 2 smooth (upsampled 4x4) images: BN sees both kinds of input
        noise = torch.randint(0, 256, (4, 32, 32, 3), generator=gen, dtype=torch.uint8)
        noise[2:] = noise[2:, ::8, ::8].repeat_interleave(8, 1).repeat_interleave(8, 2)
        calibration_images = noise.numpy()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: running stats = this batch's stats
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(np.ascontiguousarray(calibration_images)).permute(0, 3, 1, 2))
        for bn in bns:
            c = bn.running_mean.shape[0]
            # Small jitter only: larger ones compound over the 94 layers and blow activations up.
            bn.running_mean += 0.02 * bn.running_var.sqrt() * torch.randn(c, generator=gen)
            bn.running_var *= 0.95 + 0.1 * torch.rand(c, generator=gen)
            bn.momentum = 0.1
        net.fc.weight.mul_(logit_scale)
    net.eval()
    torch.save(net.state_dict(), path)
