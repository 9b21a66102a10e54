#!/usr/bin/env bash
# repa-pipe GPU device check (one H100/H200-class GPU, no network). From the repository root:
#     bash bench/device_check.sh                 # the wheels of the missing packages in ./.whl (bench/fetch_wheels.sh)
#     DRY_RUN=1 bash bench/device_check.sh       # a CPU rehearsal at tiny sizes: every command and option name
#
# Each part runs under its own timeout and the script goes on after a failure; every figure is one line:
# RESULT (a figure), SKIP (why not), FAIL (the part's last error). The parts, most valuable first:
#   0 setup    venv (--system-site-packages, bridged to python3's own env) + pip install -e ".[test]", offline from
#              $WHEELS (default ./.whl) when present
#   1 bench    `repa-pipe bench` SiT-XL/2 + REPA (dinov2-b), bf16, per-GPU batch 32 and 64, eager: img/s, MFU,
#              data wait, fwd/bwd vs optimizer+EMA, peak memory, projected 400k steps on 8 GPUs; with batch 64 the
#              sampler (SDE 250, cfg 1.8 on [0, 0.7], batch 256, bf16): img/s, projected 50k samples on 8 GPUs
#   2 gpu      `pytest -m gpu` (tests/test_gpu.py): bf16 vs fp32 loss parity, resume within tolerance, NCCL (skipped
#              with one GPU), pinned batches, sample-eval smoke and CPU parity, the reader under ulimit -n 256
#   3 encode   bare forward vs the encode-latents / encode-features stage (--precision auto: tf32) on generated
#              JPEGs, random-init SD-VAE and dinov2-b architectures: img/s and the stage's share of the bare rate
#   4 compile  `repa-pipe bench --compile --no-eager`, batch 32, then 64 while time remains: compile time, img/s, MFU
#
# Knobs (environment): BUDGET_S (default 470: the whole script), WHEELS (default ./.whl), PYTHON (default python3),
# WORK (scratch, default /tmp/repa_devcheck), DRY_RUN=1. Results also go to $OUT/device_check_results.txt when
# $OUT is set.
set -u
START=$(date +%s)
BUDGET=${BUDGET_S:-470}
DEADLINE=$((START + BUDGET))
REPO=$(pwd)
WORK=${WORK:-/tmp/repa_devcheck}
DRY=${DRY_RUN:-0}
rm -rf "$WORK"; mkdir -p "$WORK/py"
RES_DIR=${OUT:-$WORK}
SUMMARY=$RES_DIR/device_check_results.txt
: > "$SUMMARY"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1 \
       PIP_DEFAULT_TIMEOUT=5 PIP_RETRIES=0 PYTHONPATH="$WORK/py" DC_WORK="$WORK" DC_REPO="$REPO" DC_DRY="$DRY"
if [ "$DRY" = 1 ]; then  # tiny sizes: a CPU run that checks the plumbing, not the speed
  export REPA_PIPE_DEVICE=cpu
  MODEL=SiT-T/2; RES=64; B1=4; B2=8; STEPS=2; WARM=1; SB=4; SMS=2; NIMG=8; EB=4; EW=0
else
  export REPA_PIPE_DEVICE=cuda
  MODEL=SiT-XL/2; RES=256; B1=32; B2=64; STEPS=15; WARM=5; SB=256; SMS=10; NIMG=1024; EB=64; EW=12
fi
VAE_DIR=$WORK/sd-vae-random; DINO=$WORK/dinov2-b-random.safetensors
VPY=$WORK/venv/bin/python; RP=$WORK/venv/bin/repa-pipe
export WORK REPO DRY START MODEL RES B1 B2 STEPS WARM SB SMS NIMG EB EW VAE_DIR DINO VPY RP

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((DEADLINE - $(date +%s))); }

# part NAME CAP_S command...: run with timeout min(CAP, time left), copy its RESULT/SKIP lines, one FAIL line on error
part() {
  local name=$1 cap=$2; shift 2
  local rem=$(( $(left) - 5 )) t log=$WORK/$name.log t0 rc why
  if (( rem < 20 )); then say "SKIP $name: time budget (${BUDGET}s) used up"; return 0; fi
  t=$(( cap < rem ? cap : rem )); t0=$(date +%s)
  echo "== $name (timeout ${t}s)"
  if declare -F "$1" > /dev/null; then set -- bash -c '"$0" "$@"' "$@"; fi  # exported functions, with their args
  DC_DEADLINE=$(( t0 + t - 3 )) timeout -k 5 "$t" "$@" > "$log" 2>&1; rc=$?
  grep -hE '^(RESULT|SKIP|NOTE)' "$log" | tee -a "$SUMMARY"
  if [ $rc -ne 0 ]; then
    why=$(grep -hE '^ERROR' "$log" | tail -1)
    [ -z "$why" ] && why=$(grep -hE 'Error|error:|Exception|Traceback|CUDA|Killed' "$log" | grep -v '^ *File ' | tail -1)
    [ -z "$why" ] && why=$(tail -1 "$log")
    (( rc == 124 || rc == 137 )) && why="timeout after ${t}s; last: $(tail -1 "$log")"
    say "FAIL $name rc=$rc: $(echo "$why" | tr -s '\n\t ' '   ' | cut -c1-400)  (log: $log)"
  fi
  echo "   ($name took $(( $(date +%s) - t0 ))s)"
  return 0
}


# ------------------------------------------------------------------------------------------------ python helpers
cat > "$WORK/py/dc_common.py" <<'PY'
"""Shared by the device-check parts: one RESULT line per figure, one ERROR line per failure."""
import json, os, sys, time, traceback

DRY = os.environ.get("DC_DRY") == "1"
DEADLINE = float(os.environ.get("DC_DEADLINE", time.time() + 3600))


def left() -> float:
    return DEADLINE - time.time()


def result(msg: str, **figs) -> None:
    print("RESULT " + msg, flush=True)
    if figs and os.environ.get("FIGS"):
        with open(os.environ["FIGS"], "a") as f:
            f.write(json.dumps(figs) + "\n")


def skip(msg: str) -> None:
    print("SKIP " + msg, flush=True)


def one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:300] if s else ''}"


def guard(part: str, fn) -> None:
    try:
        fn()
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001
        traceback.print_exc()
        print(f"ERROR {part}: {one_line(e)}", flush=True)
        sys.exit(1)


def device():
    import torch
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if DRY:
        return torch.device("cpu")
    raise RuntimeError("no CUDA device visible to torch")


def sync(dev) -> None:
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
PY

cat > "$WORK/py/env_check.py" <<'PY'
import importlib, os, sys
from dc_common import guard, result


def main():
    import torch
    missing = []
    for mod in ("repa_pipe.cli", "zarr", "crc32c", "google_crc32c", "numcodecs", "diffusers", "timm", "typer",
                "webdataset", "torch_fidelity", "sklearn", "pytest"):
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001
            missing.append(f"{mod} ({type(e).__name__})")
    import repa_pipe
    gpu = "no CUDA"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, cc {p.major}.{p.minor}"
    try:
        import xformers  # noqa: F401
        xf = "xformers present"
    except ImportError:
        xf = "no xformers"
    result(f"env: python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}, "
           f"cudnn {torch.backends.cudnn.version()}), {gpu}, {xf}; repa_pipe from {os.path.dirname(repa_pipe.__file__)}; "
           f"missing imports: {', '.join(missing) or 'none'}")


guard("env", main)
PY

cat > "$WORK/py/make_models.py" <<'PY'
"""Random-init weights in the real formats: an SD-VAE diffusers folder (sd-vae-ft-ema architecture) and a timm
dinov2-b state dict file, as bench/encode_overhead.py makes them."""
import sys, time
from pathlib import Path
from dc_common import guard, result

SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                     up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                     layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=256,
                     scaling_factor=0.18215)


def main():
    import torch
    vae_dir, dino = Path(sys.argv[1]), Path(sys.argv[2])
    t0 = time.perf_counter()
    torch.manual_seed(0)
    from diffusers import AutoencoderKL
    from dc_common import DRY
    cfg = dict(SD_VAE_CONFIG)
    if DRY:  # same code paths (4 blocks: downsample 8, 4 latent channels), a fraction of the FLOPs for a CPU dry run
        cfg.update(block_out_channels=[16, 32, 32, 32], norm_num_groups=8, layers_per_block=1)
    AutoencoderKL(**cfg).save_pretrained(str(vae_dir))
    import timm
    from safetensors.torch import save_file
    m = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224, num_classes=0)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(dino))
    result(f"models: random-init SD-VAE folder + dinov2-b timm file written in {time.perf_counter() - t0:.1f}s")


guard("models", main)
PY

cat > "$WORK/py/make_images.py" <<'PY'
"""N JPEGs, ImageNet-like sizes, 8 class folders (as bench/encode_overhead.make_images), in parallel."""
import os, sys
from multiprocessing import Pool
from pathlib import Path
import numpy as np
from dc_common import guard, result

SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 300), (640, 480)]


def one(args):
    root, i = args
    from PIL import Image
    rng = np.random.default_rng(i)
    w, h = SIZES[i % len(SIZES)]
    low = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    d = Path(root) / f"class{i % 8}"
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=90)


def main():
    root, n = sys.argv[1], int(sys.argv[2])
    with Pool(min(8, os.cpu_count() or 1)) as p:
        p.map(one, [(root, i) for i in range(n)], chunksize=16)
    result(f"encode inputs: {n} JPEGs (375-640 px) in {root}")


if __name__ == "__main__":
    guard("images", main)
PY

cat > "$WORK/py/bench_report.py" <<'PY'
"""One RESULT line per figure from a `repa-pipe bench --json` file."""
import json, sys
from dc_common import guard, result


def main():
    rep = json.loads(open(sys.argv[1]).read())
    for t in rep["train"]:
        tag = f"train {t['model']} batch {t['batch']} {t['precision']} {'compiled' if t['compiled'] else 'eager'}"
        key = f"train_{'compile' if t['compiled'] else 'eager'}_b{t['batch']}"
        result(f"{tag}: {t['images_per_s']:,.1f} img/s", **{key: t["images_per_s"]})
        mfu = f"{100 * t['mfu']:.1f}%" if t["mfu"] is not None else "n/a"
        result(f"{tag}: MFU {mfu} ({t['tflops_per_s']:,.0f} TFLOP/s, {t['gflop_per_image']:,.0f} GFLOP/img; {rep['peak']})")
        result(f"{tag}: step {1e3 * t['step_s']:,.1f} ms = fwd+bwd {1e3 * t['fwd_bwd_s']:,.1f} + optimizer+EMA "
               f"{1e3 * t['optimizer_s']:,.1f} ms")
        result(f"{tag}: data wait {100 * t['data_wait_frac']:.2f}%")
        result(f"{tag}: peak memory {t['peak_memory_gib']:,.1f} GiB ({t['memory_kind']})")
        result(f"{tag}: warm-up ({'compile + ' if t['compiled'] else ''}{int(sys.argv[2])} steps) {t['warmup_s']:,.1f} s")
        result(f"{tag}: projected 400k steps x 256 on 8 GPUs {t['projected_hours']:,.1f} h")
    s = rep.get("sampling")
    if s:
        tag = f"sample {rep['train'][0]['model'] if rep['train'] else ''} batch {s['batch']} {s['precision']}"
        result(f"{tag}: {s['images_per_s']:,.2f} img/s for {s['schedule']} ({s['rows_per_s']:,.0f} rows/s, "
               f"{s['rows_per_image']} rows/img)", sample_img_s=s["images_per_s"])
        mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "n/a"
        result(f"{tag}: MFU {mfu} ({s['tflops_per_s']:,.0f} TFLOP/s); peak memory {s['peak_memory_gib']:,.1f} GiB")
        result(f"{tag}: projected 50k samples on 8 GPUs {s['projected_minutes']:,.1f} min")


guard("bench_report", main)
PY

cat > "$WORK/py/encode_bench.py" <<'PY'
"""Encode throughput: the model's bare forward (random uint8 batches already on the device, the stage's precision)
vs the encode stage on JPEGs (decode workers, pinned copies, writes), timed around its encoding job."""
import argparse, time
from pathlib import Path
from dc_common import DRY, guard, result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["latents", "features"]); ap.add_argument("--images"); ap.add_argument("--cache")
    ap.add_argument("--weights"); ap.add_argument("--res", type=int); ap.add_argument("--n", type=int)
    ap.add_argument("--batch", type=int); ap.add_argument("--workers", type=int)
    a = ap.parse_args()
    import torch
    from repa_pipe.encoding import runner
    from repa_pipe.encoding.config import EncodeFeaturesConfig, EncodeLatentsConfig
    from repa_pipe.pipeline import dist, hardware
    from repa_pipe.pipeline.precision import compute, resolve
    dev = dist.device()
    prec = resolve("auto", dev, "encode")
    if a.kind == "latents":
        from repa_pipe.models.latent_codecs import load_codec
        from repa_pipe.stages import encode_latents as stage
        model = load_codec("sd-vae-ft-mse", a.weights, device=dev)
        if dev.type == "cuda":
            model.to(memory_format=torch.channels_last)
        fwd, name = model.encode_moments, "sd-vae-ft-mse arch"
        cfg = EncodeLatentsConfig(source=a.images, cache=Path(a.cache), vae="sd-vae-ft-mse", vae_weights=a.weights,
                                  resolution=a.res, batch_size=a.batch, workers=a.workers)
    else:
        from repa_pipe.models.feature_encoders import load_encoder
        from repa_pipe.stages import encode_features as stage
        fwd, name = load_encoder("dinov2-b", a.weights, grid=a.res // 16, device=dev), "dinov2-b arch"
        cfg = EncodeFeaturesConfig(source=a.images, cache=Path(a.cache), encoder="dinov2-b", encoder_weights=a.weights,
                                   resolution=a.res, batch_size=a.batch, workers=a.workers)
    x = torch.randint(0, 256, (a.batch, a.res, a.res, 3), dtype=torch.uint8).permute(0, 3, 1, 2).to(dev)
    reps = 2 if DRY else 10
    with torch.inference_mode(), compute(prec, dev):
        fwd(x); hardware.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            fwd(x)
        hardware.synchronize(dev)
    bare = reps * a.batch / (time.perf_counter() - t0)
    result(f"encode {name} bare forward, batch {a.batch} {a.res} px, {prec}: {bare:,.0f} img/s", **{f"enc_bare_{a.kind}": bare})
    times = []
    job = runner.run_job
    def timed(*args, **kw):
        t = time.perf_counter(); out = job(*args, **kw); times.append(time.perf_counter() - t); return out
    runner.run_job = timed
    stage.run(cfg)
    rate = a.n / times[0]
    result(f"encode {name} stage ({a.workers} decode workers, batch {a.batch}, {prec}): {rate:,.0f} img/s on {a.n} "
           f"JPEGs = {rate / bare:.2f} of the bare forward", **{f"enc_stage_{a.kind}": rate})


guard("encode", main)
PY

# ------------------------------------------------------------------------------------------------ 0. setup
setup_env() {
  local PY=${PYTHON:-python3} V=$WORK/venv WHL=${WHEELS:-$REPO/.whl} parent vsite ok=0
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
      --format=csv,noheader | sed 's/^/RESULT nvidia-smi: /'
  echo "RESULT host: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/2^20}' /proc/meminfo) RAM, ulimit -n $(ulimit -n) (soft) / $(ulimit -Hn) (hard), $(df -h "$WORK" | awk 'NR==2 {print $4}') free in $WORK ($(stat -f -c %T "$WORK"))"
  "$PY" -m venv --system-site-packages "$V" || "$PY" -m venv --clear --without-pip --system-site-packages "$V" || return 1
  # python3 may itself live in a venv (the device image: /opt/torch/.venv): a venv made from it sees the BASE
  # interpreter's site-packages, not that venv's torch. Bridge with a .pth (appended after the new venv's own dir).
  parent=$("$PY" -c 'import site, sys; print("\n".join(p for p in site.getsitepackages() if p.startswith(sys.prefix)))')
  vsite=$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  printf '%s\n' $parent > "$vsite/zz_parent_env.pth"
  # tests call Path(sys.executable).parent / "torchrun": give the venv one when torch lives in the parent env
  [ -x "$V/bin/torchrun" ] || { printf '#!/bin/sh\nexec "%s" -m torch.distributed.run "$@"\n' "$V/bin/python" > "$V/bin/torchrun"; chmod +x "$V/bin/torchrun"; }
  # --no-build-isolation: the build backend (setuptools >= 68, as pyproject.toml asks) comes from the environment,
  # nothing is fetched for it. Python 3.11's ensurepip puts an old setuptools (65) in the venv that shadows the
  # parent's and cannot build editables without `wheel`: drop it so the parent env's one is used.
  "$V/bin/python" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' 2>/dev/null \
    || "$V/bin/python" -m pip uninstall -q -y setuptools 2>/dev/null
  "$V/bin/python" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' 2>/dev/null \
    || "$V/bin/python" -m pip install -q ${WHL:+--find-links "$WHL"} "setuptools>=68" \
    || echo "NOTE setup: no setuptools >= 68 for the editable build"
  if [ -d "$WHL" ]; then
    echo "installing offline from $WHL"
    "$V/bin/python" -m pip install -q --no-index --find-links "$WHL" --no-build-isolation -e ".[test]" && ok=1
  fi
  if [ $ok = 0 ]; then
    echo "installing from the index"
    timeout 150 "$V/bin/python" -m pip install -q --no-build-isolation -e ".[test]" && ok=1
  fi
  if [ $ok = 0 ]; then
    echo "NOTE setup: pip install -e \".[test]\" failed (offline and no usable wheels?): installing the project alone (--no-deps)"
    "$V/bin/python" -m pip install -q --no-deps --no-build-isolation -e . || return 1
  fi
  echo "RESULT install: pip install -e \".[test]\" $([ $ok = 1 ] && echo ok || echo 'FAILED, --no-deps fallback used') in $(( $(date +%s) - START ))s (venv $V)"
  "$V/bin/python" "$WORK/py/env_check.py"
}
export -f setup_env

part setup 150 setup_env
if [ ! -x "$VPY" ] || [ ! -x "$RP" ]; then say "FAIL setup: no venv with repa-pipe; stopping"; exit 1; fi
if ! "$VPY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' && [ "$DRY" != 1 ]; then
  say "FAIL cuda: torch.cuda.is_available() is False in the venv; GPU parts would not test anything; stopping"; exit 1
fi

# ------------------------------------------------------------------------------------------------ 1. bench (eager)
bench() {  # bench NAME EXTRA...: repa-pipe bench on a synthetic cache, then one RESULT line per figure
  local name=$1; shift
  "$RP" bench --model $MODEL --resolution $RES --steps $STEPS --warmup $WARM --sample-batch-size $SB \
    --sample-measure-steps $SMS --work "$WORK/$name" --json "$WORK/$name.json" "$@" || return 1
  "$VPY" "$WORK/py/bench_report.py" "$WORK/$name.json" $WARM
}
export -f bench
part bench_b$B1 90 bench bench_b$B1 --batch-size $B1 --no-sampling
part bench_b$B2 90 bench bench_b$B2 --batch-size $B2

# ------------------------------------------------------------------------------------------------ 2. gpu tests
gpu_tests() {
  local rc
  "$VPY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/test_gpu.py -rs > "$WORK/pytest_gpu.txt" 2>&1; rc=$?
  echo "RESULT pytest -m gpu: rc $rc: $(grep -E '(passed|failed|skipped|error)' "$WORK/pytest_gpu.txt" | tail -1)"
  grep -E '^(FAILED|ERROR|SKIPPED)' "$WORK/pytest_gpu.txt" | cut -c1-300 | sed 's/^/NOTE /'
  return $rc
}
export -f gpu_tests
part gpu_tests 120 gpu_tests

# ------------------------------------------------------------------------------------------------ 3. encode
encode() {
  "$VPY" "$WORK/py/make_models.py" "$VAE_DIR" "$DINO" || return 1
  "$VPY" "$WORK/py/make_images.py" "$WORK/images" $NIMG || return 1
  local common="--images $WORK/images --cache $WORK/enc_cache --res $RES --n $NIMG --batch $EB --workers $EW"
  "$VPY" "$WORK/py/encode_bench.py" latents --weights "$VAE_DIR" $common || return 1
  "$VPY" "$WORK/py/encode_bench.py" features --weights "$DINO" $common
}
export -f encode
part encode 100 encode

# ------------------------------------------------------------------------------------------------ 4. compile
if [ "$DRY" = 1 ]; then
  say "SKIP compile: DRY_RUN (inductor on a CPU is too slow for a rehearsal; tests/test_bench.py covers --compile)"
else
  part compile_b$B1 150 bench compile_b$B1 --batch-size $B1 --compile --no-eager --no-sampling
  part compile_b$B2 150 bench compile_b$B2 --batch-size $B2 --compile --no-eager --no-sampling
fi
say "done in $(( $(date +%s) - START ))s (budget ${BUDGET}s); results: $SUMMARY"
if [ -n "${OUT:-}" ]; then  # the logs and bench JSON files come back with the device tool's $OUT
  (cd "$WORK" && tar czf "$OUT/device_check_logs.tgz" *.log *.json *.txt 2>/dev/null)
fi
