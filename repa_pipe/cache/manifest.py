"""The cache's manifest as a typed contract: what a cache holds, how each array was made, and the views the
stages take of it. The one module that knows the manifest's JSON; stages build and read it only through here.

```
manifest.json (schema 2)
  format, schema_version, tool, created_utc
  dataset        Dataset: kind, root, n, num_classes, class_names, file_list_sha256, labels_sha256, notes
  resolution, crop, shard_size, num_shards
  arrays         {name: ArrayEntry}, name = "<kind>/<model name>" (latents/sd-vae-ft-mse, features/dinov2-b)
    ArrayEntry   spec (ArraySpec: what is stored and how it was made; its hash identifies the bytes)
                 + progress (status, shards_done, bad rows, times)
```

A cache's arrays are written as raw rows with a crc32c after each (`ROW_CODEC`): the reader checks every row
it serves. Schema 1 caches (no per-row checksums) are refused with a message saying so.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from repa_pipe import __version__
from repa_pipe.pipeline.errors import CacheMismatchError, NotACacheError
from repa_pipe.pipeline.fileio import atomic_write_json, read_json
from repa_pipe.pipeline.hashing import hash_json

FORMAT = "repa-pipe-cache"
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
KINDS = ("latents", "features")
CROP = "adm_center_crop"
ROW_CODEC = "bytes+crc32c"  # one row per zarr inner chunk: raw little-endian bytes, then their crc32c
DEFAULT_SHARD_SIZE = 1024
MAX_CLASSES = 100_000  # a label bound without --num-classes (ImageNet-21k has 21,841 classes)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def num_shards(n: int, shard_size: int) -> int:
    return (n + shard_size - 1) // shard_size


def shard_range(k: int, n: int, shard_size: int) -> tuple[int, int]:
    """Rows [start, stop) of shard k: the same in every array of a cache."""
    return k * shard_size, min((k + 1) * shard_size, n)


# --------------------------------------------------------------------------------------------- entries
@dataclass(frozen=True)
class Dataset:
    """The image set a cache was made from, identified by its file list and labels."""

    kind: str                          # imagefolder | webdataset
    root: str                          # the source as given (absolute folder, or a brace pattern)
    n: int
    num_classes: int
    file_list_sha256: str
    labels_sha256: str
    class_names: Optional[tuple[str, ...]] = None
    notes: tuple[str, ...] = ()        # what listing found (damaged tars kept in part, ...)

    def same_images(self, other: "Dataset") -> Optional[str]:
        """None when both list the same samples and labels; else the first differing fact."""
        for key in ("n", "file_list_sha256", "labels_sha256"):
            if getattr(self, key) != getattr(other, key):
                return key
        return None


@dataclass(frozen=True)
class Provenance:
    """Which model made an array: the codec's or encoder's own `describe()`, plus its registry name."""

    name: str                          # registry name: sd-vae-ft-mse, pixel, dinov2-b, tiny, ...
    weights_id: str                    # hub id, local file or folder, or random-init(seed=0)
    weights_hash: str                  # hash of the loaded state dict (names, shapes, values)
    random_init: bool
    details: dict[str, Any] = field(default_factory=dict)  # the rest of describe()

    @classmethod
    def from_describe(cls, d: dict[str, Any]) -> "Provenance":
        d = dict(d)
        return cls(name=d.pop("name"), weights_id=d.pop("weights_id"), weights_hash=d.pop("weights_hash"),
                   random_init=bool(d.pop("is_random_init")), details=d)


@dataclass(frozen=True)
class LatentFacts:
    channels: int                      # C; stored moments have 2C channels: mean then std
    downsample: int
    scaling_factor: float
    moments: str = "mean_std"


@dataclass(frozen=True)
class FeatureFacts:
    grid: int                          # tokens per side; T = grid * grid
    embed_dim: int
    tokens: str                        # which tokens are stored


@dataclass(frozen=True)
class ArraySpec:
    """What an array stores and how it was made. Two encodes with equal specs write identical bytes."""

    kind: str
    model: Provenance
    dtype: str
    shape: tuple[int, ...]             # (N, *row)
    precision: str                     # compute precision of the model forward
    preprocessing: dict[str, Any]      # resolution, crop and the model's input mapping
    latent: Optional[LatentFacts] = None
    feature: Optional[FeatureFacts] = None
    row_codec: str = ROW_CODEC

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.model.name}"

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[1:])

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * np.dtype(self.dtype).itemsize

    @property
    def spec_hash(self) -> str:
        """What the bytes are. The weights count by their hash, not by where their file was: an encode resumed
        after the weights file moved makes the same array."""
        d = _to_json(self)
        del d["model"]["weights_id"]
        return hash_json(d)


@dataclass(frozen=True)
class BadRow:
    """A sample that could not be used; its row stays in place (NaN) and is invalid for training."""

    index: int
    key: str
    path: str
    reason: str


@dataclass(frozen=True)
class ArrayEntry:
    spec: ArraySpec
    status: str = "in_progress"        # in_progress | complete
    shards_done: int = 0
    bad: tuple[BadRow, ...] = ()
    created_utc: str = ""
    completed_utc: Optional[str] = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def latents_spec(codec: dict[str, Any], n: int, resolution: int, dtype: str, precision: str) -> ArraySpec:
    """The spec of a latents array from the codec's describe(): (N, 2C, R/f, R/f) moments, mean then std."""
    h = resolution // codec["downsample"]
    c = codec["latent_channels"]
    return ArraySpec(
        kind="latents", model=Provenance.from_describe(codec), dtype=dtype, shape=(n, 2 * c, h, h),
        precision=precision, preprocessing={"resolution": resolution, "crop": CROP, "input": "uint8/127.5 - 1"},
        latent=LatentFacts(channels=c, downsample=codec["downsample"], scaling_factor=codec["scaling_factor"],
                           moments=codec.get("moments", "mean_std")))


def features_spec(encoder: dict[str, Any], n: int, resolution: int, dtype: str, precision: str) -> ArraySpec:
    """The spec of a features array from the encoder's describe(): (N, grid^2, D) patch tokens."""
    g, d = encoder["grid"], encoder["embed_dim"]
    return ArraySpec(
        kind="features", model=Provenance.from_describe(encoder), dtype=dtype, shape=(n, g * g, d),
        precision=precision, preprocessing={"resolution": resolution, "crop": CROP,
                                            "encoder_input": encoder.get("input", {})},
        feature=FeatureFacts(grid=g, embed_dim=d, tokens=encoder.get("tokens", "patch tokens")))


# --------------------------------------------------------------------------------------------- JSON
def _to_json(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    return obj


def _spec_from_json(d: dict[str, Any]) -> ArraySpec:
    return ArraySpec(kind=d["kind"], model=Provenance(**d["model"]), dtype=d["dtype"], shape=tuple(d["shape"]),
                     precision=d["precision"], preprocessing=d["preprocessing"],
                     latent=LatentFacts(**d["latent"]) if d.get("latent") else None,
                     feature=FeatureFacts(**d["feature"]) if d.get("feature") else None,
                     row_codec=d["row_codec"])


def _entry_from_json(d: dict[str, Any]) -> ArrayEntry:
    return ArrayEntry(spec=_spec_from_json(d["spec"]), status=d["status"], shards_done=d["shards_done"],
                      bad=tuple(BadRow(**b) for b in d["bad"]), created_utc=d["created_utc"],
                      completed_utc=d.get("completed_utc"))


def _dataset_from_json(d: dict[str, Any]) -> Dataset:
    names = d.get("class_names")
    return Dataset(kind=d["kind"], root=d["root"], n=d["n"], num_classes=d["num_classes"],
                   file_list_sha256=d["file_list_sha256"], labels_sha256=d["labels_sha256"],
                   class_names=tuple(names) if names is not None else None, notes=tuple(d.get("notes", ())))


# --------------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class Manifest:
    dataset: Dataset
    resolution: int
    shard_size: int
    arrays: dict[str, ArrayEntry] = field(default_factory=dict)
    crop: str = CROP
    tool: str = f"repa-pipe {__version__}"
    created_utc: str = field(default_factory=utc_now)
    schema_version: int = SCHEMA_VERSION

    @property
    def n(self) -> int:
        return self.dataset.n

    @property
    def num_shards(self) -> int:
        return num_shards(self.dataset.n, self.shard_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        return shard_range(k, self.dataset.n, self.shard_size)

    def with_array(self, entry: ArrayEntry) -> "Manifest":
        return dataclasses.replace(self, arrays={**self.arrays, entry.name: entry})

    def to_json(self) -> dict[str, Any]:
        d = _to_json(self)
        d["format"] = FORMAT
        d["num_shards"] = self.num_shards
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = MANIFEST) -> "Manifest":
        try:
            return cls(dataset=_dataset_from_json(d["dataset"]), resolution=int(d["resolution"]),
                       shard_size=int(d["shard_size"]), crop=d["crop"], tool=d["tool"],
                       created_utc=d["created_utc"], schema_version=d["schema_version"],
                       arrays={k: _entry_from_json(v) for k, v in d["arrays"].items()})
        except (KeyError, TypeError, ValueError) as e:
            raise NotACacheError(f"{where}: damaged manifest ({type(e).__name__}: {e})") from None

    # ------------------------------------------------------------------------------------- lookups
    def array(self, name: str, option: str = "") -> ArrayEntry:
        """The entry of array `name`; CacheMismatchError naming what exists (and the option to fix)."""
        if name not in self.arrays:
            have = ", ".join(self.arrays) or "none"
            fix = f"; encode it first or fix {option}" if option else ""
            raise CacheMismatchError(f"no array {name} in the cache (have: {have}){fix}")
        return self.arrays[name]

    def names(self, kind: str) -> list[str]:
        return [n for n, e in self.arrays.items() if e.spec.kind == kind]

    def latents_name(self, asked: Optional[str] = None) -> str:
        """The latents array to use: `asked` (a codec name or an array name), else the cache's only one."""
        if asked:
            return asked if asked.startswith("latents/") else f"latents/{asked}"
        names = self.names("latents")
        if len(names) != 1:
            what = "no latents; run encode-latents first" if not names else \
                f"several latents ({', '.join(names)}); pass --latents"
            raise CacheMismatchError(f"the cache has {what}")
        return names[0]

    def default_grid(self) -> Optional[int]:
        """Token grid of a patch-2 model on the cache's latents (None when it has none yet)."""
        sides = sorted({e.spec.shape[-1] for n, e in self.arrays.items() if e.spec.kind == "latents"})
        if len(sides) > 1:
            raise CacheMismatchError(f"latents of several sizes {sides}; pass --grid")
        if not sides:
            return None
        if sides[0] % 2:
            raise CacheMismatchError(f"the latent side {sides[0]} is odd; pass --grid")
        return sides[0] // 2

    def valid_mask(self, names: list[str]) -> np.ndarray:
        """(N,) bool: False for rows recorded bad in any of `names`."""
        mask = np.ones(self.n, dtype=bool)
        for name in names:
            for b in self.arrays[name].bad:
                mask[b.index] = False
        return mask


def read_manifest(root: str | os.PathLike) -> Manifest:
    """CACHE/manifest.json, checked: NotACacheError for a folder that is not a cache, CacheMismatchError for
    a cache of another schema version."""
    root = Path(root)
    if not root.exists():
        raise NotACacheError(f"{root}: no such folder (expected a cache made by `repa-pipe encode-latents`)")
    path = root / MANIFEST
    if not path.is_file():
        raise NotACacheError(f"{root}: not a repa-pipe cache (no {MANIFEST})")
    try:
        d = read_json(path)
    except (ValueError, OSError) as e:
        raise NotACacheError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise NotACacheError(f"{path}: not a repa-pipe cache manifest")
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CacheMismatchError(
            f"{root}: cache schema version {version} ({d.get('tool', 'unknown tool')}); this repa-pipe reads "
            f"schema {SCHEMA_VERSION} (per-row checksums): re-encode into a new --cache folder")
    return Manifest.from_json(d, str(path))


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Atomic; call only while holding the cache lock (`cache.lock.cache_lock`)."""
    atomic_write_json(Path(root) / MANIFEST, manifest.to_json())


def is_cache(root: Path) -> bool:
    return (Path(root) / MANIFEST).is_file()


# --------------------------------------------------------------------------------------------- training view
@dataclass(frozen=True)
class TrainingView:
    """What training (and later sampling) needs to know about a cache, checked against its manifest.

    A run records it, so sampling never has to walk back from the run to the cache and the image folder."""

    latents: str                       # array name, e.g. "latents/sd-vae-ft-mse"
    features: tuple[str, ...]          # array names, one per encoder, e.g. ("features/dinov2-b",)
    latent_channels: int
    latent_size: int
    scaling_factor: float
    feature_tokens: tuple[int, ...]
    feature_dims: tuple[int, ...]
    num_classes: int
    n: int
    valid: int                         # rows not recorded bad in any of the arrays above
    codec: Provenance                  # what made the latents: decoding samples needs it
    dataset_root: str
    resolution: int

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainingView":
        d = dict(d)
        d["codec"] = Provenance(**d["codec"])
        for k in ("features", "feature_tokens", "feature_dims"):
            d[k] = tuple(d[k])
        return cls(**d)


def _complete(m: Manifest, name: str, kind: str, option: str) -> ArrayEntry:
    entry = m.array(name, option)
    if entry.spec.kind != kind:
        raise CacheMismatchError(f"{name} holds {entry.spec.kind}, not {kind}; fix {option}")
    if not entry.complete:
        raise CacheMismatchError(f"{name} is not complete ({entry.shards_done}/{m.num_shards} shards done); "
                                 "re-run its encode command to finish it")
    return entry


def training_view(m: Manifest, labels: np.ndarray, latents: Optional[str], encoders: tuple[str, ...]) -> TrainingView:
    """Check that every array training needs is there, complete and consistent; return the view.

    `latents`: a codec or array name (None: the cache's only latents); `encoders`: encoder names."""
    lat = _complete(m, m.latents_name(latents), "latents", "--latents")
    feats = [_complete(m, f"features/{e}", "features", "--encoder") for e in encoders]
    c2, h, w = lat.spec.row_shape
    if h != w:
        raise CacheMismatchError(f"{lat.name} latents are {h}x{w}; only square latents are supported")
    names = [lat.name, *(f.name for f in feats)]
    valid = m.valid_mask(names)
    used = labels[valid]
    if len(used) and (used.min() < 0 or used.max() >= m.dataset.num_classes):
        raise CacheMismatchError(f"labels of usable rows span [{used.min()}, {used.max()}] but the dataset has "
                                 f"{m.dataset.num_classes} classes")
    return TrainingView(
        latents=lat.name, features=tuple(f.name for f in feats), latent_channels=lat.spec.latent.channels,
        latent_size=h, scaling_factor=lat.spec.latent.scaling_factor,
        feature_tokens=tuple(f.spec.shape[1] for f in feats), feature_dims=tuple(f.spec.shape[2] for f in feats),
        num_classes=m.dataset.num_classes, n=m.n, valid=int(valid.sum()), codec=lat.spec.model,
        dataset_root=m.dataset.root, resolution=m.resolution)
