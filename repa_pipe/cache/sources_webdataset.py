"""Image sources, part 3: WebDataset tar shards, indexed once at open for random access."""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from repa_pipe.cache.manifest import MAX_CLASSES
from repa_pipe.cache.sources_base import (IMAGE_SUFFIXES, BadImageError, ImageSource, SourceOptions, check_names,
                                          expand_shards, is_pattern, over_cap, shown, sorted_unique)
from repa_pipe.pipeline.errors import BadInputError

_BLOCK = tarfile.BLOCKSIZE  # 512: tar headers, padding and the end-of-archive marker come in these


def expand_tar_spec(spec: str) -> list[Path]:
    """A folder of .tar files, one .tar file, or a pattern ("shard-{000000..000009}.tar", a glob, a '::' list)
    -> tar paths (sources_base.expand_shards)."""
    return expand_shards(spec, ".tar")


def _pipe_name(url: str, n: int) -> str:
    """The tar name of one expanded `pipe:` command: its last word ending in .tar, else pipe-<n>.tar."""
    words = [w for w in url[len("pipe:"):].split() if w.lower().endswith(".tar")]
    return os.path.basename(words[-1]) if words else f"pipe-{n:06d}.tar"


def _pipe_folder(url: str) -> str:
    """The spool sub-folder of one expanded `pipe:` command: the first 16 hex digits of the sha256 of the whole
    command. Two commands that give the same tar name (two buckets, two caches sharing a --spool) then never reuse
    each other's tar, while the tar keeps its name (the first part of every key)."""
    return hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _temp_spool() -> str:
    d = tempfile.mkdtemp(prefix="repa-pipe-spool-")
    pid = os.getpid()
    # Only the process that made it removes it (forked loader workers inherit atexit handlers).
    atexit.register(lambda: os.getpid() == pid and shutil.rmtree(d, ignore_errors=True))
    return d


def spool_pipe_shards(spec: str, spool: str | None) -> list[Path]:
    """Run each expanded `pipe:` command of `spec` once, its standard output copied into a tar in `spool`.

    Each command's tar lies in `spool/<sha256 of the command>/<tar name>`. A tar already there is reused (a resumed
    run, the second encode stage): it was moved there only after that same command succeeded. A failing command is
    a BadInputError naming it, its exit status and its last error line."""
    from webdataset.shardlists import expand_urls

    urls = expand_urls(spec)
    names = [_pipe_name(u, n) for n, u in enumerate(urls)]
    if len(set(names)) != len(names):
        raise BadInputError(f"{spec}: several commands give the tar name {next(x for x in names if names.count(x) > 1)}"
                            "; tar names must be unique")
    folder = Path(spool).expanduser() if spool else Path(_temp_spool())
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"{folder}: cannot create the spool folder ({e.strerror or e}) (--spool)") from None
    out = []
    for url, name in zip(urls, names):
        dest = folder / _pipe_folder(url) / name
        if not dest.is_file():
            part = dest.parent / f".{name}.{os.getpid()}.part"
            try:
                dest.parent.mkdir(exist_ok=True)
                with open(part, "wb") as f:
                    p = subprocess.run(url[len("pipe:"):], shell=True, stdout=f, stderr=subprocess.PIPE,
                                       stdin=subprocess.DEVNULL)
                if p.returncode != 0:
                    err = p.stderr.decode("utf-8", "replace").strip().splitlines()
                    raise BadInputError(f"{shown(url)}: the command exited with status {p.returncode}"
                                        + (f" ({shown(err[-1])})" if err else ""))
                os.replace(part, dest)
            except OSError as e:
                raise BadInputError(f"{dest}: cannot write the spooled tar ({e.strerror or e}) (--spool)") from None
            finally:
                part.unlink(missing_ok=True)
                if not dest.is_file():  # a failed command leaves no empty folder behind
                    with contextlib.suppress(OSError):
                        dest.parent.rmdir()
        out.append(dest)
    return out


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
    # A sparse member stores fewer bytes than its size (read() refuses it): only a plain member can be cut off.
    cut = next((m for m in scan.members if not m.issparse() and m.offset_data + m.size > scan.size), None)
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
      An image member over the byte cap (SourceOptions.max_bytes), or stored sparse (tar --sparse), is a known-bad
      sample found from its header: its bytes are never read.
    - opts.unlabeled (--unlabeled): .cls members are ignored and every sample gets label 0 (one class).
    - `pipe:CMD` sources (webdataset's form, e.g. 'pipe:aws s3 cp s3://b/shard-{0000..0099}.tar -'): each
      expanded command's output is copied once into the spool folder (opts.spool, else a temporary folder removed
      at exit) and indexed there as a local tar, since encoding reads samples by index. A spooled tar found
      complete is reused, by the same command only (each command's tar lies in a sub-folder named by its hash).
      The tar's name is the command's last word ending in .tar (else pipe-<n>.tar).
    - The layout of timm/imagenet-1k-wds (KEY.jpg + KEY.cls + KEY.json) is this one: the .json is ignored.
    """

    kind = "webdataset"
    shard_noun = "tar shard"

    def __init__(self, spec: str, num_classes: int | None = None, opts: SourceOptions = SourceOptions()) -> None:
        self.opts = opts
        if spec.startswith("pipe:"):
            paths = spool_pipe_shards(spec, opts.spool)
        else:
            paths = expand_tar_spec(spec)
        bound = num_classes or MAX_CLASSES
        self.root = spec if spec.startswith("pipe:") or is_pattern(spec) else str(Path(spec).expanduser().resolve())
        paths = sorted_unique(paths, spec, "tar shard")
        names = [q.name for q in paths]
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
                elif (why := over_cap(images[0][2], opts.max_bytes)) is not None:
                    self.known_bad[i] = f"tar member of {why}"
                elif images[0][3]:
                    self.known_bad[i] = "sparse tar member (written by tar --sparse; store images as plain members)"
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
        check_names(keys, lambda i: f"{self.tar_paths[tar_ids[i]]}/{keys[i].split('/', 1)[1]}", "tar member name")
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
                samples.setdefault(prefix, ([], []))[0].append((suffix, m.offset_data, m.size, m.issparse()))
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
                if self.opts.unlabeled:  # .cls members, if any, are not read
                    label = 0
                elif not clss:
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
                one = len(images) == 1 and not images[0][3]  # a sparse member's stored size is not its size
                cut = cut_off(images[0][1], images[0][2]) if one else None
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
