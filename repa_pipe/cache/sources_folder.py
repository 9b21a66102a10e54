"""Image sources, part 2: ImageFolder (ROOT/<class>/<file>)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from repa_pipe.cache.sources_base import (IMAGE_EXTENSIONS, ImageSource, SourceOptions, check_names,
                                          read_regular_file, shown)
from repa_pipe.pipeline.errors import BadInputError
from repa_pipe.pipeline.fileio import not_regular


@dataclass
class _Skipped:
    """What listing left out, by why: count and a first example each, for one warning line per kind."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, why: str, example: str) -> None:
        self.counts[why] = self.counts.get(why, 0) + 1
        self.examples.setdefault(why, example)

    def lines(self) -> list[str]:
        return [f"{n} {why} skipped (e.g. {shown(self.examples[why])})" for why, n in self.counts.items()]


_NOT_FOLLOWED = "symbolic link(s) to folders (pass --follow-links to follow them)"
_OUTSIDE = "symbolic link(s) leading outside the source folder (pass --follow-links to follow them)"
_TWICE = "folder(s) reached a second time through a symbolic link"


class _Walker:
    """Lists the image files under one ImageFolder root by the link rules of ImageFolderSource."""

    def __init__(self, root: Path, follow_links: bool) -> None:
        self.root = str(root)
        self.follow = follow_links
        self.visited: set[tuple[int, int]] = set()  # (st_dev, st_ino) of every folder listed
        self.skipped = _Skipped()
        self.ignored = 0
        self.ignored_example = ""
        st = os.stat(self.root)
        self.visited.add((st.st_dev, st.st_ino))

    def inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self.root or real.startswith(self.root + os.sep)

    def enter(self, path: str, rel: str, is_link: bool) -> bool:
        """Whether to list the folder at `path` (ROOT-relative `rel`), recording why not."""
        if is_link and not self.follow:
            self.skipped.add(_OUTSIDE if not self.inside(path) else _NOT_FOLLOWED, rel)
            return False
        try:
            st = os.stat(path)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) in self.visited:  # a loop, or a second way to the same folder
            self.skipped.add(_TWICE, rel)
            return False
        self.visited.add((st.st_dev, st.st_ino))
        return True

    def files(self, path: str, rel: str, out: list[str], bad: dict[str, str]) -> None:
        """Append the ROOT-relative image paths under `path` to `out` (any order); `bad`: rel path -> reason for
        image-named entries that are not regular files."""
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)  # sorted: which of two ways to a folder wins is fixed
        except OSError as e:
            raise BadInputError(f"{shown(path)}: cannot list folder ({e.strerror or e})") from None
        for e in entries:
            if e.name.startswith("."):
                continue
            r = f"{rel}/{e.name}"
            link = e.is_symlink()
            if link and not self.follow and not self.inside(e.path):
                self.skipped.add(_OUTSIDE, r)
                continue
            if e.is_dir():  # follows a link: a link to a folder is decided by enter()
                if self.enter(e.path, r, link):
                    self.files(e.path, r, out, bad)
                continue
            if os.path.splitext(e.name)[1].lower() not in IMAGE_EXTENSIONS:
                self.ignored += 1
                self.ignored_example = self.ignored_example or r
                continue
            out.append(r)
            if link or not e.is_file(follow_symlinks=False):  # d_type says so without a stat for plain files
                try:
                    why = not_regular(os.stat(e.path).st_mode)
                except OSError as err:
                    why = f"broken symbolic link ({err.strerror or err})"
                if why:
                    bad[r] = why


class ImageFolderSource(ImageSource):
    """Images under ROOT/<class>/..., one class per top-level folder.

    - Class index = position of the folder name in the sorted list of class folders (the ImageNet wnid order).
      A class folder with no images keeps its index (so labels stay the standard ones) and gets a warning.
    - Images are files with extension .jpg .jpeg .png .webp in any case (.JPEG, .Png), searched recursively inside
      each class folder. Other files (.txt, .xml, ...) are ignored at listing time and counted in a warning; files
      directly under ROOT are ignored with a warning. Names starting with '.' (hidden files and folders, e.g. macOS
      '._x.jpg' or '.ipynb_checkpoints') are skipped silently.
    - Symbolic links: a link to a file inside ROOT is followed. By default a link to a folder is not followed, and
      neither is any link leading outside ROOT; with follow_links (--follow-links) both are, and every real folder
      is listed once (a loop, or a second way to a folder, is cut). Each kind of skip is one warning with a count
      and an example. ROOT itself may be a link.
    - An image-named entry that is not a regular file (a FIFO, a device, a socket, a broken link) keeps its index and
      is a known-bad sample: it is never opened. A regular file is read with a byte cap (SourceOptions.max_bytes).
    - A file or folder name with a line break, or not valid UTF-8, refuses the whole source (keys are stored one
      per line).
    - A file with an image extension that does not decode is a bad image at read time, not at listing time.
    - Canonical order: by class folder (sorted), then by the path inside it, so labels are non-decreasing.
      key = path relative to ROOT with '/' separators.
    """

    kind = "imagefolder"

    def __init__(self, root: str | os.PathLike, num_classes: int | None = None,
                 opts: SourceOptions = SourceOptions()) -> None:
        p = Path(root).expanduser()
        if not p.exists():
            raise BadInputError(f"{root}: no such file or directory")
        if not p.is_dir():
            raise BadInputError(f"{root}: not a directory (expected an ImageFolder ROOT/<class>/<image>)")
        if opts.unlabeled:
            raise BadInputError(f"{root}: --unlabeled is for tar and parquet shards; an ImageFolder's labels are its "
                                "class folders")
        p = p.resolve()
        self.root = str(p)
        self.opts = opts
        self.warnings = []
        self.known_bad = {}
        walker = _Walker(p, opts.follow_links)

        classes, stray = [], 0
        with os.scandir(p) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    classes.append(e.name)
                else:
                    stray += 1
        classes.sort()
        check_names(classes, lambda i: os.path.join(self.root, classes[i]), "class folder name")
        if stray:
            self.warnings.append(f"{stray} file(s) directly under {p} ignored: images must be in class folders")

        keys: list[str] = []
        labels: list[int] = []
        bad: dict[str, str] = {}
        # Class folders are claimed before any is listed: a link from one class into another is then a second way
        # to a listed folder (skipped), never a way to list the other class's images under this class.
        listed = [walker.enter(str(p / name), name, (p / name).is_symlink()) for name in classes]
        for ci, name in enumerate(classes):
            files: list[str] = []
            if listed[ci]:
                walker.files(str(p / name), name, files, bad)
            if not files:
                self.warnings.append(f"class folder {name!r} (class index {ci}) has no images")
            files.sort()  # all start with "<name>/", so this sorts by the path inside the class folder
            keys += files
            labels += [ci] * len(files)
        self.warnings += walker.skipped.lines()
        if walker.ignored:
            self.warnings.append(f"{walker.ignored} non-image file(s) ignored (e.g. {shown(walker.ignored_example)}); "
                                 f"images are {'/'.join(IMAGE_EXTENSIONS)} in any case")
        if not keys:
            raise BadInputError(f"{root}: no images found (expected {root}/<class>/<image> with extension "
                                f"{'/'.join(IMAGE_EXTENSIONS)})")
        check_names(keys, lambda i: os.path.join(self.root, keys[i]))
        if num_classes is not None and num_classes < len(classes):
            raise BadInputError(f"{root}: {len(classes)} class folders, more than --num-classes {num_classes}")
        self.keys = keys
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = classes
        self._num_classes = num_classes
        if bad:
            self.known_bad = {i: bad[k] for i, k in enumerate(keys) if k in bad}
            first = min(self.known_bad)
            self.warnings.append(f"{len(bad)} image name(s) that are not regular files, e.g. "
                                 f"{shown(self.where(first))}: {self.known_bad[first]}")

    def where(self, i: int) -> str:
        return os.path.join(self.root, self.keys[self._index(i)])

    def read_bytes(self, i: int) -> bytes:
        return read_regular_file(self.where(i), self.opts.max_bytes)
