"""The options of `encode-latents` and `encode-features` (light: the CLI reads them to build --help)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from repa_pipe.cache.source_options import BYTES_PER_BUDGET_PIXEL, DEFAULT_MAX_MEGAPIXELS, SourceOptions
from repa_pipe.models.registry import CODEC_NAMES, ENCODERS
from repa_pipe.pipeline.config import check_at_least, check_choices, flag, option
from repa_pipe.pipeline.errors import ConfigError
from repa_pipe.pipeline.precision import ENCODE_NAMES as PRECISION_NAMES

DEFAULT_RESOLUTION = 256
# The largest crop accepted. The paper trains at 256 and 512 px; at 4096 px one decoded crop is already 48 MiB of
# uint8 and an sd-vae latent 512x512x4 per image, so a larger value is a typo, refused before a cache exists.
MAX_RESOLUTION = 4096


@dataclass(frozen=True)
class _Target:
    source: str = option(help="Images: an ImageFolder root (ROOT/<class>/<file>), a folder of WebDataset .tar "
                              "shards or of Hugging Face .parquet files, one shard, a pattern such as "
                              "'shards/train-{0000..0099}.tar' or 'data/train-*.parquet', or 'pipe:CMD' (webdataset's "
                              "streaming form).", metavar="PATH")
    cache: Path = option(help="Cache folder (created if new; arrays are added to an existing cache of the same "
                              "images).", metavar="DIR")


@dataclass(frozen=True)
class _Common:
    resolution: Optional[int] = option(None, "ADM center-crop size in pixels. Default: the cache's, or 256 for a "
                                             "new cache.", metavar="PX")
    shard_size: Optional[int] = option(None, "Samples per shard. Default: the cache's, or 1024 for a new cache.",
                                       metavar="N")
    batch_size: int = option(32, "Images per model forward.", metavar="N")
    workers: int = option(4, "Image-decoding loader processes per rank (0: decode in the main process).",
                          metavar="N")
    precision: str = option("auto", "Model compute precision: auto (tf32 on CUDA, fp32 on a CPU), fp32 (strict: "
                                    "TF32 off), tf32, bf16, fp16.", metavar="P", choices=PRECISION_NAMES)
    skip_bad: bool = option(False, "Record bad images and labels (path, reason) in the manifest and mark their "
                                   "rows invalid, instead of stopping at the first one.")
    num_classes: Optional[int] = option(None, "Labels must lie in [0, N), N at most 100,000 (ImageNet-21k has "
                                              "21,841). Default: the number of class folders of an ImageFolder; "
                                              "for tar shards the largest label + 1.", metavar="N")
    max_megapixels: float = option(DEFAULT_MAX_MEGAPIXELS, "Pixel budget: an image whose header declares more "
                                   "megapixels is a bad image (found before it is decoded).", metavar="MPX")
    max_image_mb: Optional[float] = option(None, "Byte cap per image file, tar member or parquet value, checked "
                                           "before it is read (a bad image when over). Default: 4 bytes per pixel of "
                                           "--max-megapixels (256 MB).", metavar="MB")
    follow_links: bool = option(False, "ImageFolder: follow symbolic links to folders and links leading outside "
                                       "the source folder (each real folder listed once); by default they are "
                                       "skipped with a warning.")
    unlabeled: bool = option(False, "Tar or parquet shards without labels (label -1 in Hugging Face parquet): every "
                                    "image gets label 0 of one class.")
    spool: Optional[str] = option(None, "Folder where each 'pipe:' shard is copied once and kept (reused by a "
                                        "resumed run or the other encode stage). Default: a temporary folder, "
                                        "removed at exit.", metavar="DIR")

    def _check_common(self) -> None:
        check_choices(self)
        check_at_least(self, ("batch_size", "shard_size", "resolution", "num_classes"), 1)
        check_at_least(self, ("workers",), 0)
        if self.resolution is not None and self.resolution > MAX_RESOLUTION:
            raise ConfigError(f"--resolution {self.resolution}: at most {MAX_RESOLUTION} px (one decoded crop of "
                              f"{self.resolution} px would take {3 * self.resolution ** 2 / 2 ** 30:.1f} GiB)")
        from repa_pipe.cache.manifest import MAX_CLASSES  # here: the manifest module is not light (--help)
        if self.num_classes is not None and self.num_classes > MAX_CLASSES:
            raise ConfigError(f"--num-classes {self.num_classes}: at most {MAX_CLASSES:,} (the class embedding "
                              "of a model trained on the cache grows with it)")
        for name in ("max_megapixels", "max_image_mb"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{flag(name)} must be a positive number, got {v}")

    def source_options(self) -> SourceOptions:
        """The source options of this command, the byte cap resolved."""
        mb = self.max_image_mb if self.max_image_mb is not None else BYTES_PER_BUDGET_PIXEL * self.max_megapixels
        return SourceOptions(unlabeled=self.unlabeled, follow_links=self.follow_links, max_bytes=int(mb * 1e6),
                             spool=self.spool)


@dataclass(frozen=True)
class _Latents:
    vae: str = option("sd-vae-ft-mse", "VAE: sd-vae-ft-mse (the reference's) or sd-vae-ft-ema (diffusers "
                                       "AutoencoderKL; one encoder), pixel (the image itself in [-1, 1]), tiny "
                                       "(random-init, for tests).", metavar="NAME", choices=CODEC_NAMES)
    vae_weights: Optional[str] = option(None, "Local diffusers VAE folder (save_pretrained layout) instead of the "
                                              "hub id.", metavar="DIR")
    dtype: str = option("float32", "Stored moments dtype.", metavar="DTYPE", choices=("float32", "float16"))


@dataclass(frozen=True)
class EncodeLatentsConfig(_Common, _Latents, _Target):
    def __post_init__(self) -> None:
        self._check_common()


@dataclass(frozen=True)
class _Features:
    encoder: str = option("dinov2-b", "Pretrained encoder (ijepa-h and mocov3-* need --encoder-weights; tiny is "
                                      "random-init unless given --encoder-weights).", metavar="NAME",
                          choices=ENCODERS)
    encoder_weights: Optional[str] = option(None, "Encoder weights file (timm state dict or the encoder's "
                                                  "official format) instead of the hub.", metavar="FILE")
    grid: Optional[int] = option(None, "Token grid per side. Default: a patch-2 SiT's grid on the cache's "
                                       "latents, or resolution/16 without latents.", metavar="N")
    feature_dtype: str = option("float16", "Stored feature dtype: float16, float32, or int8 (each token "
                                           "quantized on its absmax with a float32 scale: 0.50x float16's bytes; "
                                           "read back as float16, docs/cache.md).", metavar="DTYPE",
                                choices=("float16", "float32", "int8"))
    with_cls: bool = option(False, "Also store the encoder's class token (after its final norm) as the array "
                                   "cls/<encoder>, beside the patch tokens; training ignores it.")


@dataclass(frozen=True)
class EncodeFeaturesConfig(_Common, _Features, _Target):
    def __post_init__(self) -> None:
        check_at_least(self, ("grid",), 1)
        self._check_common()
