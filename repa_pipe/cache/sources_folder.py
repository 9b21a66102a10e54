"""Image sources, part 2: ImageFolder (ROOT/<class>/<file>)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from repa_pipe.cache.sources_base import IMAGE_EXTENSIONS, BadImageError, ImageSource
from repa_pipe.pipeline.errors import BadInputError


class ImageFolderSource(ImageSource):
    """Images under ROOT/<class>/..., one class per top-level folder.

    - Class index = position of the folder name in the sorted list of class folders (the ImageNet wnid order).
      A class folder with no images keeps its index (so labels stay the standard ones) and gets a warning.
    - Images are files with extension .jpg .jpeg .png .webp in any case (.JPEG, .Png), searched recursively inside
      each class folder (symlinks followed). Other files (.txt, .xml, ...) are ignored at listing time and counted in
      a warning; files directly under ROOT are ignored with a warning. Names starting with '.' (hidden files and
      folders, e.g. macOS '._x.jpg' or '.ipynb_checkpoints') are skipped silently.
    - A file with an image extension that does not decode is a bad image at read time, not at listing time.
    - Canonical order: by class folder (sorted), then by the path inside it, so labels are non-decreasing.
      key = path relative to ROOT with '/' separators.
    """

    kind = "imagefolder"

    def __init__(self, root: str | os.PathLike, num_classes: int | None = None) -> None:
        p = Path(root).expanduser()
        if not p.exists():
            raise BadInputError(f"{root}: no such file or directory")
        if not p.is_dir():
            raise BadInputError(f"{root}: not a directory (expected an ImageFolder ROOT/<class>/<image>)")
        p = p.resolve()
        self.root = str(p)
        self.warnings = []
        self.known_bad = {}

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
        if stray:
            self.warnings.append(f"{stray} file(s) directly under {p} ignored: images must be in class folders")

        keys: list[str] = []
        labels: list[int] = []
        ignored, example = 0, ""
        for ci, name in enumerate(classes):
            files: list[str] = []
            for dirpath, dirnames, filenames in os.walk(p / name, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel = Path(dirpath).relative_to(p).as_posix()
                for f in filenames:
                    if f.startswith("."):
                        continue
                    if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                        files.append(f"{rel}/{f}")
                    else:
                        ignored += 1
                        example = example or f"{rel}/{f}"
            if not files:
                self.warnings.append(f"class folder {name!r} (class index {ci}) has no images")
            files.sort()  # all start with "<name>/", so this sorts by the path inside the class folder
            keys += files
            labels += [ci] * len(files)
        if ignored:
            self.warnings.append(f"{ignored} non-image file(s) ignored (e.g. {example}); images are "
                                 f"{'/'.join(IMAGE_EXTENSIONS)} in any case")
        if not keys:
            raise BadInputError(f"{root}: no images found (expected {root}/<class>/<image> with extension "
                                f"{'/'.join(IMAGE_EXTENSIONS)})")
        if num_classes is not None and num_classes < len(classes):
            raise BadInputError(f"{root}: {len(classes)} class folders, more than --num-classes {num_classes}")
        self.keys = keys
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = classes
        self._num_classes = num_classes

    def where(self, i: int) -> str:
        return os.path.join(self.root, self.keys[self._index(i)])

    def read_bytes(self, i: int) -> bytes:
        path = self.where(i)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise BadImageError(path, f"cannot read file ({e.strerror or e})") from None
