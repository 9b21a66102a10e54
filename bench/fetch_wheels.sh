#!/usr/bin/env bash
# Download, here (with network), the wheels bench/device_check.sh installs offline on the GPU machine: the
# project's dependencies that the device image lacks (its package list: the device notes of this workplace; torch,
# torchvision, timm, numpy, scipy, scikit-learn, typer, rich, safetensors, pillow, matplotlib, pytest ... are there),
# with their own missing dependencies, for the device's Python (3.12, CPython) on manylinux x86_64.
#
#     bash bench/fetch_wheels.sh            # -> ./.whl (git-ignored); then carry .whl with the device call
#
# Versions are pinned to those this repository's tests ran with here, so the device runs the same code paths.
# PYVER / DEST override the target Python and the folder.
set -euo pipefail
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
PY=${PYTHON:-python3}
PKGS=(
  zarr==3.1.6 donfig==0.8.1.post1 google-crc32c==1.9.0 numcodecs==0.16.6   # the cache (zarr v3)
  crc32c==2.9.post0                                                         # row checksums
  webdataset==1.0.2 braceexpand==0.1.7                                      # tar-shard sources
  diffusers==0.42.1 importlib-metadata                                      # SD-VAE
  torch-fidelity==0.4.0                                                     # Inception (metrics)
)
mkdir -p "$DEST"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
for p in "${PKGS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$p"
done
ls -la "$DEST"
echo "wheels in $DEST: $(ls "$DEST" | wc -l) files, $(du -sh "$DEST" | cut -f1) (the device call carries at most 64 MiB)"
