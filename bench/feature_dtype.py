"""Stored feature forms side by side: float16 (the default), int8 with a per-token absmax scale (cache/quant.py),
and float8 e4m3 with the same per-token scale (measured only, to choose on numbers).

    python bench/feature_dtype.py            # updates docs/benchmarks.md (section feature-dtype)
    python bench/feature_dtype.py --quick    # fewer images, a smaller reader cache, prints only

On real encoder architectures, through the project's encoder registry (`load_encoder`):
- dinov2-b (ViT-B/14, grid 16) with random weights: timm's init, saved and loaded through --encoder-weights;
- the demo's trained SSL encoder: the `tiny` ViT trained with SimCLR on the demo's digits (demo/ssl.py, the demo's
  default 200 steps), grid 8;
both on the demo's digit images (ADM crop; 256 px for dinov2-b, the demo's 8 px for its encoder). For each form: bytes per image against float16, per-token cosine to the
float16 tokens (mean, min), and the REPA cosine loss and its gradient with respect to the projector output
(difference and cosine against the loss on float16 tokens), for two projector outputs: a random one (its loss is
near 0, so the absolute difference is given) and one near the target (target + noise, as after some training;
relative difference).

Reader: two caches of the same (N, 256, 768) rows written by the real writer, float16 and int8; random batches of
256 rows gathered through `CacheReader` (4 threads, every row's crc32c checked), int8 both dequantized to float16
inside the gather (the CPU path) and in its stored form (int8 + float32 scales, what training on a GPU ships to
the device, training/stream.py), all interleaved round by round in this one process (medians); warm, and cold (the
cache files' pages evicted with posix_fadvise before each batch). For reference, the device path's dequantization
(`dequantize_int8_tensor`) timed on a CPU tensor of one batch; on a GPU it is a few elementwise kernels, not
measured here.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from repa_pipe.cache import writer  # noqa: E402
from repa_pipe.cache.manifest import ArraySpec, Dataset, Provenance  # noqa: E402
from repa_pipe.cache.quant import dequantize_int8, dequantize_int8_tensor, quantize_int8  # noqa: E402
from repa_pipe.cache.reader import CacheReader  # noqa: E402
from repa_pipe.cache.sources import load_preprocessed, open_source  # noqa: E402
from repa_pipe.demo.digits import write_digits_imagefolder  # noqa: E402
from repa_pipe.demo.ssl import train_ssl_encoder  # noqa: E402
from repa_pipe.models import feature_encoders as FE  # noqa: E402
from repa_pipe.models.transport import alignment_loss  # noqa: E402
from repa_pipe.pipeline.hashing import hash_lines, sha256_int64  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

E4M3_MAX = 448.0
# reader rows: int8 dequantized to float16 in the gather (CPU training), int8 as stored (CUDA training), the op
I8, ST = "int8 dequantized in the gather", "int8 stored (+ scales)"
OP = "dequantize_int8_tensor on the CPU (no read)"


def int8_roundtrip(x: np.ndarray) -> np.ndarray:
    """(B, T, D) float32 -> the float16 tokens the reader serves from an int8 cache."""
    return dequantize_int8(quantize_int8(x), np.empty(x.shape, dtype=np.float16))


def fp8_roundtrip(x: np.ndarray) -> np.ndarray:
    """Per-token scale absmax / 448, values as float8_e4m3fn, read back as float16 (same bytes as int8)."""
    t = torch.from_numpy(x)
    scale = t.abs().amax(-1, keepdim=True) / E4M3_MAX
    q = (t / scale.clamp_min(1e-30)).to(torch.float8_e4m3fn)
    return (q.float() * scale).half().numpy()


FORMS = {"float16": (lambda x: x.astype(np.float16), lambda t, d: t * d * 2),
         "int8": (int8_roundtrip, lambda t, d: t * (d + 4)),
         "float8_e4m3": (fp8_roundtrip, lambda t, d: t * (d + 4))}


def token_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)


def loss_and_grad(h: torch.Tensor, z: np.ndarray) -> tuple[float, torch.Tensor]:
    h = h.clone().requires_grad_(True)
    loss = alignment_loss([h], [torch.from_numpy(z)])
    loss.backward()
    return float(loss.detach()), h.grad.flatten().double()


def fidelity(tokens: np.ndarray, seed: int = 0) -> list[dict]:
    """One dict per form: bytes ratio, token cosine, loss / gradient agreement with float16."""
    ref = tokens.astype(np.float16)
    g = torch.Generator().manual_seed(seed)
    t = torch.from_numpy(tokens)
    projs = {"random": torch.randn(t.shape, generator=g),
             "near": t + 0.5 * t.std() * torch.randn(t.shape, generator=g)}
    B, T, D = tokens.shape
    out = []
    for name, (roundtrip, nbytes) in FORMS.items():
        z = roundtrip(tokens)
        cos = token_cos(z, ref)
        row = {"form": name, "bytes": nbytes(T, D), "ratio": nbytes(T, D) / (T * D * 2),
               "cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
        for pname, h in projs.items():
            l_ref, g_ref = loss_and_grad(h, ref)
            l, gr = loss_and_grad(h, z)
            row[f"loss_abs_{pname}"] = abs(l - l_ref)
            row[f"loss_rel_{pname}"] = abs(l - l_ref) / abs(l_ref)
            row[f"grad_cos_{pname}"] = float(torch.dot(gr, g_ref) / (gr.norm() * g_ref.norm()))
        out.append(row)
    return out


def encoder_tokens(quick: bool, scratch: Path) -> dict[str, np.ndarray]:
    """{encoder: (B, T, D) float32 tokens} on the demo's digits."""
    folder = write_digits_imagefolder(scratch / "digits", size=32)  # upscaled to 256 px by the ADM crop
    folder8 = write_digits_imagefolder(scratch / "digits8", size=8)  # the demo's own size
    src = open_source(str(folder))
    n_b = 16 if quick else 64
    rng = np.random.default_rng(0)
    pick = rng.choice(len(src), size=max(n_b, 256), replace=False)
    out = {}
    # dinov2-b, random weights through the registry: timm's init saved as a weights file, loaded like real weights
    spec = FE.get_spec("dinov2-b")
    torch.manual_seed(0)
    model = FE._build_model(spec, 16)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(scratch / "dinov2-b-random.safetensors"))
    enc = FE.load_encoder("dinov2-b", str(scratch / "dinov2-b-random.safetensors"), grid=16)
    x = torch.from_numpy(np.stack([load_preprocessed(src, int(i), 256) for i in pick[:n_b]])).permute(0, 3, 1, 2)
    with torch.inference_mode():
        out["dinov2-b (random weights), 256 px"] = torch.cat([enc(x[i:i + 8]) for i in range(0, n_b, 8)]).numpy()
    # the demo's encoder: SimCLR-trained tiny ViT, grid 8, on the digits at 8 px (the demo's own recipe)
    src8 = open_source(str(folder8))
    images = np.stack([load_preprocessed(src8, i, 8) for i in range(len(src8))])
    sd = train_ssl_encoder(images, 8, steps=40 if quick else 200, seed=0)
    save_file(sd, str(scratch / "tiny-simclr.safetensors"))
    tiny = FE.load_encoder("tiny", str(scratch / "tiny-simclr.safetensors"), grid=8)
    xt = torch.from_numpy(images[pick[:256]]).permute(0, 3, 1, 2)
    with torch.inference_mode():
        out["demo SSL encoder (tiny, SimCLR), 8 px"] = tiny(xt).numpy()
    return out


# ------------------------------------------------------------------------------------------------ reader
def make_cache(root: Path, n: int, dtype: str, T: int = 256, D: int = 768) -> None:
    keys = [f"b/{i}" for i in range(n)]
    labels = np.arange(n, dtype=np.int64) % 1000
    ds = Dataset(kind="synthetic", root="bench/feature_dtype.py", n=n, num_classes=1000,
                 file_list_sha256=hash_lines(keys), labels_sha256=sha256_int64(labels))
    writer.open_or_create(root, ds, keys, labels, 256, 64)  # 64-row shards: a batch spans every shard
    spec = ArraySpec(kind="features", model=Provenance("dinov2-b", "synthetic", "none", True), dtype=dtype,
                     shape=(n, T, D), precision="fp32", preprocessing={})
    m = writer.ensure_array(root, spec)
    w = writer.ShardWriter(root, m, spec.name)
    rng = np.random.default_rng(0)
    for k in range(m.num_shards):
        s, e = m.shard_range(k)
        w.write(k, w.store_rows(rng.standard_normal((e - s, T, D), dtype=np.float32)), [])
    writer.finalize(root, spec.name)


def evict(files: list[Path]) -> None:
    """Drop these files' pages only (posix_fadvise DONTNEED): a system-wide drop_caches would disturb the other
    users of a shared machine."""
    os.sync()
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def reader_rates(scratch: Path, n: int, rounds: int, batch: int = 256, threads: int = 4) -> dict[str, list[float]]:
    roots = {d: scratch / f"reader-{d}" for d in ("float16", "int8")}
    for d, root in roots.items():
        make_cache(root, n, d)
    readers = {d: CacheReader(root, ["features/dinov2-b"], threads=threads) for d, root in roots.items()}
    readers[I8] = readers.pop("int8")  # the CPU training path: float16 out of the gather
    roots[I8] = roots["int8"]
    # The same float16 cache with at most one shard file open: every shard a batch touches is opened (and
    # closed) again, as an open/pread/close-per-batch reader would, against the default LRU of 256.
    readers["float16, 1 open file"] = CacheReader(roots["float16"], ["features/dinov2-b"], threads=threads)
    readers["float16, 1 open file"].arrays["features/dinov2-b"].max_open = 1
    roots["float16, 1 open file"] = roots["float16"]
    # The int8 cache gathered as stored (no dequantization), as BatchStream(dequantize="device") reads it.
    readers[ST] = CacheReader(roots["int8"], ["features/dinov2-b"], threads=threads)
    roots[ST] = roots["int8"]
    del roots["int8"]
    stored = {d: d == ST for d in readers}
    bufs = {d: r.buffers(batch, stored[d]) for d, r in readers.items()}
    rng = np.random.default_rng(1)
    for d, r in readers.items():  # warm the page cache
        for lo in range(0, n, batch):
            r.gather(np.arange(lo, min(lo + batch, n)))
    rates: dict[str, list[float]] = {f"{d}, {w}": [] for w in ("warm", "cold") for d in readers}
    for _ in range(rounds):
        for d, r in readers.items():
            idx = rng.choice(n, size=batch, replace=False)
            t0 = time.perf_counter()
            for _ in range(4):
                r.gather(idx, out=bufs[d], stored=stored[d])
            rates[f"{d}, warm"].append(4 * batch / (time.perf_counter() - t0))
    for _ in range(max(2, rounds // 3)):
        for d, r in readers.items():
            evict(sorted((roots[d] / "cache.zarr").rglob("c/*/0/0")))
            idx = rng.choice(n, size=batch, replace=False)
            t0 = time.perf_counter()
            r.gather(idx, out=bufs[d], stored=stored[d])
            rates[f"{d}, cold"].append(batch / (time.perf_counter() - t0))
    # The device path's dequantization op on this CPU, on one stored batch (reference only).
    raw = torch.from_numpy(bufs[ST]["features/dinov2-b"])
    rates[OP] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(4):
            dequantize_int8_tensor(raw)
        rates[OP].append(4 * batch / (time.perf_counter() - t0))
    for r in readers.values():
        r.close()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_docs_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(2)
    info = C.machine()
    scratch = Path(tempfile.mkdtemp(prefix="feature_dtype_", dir=C.SCRATCH if C.SCRATCH.is_dir() else None))
    try:
        t0 = time.perf_counter()
        toks = encoder_tokens(args.quick, scratch)
        rows = []
        for enc, x in toks.items():
            for r in fidelity(x):
                rows.append([enc, r["form"], f"{r['bytes']:,}", f"{r['ratio']:.4f}", f"{r['cos_mean']:.6f}",
                             f"{r['cos_min']:.6f}", f"{r['loss_abs_random']:.1e}", f"{r['grad_cos_random']:.6f}",
                             f"{r['loss_rel_near']:.1e}", f"{r['grad_cos_near']:.6f}"])
        fid_s = time.perf_counter() - t0
        n = 1024 if args.quick else 2048
        rates = reader_rates(scratch, n, rounds=5 if args.quick else 9)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    info["load_end"] = C.loadavg()
    fid = C.table(["encoder, tokens", "form", "bytes/image", "vs float16", "token cos mean", "token cos min",
                   "loss abs. diff (random proj.; loss near 0)", "grad cos (random proj.)", "loss rel. diff (near proj.)",
                   "grad cos (near proj.)"], rows)
    med = {d: C.median(v) for d, v in rates.items()}
    rd = C.table(["stored form", "samples/s (median)", "range over rounds", "MB/s read from the page cache"],
                 [[d, med[d], C.spread(v), "-" if d == OP else
                   med[d] * (256 * (768 * 2 if d.startswith("float16") else 772)) / 1e6] for d, v in rates.items()])
    ratio = {f"{d}, {w}": med[f"{d}, {w}"] / med[f"float16, {w}"] for d in (I8, ST) for w in ("warm", "cold")}
    body = (f"## Stored feature forms: float16, int8, float8 (bench/feature_dtype.py)\n\n{C.machine_line(info)}\n\n"
            f"Fidelity against the float16 tokens ({fid_s:.0f} s incl. the encoders' forward passes and the SimCLR "
            f"training):\n\n{fid}\n\nReader, {n} rows of 256x768, random 256-row batches, 4 threads, every row's crc32c "
            f"checked; int8 either dequantized to float16 inside the gather (the CPU training path) or gathered as "
            f"stored, int8 + float32 scales (the CUDA training path, dequantized on the GPU in the step). Warm page "
            f"cache: int8 stored / float16 = {ratio[ST + ', warm']:.2f}, int8 dequantized / float16 = "
            f"{ratio[I8 + ', warm']:.2f}; cold, the files' pages dropped before each batch: "
            f"{ratio[ST + ', cold']:.2f} and {ratio[I8 + ', cold']:.2f}. 32 shards of 64 rows; '1 open file' reopens "
            f"every shard it touches, per batch (1 open file / LRU = "
            f"{med['float16, 1 open file, warm'] / med['float16, warm']:.2f} warm). Last row: the device path's "
            f"dequantization op (`dequantize_int8_tensor`, one 256-row batch already in memory) run on this CPU, "
            f"for reference only; on a GPU it is a few elementwise kernels over 50 MB, not measured here (no GPU on "
            f"this machine):\n\n{rd}\n")
    print(body)
    if C.should_write_docs(args):
        C.update_section("feature-dtype", body)


if __name__ == "__main__":
    main()
