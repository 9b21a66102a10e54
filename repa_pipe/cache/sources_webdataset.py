"""Image sources, part 3: WebDataset tar shards, indexed once at open for random access."""
from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from repa_pipe.cache.manifest import MAX_CLASSES
from repa_pipe.cache.sources_base import IMAGE_SUFFIXES, BadImageError, ImageSource
from repa_pipe.pipeline.errors import BadInputError

_BLOCK = tarfile.BLOCKSIZE  # 512: tar headers, padding and the end-of-archive marker come in these


def expand_tar_spec(spec: str) -> list[Path]:
    """A folder of .tar files, one .tar file, or a brace pattern ("shard-{000000..000009}.tar") -> tar paths.

    Brace patterns are expanded with webdataset's own expander, so the same string means the same shards here and in
    a webdataset pipeline. Every named tar must exist.
    """
    if "{" in spec:
        from webdataset.shardlists import expand_urls  # imported here: it is only needed for patterns

        paths = [Path(u).expanduser() for u in expand_urls(spec)]
        missing = [str(q) for q in paths if not q.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise BadInputError(f"{spec}: shard {missing[0]} does not exist{more}")
        return paths
    p = Path(spec).expanduser()
    if not p.exists():
        raise BadInputError(f"{spec}: no such file or directory")
    if p.is_dir():
        paths = [q for q in p.iterdir() if q.suffix.lower() == ".tar" and q.is_file() and not q.name.startswith(".")]
        if not paths:
            raise BadInputError(f"{spec}: no .tar files in this folder")
        return paths
    return [p]


@dataclass
class _TarScan:
    """What one pass over a tar's headers found."""

    members: list[tarfile.TarInfo] = field(default_factory=list)  # regular files, in tar order
    size: int = 0                                                 # bytes in the file
    damage: str | None = None                                     # why the tar is damaged, None when intact


def _scan_tar(path: str) -> _TarScan:
    """Every member header up to the end-of-archive marker, or up to the damage (a file cut off part way, a
    header that does not parse). Raises BadInputError only for a tar that cannot be opened at all."""
    scan = _TarScan()
    try:
        scan.size = os.path.getsize(path)
        tf = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise BadInputError(f"{path}: not a readable uncompressed tar file ({e})") from None
    error = None
    with tf:
        while True:
            try:
                m = tf.next()
            except (tarfile.TarError, OSError, EOFError, ValueError) as e:
                error = e
                break
            if m is None:
                break
            if m.isreg():
                scan.members.append(m)
        end = tf.offset  # where the next header would start: the marker, the damage, or past a cut-off member
    cut = next((m for m in scan.members if m.offset_data + m.size > scan.size), None)
    if cut is not None:
        scan.damage = f"truncated: the file ends at byte {scan.size}, inside member {cut.name}"
    elif end > scan.size:  # tarfile's "unexpected end of data": the last member's padding is cut off
        scan.damage = f"truncated: the file ends at byte {scan.size}, inside the padding of its last member"
    elif error is not None:
        scan.damage = f"unreadable after byte {end} ({error})"
    else:
        # tarfile stops silently at a cut-off or unparsable header; a complete tar ends with zero blocks there.
        with open(path, "rb") as f:
            f.seek(end)
            tail = f.read(_BLOCK)
        if not tail:
            scan.damage = f"truncated: the file ends at byte {end} with no end-of-archive marker"
        elif tail.strip(b"\0"):
            scan.damage = (f"unreadable tar header at byte {end}" if len(tail) == _BLOCK else
                           f"truncated: the file ends at byte {scan.size}, inside a member header")
    return scan


class WebDatasetSource(ImageSource):
    """Samples from WebDataset tar shards: members KEY.jpg|jpeg|png|webp (any case) with KEY.cls = integer label.

    - Keys and suffixes are split as webdataset does (KEY = member name up to the first '.' of its base name).
      Members of one KEY are grouped even when not adjacent in the tar (webdataset's stream reader would split them).
    - Order: tars sorted by file name, samples in tar order (first member of each KEY).
      key = "<tar file name>/<KEY>"; tar file names must therefore be unique.
    - A sample with no .cls, an unparsable, negative or out-of-range .cls (>= num_classes, or 100,000 when not
      given), several .cls, or several image members keeps its index, gets label -1 (no usable label) or its
      parsed label, and is listed in `known_bad`; read() raises for it.
    - Members with other suffixes (.json, .txt, ...) are ignored; a .cls with no image is not a sample (warning).
    - A damaged tar (cut off part way, or a header that does not parse) keeps the samples listed before the
      damage; a member whose data runs past the end of the file is a known-bad sample ("tar shard truncated ...").
      A tar that cannot be opened at all contributes no samples. Each damaged tar is in `damaged` (path -> reason),
      in `warnings` and in `notes()`; the encode stages refuse a damaged source unless --skip-bad.
    - Only uncompressed tars (random access by byte offset). Image bytes are read by (offset, size) at read time.
    """

    kind = "webdataset"

    def __init__(self, spec: str, num_classes: int | None = None) -> None:
        paths = expand_tar_spec(spec)
        bound = num_classes or MAX_CLASSES
        self.root = spec if "{" in spec else str(Path(spec).expanduser().resolve())
        paths = sorted(paths, key=lambda q: q.name)
        names = [q.name for q in paths]
        dup = [a for a, b in zip(names, names[1:]) if a == b]  # names are sorted, so duplicates are adjacent
        if dup:
            raise BadInputError(f"{spec}: several shards are named {dup[0]}; tar file names must be unique")
        self.tar_paths = [str(q.resolve()) for q in paths]
        self.class_names = None
        self.warnings = []
        self.known_bad = {}
        self.damaged: dict[str, str] = {}
        keys: list[str] = []
        labels: list[int] = []
        tar_ids: list[int] = []
        offsets: list[int] = []
        sizes: list[int] = []
        exts: list[str] = []
        ext_pool: dict[str, str] = {}  # one str object per distinct suffix, so 1M samples do not hold 1M copies
        for t, path in enumerate(self.tar_paths):
            first = len(keys)
            try:
                samples = self._index_tar(path)
            except BadInputError as e:
                self.damaged[path] = str(e).removeprefix(f"{path}: ")
                self.warnings.append(f"{path}: damaged tar shard ({self.damaged[path]}); none of its samples is used")
                continue
            for prefix, images, cls_label, cls_problem in samples:
                i = len(keys)
                keys.append(f"{names[t]}/{prefix}")
                tar_ids.append(t)
                offsets.append(images[0][1])
                sizes.append(images[0][2])
                exts.append(ext_pool.setdefault(images[0][0], images[0][0]))
                if cls_label >= bound:
                    cls_problem = (f"label {cls_label} out of range [0, {bound})"
                                   + ("" if num_classes else " (pass --num-classes for more than 100,000 classes)"))
                    cls_label = -1
                labels.append(cls_label)
                if len(images) > 1:
                    self.known_bad[i] = "several image members (" + ", ".join(f"{prefix}.{x[0]}" for x in images) + ")"
                elif cls_problem:
                    self.known_bad[i] = cls_problem
            if path in self.damaged:
                lost = sum(1 for i in range(first, len(keys)) if i in self.known_bad)
                self.warnings.append(f"{path}: damaged tar shard ({self.damaged[path]}); {len(keys) - first} "
                                     f"sample(s) listed before the damage, {lost} of them unusable")
        if not keys:
            why = "".join(f"; {p}: {r}" for p, r in self.damaged.items())
            raise BadInputError(f"{spec}: no image samples found in {len(paths)} tar file(s){why}")
        self.keys = keys
        self.labels = np.asarray(labels, dtype=np.int64)
        self._num_classes = num_classes
        self._tar_ids = np.asarray(tar_ids, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._exts = exts
        if self.known_bad:
            first = min(self.known_bad)
            self.warnings.append(f"{len(self.known_bad)} sample(s) unusable at listing time, e.g. "
                                 f"{self.where(first)}: {self.known_bad[first]}")

    def _index_tar(self, path: str) -> list[tuple[str, list[tuple[str, int, int]], int, str | None]]:
        """[(KEY, [(image suffix as written, data offset, size), ...], label or -1, problem or None)] in tar order.

        A damaged tar is recorded in `self.damaged` and yields the samples listed before the damage; BadInputError
        for a tar that cannot be opened at all."""
        from webdataset.tariterators import base_plus_ext

        scan = _scan_tar(path)
        if scan.damage is not None:
            self.damaged[path] = scan.damage
        samples: dict[str, tuple[list, list]] = {}  # KEY -> (image members, cls members)
        for m in scan.members:
            prefix, suffix = base_plus_ext(m.name)
            if prefix is None:
                continue
            low = suffix.lower()
            if low in IMAGE_SUFFIXES:
                samples.setdefault(prefix, ([], []))[0].append((suffix, m.offset_data, m.size))
            elif low == "cls":
                samples.setdefault(prefix, ([], []))[1].append((m.offset_data, m.size))

        def cut_off(offset: int, size: int, what: str = "") -> str | None:
            """The reason for a member whose data runs past the end of the file, else None."""
            present = max(0, min(size, scan.size - offset))
            return None if present == size else f"tar shard truncated ({what}{present} of {size} bytes present)"

        out = []
        orphans = 0
        with open(path, "rb") as f:
            for prefix, (images, clss) in samples.items():
                if not images:
                    orphans += 1
                    continue
                label, problem = -1, None
                if not clss:
                    problem = "no .cls label" + (" (the tar shard is damaged: it may have been lost)"
                                                 if scan.damage else "")
                elif len(clss) > 1:
                    problem = "several .cls members"
                elif (cut := cut_off(*clss[0], what="its .cls member: ")) is not None:
                    problem = cut
                else:
                    f.seek(clss[0][0])
                    text = f.read(min(clss[0][1], 64)).decode("utf-8", "replace").strip()
                    if clss[0][1] <= 64 and re.fullmatch(r"[0-9]+", text):  # rejects "-1", "1.5", "", "cat"
                        label = int(text)
                    else:
                        problem = f"bad .cls label {text[:20]!r} (expected a non-negative integer)"
                cut = cut_off(images[0][1], images[0][2]) if len(images) == 1 else None
                out.append((prefix, images, label, cut or problem))
        if orphans:
            self.warnings.append(f"{path}: {orphans} .cls member(s) with no image member ignored")
        return out

    def notes(self) -> list[str]:
        return super().notes() + [f"damaged tar shard {p}: {r}" for p, r in self.damaged.items()]

    def where(self, i: int) -> str:
        i = self._index(i)
        key = self.keys[i]
        prefix = key[key.index("/") + 1:]
        return f"{self.tar_paths[self._tar_ids[i]]}/{prefix}.{self._exts[i]}"

    def read_bytes(self, i: int) -> bytes:
        i = self._index(i)
        size = int(self._sizes[i])
        try:
            with open(self.tar_paths[self._tar_ids[i]], "rb") as f:
                f.seek(int(self._offsets[i]))
                data = f.read(size)
        except OSError as e:
            raise BadImageError(self.where(i), f"cannot read tar member ({e.strerror or e})") from None
        if len(data) != size:
            raise BadImageError(self.where(i), f"tar shard truncated ({len(data)} of {size} bytes present)")
        return data
