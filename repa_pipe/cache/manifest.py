"""The cache's manifest as a typed contract: what a cache holds, how each array was made, and the views the
stages take of it. The one module that knows the manifest's JSON; stages build and read it only through here.

```
manifest.json (schema 2)
  format, schema_version, tool, created_utc
  dataset        Dataset: kind, root, n, num_classes, class_names, file_list_sha256, labels_sha256, notes
  resolution, crop, shard_size, num_shards
  arrays         {name: ArrayEntry}, name = "<kind>/<model name>" (latents/sd-vae-ft-mse, features/dinov2-b,
                 cls/dinov2-b)
    ArrayEntry   spec (ArraySpec: what is stored and how it was made; its hash identifies the bytes)
                 + progress (status, shards_done, bad rows, times)
done/<kind>/<name>/<k>.json   ShardMarker: shard k of that array is written and fsynced
```

A cache's arrays are written as raw rows with a crc32c after each (`ROW_CODEC`): the reader checks every row
it serves. Schema 1 caches (no per-row checksums) are refused with a message saying so. Every value read back
from manifest.json is checked (types, ranges, array names that stay inside the cache): a hand-edited or damaged
manifest is one line, never a traceback or a path outside the cache.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from repa_pipe import __version__
from repa_pipe.cache.layout import CachePaths
from repa_pipe.pipeline.errors import CacheMismatchError, NotACacheError
from repa_pipe.pipeline.fileio import atomic_write_json, read_json
from repa_pipe.pipeline.hashing import hash_json

FORMAT = "repa-pipe-cache"
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
KINDS = ("latents", "features", "cls")  # cls: the encoder's class token (encode-features --with-cls)
# An array name is "<kind>/<model name>"; the model part is a registry-style name. Anything else (an absolute
# path, "..", a separator) in a manifest is damage: the name becomes a path inside the cache.
ARRAY_NAME = re.compile(r"(?:%s)/[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}" % "|".join(KINDS))
CROP = "adm_center_crop"
ROW_CODEC = "bytes+crc32c"  # one row per zarr inner chunk: raw little-endian bytes, then their crc32c
DEFAULT_SHARD_SIZE = 1024
MAX_CLASSES = 100_000  # the label bound (ImageNet-21k has 21,841 classes); --num-classes may not exceed it
# Stored feature forms: "int8" is a per-token absmax int8 quantization (cache/quant.py).
QUANTIZED = ("int8",)


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
    def quantized(self) -> bool:
        return self.dtype in QUANTIZED

    @property
    def stored_row_shape(self) -> tuple[int, ...]:
        """The row as stored: int8 rows carry each token's float32 scale as 4 more int8 bytes after its values."""
        return (*self.row_shape[:-1], self.row_shape[-1] + 4) if self.quantized else self.row_shape

    @property
    def read_dtype(self) -> str:
        """The dtype rows are served in: int8 rows are dequantized to float16, what a float16 cache serves."""
        return "float16" if self.quantized else self.dtype

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row (without its crc32c)."""
        return int(np.prod(self.stored_row_shape)) * np.dtype(self.dtype).itemsize

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
class ShardMarker:
    """done/<array>/<k>.json: shard k (rows [start, stop)) is written whole and fsynced, as `spec_hash` says.

    Markers written before this type also hold a whole-file "crc32c"; it is ignored (every row and the shard
    index carry their own crc32c, which `cache verify` checks)."""

    k: int
    start: int
    stop: int
    bytes: int                         # the shard file's size: a stat finds a truncated or replaced file
    spec_hash: str
    bad: tuple[BadRow, ...] = ()
    written_utc: str = ""

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, d: Any, n: int) -> "ShardMarker":
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        try:
            m = cls(k=d["k"], start=d["start"], stop=d["stop"], bytes=d["bytes"], spec_hash=d["spec_hash"],
                    bad=tuple(_bad_row(b, n) for b in d["bad"]), written_utc=d.get("written_utc", ""))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{type(e).__name__}: {e}") from None
        _check_ints(("k", m.k), ("start", m.start), ("stop", m.stop), ("bytes", m.bytes))
        return m


def read_markers(root: str | os.PathLike, name: str,
                 n_shards: int, n: int) -> tuple[dict[int, ShardMarker], list[tuple[int, str]]]:
    """({k: marker} for readable markers, [(k, one line) per unreadable marker]) of array `name`."""
    paths = CachePaths(Path(root))
    out, problems = {}, []
    for k in range(n_shards):
        p = paths.done_marker(name, k)
        if not p.is_file():  # also refuses a FIFO or device in its place: is_file is a regular file
            continue
        try:
            out[k] = ShardMarker.from_json(read_json(p), n)
        except (ValueError, OSError) as e:
            problems.append((k, f"{name}: shard {k}: unreadable done marker {p} ({type(e).__name__}: {e})"))
    return out, problems


def write_marker(root: str | os.PathLike, name: str, marker: ShardMarker) -> None:
    atomic_write_json(CachePaths(Path(root)).done_marker(name, marker.k), marker.to_json())


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


def cls_spec(encoder: dict[str, Any], n: int, resolution: int, dtype: str, precision: str) -> ArraySpec:
    """The spec of the class-token array beside features_spec's patch tokens: (N, 1, D), the encoder's class
    token after its final norm, stored and checksummed like the patch tokens."""
    d = encoder["embed_dim"]
    return ArraySpec(
        kind="cls", model=Provenance.from_describe(encoder), dtype=dtype, shape=(n, 1, d), precision=precision,
        preprocessing={"resolution": resolution, "crop": CROP, "encoder_input": encoder.get("input", {})},
        feature=FeatureFacts(grid=encoder["grid"], embed_dim=d, tokens="class token after the final norm"))


# --------------------------------------------------------------------------------------------- JSON
def _to_json(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    return obj


def _check_ints(*named: tuple[str, Any], low: int = 0) -> None:
    """Each value an int (not a bool) >= low, else ValueError naming it."""
    for what, v in named:
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{what} must be an integer >= {low}, got {v!r}")


def _bad_row(d: Any, n: int) -> BadRow:
    b = BadRow(**d)
    if isinstance(b.index, bool) or not isinstance(b.index, int) or not 0 <= b.index < n:
        raise ValueError(f"bad-row index {b.index!r} outside [0, {n})")
    return b


def check_array_name(name: Any) -> str:
    """An array name from a manifest: '<kind>/<model>' in the fixed grammar (no '..', no absolute path, no
    separator in the model part), else ValueError. The grammar alone keeps the path inside cache.zarr/, done/
    and locks/; `Manifest.from_json` also checks the resolved path."""
    if not isinstance(name, str) or not ARRAY_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"array name {name!r} is not <kind>/<model> ({', '.join(KINDS)})")
    return name


def _spec_from_json(d: dict[str, Any]) -> ArraySpec:
    return ArraySpec(kind=d["kind"], model=Provenance(**d["model"]), dtype=d["dtype"], shape=tuple(d["shape"]),
                     precision=d["precision"], preprocessing=d["preprocessing"],
                     latent=LatentFacts(**d["latent"]) if d.get("latent") else None,
                     feature=FeatureFacts(**d["feature"]) if d.get("feature") else None,
                     row_codec=d["row_codec"])


def _entry_from_json(d: dict[str, Any], n: int) -> ArrayEntry:
    e = ArrayEntry(spec=_spec_from_json(d["spec"]), status=d["status"], shards_done=d["shards_done"],
                   bad=tuple(_bad_row(b, n) for b in d["bad"]), created_utc=d["created_utc"],
                   completed_utc=d.get("completed_utc"))
    _check_ints(("shards_done", e.shards_done), *((f"shape[{i}]", v) for i, v in enumerate(e.spec.shape)))
    if e.spec.shape[0] != n or e.spec.kind not in KINDS or not isinstance(e.spec.dtype, str):
        raise ValueError(f"{e.spec.kind} array of shape {list(e.spec.shape)} in a cache of {n} rows")
    np.dtype(e.spec.dtype)  # TypeError for a dtype numpy does not know
    return e


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
        """The manifest, every value checked; NotACacheError (one line: damaged manifest) for anything off."""
        try:
            dataset = _dataset_from_json(d["dataset"])
            _check_ints(("dataset.n", dataset.n), ("resolution", d["resolution"]), ("shard_size", d["shard_size"]),
                        ("dataset.num_classes", dataset.num_classes), low=1)
            if not isinstance(d["arrays"], dict):
                raise TypeError(f"arrays must be a JSON object, got {type(d['arrays']).__name__}")
            arrays = {}
            for k, v in d["arrays"].items():
                entry = _entry_from_json(v, dataset.n)
                if check_array_name(k) != entry.name:
                    raise ValueError(f"array {k!r} holds the spec of {entry.name!r}")
                _check_inside(Path(where).parent, k)
                arrays[k] = entry
            return cls(dataset=dataset, resolution=d["resolution"], shard_size=d["shard_size"], crop=d["crop"],
                       tool=d["tool"], created_utc=d["created_utc"], schema_version=d["schema_version"],
                       arrays=arrays)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
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


def _check_inside(root: Path, name: str) -> None:
    """Every path array `name` gives (data, done markers, lock) resolves inside the cache folder: a symlinked
    folder in the cache pointing out of it is damage too."""
    paths = CachePaths(root)
    top = root.resolve()
    for p in (paths.array_dir(name), paths.done_dir(name), paths.array_lock(name)):
        if not p.resolve().is_relative_to(top):
            raise ValueError(f"array {name!r}: {p} resolves outside the cache")


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
