"""Reader benchmark: random batches of 256 rows from a (N, 256, 768) float16 feature array in the cache.

    python bench/reader.py            # N = 8,192 (3.2 GB under /tmp/repa_bench), updates docs/benchmarks.md
    python bench/reader.py --quick    # N = 2,048, fewer repeats, prints only

The array is written once with the repa_pipe cache writer (`writer.open_or_create` / `ensure_array` /
`ShardWriter.write`, shard size 1024) into $REPA_BENCH_DIR (default /tmp/repa_bench) and reused when present.
Measured, all in this one process, side by side (the configurations are interleaved round by round, so load from
other users hits them alike; medians over the rounds):

- `ArrayReader.gather` (the training hot path, every row's crc32c checked) with 1, 4, 8 and 16 threads, warm page
  cache, and side by side the same reader with the checks left out (`UncheckedReader`: the gather loop as it was
  before rows carried checksums), to measure what the integrity check costs;
- raw `os.preadv` of the same rows' byte ranges (offsets from the shard index, computed before timing), split
  over the same thread counts, into a reused buffer and into a fresh buffer per batch -- no repa_pipe code;
- sequential read of the shard files (16 MiB `readinto`), and one in-RAM memcpy of a batch, as ceilings;
- zarr-python `oindex` on the same array (a few batches: it is slow);
- cold: after dropping the page cache (`echo 3 > /proc/sys/vm/drop_caches` when permitted, else
  `posix_fadvise(DONTNEED)` on the shard files), gather / raw pread / sequential read.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from repa_pipe.cache import layout, writer  # noqa: E402
from repa_pipe.cache.manifest import ArraySpec, Dataset, Manifest, Provenance, read_manifest  # noqa: E402
from repa_pipe.cache.reader import ArrayReader  # noqa: E402
from repa_pipe.pipeline.errors import CorruptDataError  # noqa: E402
from repa_pipe.pipeline.hashing import hash_lines, sha256_int64  # noqa: E402

NAME = "features/dinov2-b"  # synthetic content; the name lets bench/loader.py train from this cache
T, D = 256, 768
ROW_BYTES = T * D * 2
BATCH = 256
THREADS = (1, 4, 8, 16)


# ------------------------------------------------------------------------------------------------ the data
def make_cache(root: Path, n: int, shard_size: int = 1024) -> Manifest:
    """Write (n, 256, 768) float16 with the repa_pipe writer; idempotent (done shards are skipped)."""
    keys = [f"bench/{i:08d}" for i in range(n)]
    labels = np.arange(n, dtype=np.int64) % 1000
    dataset = Dataset(kind="synthetic", root="bench/reader.py", n=n, num_classes=1000,
                      file_list_sha256=hash_lines(keys), labels_sha256=sha256_int64(labels))
    writer.open_or_create(root, dataset, keys, labels, resolution=256, shard_size=shard_size)
    spec = ArraySpec(kind="features", model=Provenance("dinov2-b", "synthetic (bench/reader.py)", "none", True),
                     dtype="float16", shape=(n, T, D), precision="fp32", preprocessing={"resolution": 256})
    m = writer.ensure_array(root, spec)
    w = writer.ShardWriter(root, m, NAME)
    todo = w.pending(list(range(w.num_shards)))
    t_write, nbytes = 0.0, 0
    for k in todo:
        start, stop = m.shard_range(k)
        rng = np.random.default_rng(k)
        data = rng.standard_normal((stop - start, T, D), dtype=np.float32).astype(np.float16)
        data[:, 0, 0] = np.arange(start, stop) % 2048  # row id (exact in fp16) to check gathers return the right rows
        t0 = time.perf_counter()
        w.write(k, data, [])
        t_write += time.perf_counter() - t0
        nbytes += data.nbytes
        print(f"  wrote shard {k} ({data.nbytes / 1e6:.0f} MB)", flush=True)
    if todo:
        writer.finalize(root, NAME)
        print(f"  writer: {nbytes / t_write / 1e6:.0f} MB/s (zarr write + fsync + crc + marker)")
    return read_manifest(root)


def shard_files(root: Path, m: Manifest) -> list[Path]:
    paths = layout.CachePaths(root)
    return [paths.shard_file(NAME, k, 3) for k in range(m.num_shards)]


class UncheckedReader(ArrayReader):
    """The gather loop without the per-row crc32c check (reads only each row's bytes): the reader as it was before
    rows carried checksums, kept here only to measure what the check costs."""

    def _read_rows(self, rows: np.ndarray, out: np.ndarray, pos: np.ndarray, stored: bool = False) -> None:
        k = int(rows[0]) // self.shard_size
        sh = self._acquire(k)
        try:
            flat = out.reshape(out.shape[0], -1).view(np.uint8)
            for r, p in zip(rows, pos):
                if os.preadv(sh.fd, [flat[p]], int(sh.offsets[int(r) - k * self.shard_size])) != self.row_bytes:
                    raise CorruptDataError(f"short read of row {r}")
        finally:
            self._release(sh)


# --------------------------------------------------------------------------------------------- raw readers
class RawPread:
    """No repa_pipe code: sorted (fd, offset) per row precomputed, preadv over `threads` contiguous slices."""

    def __init__(self, files: list[Path], shard_size: int, threads: int):
        self.fds = [os.open(p, os.O_RDONLY) for p in files]
        self.offsets = []
        for fd in self.fds:  # parse the shard index (end of file: shard_size x (offset, nbytes) u64 + crc32c)
            size = os.fstat(fd).st_size
            raw = os.pread(fd, shard_size * 16, size - shard_size * 16 - 4)
            self.offsets.append(np.frombuffer(raw, dtype="<u8").reshape(shard_size, 2)[:, 0].copy())
        self.shard_size = shard_size
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def plan(self, idx: np.ndarray) -> list[tuple[int, int, int]]:
        """(position in output, fd, byte offset) per row, sorted by row."""
        order = np.argsort(idx)
        return [(int(p), self.fds[int(idx[p]) // self.shard_size],
                 int(self.offsets[int(idx[p]) // self.shard_size][int(idx[p]) % self.shard_size])) for p in order]

    def read(self, plan, out: np.ndarray) -> None:
        flat = out.reshape(len(out), -1).view(np.uint8)
        views = [memoryview(flat[i]) for i in range(len(out))]

        def part(items):
            for p, fd, off in items:
                os.preadv(fd, [views[p]], off)
        if self.pool is None:
            part(plan)
            return
        n = len(plan)
        cuts = [plan[i * n // self.threads:(i + 1) * n // self.threads] for i in range(self.threads)]
        for f in [self.pool.submit(part, c) for c in cuts if c]:
            f.result()

    def close(self):
        for fd in self.fds:
            os.close(fd)
        if self.pool:
            self.pool.shutdown()


def sequential_read(files: list[Path], block: int = 16 << 20) -> tuple[float, int]:
    buf = bytearray(block)
    mv = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while (k := f.readinto(mv)):
                n += k
    return time.perf_counter() - t0, n


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_docs_args(ap)
    ap.add_argument("--n", type=int, default=None, help="rows (default 8192, --quick 2048)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, --quick 2)")
    ap.add_argument("--batches", type=int, default=None, help="batches per configuration per round (default 8)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache measurements")
    args = ap.parse_args()
    n = args.n or (2048 if args.quick else 8192)
    rounds = args.rounds or (2 if args.quick else 7)
    batches = args.batches or (3 if args.quick else 8)
    zarr_batches = 1 if args.quick else 3
    cold_reps = 1 if args.quick else 3
    cold_batches = 2 if args.quick else 4

    root = C.SCRATCH / f"reader_N{n}"
    print(f"cache: {root}")
    m = make_cache(root, n)
    files = shard_files(root, m)
    total_bytes = sum(p.stat().st_size for p in files)
    info = C.machine({"cache": f"{root} (ext4 on virtio disk)" if str(root).startswith("/tmp") else str(root),
                      "N": n})
    print(C.machine_line(info))
    mb_per_sample = ROW_BYTES / 1e6

    # ---- warm: read everything once, then sequential-read bandwidth from the page cache
    seq_warm = []
    for _ in range(1 + min(rounds, 3)):
        dt, nb = sequential_read(files)
        seq_warm.append(nb / dt / 1e6)
    seq_warm = seq_warm[1:]  # the first pass warms the cache

    readers = {t: ArrayReader(root, m, NAME, threads=t) for t in THREADS}
    unchecked = {t: UncheckedReader(root, m, NAME, threads=t) for t in THREADS}
    raws = {t: RawPread(files, m.shard_size, t) for t in THREADS}
    reusing = {t: ArrayReader(root, m, NAME, threads=t) for t in (1, 4)}
    rng = np.random.default_rng(0)

    def new_batches(k):
        return [rng.permutation(n)[:BATCH] for _ in range(k)]

    # correctness: gather == raw pread == zarr for one batch, and the row ids match
    idx0 = new_batches(1)[0]
    g = readers[8].gather(idx0)
    r = np.empty_like(g)
    raws[8].read(raws[8].plan(idx0), r)
    assert np.array_equal(g.view(np.uint16), r.view(np.uint16)), "gather != raw pread"
    assert np.array_equal(g[:, 0, 0].astype(np.int64), idx0 % 2048), "gather returned wrong rows"
    assert np.array_equal(reusing[4].gather(idx0, out=r).view(np.uint16), g.view(np.uint16))
    for t in (1, 4):
        reusing[t].gather(idx0)
    assert np.array_equal(unchecked[4].gather(idx0).view(np.uint16), g.view(np.uint16))
    for t in THREADS:
        readers[t].gather(idx0)  # open every shard (index parse + crc check) before timing
        unchecked[t].gather(idx0)

    configs = [f"gather t{t}" for t in THREADS] + [f"unchecked t{t}" for t in THREADS] + \
              [f"raw t{t}" for t in THREADS] + \
              [f"raw-fresh t{t}" for t in (1, 16)] + [f"gather-reuse t{t}" for t in (1, 4)]
    res: dict[str, list[float]] = {c: [] for c in configs}
    memcpy = []
    reuse = np.empty((BATCH, T, D), dtype=np.float16)
    src = g.copy()
    for rd in range(rounds):
        bl = new_batches(batches)
        order = list(configs) if rd % 2 == 0 else list(reversed(configs))
        for c in order:
            kind, t = c.split(" t")
            t = int(t)
            if kind in ("gather", "unchecked"):
                rd_ = readers[t] if kind == "gather" else unchecked[t]
                t0 = time.perf_counter()
                for idx in bl:
                    rd_.gather(idx)
            elif kind == "gather-reuse":
                t0 = time.perf_counter()
                for idx in bl:
                    reusing[t].gather(idx, out=reuse)
            else:
                plans = [raws[t].plan(idx) for idx in bl]
                t0 = time.perf_counter()
                for p in plans:
                    out = reuse if kind == "raw" else np.empty((BATCH, T, D), dtype=np.float16)
                    raws[t].read(p, out)
            res[c].append(batches * BATCH / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in range(batches):
            np.copyto(reuse, src)
        memcpy.append(batches * BATCH / (time.perf_counter() - t0))
        print(f"  round {rd + 1}/{rounds}: " + ", ".join(f"{c} {res[c][-1]:,.0f}" for c in configs), flush=True)

    # ---- zarr-python oindex, a few batches (~100 samples/s on sharded arrays in zarr 3.1)
    import zarr
    z = zarr.open_array(store=str(layout.CachePaths(root).zarr), path=NAME, mode="r")
    zb = new_batches(zarr_batches)
    zc = z.oindex[np.sort(idx0)]
    assert np.array_equal(zc, g[np.argsort(idx0)]), "zarr oindex disagrees with gather"
    zarr_rates = []
    for idx in zb:
        t0 = time.perf_counter()
        z.oindex[np.sort(idx)]
        zarr_rates.append(BATCH / (time.perf_counter() - t0))
    print(f"  zarr oindex: {C.median(zarr_rates):,.1f} samples/s")

    # ---- cold
    cold: dict[str, list[float]] = {}
    cold_method = "skipped"
    if not args.no_cold:
        cold_cfgs = ["gather t1", "gather t8", "gather t16", "raw t16", "sequential"]
        for rep in range(cold_reps):
            for c in cold_cfgs:
                cold_method = C.drop_caches(files)
                if c == "sequential":
                    dt, nb = sequential_read(files)
                    cold.setdefault(c, []).append(nb / dt / 1e6 / mb_per_sample)  # in samples/s
                    continue
                kind, t = c.split(" t")
                t = int(t)
                perm = rng.permutation(n)  # distinct rows in every batch of this pass
                bl = [perm[i * BATCH:(i + 1) * BATCH] for i in range(cold_batches)]
                if kind == "gather":
                    rd_ = ArrayReader(root, m, NAME, threads=t)  # fresh: shard indexes read cold too
                    t0 = time.perf_counter()
                    for idx in bl:
                        rd_.gather(idx)
                    dt = time.perf_counter() - t0
                    rd_.close()
                else:
                    raw = RawPread(files, m.shard_size, t)  # index read before timing
                    plans = [raw.plan(idx) for idx in bl]
                    t0 = time.perf_counter()
                    for p in plans:
                        raw.read(p, reuse)
                    dt = time.perf_counter() - t0
                    raw.close()
                cold.setdefault(c, []).append(cold_batches * BATCH / dt)
            print(f"  cold rep {rep + 1}: " + ", ".join(f"{c} {v[-1]:,.0f}" for c, v in cold.items()), flush=True)
        sequential_read(files)  # leave it warm
    info["load_end"] = C.loadavg()
    for x in list(readers.values()) + list(unchecked.values()) + list(raws.values()) + list(reusing.values()):
        x.close()

    # ---- report
    def row(label, rates, note=""):
        med = C.median(rates)
        return [label, f"{med:,.0f}", f"{med * mb_per_sample:,.0f}", C.spread(rates), note]

    best_raw = max(C.median(res[f"raw t{t}"]) for t in THREADS)
    rows = []
    for t in THREADS:
        med = C.median(res[f"gather t{t}"])
        rows.append(row(f"`ArrayReader.gather`, {t} thread{'s' if t > 1 else ''}", res[f"gather t{t}"],
                        f"{med / C.median(res[f'raw t{t}']):.2f} of raw pread t{t}, {med / best_raw:.2f} of best raw"))
    for t in THREADS:
        med = C.median(res[f"gather t{t}"])
        rows.append(row(f"the same gather without row checksums, {t} thread{'s' if t > 1 else ''}",
                        res[f"unchecked t{t}"], f"checked gather is {med / C.median(res[f'unchecked t{t}']):.2f} "
                        "of this"))
    for t in THREADS:
        rows.append(row(f"raw `os.preadv`, {t} thread{'s' if t > 1 else ''}, reused buffer", res[f"raw t{t}"]))
    for t in (1, 16):
        rows.append(row(f"raw `os.preadv`, {t} thread{'s' if t > 1 else ''}, new buffer per batch",
                        res[f"raw-fresh t{t}"]))
    for t in (1, 4):
        rows.append(row(f"`ArrayReader.gather(idx, out=buf)` reusing one buffer, {t} thread{'s' if t > 1 else ''}",
                        res[f"gather-reuse t{t}"], f"{C.median(res[f'gather-reuse t{t}']) / C.median(res[f'gather t{t}']):.2f}x "
                        f"`gather` t{t}"))
    seq_rates = [x / mb_per_sample for x in seq_warm]
    rows.append(row("sequential read of the shard files (16 MiB readinto), page cache", seq_rates,
                    f"{total_bytes / 1e9:.2f} GB, {len(files)} files"))
    rows.append(row("memcpy of a 256-row batch in RAM (`np.copyto`), ceiling", memcpy))
    rows.append(row("zarr-python 3.1 `oindex[sorted idx]`", zarr_rates,
                    f"{len(zarr_rates)} batch(es); gather t8 is {C.median(res['gather t8']) / C.median(zarr_rates):,.0f}x"))
    warm_table = C.table(["reader (warm page cache)", "samples/s", "MB/s", "range over rounds", "note"], rows)
    cold_rows = [row(("`ArrayReader.gather`, " if c.startswith("gather") else "raw `os.preadv`, " if c.startswith("raw")
                      else "") + (c.split(" ")[1].replace("t", "") + (" threads" if c.split(" ")[1] != "t1" else " thread") if " t" in c else
                                  "sequential read of all shard files (16 MiB)"), v) for c, v in cold.items()]
    cold_table = C.table(["reader (cold: " + cold_method + " before each)", "samples/s", "MB/s", "range", "note"],
                         cold_rows) if cold else "(cold measurements skipped)"
    gather_best = max(C.median(res[f"gather t{t}"]) for t in THREADS)
    unchecked_best = max(C.median(res[f"unchecked t{t}"]) for t in THREADS)
    verdict = ("meets" if gather_best >= 2000 else "misses")
    ratio = gather_best / unchecked_best
    text = f"""## Reader: random batches of 256 rows from a (N, 256, 768) float16 array

`python bench/reader.py` ({'quick run' if args.quick else 'full run'}). {C.machine_line(info)}

Array: N = {n:,} rows of 256x768 float16 ({mb_per_sample:.3f} MB each, {total_bytes / 1e9:.2f} GB in {len(files)}
shard files of 1,024 rows), written by the repa_pipe cache writer under {root}. Each round reads {batches} batches of
256 distinct random rows (a fresh random permutation slice, unsorted, as the sampler gives them) with every
configuration, the order of the configurations alternating between rounds; {rounds} rounds, medians (samples/s),
MB/s = samples/s x {mb_per_sample:.3f}. Raw `os.preadv` uses the same rows' byte ranges with the offsets looked up
before timing. All readers return the same bytes (checked).

**Target 2,000 samples/s warm: {verdict}** (best `gather` {gather_best:,.0f} samples/s).
**Row checksums: best checked `gather` is {ratio:.2f} of the best unchecked one** ({unchecked_best:,.0f} samples/s;
target >= 0.90).

{warm_table}

Cold-ish (page cache dropped before each measurement with {cold_method}; {cold_batches} batches of 256 distinct rows
per measurement, {cold_reps} repeat(s), medians). The virtio disk may be cached by the host, so this is "not in
this VM's page cache" rather than a physical disk read.

{cold_table}
"""
    print(text)
    if C.should_write_docs(args):
        C.update_section("reader", text)


if __name__ == "__main__":
    main()
