"""Image sources, part 4: Hugging Face parquet shards (the `ILSVRC/imagenet-1k` layout), read with pyarrow one row
group at a time."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from repa_pipe.cache.manifest import MAX_CLASSES
from repa_pipe.cache.sources_base import (BadImageError, ImageSource, SourceOptions, check_names, expand_shards,
                                          is_pattern, over_cap, sorted_unique)
from repa_pipe.pipeline.errors import BadInputError

IMAGE_COLUMN = "image"   # struct{bytes: binary, path: string}, as the `datasets` Image feature stores it
LABEL_COLUMN = "label"   # int; -1 marks a split without labels (imagenet-1k's test split)
UNLABELED = -1


def _arrow_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (pa.ArrowException, OSError, ValueError)


class ParquetSource(ImageSource):
    """Samples from parquet files with an `image` column (struct of `bytes` and `path`) and a `label` column.

    - Order: files sorted by name, rows in file order; key = "<file name>/<row in the file>" (file names must be
      unique). Listing reads each file's footer and its label column only, row group by row group.
    - Reading sample i reads the `image` column of the one row group holding it, kept until a sample of another row
      group is asked for (each loader worker holds at most one row group: `datasets` writes 100 images per row
      group). The whole file is never in memory.
    - Labels: -1 (an unlabeled split) is a known-bad sample, and a source whose every row is -1 is refused at
      listing, unless opts.unlabeled (--unlabeled): then labels are not read and every row gets label 0 of one
      class. A null, negative or out-of-range label (>= num_classes, or 100,000 when not given) is a known-bad
      sample, as in tar shards.
    - A file whose footer cannot be read (cut short, not parquet) is in `damaged` and contributes no samples; the
      encode stages refuse it unless --skip-bad. A file in another layout (no `image` struct with `bytes`, or no
      `label` column) refuses the source. A row group whose data cannot be read makes its rows bad at read time
      (label chunk at listing, image chunk at read time), with the file, row and reason.
    - An image over the byte cap (opts.max_bytes) is a bad sample; a row group whose image chunk declares more than
      the cap times its rows is refused before it is read.
    """

    kind = "parquet"
    shard_noun = "parquet file"

    def __init__(self, spec: str, num_classes: int | None = None, opts: SourceOptions = SourceOptions()) -> None:
        import pyarrow.parquet as pq

        paths = sorted_unique(expand_shards(spec, ".parquet"), spec, "parquet file")
        self.root = spec if is_pattern(spec) else str(Path(spec).expanduser().resolve())
        self.opts = opts
        self.paths = [str(q.resolve()) for q in paths]
        self.class_names = None
        self.warnings = []
        self.known_bad = {}
        self.damaged = {}
        bound = num_classes or MAX_CLASSES
        keys: list[str] = []
        labels: list[np.ndarray] = []
        file_ids: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        self._group_starts: list[np.ndarray] = []  # per file: first row of each row group, then the row count
        unlabeled_rows = 0
        for f, path in enumerate(self.paths):
            try:
                pf = pq.ParquetFile(path)
            except _arrow_errors() as e:
                self.damaged[path] = f"not a readable parquet file ({type(e).__name__}: {e})"
                self.warnings.append(f"{path}: damaged parquet file ({self.damaged[path]}); none of its rows is used")
                self._group_starts.append(np.zeros(1, dtype=np.int64))
                continue
            with pf:
                self._check_layout(pf, path)
                meta = pf.metadata
                sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
                starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
                self._group_starts.append(starts)
                n = int(starts[-1])
                first = len(keys)
                name = Path(path).name
                keys += [f"{name}/{r}" for r in range(n)]
                file_ids.append(np.full(n, f, dtype=np.int32))
                rows.append(np.arange(n, dtype=np.int64))
                lab = np.zeros(n, dtype=np.int64)
                if not opts.unlabeled:
                    for g in range(len(sizes)):
                        lo, hi = int(starts[g]), int(starts[g + 1])
                        try:
                            col = pf.read_row_group(g, columns=[LABEL_COLUMN]).column(0)
                        except _arrow_errors() as e:
                            lab[lo:hi] = -1
                            for r in range(lo, hi):
                                self.known_bad[first + r] = f"unreadable label (row group {g}: {type(e).__name__}: {e})"
                            continue
                        nulls = col.is_null().to_numpy()
                        vals = col.fill_null(0).to_numpy().astype(np.int64)
                        for r in np.flatnonzero(nulls | (vals < 0) | (vals >= bound)):
                            v = int(vals[r])
                            unlabeled_rows += int(not nulls[r] and v == UNLABELED)
                            self.known_bad[first + lo + int(r)] = ("no label (null)" if nulls[r] else
                                                                   _label_problem(v, bound, num_classes))
                            vals[r] = -1
                        lab[lo:hi] = vals
                labels.append(lab)
        if not keys:
            why = "".join(f"; {p}: {r}" for p, r in self.damaged.items())
            raise BadInputError(f"{spec}: no rows found in {len(paths)} parquet file(s){why}")
        if unlabeled_rows == len(keys):
            raise BadInputError(f"{self.paths[0]}: every row has label -1 (an unlabeled split); pass --unlabeled to "
                                "encode it without labels (every row gets label 0)")
        self.keys = keys
        self.labels = np.concatenate(labels)
        self._file_ids = np.concatenate(file_ids)
        self._rows = np.concatenate(rows)
        self._num_classes = num_classes
        check_names(keys, self.where, "parquet file name")
        self._open: Any = None  # (file id, row group, image bytes array) of the row group read last
        if self.known_bad:
            first = min(self.known_bad)
            self.warnings.append(f"{len(self.known_bad)} sample(s) unusable at listing time, e.g. "
                                 f"{self.where(first)}: {self.known_bad[first]}")

    def _check_layout(self, pf: Any, path: str) -> None:
        import pyarrow as pa

        schema = pf.schema_arrow
        names = set(schema.names)
        image = schema.field(IMAGE_COLUMN).type if IMAGE_COLUMN in names else None
        if image is None or not pa.types.is_struct(image) or image.get_field_index("bytes") < 0:
            raise BadInputError(f"{path}: no '{IMAGE_COLUMN}' column of struct{{bytes, path}} (the Hugging Face "
                                f"ILSVRC/imagenet-1k layout); columns: {', '.join(schema.names)}")
        if not self.opts.unlabeled and (LABEL_COLUMN not in names
                                        or not pa.types.is_integer(schema.field(LABEL_COLUMN).type)):
            raise BadInputError(f"{path}: no integer '{LABEL_COLUMN}' column; pass --unlabeled for images without "
                                "labels")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = None  # DataLoader workers each read their own row groups
        return state

    def notes(self) -> list[str]:
        return super().notes() + [f"damaged parquet file {p}: {r}" for p, r in self.damaged.items()]

    def where(self, i: int) -> str:
        i = self._index(i)
        return f"{self.paths[self._file_ids[i]]} row {self._rows[i]}"

    def _row_group(self, f: int, g: int, where: str) -> Any:
        """The image bytes (a pyarrow BinaryArray) of row group g of file f, read once and kept."""
        if self._open is not None and self._open[:2] == (f, g):
            return self._open[2]
        import pyarrow.parquet as pq

        self._open = None  # drop the previous row group before reading the next
        path = self.paths[f]
        try:
            with pq.ParquetFile(path) as pf:
                rg = pf.metadata.row_group(g)
                declared = sum(rg.column(c).total_uncompressed_size for c in range(rg.num_columns)
                               if rg.column(c).path_in_schema == f"{IMAGE_COLUMN}.bytes")
                if declared > self.opts.max_bytes * max(rg.num_rows, 1):
                    raise BadImageError(where, f"row group {g} declares {declared} bytes of images for {rg.num_rows} "
                                               "rows, over the per-image cap (--max-image-mb)")
                col = pf.read_row_group(g, columns=[IMAGE_COLUMN]).column(0).combine_chunks()
        except BadImageError:
            raise
        except _arrow_errors() as e:
            raise BadImageError(where, f"unreadable row group {g} ({type(e).__name__}: {e})") from None
        data = col.field("bytes")
        self._open = (f, g, data)
        return data

    def read_bytes(self, i: int) -> bytes:
        i = self._index(i)
        f, r = int(self._file_ids[i]), int(self._rows[i])
        starts = self._group_starts[f]
        g = int(np.searchsorted(starts, r, side="right")) - 1
        data = self._row_group(f, g, self.where(i))
        j = r - int(starts[g])
        if not data[j].is_valid:
            raise BadImageError(self.where(i), "no image bytes (null)")
        value = data[j].as_buffer()
        why = over_cap(value.size, self.opts.max_bytes)
        if why:
            raise BadImageError(self.where(i), why)
        return value.to_pybytes()


def _label_problem(v: int, bound: int, num_classes: int | None) -> str:
    """Why label v is unusable."""
    if v == UNLABELED:
        return "label -1 (an unlabeled split; pass --unlabeled to encode it without labels)"
    if v < 0:
        return f"negative label {v}"
    return f"label {v} out of range [0, {bound})" + ("" if num_classes else
                                                     " (pass --num-classes for more than 100,000 classes)")
