#!/usr/bin/env bash
# Runs a command with wrnc's GPU path on the fake CUDA driver (emu/fakecuda.cpp): every kernel
# runs on the CPU through the emulation, so `--device cuda`, selftest and bench work without a
# GPU (slowly: use tiny networks and batches). Example:
#   bash scripts/fakegpu.sh target/release/wrnc selftest --quick
# Needs g++. The driver and the compiled modules are kept in $WRNC_FAKE_HOME
# (default: $TMPDIR/wrnc-fakegpu-$UID); its own PTX cache too, apart from the real one.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
home="${WRNC_FAKE_HOME:-${TMPDIR:-/tmp}/wrnc-fakegpu-$(id -u)}"
mkdir -p "$home"
lib="$home/libwrnc_fakecuda.so"
if [ ! -f "$lib" ] || [ "$root/emu/fakecuda.cpp" -nt "$lib" ] || [ "$root/emu/cuda_emu_tma.h" -nt "$lib" ]; then
    g++ -O1 -std=c++20 -shared -fPIC -pthread -DWRNC_FAKE_EMU_DIR="\"$root/emu\"" \
        "$root/emu/fakecuda.cpp" -o "$lib.tmp" -ldl
    mv "$lib.tmp" "$lib"
fi
export WRNC_LIBCUDA="$lib" WRNC_NVRTC="$lib"
export WRNC_CACHE_DIR="$home/cache" WRNC_FAKE_BUILD_DIR="$home/build"
exec "$@"
