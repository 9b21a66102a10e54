"""Image sources for the encoders: ImageFolder / WebDataset / parquet listing, decoding, the ADM center crop, a
DataLoader dataset.

The pieces live in sources_base.py (ImageSource, decoding rules, byte cap, names), sources_folder.py,
sources_webdataset.py, sources_parquet.py; import everything from here. This module never imports repa_pipe.models.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from repa_pipe.cache.sources_base import (IMAGE_EXTENSIONS, BadImageError, ImageSource, SourceOptions, decode_image,
                                          is_pattern, to_rgb)
from repa_pipe.cache.sources_folder import ImageFolderSource
from repa_pipe.cache.sources_parquet import ParquetSource
from repa_pipe.cache.sources_webdataset import WebDatasetSource
from repa_pipe.pipeline.errors import BadInputError

__all__ = [
    "IMAGE_EXTENSIONS", "BadImageError", "ImageSource", "ImageFolderSource", "WebDatasetSource", "ParquetSource",
    "SourceOptions", "open_source", "decode_image",
    "to_rgb", "adm_center_crop", "load_preprocessed", "MAX_ASPECT_RATIO", "PreprocessedImages", "PreprocessedBatch",
    "collate_preprocessed",
]

# load_preprocessed refuses images longer than this many times their short side: the ADM crop would first resize the
# whole image to short side = resolution (a 1x100000 strip at 256 px is a 20 GB array) and kill the run on OOM.
MAX_ASPECT_RATIO = 200


_SHARD_KINDS = {".tar": WebDatasetSource, ".parquet": ParquetSource}


def open_source(spec: str | os.PathLike, num_classes: int | None = None,
                opts: SourceOptions | None = None) -> ImageSource:
    """Open an image source from what the user typed.

    - `pipe:CMD` (a brace pattern allowed in CMD) -> WebDatasetSource, each command's output spooled
    - an existing path: a .tar or .parquet file, or a folder holding only .tar files, or .parquet files
      -> WebDatasetSource / ParquetSource; any other folder -> ImageFolderSource (its class folders)
    - no such path, but a pattern (braces, glob characters, or a '::' list) of .tar or of .parquet files
      -> WebDatasetSource / ParquetSource. An existing path is never read as a pattern ('imgs{1}' is a folder).
    A missing path, a file of another kind, shards mixed with class folders or with shards of the other kind
    -> BadInputError.
    """
    spec = os.fspath(spec)
    opts = opts or SourceOptions()
    if spec.startswith("pipe:"):
        return WebDatasetSource(spec, num_classes, opts)
    p = Path(spec).expanduser()
    if not p.exists():
        if not is_pattern(spec):
            raise BadInputError(f"{spec}: no such file or directory")
        return _open_pattern(spec, num_classes, opts)
    if p.is_file():
        cls = _SHARD_KINDS.get(p.suffix.lower())
        if cls is None:
            raise BadInputError(f"{spec}: not a folder, a .tar or a .parquet file (expected an ImageFolder "
                                "ROOT/<class>/<image>, a folder of .tar or .parquet shards, one shard, or a pattern)")
        return cls(spec, num_classes, opts)
    entries = [e for e in p.iterdir() if not e.name.startswith(".")]
    kinds = {e.suffix.lower() for e in entries if e.suffix.lower() in _SHARD_KINDS and e.is_file()}
    if len(kinds) > 1:
        raise BadInputError(f"{spec}: holds both .tar and .parquet files; point at one kind (a pattern or a folder)")
    if kinds:
        if any(e.is_dir() for e in entries):
            raise BadInputError(f"{spec}: holds both {next(iter(kinds))} files and folders; point at the shards (a "
                                "pattern or a folder of only shards) or at an ImageFolder")
        return _SHARD_KINDS[kinds.pop()](spec, num_classes, opts)
    return ImageFolderSource(spec, num_classes, opts)


def _open_pattern(spec: str, num_classes: int | None, opts: SourceOptions) -> ImageSource:
    """A missing path that looks like a pattern: shards of one kind, else one line saying what is wrong, "no such
    file or directory" when the spec is no pattern of shards and names nothing (a mistyped folder with a '{')."""
    from webdataset.shardlists import expand_urls  # webdataset's own pattern expansion, as in a pipeline

    try:
        urls = expand_urls(spec)
    except ValueError:  # braceexpand's UnbalancedBracesError: a path with a stray '{', not a pattern
        urls = []
    suffixes = {Path(u).suffix.lower() for u in urls}
    if len(suffixes) == 1 and next(iter(suffixes)) in _SHARD_KINDS:
        return _SHARD_KINDS[suffixes.pop()](spec, num_classes, opts)
    if not any(glob.glob(os.path.expanduser(u)) for u in urls):
        raise BadInputError(f"{spec}: no such file or directory" + (", and as a pattern it matches no file" if urls
                                                                    and urls != [spec] else ""))
    raise BadInputError(f"{spec}: a pattern must name only .tar files or only .parquet files")


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
