"""Image sources for the encoders: ImageFolder / WebDataset listing, decoding, the ADM center crop, a DataLoader
dataset.

The pieces live in sources_base.py (ImageSource, decoding rules), sources_folder.py, sources_webdataset.py; import
everything from here. This module never imports repa_pipe.models.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from repa_pipe.cache.sources_base import IMAGE_EXTENSIONS, BadImageError, ImageSource, decode_image, to_rgb
from repa_pipe.cache.sources_folder import ImageFolderSource
from repa_pipe.cache.sources_webdataset import WebDatasetSource
from repa_pipe.pipeline.errors import BadInputError

__all__ = [
    "IMAGE_EXTENSIONS", "BadImageError", "ImageSource", "ImageFolderSource", "WebDatasetSource", "open_source", "decode_image",
    "to_rgb", "adm_center_crop", "load_preprocessed", "MAX_ASPECT_RATIO", "PreprocessedImages", "PreprocessedBatch",
    "collate_preprocessed",
]

# load_preprocessed refuses images longer than this many times their short side: the ADM crop would first resize the
# whole image to short side = resolution (a 1x100000 strip at 256 px is a 20 GB array) and kill the run on OOM.
MAX_ASPECT_RATIO = 200


def open_source(spec: str | os.PathLike, num_classes: int | None = None) -> ImageSource:
    """Open an image source from what the user typed.

    - a brace pattern ("data/shard-{000000..000009}.tar"), a single .tar file, or a folder holding .tar files
      -> WebDatasetSource
    - a folder of class folders -> ImageFolderSource
    A missing path, a file that is not a .tar, or a folder with both .tar files and class folders -> BadInputError.
    """
    spec = os.fspath(spec)
    if "{" in spec:
        return WebDatasetSource(spec, num_classes)
    p = Path(spec).expanduser()
    if not p.exists():
        raise BadInputError(f"{spec}: no such file or directory")
    if p.is_file():
        if p.suffix.lower() != ".tar":
            raise BadInputError(f"{spec}: not a folder or a .tar shard (expected an ImageFolder ROOT/<class>/<image>, "
                                f"a folder of .tar shards, a .tar file or a brace pattern)")
        return WebDatasetSource(spec, num_classes)
    entries = [e for e in p.iterdir() if not e.name.startswith(".")]
    has_tars = any(e.suffix.lower() == ".tar" and e.is_file() for e in entries)
    if has_tars:
        if any(e.is_dir() for e in entries):
            raise BadInputError(f"{spec}: holds both .tar files and folders; point at the shards (a pattern or a "
                                f"folder of only .tar files) or at an ImageFolder")
        return WebDatasetSource(spec, num_classes)
    return ImageFolderSource(spec, num_classes)


def adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """The ADM ("dhariwal") center crop of the reference preprocessing, bit-exact.

    Halve with BOX while the short side is >= 2*size, resize with BICUBIC to (round(W*s), round(H*s)) with
    s = size / short side, then crop size x size at the floor-centered offset. An image whose short side is already
    below `size` is upsampled by that same BICUBIC resize, exactly as the reference would do. Non-RGB input is
    converted with to_rgb first (the reference converts to RGB before cropping).
    """
    if size < 1:
        raise ValueError(f"crop size must be >= 1, got {size}")
    if img.mode != "RGB":
        img = to_rgb(img)
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = size / min(*img.size)
    # Same float expression and Python round() (half to even) as the reference, so sizes match to the pixel.
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.Resampling.BICUBIC)
    left = (img.width - size) // 2
    top = (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_preprocessed(source: ImageSource, i: int, resolution: int, max_pixels: int | None = None) -> np.ndarray:
    """Sample i decoded, RGB, ADM-cropped: uint8 (resolution, resolution, 3). Raises BadInputError for a bad image
    (including one over the pixel budget `max_pixels`, or with an aspect ratio above MAX_ASPECT_RATIO)."""
    img = source.read(i, max_pixels)
    w, h = img.size
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise BadImageError(source.where(i), f"extreme aspect ratio {w}x{h} (more than {MAX_ASPECT_RATIO}:1)")
    return np.array(adm_center_crop(img, resolution), dtype=np.uint8)


class PreprocessedImages:
    """Map-style dataset for torch.utils.data.DataLoader (workers included): item j = (index, image, reason).

    index = indices[j] (the source index; indices=None means all samples, so j == index), image = uint8 (R, R, 3) or
    None, reason = the short reason (e.g. "truncated image data (...)") or None; the path is source.where(index).
    Bad images never raise inside a worker (an exception there would lose which image it was); they come back with
    their reason, and the caller stops with the path or records them as invalid (--skip-bad). Batch with
    `collate_fn=collate_preprocessed` (the default collate cannot handle None). Plain class, no torch import: a
    DataLoader only needs __len__/__getitem__.
    """

    def __init__(self, source: ImageSource, indices: Sequence[int] | None, resolution: int,
                 max_pixels: int | None = None) -> None:
        self.source = source
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        self.resolution = int(resolution)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, np.ndarray | None, str | None]:
        i = int(j) if self.indices is None else int(self.indices[j])
        try:
            return i, load_preprocessed(self.source, i, self.resolution, self.max_pixels), None
        except BadImageError as e:
            return i, None, e.reason


@dataclass
class PreprocessedBatch:
    """A batch from collate_preprocessed. Rows of bad images are zeros with valid False and their reason set."""

    indices: np.ndarray  # (B,) int64 source indices
    images: np.ndarray  # (B, R, R, 3) uint8
    valid: np.ndarray  # (B,) bool
    reasons: list[str | None]  # short reasons; the path of row k is source.where(indices[k])


def collate_preprocessed(items: Sequence[tuple[int, np.ndarray | None, str | None]]) -> PreprocessedBatch:
    """collate_fn for PreprocessedImages: stack images, zero-fill bad rows, keep every index in place."""
    shape = next((a.shape for _, a, _ in items if a is not None), None)
    if shape is None:  # every image in the batch is bad: the size is unknown here and does not matter
        shape = (0, 0, 3)
    images = np.zeros((len(items), *shape), dtype=np.uint8)
    for k, (_, a, _) in enumerate(items):
        if a is not None:
            images[k] = a
    return PreprocessedBatch(
        indices=np.asarray([i for i, _, _ in items], dtype=np.int64),
        images=images,
        valid=np.asarray([a is not None for _, a, _ in items], dtype=bool),
        reasons=[r for _, _, r in items],
    )
