"""Latent codecs: image <-> latent posterior moments (SD-VAE, pixel identity, a tiny random VAE for tests).

Conventions (docs/CONTRACTS.md "Latent moments"; the REPA reference's `preprocessing/`,
https://github.com/sihyun-yu/REPA; docs/numerics.md point 2):
- input images are uint8 `[B, 3, H, W]`; the VAE sees `x.float() / 127.5 - 1`;
- `encode_moments` returns float32 `[B, 2C, H/f, W/f]` = `cat(posterior mean, posterior std)` where std is
  diffusers' `exp(0.5 * clamp(logvar, -30, 20))` (moments are stored, not samples);
- a training latent is `(mean + std * eps) * scaling_factor`; `decode` takes such a model-space latent, divides
  by `scaling_factor` itself and returns float32 images clamped to [-1, 1] (the reference clamps after
  `(x+1)/2*255`, which gives the same uint8 values).

Codecs:
- `sd-vae-ft-ema`, `sd-vae-ft-mse`: diffusers AutoencoderKL (`stabilityai/sd-vae-ft-{ema,mse}`, or a local
  diffusers folder written by `save_pretrained`, `--vae-weights DIR`). scaling_factor is the reference's
  constant 0.18215 (= `vae.config.scaling_factor` of both hub checkpoints; a warning is given if a loaded
  folder's config says otherwise). latent_channels / downsample are read from the loaded config.
- `pixel`: mean = image in [-1, 1], std = 0, downsample 1, 3 channels, scaling_factor 1.0; decode = identity.
- `tiny`: random-init AutoencoderKL, block_out_channels (16, 32, 32), norm groups 8, 1 layer per block,
  4 latent channels, downsample 4 (32x32 image -> 4x8x8 latent), built on CPU from seed 0 so every process
  gets the same weights; scaling_factor 0.18215 (same constant as the real codecs, so the scaling code paths
  are exercised); `is_random_init=True`. With `weights=DIR` it loads a saved AutoencoderKL folder instead.

`dtype` (fp32 default, bf16/fp16) is the compute dtype of the VAE; inputs are converted in fp32 first and
moments / images always come back float32. The SD VAE decoder is known to overflow in fp16 at high resolution:
prefer bf16 on GPU. `weights_hash` = `hash_state_dict` of the fp32 weights as loaded.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from repa_pipe.models import weights as W
from repa_pipe.models.registry import CODEC_NAMES, HUB_IDS, SD_SCALING_FACTOR
from repa_pipe.pipeline.errors import BadInputError, ConfigError
from repa_pipe.pipeline.hashing import hash_state_dict

TINY_SEED = 0
TINY_SCALING_FACTOR = 0.18215
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=TINY_SCALING_FACTOR,
)
OPTION = "--vae-weights DIR"


def _check_images(x: Tensor, downsample: int) -> None:
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise BadInputError(f"codec input must be a uint8 tensor [B, 3, H, W], got {got}")
    if x.shape[2] % downsample or x.shape[3] % downsample:
        raise BadInputError(
            f"image size {x.shape[2]}x{x.shape[3]} is not divisible by the codec downsample factor {downsample}"
        )


class LatentCodec(torch.nn.Module):
    """Base class. Subclasses implement `encode_moments` and `decode`; outputs are float32 on the codec device."""

    name: str
    latent_channels: int
    downsample: int
    scaling_factor: float
    moments: str = "mean_std"
    weights_id: str
    weights_hash: str
    is_random_init: bool

    def __init__(self, *, name: str, latent_channels: int, downsample: int, scaling_factor: float,
                 weights_id: str, weights_hash: str, is_random_init: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.name = name
        self.latent_channels = int(latent_channels)
        self.downsample = int(downsample)
        self.scaling_factor = float(scaling_factor)
        self.weights_id = weights_id
        self.weights_hash = weights_hash
        self.is_random_init = bool(is_random_init)
        self.dtype = dtype
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape `(C, h, w)` of a latent (half the moments' channels) for an image of this size."""
        return self.latent_channels, height // self.downsample, width // self.downsample

    def describe(self) -> dict:
        """JSON-able provenance: what a cache manifest records about the codec."""
        return {
            "name": self.name, "latent_channels": self.latent_channels, "downsample": self.downsample,
            "scaling_factor": self.scaling_factor, "moments": self.moments, "weights_id": self.weights_id,
            "weights_hash": self.weights_hash, "is_random_init": self.is_random_init,
        }

    def encode_moments(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.encode_moments(x)


class PixelCodec(LatentCodec):
    """Identity codec: the 'latent' is the image in [-1, 1] (std 0)."""

    def __init__(self, device="cpu"):
        super().__init__(name="pixel", latent_channels=3, downsample=1, scaling_factor=1.0,
                         weights_id="none", weights_hash="none", is_random_init=False)
        self.to(device)

    @torch.no_grad()
    def encode_moments(self, x: Tensor) -> Tensor:
        _check_images(x, 1)
        mean = x.to(self.device).float() / 127.5 - 1.0
        return torch.cat([mean, torch.zeros_like(mean)], dim=1)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return (z.to(self.device).float() / self.scaling_factor).clamp(-1.0, 1.0)


class VAECodec(LatentCodec):
    """A diffusers AutoencoderKL (the SD VAEs, or the tiny random one)."""

    def __init__(self, vae, *, name: str, scaling_factor: float, weights_id: str, is_random_init: bool,
                 device="cpu", dtype: torch.dtype = torch.float32):
        vae.eval().requires_grad_(False)
        cfg = vae.config
        super().__init__(
            name=name, latent_channels=cfg.latent_channels, downsample=2 ** (len(cfg.block_out_channels) - 1),
            scaling_factor=scaling_factor, weights_id=weights_id,
            weights_hash=hash_state_dict(vae.state_dict()), is_random_init=is_random_init, dtype=dtype,
        )
        self.vae = vae
        # nn.Module.to: diffusers' own .to() warns on every dtype cast (even with nothing kept in fp32)
        torch.nn.Module.to(self, device=device, dtype=dtype)

    @torch.no_grad()
    def encode_moments(self, x: Tensor) -> Tensor:
        _check_images(x, self.downsample)
        pixels = (x.to(self.device).float() / 127.5 - 1.0).to(self.dtype)
        dist = self.vae.encode(pixels).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).float()

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        if not isinstance(z, Tensor) or z.ndim != 4 or z.shape[1] != self.latent_channels:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise BadInputError(f"{self.name}.decode expects a latent [B, {self.latent_channels}, h, w], got {got}")
        z = (z.to(self.device).float() / self.scaling_factor).to(self.dtype)
        return self.vae.decode(z).sample.float().clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------------------------ loading
def build_tiny_vae(seed: int = TINY_SEED):
    """The `tiny` codec's AutoencoderKL, random-init on CPU from `seed` (identical in every process)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
    return vae


def _vae_folder(path: Path) -> tuple[Path, str | None]:
    if path.is_file():
        raise ConfigError(
            f"--vae-weights {path} is a file; expected a diffusers AutoencoderKL folder (config.json + "
            "diffusion_pytorch_model.safetensors/.bin, as written by save_pretrained or downloaded from the hub)"
        )
    if (path / "config.json").is_file():
        return path, None
    if (path / "vae" / "config.json").is_file():  # a full diffusers pipeline folder
        return path, "vae"
    raise ConfigError(f"--vae-weights {path} has no config.json (nor vae/config.json): not a diffusers VAE folder")


def _from_pretrained(source: str, **kwargs):
    """AutoencoderKL.from_pretrained in float32, quietly (no accelerate nag, no deprecation noise)."""
    import importlib.util

    from diffusers import AutoencoderKL

    kwargs.setdefault("low_cpu_mem_usage", importlib.util.find_spec("accelerate") is not None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return AutoencoderKL.from_pretrained(source, torch_dtype=torch.float32, **kwargs)


def _load_vae_folder(name: str, path: Path):
    folder, subfolder = _vae_folder(path)
    try:
        return _from_pretrained(str(folder), subfolder=subfolder, local_files_only=True)
    except Exception as err:
        raise ConfigError(f"{name}: cannot load --vae-weights {path} as AutoencoderKL "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err


def _load_vae_hub(name: str, hub_id: str):
    cache_dir = W.hub_cache_dir()

    def local():
        return _from_pretrained(hub_id, cache_dir=cache_dir, local_files_only=True)

    def remote():
        return _from_pretrained(hub_id, cache_dir=cache_dir)

    return W.fetch_from_hub(f"codec {name}", hub_id, OPTION, local, remote)


def load_codec(name: str, weights: str | None = None, device="cpu", dtype=torch.float32) -> LatentCodec:
    """Build a codec by name. `weights` = a local diffusers AutoencoderKL folder (`--vae-weights DIR`).

    Raises ConfigError for an unknown name / unusable folder, MissingWeightsError (within seconds, offline)
    when hub weights are neither cached nor downloadable or the given path does not exist.
    """
    if name not in CODEC_NAMES:
        raise ConfigError(f"unknown codec {name!r}; valid codecs: {', '.join(CODEC_NAMES)}")
    dtype = W.resolve_dtype(dtype)
    if name == "pixel":
        if weights is not None:
            raise ConfigError("the 'pixel' codec has no weights; drop --vae-weights")
        return PixelCodec(device=device)

    if weights is not None:
        path = W.local_path(weights, "--vae-weights", f"codec {name}")
        vae = _load_vae_folder(name, path)
        weights_id, random_init = str(path), False
    elif name == "tiny":
        vae = build_tiny_vae()
        weights_id, random_init = f"random-init(seed={TINY_SEED})", True
    else:
        vae = _load_vae_hub(name, HUB_IDS[name])
        weights_id, random_init = HUB_IDS[name], False

    if name == "tiny":
        scale = TINY_SCALING_FACTOR
    else:
        scale = SD_SCALING_FACTOR
        cfg_scale = getattr(vae.config, "scaling_factor", SD_SCALING_FACTOR)
        if abs(float(cfg_scale) - SD_SCALING_FACTOR) > 1e-9:
            warnings.warn(f"{name}: the loaded VAE config has scaling_factor {cfg_scale}; "
                          f"using the reference constant {SD_SCALING_FACTOR}")
    return VAECodec(vae, name=name, scaling_factor=scale, weights_id=weights_id, is_random_init=random_init,
                    device=device, dtype=dtype)
