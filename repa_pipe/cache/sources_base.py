"""Image sources, part 1: the ImageSource base class and image decoding (bytes -> RGB PIL image).

Decoding outcomes (every failure is a BadImageError, a BadInputError whose message is "<path>: <reason>"):
- zero-byte file                      -> "empty file (0 bytes)"
- not an image / unknown or cut header -> "not a decodable image (unknown format or damaged header)"
- data cut short (JPEG/PNG cut in half) -> "truncated image data (<PIL message>)"
- other decoder failures              -> "corrupt image data (<exception>: <message>)"
- more pixels than PIL's bomb limit    -> "image too large (<PIL message>)"
- a mode that cannot become RGB       -> "unsupported image mode <mode>"
- unreadable file / cut-off tar shard  -> "cannot read file (...)" / "tar shard truncated (...)"
- (load_preprocessed) sides over 200:1 -> "extreme aspect ratio WxH (more than 200:1)"
Not errors, converted to RGB with PIL's convert('RGB') exactly as the reference's `.convert('RGB')`: L, 1, LA, RGBA,
P (with or without transparency), PA, CMYK. Alpha is dropped, not composited, for parity with the reference.
16-bit grayscale (I;16, I;16B, I;16L, I;16N, and I as produced by some 16-bit decoders) is scaled to 8 bits by
taking the high byte (v >> 8), because PIL's convert('RGB') clips every value above 255 to white. This is the same
rule PIL itself applies when it opens 16-bit RGB PNGs as 8-bit RGB. EXIF orientation is ignored (the reference does
not apply it either), and the format comes from the file content, never its extension.
"""
from __future__ import annotations

import io
import operator
import warnings
from abc import ABC, abstractmethod

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from repa_pipe.cache.manifest import Dataset
from repa_pipe.pipeline.errors import BadInputError
from repa_pipe.pipeline.hashing import hash_lines, sha256_int64

# Lower-case file extensions (ImageFolder) and WebDataset member suffixes that count as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_SUFFIXES: frozenset[str] = frozenset(e[1:] for e in IMAGE_EXTENSIONS)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


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
    unusable while listing; read() raises for them; their index is kept so nothing shifts).
    Instances hold no open files, so they pickle cheaply into DataLoader workers.
    """

    kind: str
    root: str
    keys: list[str]
    labels: np.ndarray
    class_names: list[str] | None
    warnings: list[str]
    known_bad: dict[int, str]

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
