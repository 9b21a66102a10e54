"""Image sources, part 1: the ImageSource base class and image decoding (bytes -> RGB PIL image).

Decoding outcomes (every failure is a BadImageError, a BadInputError whose message is "<path>: <reason>"):
- zero-byte file                      -> "empty file (0 bytes)"
- not an image / unknown or cut header -> "not a decodable image (unknown format or damaged header)"
- data cut short (JPEG/PNG cut in half) -> "truncated image data (<PIL message>)"
- other decoder failures              -> "corrupt image data (<exception>: <message>)"
- more pixels than PIL's bomb limit    -> "image too large (<PIL message>)"
- a mode that cannot become RGB       -> "unsupported image mode <mode>"
- unreadable file / cut-off tar shard  -> "cannot read file (...)" / "tar shard truncated (...)"
- not a regular file (FIFO, device...) -> "not a regular file (<kind>)", found before the file is opened
- more bytes than the per-image cap    -> "<n> bytes, over the per-image cap of <cap> bytes (--max-image-mb)"
- (load_preprocessed) sides over 200:1 -> "extreme aspect ratio WxH (more than 200:1)"
Not errors, converted to RGB with PIL's convert('RGB') exactly as the reference's `.convert('RGB')`: L, 1, LA, RGBA,
P (with or without transparency), PA, CMYK. Alpha is dropped, not composited, for parity with the reference.
16-bit grayscale (I;16, I;16B, I;16L, I;16N, and I as produced by some 16-bit decoders) is scaled to 8 bits by
taking the high byte (v >> 8), because PIL's convert('RGB') clips every value above 255 to white. This is the same
rule PIL itself applies when it opens 16-bit RGB PNGs as 8-bit RGB. EXIF orientation is ignored (the reference does
not apply it either), and the format comes from the file content, never its extension.
"""
from __future__ import annotations

import glob
import io
import operator
import os
import re
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from repa_pipe.cache.manifest import Dataset
from repa_pipe.cache.source_options import SourceOptions
from repa_pipe.pipeline.errors import BadInputError
from repa_pipe.pipeline.fileio import not_regular
from repa_pipe.pipeline.hashing import hash_lines, sha256_int64

# Lower-case file extensions (ImageFolder) and WebDataset member suffixes that count as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_SUFFIXES: frozenset[str] = frozenset(e[1:] for e in IMAGE_EXTENSIONS)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def over_cap(size: int, cap: int) -> str | None:
    """The reason for an image of `size` bytes over the per-image cap, else None."""
    return None if size <= cap else f"{size} bytes, over the per-image cap of {cap} bytes (--max-image-mb)"


def read_regular_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` bytes, else BadImageError.

    The type is checked before opening (opening a device can have effects) and again on the open descriptor (the
    file may have been swapped); O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer."""
    try:
        why = not_regular(os.stat(path).st_mode)
        if why:
            raise BadImageError(path, why)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise BadImageError(path, f"cannot read file ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        why = not_regular(st.st_mode) or over_cap(st.st_size, max_bytes)
        if why:
            raise BadImageError(path, why)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)  # +1: a file that grew since fstat is still caught
    except OSError as e:
        raise BadImageError(path, f"cannot read file ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise BadImageError(path, f"more than {max_bytes} bytes (it grew while read), over the per-image cap "
                                  "(--max-image-mb)")
    return data


# Characters str.splitlines() breaks a line at: a key holding one would not round-trip through index/keys.txt.
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_BAD_KEY_CHAR = re.compile(f"[{_LINE_BREAKS}\ud800-\udfff]")


def check_names(names: Sequence[str], where: Callable[[int], str], what: str = "file or folder name") -> None:
    """Refuse the source when a sample key (or class name) holds a line break or is not valid UTF-8.

    Keys are stored one per line in index/keys.txt, so such a name would be split on reading; a name that is not
    UTF-8 (os gives it back with surrogate escapes) cannot be written there at all. One pass over all names."""
    joined = "\0".join(names)  # NUL cannot occur in a file name, so it marks the boundaries
    m = _BAD_KEY_CHAR.search(joined)
    if m is None:
        return
    i = joined.count("\0", 0, m.start())
    if "\ud800" <= m.group() <= "\udfff":
        why = "is not valid UTF-8"
    else:
        why = f"holds a line break ({m.group()!r})"
    raise BadInputError(f"{shown(where(i))}: the {what} {why}; rename it (sample keys are stored one per line as "
                        "UTF-8 in the cache's index/keys.txt)")


def _escaped(c: str) -> str:
    """One character that cannot be printed as it is: a byte that was not UTF-8 (os gives it back as a surrogate
    escape) as that byte, `\\xff`; anything else as Python escapes it (`\\n`, `\\u2028`)."""
    if "\udc80" <= c <= "\udcff":
        return repr(os.fsencode(c))[2:-1]
    return ascii(c)[1:-1]


def shown(path: str) -> str:
    """A path for a one-line message: line breaks and undecodable bytes escaped, the rest as it is."""
    return "".join(c if c.isprintable() else _escaped(c) for c in path)


def is_pattern(spec: str) -> bool:
    """Whether --source is a shard pattern (braces, glob characters or a '::' list) rather than a path: only
    when no file or folder of that name exists, so a folder named 'imgs{1}' stays a folder."""
    return (any(c in spec for c in "{*?[") or "::" in spec) and not os.path.lexists(os.path.expanduser(spec))


def sorted_unique(paths: list[Path], spec: str, noun: str) -> list[Path]:
    """Shard paths sorted by file name; file names must be unique (they are the first part of every key)."""
    paths = sorted(paths, key=lambda q: q.name)
    names = [q.name for q in paths]
    dup = next((a for a, b in zip(names, names[1:]) if a == b), None)  # sorted: duplicates are adjacent
    if dup is not None:
        raise BadInputError(f"{spec}: several {noun}s are named {dup}; file names must be unique")
    return paths


def expand_shards(spec: str, suffix: str) -> list[Path]:
    """A folder of `suffix` files, one file, a brace pattern ('shard-{0000..0099}.tar', webdataset's expander),
    a glob ('data/train-*.parquet') or a '::'-separated list of these -> the shard paths, each an existing
    file. Order as given; callers sort."""
    if is_pattern(spec):
        from webdataset.shardlists import expand_urls  # the same expansion webdataset pipelines apply

        paths: list[Path] = []
        for u in expand_urls(spec):
            if any(c in u for c in "*?[") and not os.path.lexists(os.path.expanduser(u)):
                found = sorted(glob.glob(os.path.expanduser(u)))
                if not found:
                    raise BadInputError(f"{spec}: the pattern {u} matches no file")
                paths += [Path(q) for q in found]
            else:
                paths.append(Path(u).expanduser())
        missing = [str(q) for q in paths if not q.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise BadInputError(f"{spec}: shard {missing[0]} does not exist{more}")
        return paths
    p = Path(spec).expanduser()
    if not p.exists():
        raise BadInputError(f"{spec}: no such file or directory")
    if p.is_dir():
        paths = [q for q in p.iterdir() if q.suffix.lower() == suffix and q.is_file() and not q.name.startswith(".")]
        if not paths:
            raise BadInputError(f"{spec}: no {suffix} files in this folder")
        return paths
    return [p]


class BadImageError(BadInputError):
    """One sample cannot be used. str() = "<where>: <reason>"; .where and .reason are kept apart so a caller can
    record the short reason next to the sample's key without repeating the path."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason

    def __reduce__(self):  # pickle (DataLoader workers, torch.distributed objects) with both fields
        return (type(self), (self.where, self.reason))


def to_rgb(img: Image.Image, where: str = "image") -> Image.Image:
    """Convert a decoded image of any supported mode to RGB (rules in the module docstring)."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        # Stay at the decoder's width (uint16, or int32 for mode I; never a copy widened to int64): clip negative
        # or >16-bit values, then keep the high byte. Big-endian I;16B shifts by value like any other.
        a = np.asarray(img)
        if a.dtype.kind == "i":
            a = np.clip(a, 0, 65535)
        gray = (a >> 8).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2)))
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImageError(where, f"unsupported image mode {img.mode} ({e})") from None


def decode_image(data: bytes, where: str, max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes fully (img.load() inside the try, so truncation is caught here) and return RGB.

    An image whose header declares more than `max_pixels` pixels is refused before its pixels are decoded
    (a 280 KB PNG can declare 144 megapixels: several GB once decoded)."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # With this flag PIL silently pads cut-off images with gray; we would cache broken pixels without a word.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; repa_pipe needs it False to detect "
                           "truncated images")
    if len(data) == 0:
        raise BadImageError(where, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # the pixel budget below replaces PIL's bomb warning (its error stays)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise BadImageError(where, f"image is {w}x{h} ({w * h / 1e6:.1f} megapixels), over the pixel budget of "
                                       f"{max_pixels / 1e6:g} megapixels (--max-megapixels)")
        img.load()
    except BadImageError:
        raise
    except MemoryError:
        raise BadImageError(where, "out of memory while decoding (lower --max-megapixels or --workers)") from None
    except Image.DecompressionBombError as e:
        raise BadImageError(where, f"image too large ({e})") from None
    except UnidentifiedImageError:
        raise BadImageError(where, "not a decodable image (unknown format or damaged header)") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, ...
        msg = str(e)
        if "truncat" in msg.lower():
            raise BadImageError(where, f"truncated image data ({msg})") from None
        raise BadImageError(where, f"corrupt image data ({type(e).__name__}: {msg})") from None
    return to_rgb(img, where)


class ImageSource(ABC):
    """A random-access, canonical-order list of (key, label, image).

    Attributes: kind, root, keys (canonical order), labels ((N,) int64, -1 = no usable label), class_names
    (or None), warnings (human-readable notes found while listing), known_bad (index -> reason for samples found
    unusable while listing; read() raises for them; their index is kept so nothing shifts), opts (how it was
    listed and is read: links, byte cap, labels), damaged (shard path -> why it could not be read in full; a
    `shard_noun` each) for sources made of shards.
    Instances hold no open files, so they pickle cheaply into DataLoader workers.
    """

    kind: str
    root: str
    keys: list[str]
    labels: np.ndarray
    class_names: list[str] | None
    warnings: list[str]
    known_bad: dict[int, str]
    opts: SourceOptions = SourceOptions()
    # Shards that could not be read in full (path -> reason); the encode stages refuse them unless --skip-bad.
    damaged: dict[str, str] = {}
    shard_noun: str = "shard"

    def __len__(self) -> int:
        return len(self.keys)

    def _index(self, i: int) -> int:
        i = operator.index(i)
        if not 0 <= i < len(self.keys):
            raise IndexError(f"sample index {i} out of range for a source of {len(self.keys)} samples")
        return i

    @abstractmethod
    def where(self, i: int) -> str:
        """Where sample i lives, for messages: a file path, or '<tar path>/<member name>'."""

    @abstractmethod
    def read_bytes(self, i: int) -> bytes:
        """The encoded bytes of sample i; raises BadInputError when they cannot be read."""

    def read(self, i: int, max_pixels: int | None = None) -> Image.Image:
        """Decoded RGB image of sample i; raises BadInputError("<path>: <reason>")."""
        i = self._index(i)
        if i in self.known_bad:
            raise BadImageError(self.where(i), self.known_bad[i])
        return decode_image(self.read_bytes(i), self.where(i), max_pixels)

    _num_classes: int | None = None  # set from --num-classes

    @property
    def num_classes(self) -> int:
        """--num-classes when given, else the class folders, else the largest usable label + 1."""
        if self._num_classes is not None:
            return self._num_classes
        if self.class_names is not None:
            return len(self.class_names)
        usable = self.labels[self.labels >= 0]
        return int(usable.max()) + 1 if len(usable) else 0

    def dataset(self) -> Dataset:
        """The manifest's record of this source. file_list_sha256 = hash_lines(keys), i.e. the sha256 of a
        keys.txt written one key per line with '\\n' endings; labels_sha256 = sha256 of the labels as
        little-endian int64."""
        names = tuple(self.class_names) if self.class_names is not None else None
        return Dataset(kind=self.kind, root=self.root, n=len(self.keys), num_classes=self.num_classes,
                       file_list_sha256=hash_lines(self.keys), labels_sha256=sha256_int64(self.labels),
                       class_names=names, notes=tuple(self.notes()))

    def notes(self) -> list[str]:
        """What listing found that the manifest should keep (samples unusable at listing time, ...)."""
        return [f"{len(self.known_bad)} sample(s) unusable at listing time"] if self.known_bad else []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, N={len(self)}, num_classes={self.num_classes})"
