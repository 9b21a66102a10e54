"""scikit-learn's digits (1,797 real 8x8 scans, 10 classes, bundled: no download) as a PNG ImageFolder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from repa_pipe.pipeline.fileio import atomic_write_json

_DIGITS_MARKER = ".repa_digits.json"  # hidden, so the ImageFolder listing skips it


def write_digits_imagefolder(out_dir: str | os.PathLike, size: int = 32) -> Path:
    """Write scikit-learn's bundled digits (1,797 real 8x8 scans, 10 classes, no download) as a PNG ImageFolder.

    out_dir/<class>/<idx:04d>.png with classes "0".."9" (sorted name order = label order), idx = row in
    sklearn.datasets.load_digits(). Pixels: the 0..16 values scaled to 0..255 and rounded, upscaled to size x size
    with BICUBIC, saved as RGB. Idempotent: a marker written last records the size; a re-run with the same size and
    all files present does nothing, otherwise every file is rewritten (each one atomically). Returns out_dir.
    """
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import and only the demo needs it

    out = Path(out_dir).expanduser()
    marker = out / _DIGITS_MARKER
    digits = load_digits()
    n = len(digits.target)
    want = {"dataset": "sklearn.datasets.load_digits", "n": n, "size": int(size)}
    names = [out / str(int(t)) / f"{k:04d}.png" for k, t in enumerate(digits.target)]
    if marker.is_file():
        try:
            same = json.loads(marker.read_text()) == want
        except (OSError, ValueError):
            same = False
        if same and all(q.is_file() for q in names):
            return out
    for c in range(10):
        (out / str(c)).mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(names):
        u8 = np.round(digits.images[k] * (255.0 / 16.0)).astype(np.uint8)
        img = Image.fromarray(u8)
        if size != u8.shape[0]:
            img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
        tmp = path.with_name(f".{path.name}.tmp")
        img.convert("RGB").save(tmp, format="PNG")
        os.replace(tmp, path)
    atomic_write_json(marker, want)
    return out
