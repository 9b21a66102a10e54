"""A full-size rehearsal: a cache with ImageNet-1k's 1,281,167 rows and its shard count (1,252 shards of 1,024),
built through the real writer with small rows, and the cache operations timed at that size.

    python bench/scale.py            # full size and a 1/10 size (to see how each step grows); docs/benchmarks.md
    python bench/scale.py --quick    # 1/10 and 1/100 sizes, prints only

Arrays: latents (N, 8, 2, 2) float32 and features (N, 4, 8) int8 (stored (N, 4, 12)), so the cache fits in a few
hundred MB; every row is written by `ShardWriter.write` (zarr shards, per-row crc32c) and every shard gets its done
marker. The last 10% of the features' shards are left unwritten, as a killed encode would leave them (and
`cache info` must project their size), then measured, each step in a fresh process (time, and peak RSS from
`getrusage(RUSAGE_CHILDREN)`):

- resume: what a resumed encode does before its first batch: open (check) the cache and the array, clean debris,
  and find the pending shards (`ShardWriter.pending`);
- `repa-pipe cache info`;
- `repa-pipe cache verify` (on the complete latents; every row's crc32c read);
- training start-up: training's cache view (`training_view`, `check_labels`, `check_ready`) and the first
  256-row batch from `BatchStream`;
plus the manifest's size and the number of files. The cache lives under $REPA_BENCH_DIR (default /tmp) and is
deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from repa_pipe.cache import writer  # noqa: E402
from repa_pipe.cache.manifest import ArraySpec, Dataset, LatentFacts, Provenance  # noqa: E402
from repa_pipe.pipeline.hashing import hash_lines, sha256_int64  # noqa: E402

IMAGENET_N = 1_281_167
SHARD = 1024
LAT, FEAT = "latents/sd-vae-ft-mse", "features/dinov2-b"
UNFINISHED = 0.10  # share of the features' shards left unwritten

STEPS = {
    "resume: find the remaining work": f"""
from repa_pipe.cache import writer
from repa_pipe.cache.manifest import read_manifest
from repa_pipe.cache.layout import read_keys, read_labels
root = ROOT
m = read_manifest(root)
# the encode's own order: the source (here the cache's own index stands in for the listing) checked against
# the cache, the array created or checked, debris cleaned, then the pending shards
keys, labels = read_keys(root), read_labels(root)
writer.open_or_create(root, m.dataset, keys, labels, m.resolution, m.shard_size)
writer.ensure_array(root, m.arrays["{FEAT}"].spec)
writer.clean_array_debris(root, "{FEAT}")
w = writer.ShardWriter(root, read_manifest(root), "{FEAT}")
print("pending", len(w.pending(range(w.num_shards))))
""",
    "cache info": "CLI cache info ROOT",
    "cache verify (every done row)": "CLI cache verify ROOT",
    "training start-up (view + first batch)": """
import numpy as np
from pathlib import Path
from repa_pipe.cache.manifest import read_manifest, training_view
from repa_pipe.cache.reader import check_labels, check_ready
from repa_pipe.training.stream import BatchStream
root = Path(ROOT)
m = read_manifest(root)
view = training_view(m, check_labels(root, m), "sd-vae-ft-mse", ())
check_ready(root, m, [view.latents])
s = BatchStream(root, view, 256, 0, 0, 1, 0.1, 0, 1, threads=4)
b = next(s)
s.close()
print("batch", tuple(b.moments.shape))
""",
}


def build(root: Path, n: int) -> float:
    """The cache, through the real writer; returns seconds."""
    t0 = time.perf_counter()
    keys = [f"n{(i % 1000):08d}/n{(i % 1000):08d}_{i}.JPEG" for i in range(n)]
    labels = np.arange(n, dtype=np.int64) % 1000
    ds = Dataset(kind="imagefolder", root="/data/imagenet/train", n=n, num_classes=1000,
                 file_list_sha256=hash_lines(keys), labels_sha256=sha256_int64(labels))
    writer.open_or_create(root, ds, keys, labels, 256, SHARD)
    del keys
    prov = Provenance("sd-vae-ft-mse", "synthetic (bench/scale.py)", "none", True)
    lat = ArraySpec(kind="latents", model=prov, dtype="float32", shape=(n, 8, 2, 2), precision="fp32",
                    preprocessing={}, latent=LatentFacts(channels=4, downsample=128, scaling_factor=0.18215))
    feat = ArraySpec(kind="features", model=Provenance("dinov2-b", "synthetic", "none", True), dtype="int8",
                     shape=(n, 4, 8), precision="fp32", preprocessing={})
    rng = np.random.default_rng(0)
    for spec, frac in ((lat, 1.0), (feat, 1.0 - UNFINISHED)):
        m = writer.ensure_array(root, spec)
        w = writer.ShardWriter(root, m, spec.name)
        for k in range(int(m.num_shards * frac)):
            s, e = m.shard_range(k)
            w.write(k, w.store_rows(rng.standard_normal((e - s, *spec.row_shape), dtype=np.float32)), [])
        writer.finalize(root, spec.name)
    return time.perf_counter() - t0


def run_step(code: str, root: Path) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB, last output line) of one step in a fresh process."""
    if code.startswith("CLI "):
        args = [sys.executable, "-m", "repa_pipe.cli", *code[4:].replace("ROOT", str(root)).split()]
    else:
        args = [sys.executable, "-c", code.replace("ROOT", repr(str(root)))]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(C.REPO),
                                                                     "COLUMNS": "200"})
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest of any child so far: each step runs from its own `--measure` process
    # (see `measure`), so this is that step's peak alone.
    lines = (out.stdout + out.stderr).strip().splitlines()
    if out.returncode not in (0, 1) or (out.returncode == 1 and "verify" not in code):
        raise SystemExit(f"step failed ({out.returncode}): {out.stderr[-2000:]}")
    return dt, max(rss, before) / 1024, lines[-1] if lines else ""


def measure_one(name: str, root: Path) -> None:
    """Child entry: run one step in a grandchild and print its JSON (so ru_maxrss is that step's alone)."""
    dt, rss, last = run_step(STEPS[name], root)
    print(json.dumps({"s": dt, "rss_mib": rss, "out": last}))


def measure(root: Path) -> dict[str, dict]:
    out = {}
    for name in STEPS:
        r = subprocess.run([sys.executable, __file__, "--measure", name, str(root)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(C.REPO)})
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        out[name] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def census(root: Path) -> tuple[int, int]:
    files = sum(len(f) for _, _, f in os.walk(root))
    return files, (root / "manifest.json").stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_docs_args(ap)
    ap.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        measure_one(args.measure[0], Path(args.measure[1]))
        return
    sizes = (IMAGENET_N // 100, IMAGENET_N // 10) if args.quick else (IMAGENET_N // 10, IMAGENET_N)
    info = C.machine()
    results = {}
    base = Path(os.environ.get("REPA_BENCH_DIR", tempfile.gettempdir()))
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix="scale_", dir=base)) / "cache"
        try:
            built = build(root, n)
            files, manifest = census(root)
            disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
            results[n] = {"build_s": built, "files": files, "manifest": manifest, "disk": disk,
                          "steps": measure(root)}
            print(n, json.dumps(results[n], indent=1), flush=True)
        finally:
            shutil.rmtree(root.parent, ignore_errors=True)
    info["load_end"] = C.loadavg()
    small, big = sizes
    shards = {n: -(-n // SHARD) for n in sizes}
    growth = shards[big] / shards[small]
    rows = []
    for name in STEPS:
        a, b = results[small]["steps"][name], results[big]["steps"][name]
        rows.append([name, f"{a['s']:.1f}", f"{b['s']:.1f}", f"{b['s'] / a['s']:.1f}x", f"{a['rss_mib']:.0f}",
                     f"{b['rss_mib']:.0f}", b["out"][:80].replace("|", "/")])
    rows.append(["manifest.json bytes", f"{results[small]['manifest']:,}", f"{results[big]['manifest']:,}",
                 f"{results[big]['manifest'] / results[small]['manifest']:.1f}x", "", "", ""])
    rows.append(["files in the cache", f"{results[small]['files']:,}", f"{results[big]['files']:,}",
                 f"{results[big]['files'] / results[small]['files']:.1f}x", "", "", ""])
    table = C.table(["step", f"s at N={small:,}", f"s at N={big:,}", f"growth (shards x{growth:.1f})",
                     "peak RSS MiB (small)", "peak RSS MiB (full)", "last line of its output"], rows)
    body = (f"## Full-size rehearsal: ImageNet's row and shard count (bench/scale.py)\n\n{C.machine_line(info)}\n\n"
            f"{shards[big]:,} shards of {SHARD} rows; latents (N, 8, 2, 2) float32 complete, features (N, 4, 8) "
            f"int8 with {UNFINISHED:.0%} of its shards unwritten (a killed encode). Built through the real writer "
            f"in {results[big]['build_s']:.0f} s ({results[big]['disk'] / 1e6:,.0f} MB on disk), then deleted. "
            f"Each step in a fresh process (Python start-up and imports included):\n\n{table}\n")
    print(body)
    if C.should_write_docs(args):
        C.update_section("scale", body)


if __name__ == "__main__":
    main()
