#!/usr/bin/env bash
# Everything a GPU session carries, prepared on the build machine (no GPU needed):
#   bash bench/prepare_carry.sh [DATA_DIR]
# builds the release binary, strips it into gpu-carry/, records the commit, copies the
# CIFAR-10 archives (DATA_DIR, default ../shared/datasets/cifar10-jpeg), and precompiles every
# module the session compiles, for sm_90 (`bench/run_gpu.sh precompile`, ~7 minutes on 2
# cores) into gpu-carry/cache.tar.xz. Then carry ["gpu-carry"] (bench/README.md); the folder
# must stay under the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/datasets/cifar10-jpeg}
cargo build --release -p wrnc
rm -rf gpu-carry
mkdir -p gpu-carry
cp target/release/wrnc gpu-carry/
strip gpu-carry/wrnc
git rev-parse HEAD >gpu-carry/COMMIT
if [ -f "$data/train.tar.xz" ] && [ -f "$data/test.tar.xz" ]; then
    cp "$data/train.tar.xz" "$data/test.tar.xz" gpu-carry/
else
    echo "warning: no CIFAR-10 archives in $data: the session's training run will have no data" >&2
fi
OUT=${OUT:-/tmp/wrnc-precompile} bash bench/run_gpu.sh precompile
size=$(du -sm gpu-carry | cut -f1)
echo "gpu-carry: ${size} MiB ($(ls gpu-carry | tr '\n' ' '))"
if [ "$size" -ge 64 ]; then
    echo "error: gpu-carry is ${size} MiB, over the device tool's 64 MiB" >&2
    exit 1
fi
