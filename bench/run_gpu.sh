#!/usr/bin/env bash
# THE script for a lent GPU machine. Run from the repository root:
#
#   bench/run_gpu.sh [STAGE...]      stages: info first session selftest selftest_par tiles bench tf32 tf32wg tuned fusion wgmma tf32x3 k64 tma deep dgrad splitk issue6 train train_bf16 assemble
#                                    (and, on the build machine before the carry: precompile)
#                                    (default: info selftest tiles bench train assemble)
#
# Inputs (carried with the working tree):
#   $WRNC            the prebuilt release binary (default gpu-carry/wrnc)
#   $WRNC_DATA_DIR   CIFAR-10 as an image folder (default gpu-carry/cifar10-jpeg: train/<class>/*, test/<class>/*)
# Outputs: everything under $OUT (default ./gpu-out), one log / JSON per stage, plus a copy in
# bench/results/raw/ so a later call on the same (still warm) machine can assemble them;
# `assemble` writes bench/results/<date>-<gpu>.json (and into $OUT).
#
# With 15 minutes of device time for a whole session (machine start included), spend the first
# call on `first`: what the must-shows need most, within one call of at most 600 s:
#   call 0: bench/run_gpu.sh first    (info, the quick selftest, WRN-28-10 f32 + bf16 fused and
#            unfused, PyTorch eager + compile, assemble; every command under a timeout that sums
#            to ~560 s; FIRST_BENCH_TIMEOUT, FIRST_PYTORCH_TIMEOUT, FIRST_SELFTEST_TIMEOUT)
# then, if time is left, `train` (set TRAIN_SECONDS to what remains).
# With more time, each stage is sized for one 10-minute call, every command under `timeout`:
#   call 1: bench/run_gpu.sh info selftest          (~3-6 min)
#   call 1b: bench/run_gpu.sh info tiles            (the bf16 tile search, cached in WRNC_CACHE_DIR,
#            which stays on the machine while it is warm; time unknown until a GPU runs it)
#   call 2: bench/run_gpu.sh info bench assemble    (~6-9 min: wrnc bench f32+bf16 + PyTorch, same call;
#            also bf16 on NCHW, fused only, unless BENCH_BF16_NCHW=0)
#   call 3: bench/run_gpu.sh info train assemble    (~6 min: WRN-16-4 on CIFAR-10 for ~5 min)
#   call 4: bench/run_gpu.sh info train_bf16 assemble   (the same recipe in bf16)
# `assemble` also runs on any machine with python3, over the raw folders fetched back:
#   bench/run_gpu.sh assemble            (reads $OUT and bench/results/raw)
set -u
# this script by a path that survives the `cd` (stage `precompile` runs it again)
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
WRNC=${WRNC:-gpu-carry/wrnc}
# wrnc reads DIR/{train,test}.tar.xz without unpacking (runtime/src/data/folder.rs), so the
# carried archives are the data set as they are
if [ -z "${WRNC_DATA_DIR:-}" ] && [ -f gpu-carry/train.tar.xz ] && [ -f gpu-carry/test.tar.xz ]; then
    DATA=gpu-carry
else
    DATA=${WRNC_DATA_DIR:-gpu-carry/cifar10-jpeg}
fi
OUT=${OUT:-$PWD/gpu-out}
RESULTS=${RESULTS:-bench/results}
RAW=${RAW:-$RESULTS/raw}
NET=${BENCH_NET:-WRN-28-10}
BATCH=${BENCH_BATCH:-128}
TRAIN_NET=${TRAIN_NET:-WRN-16-4}
TRAIN_SECONDS=${TRAIN_SECONDS:-300}
TRAIN_EPOCHS=${TRAIN_EPOCHS:-10}
TRAIN_ARGS=${TRAIN_ARGS:-}          # extra `wrnc run` flags (the rehearsal's --subset ...)
EXAMPLES=${EXAMPLES:-examples}      # the folder `wrnc selftest` checks
SELFTEST_TIMEOUT=${SELFTEST_TIMEOUT:-420}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-200}
BENCH_ARGS=${BENCH_ARGS:---warmup 3 --iters 10}
TILES_TIMEOUT=${TILES_TIMEOUT:-540}
# bench/rehearse_gpu.sh runs this script on the fake GPU with small values of the above
mkdir -p "$OUT" "$RAW" "$RESULTS"
export WRNC_CACHE_DIR=${WRNC_CACHE_DIR:-$PWD/gpu-carry/cache}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(info selftest tiles bench train assemble)

log() { echo "[run_gpu $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/run_gpu.log"; }
keep() { cp -f "$@" "$RAW/" 2>/dev/null || true; }
# run NAME TIMEOUT CMD...: stdout -> $OUT/NAME.out, stderr -> $OUT/NAME.err, rc -> $OUT/NAME.rc
# With PRECOMPILE_ARCH set (stage `precompile`, on a machine without a GPU) a `wrnc bench`,
# `wrnc selftest` or `wrnc run` becomes `wrnc precompile --arch $PRECOMPILE_ARCH` of the same
# command line (the modules it would compile, into WRNC_CACHE_DIR), and nothing else runs.
run() {
    local name=$1 t=$2; shift 2
    if [ -n "${PRECOMPILE_ARCH:-}" ]; then
        if [ "$1" = "$WRNC" ] && [[ " bench selftest run " == *" ${2:-} "* ]]; then
            log "$name: precompile for $PRECOMPILE_ARCH: ${*:2}"
            "$WRNC" precompile --arch "$PRECOMPILE_ARCH" "${@:2}" >"$OUT/$name.out" 2>"$OUT/$name.err"
            local prc=$?
            log "$name: precompile rc=$prc: $(grep -E 'modules for|"modules"|error' "$OUT/$name.out" "$OUT/$name.err" | head -n 2 | tr '\n' ' ')"
            return $prc
        fi
        log "$name: not run (precompile): $*"
        return 0
    fi
    log "$name: $* (timeout ${t}s)"
    local t0=$SECONDS
    timeout -k 5 "$t" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
    local rc=$?
    echo "$rc" >"$OUT/$name.rc"
    log "$name: rc=$rc in $((SECONDS - t0))s"
    tail -n 25 "$OUT/$name.err" | sed "s/^/  [$name] /"
    tail -n 40 "$OUT/$name.out" | sed "s/^/  [$name] /"
    keep "$OUT/$name.out" "$OUT/$name.err" "$OUT/$name.rc"
    return $rc
}

# the modules `precompile` compiled on the build machine (gpu-carry/cache.tar.xz), unpacked
# into the cache once per machine (the marker), by the GPU stages only (every one calls
# find_nvrtc): they load without compiling or the driver's JIT where this machine's NVRTC has
# the build machine's version (else every entry misses and the modules compile here). Entries
# already there are kept; a file an interrupted unpack cut short is a miss (`is_cubin`).
unpack_cache() {
    [ -z "${PRECOMPILE_ARCH:-}" ] && [ -f gpu-carry/cache.tar.xz ] || return 0
    [ -f "$WRNC_CACHE_DIR/cubin/.unpacked" ] && return 0
    mkdir -p "$WRNC_CACHE_DIR"
    if tar --skip-old-files -xJf gpu-carry/cache.tar.xz -C "$WRNC_CACHE_DIR"; then
        touch "$WRNC_CACHE_DIR/cubin/.unpacked"
        log "unpacked $(ls "$WRNC_CACHE_DIR/cubin" | wc -l) precompiled modules (made by $(cat gpu-carry/cache.nvrtc 2>/dev/null)) into $WRNC_CACHE_DIR; this machine's NVRTC: $(ls /usr/local/cuda/lib64/libnvrtc.so.* 2>/dev/null | tr '\n' ' ')"
    else
        log "unpacking gpu-carry/cache.tar.xz failed: the modules compile here"
    fi
}

find_nvrtc() {
    unpack_cache
    # the driver's CUDA version decides which NVRTC is safe (PTX newer than the driver fails)
    if [ -z "${WRNC_NVRTC:-}" ]; then
        for c in /usr/local/cuda/lib64/libnvrtc.so.13 /usr/local/cuda-13*/lib64/libnvrtc.so.13 \
                 /usr/local/cuda/lib64/libnvrtc.so; do
            if [ -e "$c" ]; then export WRNC_NVRTC=$c; break; fi
        done
    fi
    log "WRNC_NVRTC=${WRNC_NVRTC:-<unset: wrnc searches itself, see runtime/src/nvrtc.rs>}"
}

stage_info() {
    {
        echo "== date"; date -u
        echo "== commit"; git rev-parse HEAD 2>/dev/null || cat gpu-carry/COMMIT 2>/dev/null
        echo "== nvidia-smi"; nvidia-smi 2>&1
        echo "== libcuda"; ldconfig -p 2>/dev/null | grep -E "libcuda\.so" ; ls -l /usr/lib/x86_64-linux-gnu/libcuda.so* 2>&1
        echo "== libnvrtc"; ldconfig -p 2>/dev/null | grep -E "libnvrtc"; ls -l /usr/local/cuda*/lib64/libnvrtc.so* 2>&1
        python3 - <<'PY' 2>&1
import glob, os
try:
    import nvidia
    for d in nvidia.__path__:
        for f in sorted(glob.glob(os.path.join(d, "*", "lib", "libnvrtc*"))):
            print("pip:", f)
except Exception as e:
    print("no pip nvidia package:", e)
PY
        echo "== nvcc"; nvcc --version 2>&1 | tail -2
        echo "== torch"; python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1
        echo "== wrnc"; ls -l "$WRNC"; "$WRNC" --version
        echo "== data"; ls "$DATA" 2>&1 | head; ls "$DATA/train" 2>&1 | head -3
    } >"$OUT/info.txt" 2>&1
    cat "$OUT/info.txt"
    keep "$OUT/info.txt"
    find_nvrtc
}

# the layout probes' dump (selftest --probe-dump, sm_90 only), kept, and which readings of
# wgmma and landings of TMA explain it (scripts/probe_analyze.py: wrnc's, or which instead)
analyze_probes() {
    [ -f "$OUT/wgmma_probe.json" ] || return 0
    timeout 120 python3 scripts/probe_analyze.py "$OUT/wgmma_probe.json" >"$OUT/probe_analysis.txt" 2>&1
    log "probes: $(tail -n 1 "$OUT/probe_analysis.txt")"
    keep "$OUT/wgmma_probe.json" "$OUT/probe_analysis.txt"
}

stage_selftest() {
    find_nvrtc
    # built-in small networks of every family first (fast, JSON), then every example
    # (human-readable lines, streamed, so a timeout still leaves the checks done so far)
    run selftest_quick 150 "$WRNC" selftest --device cuda --quick --json --probe-dump "$OUT/wgmma_probe.json"
    analyze_probes
    run selftest "$SELFTEST_TIMEOUT" "$WRNC" selftest --device cuda --examples "$EXAMPLES"
}

# the examples' selftest, one process per example network, SELFTEST_JOBS (6) at a time: the
# checks are CPU-bound (the f64 reference, NVRTC) and the GPU has room for them all; each
# example's log is selftest_ex_<name>.out, and `assemble` adds their summary lines up. The
# slowest examples start first, and every process ends by one deadline (DEADLINE, epoch
# seconds; default SELFTEST_TIMEOUT from now): one that would start with under 15 s left is
# skipped, so a late start cannot outrun the session.
stage_selftest_par() {
    find_nvrtc
    export -f run log keep
    export OUT RAW WRNC EXAMPLES
    [ -n "${WRNC_NVRTC:-}" ] && export WRNC_NVRTC
    DEADLINE=${DEADLINE:-$(($(date +%s) + ${SELFTEST_TIMEOUT:-420}))}
    export DEADLINE
    local names=() n f
    for n in pyramidnet-272-200-bottleneck resnet-50-imagenet wrn-50-2-imagenet densenet-bc-100-12 \
             preresnet-164 wrn-28-10 wrn-28-10-cifar100 wrn-28-10-sd; do
        [ -f "$EXAMPLES/$n.net" ] && names+=("$n")
    done
    for f in "$EXAMPLES"/*.net; do
        n=$(basename "$f" .net)
        [[ " ${names[*]} " == *" $n "* ]] || names+=("$n")
    done
    printf '%s\n' "${names[@]}" |
        WRNC_JOBS=${SELFTEST_COMPILE_JOBS:-3} xargs -P "${SELFTEST_JOBS:-6}" -I{} bash -c \
            't=$((DEADLINE - $(date +%s))); if [ "$t" -lt 15 ]; then log "selftest_ex_$1: not started (${t}s left)"; exit 0; fi
             run "selftest_ex_$1" "$t" "$WRNC" selftest --device cuda --examples "$EXAMPLES" --only "$1 "' \
            _ {}
}

# the results so far, copied where the device call fetches them (PACK_TO: the call's own
# $OUT), so a call cut off by its time limit still brings back every figure assembled before
pack() {
    [ -n "${PACK_TO:-}" ] || return 0
    mkdir -p "$PACK_TO"
    cp -f "$OUT"/2*.json "$OUT/run_gpu.log" "$PACK_TO"/ 2>/dev/null
    tar czf "$PACK_TO/gpuout.tgz.tmp" --exclude='*ckpt*' -C "$(dirname "$OUT")" "$(basename "$OUT")" \
        2>/dev/null && mv -f "$PACK_TO/gpuout.tgz.tmp" "$PACK_TO/gpuout.tgz"
    return 0
}

# assemble, print one line of it, pack
assemble_pack() {
    stage_assemble >"$OUT/assemble.out" 2>&1
    log "assembled: $(grep -c . "$OUT/assemble.out") lines; $(tail -n 1 "$OUT/assemble.out")"
    pack
}

# the first call of a short GPU budget (see the top): the selftest's built-in networks, and the
# benches the results format needs, with tighter timeouts and without the NCHW comparison
stage_first() {
    stage_info
    pack
    # (on sm_90 the wgmma layout probe's images and raw accumulators go to wgmma_probe.json:
    # if the hardware reads wgmma otherwise than wrnc, how it reads it is worked out from them)
    run selftest_quick "${FIRST_SELFTEST_TIMEOUT:-100}" "$WRNC" selftest --device cuda --quick --json \
        --probe-dump "$OUT/wgmma_probe.json"
    analyze_probes
    # bf16 at the default tile: a tile search on a fresh machine (its time unknown until a GPU
    # runs it) could eat the bench's whole limit, and `--json` prints only at the end
    BENCH_TIMEOUT=${FIRST_BENCH_TIMEOUT:-140} BENCH_BF16_NCHW=0 BENCH_BF16_TILES=${FIRST_TILES:-default} \
        PYTORCH_TIMEOUT=${FIRST_PYTORCH_TIMEOUT:-170} PYTORCH_ITERS=10 stage_bench
    stage_assemble
    pack
}

# ONE call that does what the must-shows need, in priority order, inside SESSION_SECONDS
# (default 570; set it from the device's budget left): `first` (measured alone); the optional
# benches (tf32, tf32wg, tuned, fusion, wgmma, k64, tf32x3; tma and deep when asked) only while they leave SESSION_RESERVE
# (240 s) for the rest; then the CIFAR-10 training run (foreground) and the examples'
# selftest (background, the slowest first) side by side until one deadline 25 s before the
# budget ends (the selftest is CPU-bound: its f64 reference and NVRTC; neither run's speed is
# reported). Every assemble is packed into PACK_TO, so a call cut off keeps what it had.
stage_session() {
    local t0 budget end reserve
    t0=$(date +%s)
    budget=${SESSION_SECONDS:-570}
    end=$((t0 + budget - 25))
    reserve=${SESSION_RESERVE:-240}
    left() { echo $((end - $(date +%s))); }
    # optional ENABLED TIMEOUT STAGE: the stage, then assemble_pack, if ENABLED is 1 and its
    # limit TIMEOUT still leaves the reserve
    optional() {
        [ "$1" = 1 ] && [ $(($(left) - $2)) -ge "$reserve" ] || return 0
        "$3"
        assemble_pack
    }
    unpack_data &
    local unpack=$!
    stage_first
    # f32 storage with the convolutions in plain TF32 (--tf32: what PyTorch's f32 convolutions
    # run as by default), fused and unfused: issue 5's f32 ratio with the convolutions at
    # tensor-core speed, and the f32 standing against PyTorch on the same arithmetic
    optional "${BENCH_TF32:-1}" "${TF32_TIMEOUT:-150}" stage_tf32
    # the same with Hopper's warpgroup MMA (--tf32 --wgmma, sm_90 only): TF32 at wgmma's rate,
    # which issue 5's f32 ratio needs (docs/gpu.md, "What fusion can buy a step")
    optional "${BENCH_TF32WG:-1}" "${TF32WG_TIMEOUT:-150}" stage_tf32wg
    # bf16 at the tiles a search on this GPU picks (first's bf16 is at the default tile): the
    # search's candidate modules come precompiled (`precompile`), only the picked tiles'
    # modules compile here
    optional "${BENCH_TUNED:-1}" "${TUNED_TIMEOUT:-150}" stage_tuned
    # fused against unfused where the arithmetic says fusion can show 1.3x (docs/gpu.md, "What
    # fusion can buy a step"): PreResNet-164's f32 training step
    optional "${BENCH_FUSION:-1}" "${FUSION_TIMEOUT:-120}" stage_fusion
    # Hopper's warpgroup MMA (issue 6's sm_90 step), fused, beside `first`'s mma.sync figures
    WGMMA_TILES=${WGMMA_TILES:-default} optional "${BENCH_WGMMA:-1}" "${WGMMA_TIMEOUT:-120}" stage_wgmma
    # the same with stages of 64 and both operands by TMA where they fit (--k64 --tma), the
    # training step profiled kernel by kernel: the wgmma engine as designed to run fastest
    optional "${BENCH_K64:-1}" "${K64_TIMEOUT:-120}" stage_k64
    # f32 on the tensor cores as 3xTF32 (--tf32x3), fused and unfused: issue 5's f32 ratio
    # with the convolutions at tensor-core speed, beside `first`'s FMA-engine figures
    optional "${BENCH_TF32X3:-1}" "${TF32X3_TIMEOUT:-150}" stage_tf32x3
    # the weight operand by TMA (--tma, sm_90), when asked: off by default, like `deep`
    optional "${BENCH_TMA:-0}" "${TMA_TIMEOUT:-120}" stage_tma
    # deep pipelines in dynamic shared memory (--stages 4), when asked: off by default so the
    # training run and the examples' selftest keep their time
    optional "${BENCH_DEEP:-0}" "${DEEP_TIMEOUT:-120}" stage_deep
    # phase-order data gradients against every tap, when asked (two short benches)
    optional "${BENCH_DGRAD:-0}" "$((2 * ${DGRAD_TIMEOUT:-90}))" stage_dgrad
    # batch-1 inference with split-K against without, when asked (two short benches)
    optional "${BENCH_SPLITK:-0}" "$((2 * ${SPLITK_TIMEOUT:-90}))" stage_splitk
    wait "$unpack"
    local l
    l=$(left)
    log "session: ${l}s left for train + selftest"
    if [ "$l" -gt 45 ]; then
        DEADLINE=$end stage_selftest_par &
        local st=$!
        TRAIN_SECONDS=$((l - 5)) stage_train
        assemble_pack
        wait "$st"
    fi
    assemble_pack
}

# the tile caches (every GEMM's times per tile), kept with the results
keep_tile_caches() {
    local f
    for f in "$WRNC_CACHE_DIR"/tiles/*.json; do
        [ -f "$f" ] && cp -f "$f" "$OUT/tile_cache_$(basename "$f")" && keep "$OUT/tile_cache_$(basename "$f")"
    done
}

# bf16 at searched tiles (--tiles auto: every GEMM timed with each candidate tile on this GPU,
# the fastest kept and cached in WRNC_CACHE_DIR/tiles), fused only; the tile cache file is
# kept with the results
stage_tuned() {
    find_nvrtc
    # shellcheck disable=SC2086
    run bench_wrnc_bf16_tuned "${TUNED_TIMEOUT:-150}" "$WRNC" bench "$NET" --batch "$BATCH" --precision bf16 \
        --fused-only --tiles auto $BENCH_ARGS --json
    keep_tile_caches
}

# bf16 with --wgmma (sm_90 only), fused only: the same bench as bench_wrnc_bf16 otherwise
stage_wgmma() {
    find_nvrtc
    # shellcheck disable=SC2086
    run bench_wrnc_bf16_wgmma "${WGMMA_TIMEOUT:-120}" "$WRNC" bench "$NET" --batch "$BATCH" --precision bf16 \
        --wgmma --fused-only --tiles "${WGMMA_TILES:-auto}" $BENCH_ARGS --json
}

# f32 with --tf32 (every convolution on the tensor cores in plain TF32, as PyTorch's f32
# convolutions by default), fused and unfused, training step only, tiles TF32_TILES (default:
# the default tile, no search)
stage_tf32() {
    find_nvrtc
    # shellcheck disable=SC2086
    run bench_wrnc_f32_tf32 "${TF32_TIMEOUT:-150}" "$WRNC" bench "$NET" --batch "$BATCH" --precision f32 \
        --tf32 --tiles "${TF32_TILES:-default}" --no-infer --profile $BENCH_ARGS --json
}

# stage_tf32 with --wgmma (the forward and data-gradient convolutions on Hopper's warpgroup
# MMA in TF32; sm_90 only), fused and unfused, training step only
stage_tf32wg() {
    find_nvrtc
    # shellcheck disable=SC2086
    run bench_wrnc_f32_tf32wg "${TF32WG_TIMEOUT:-150}" "$WRNC" bench "$NET" --batch "$BATCH" --precision f32 \
        --tf32 --wgmma --tiles "${TF32_TILES:-default}" --no-infer --profile $BENCH_ARGS --json
}

# fused against unfused on a network whose step is mostly element-wise traffic (FUSION_NET,
# default examples/preresnet-164.net: fusion can give 1.3x there with GEMMs at 9 to 12 TFLOP/s),
# f32, training step only, at the bench's batch
stage_fusion() {
    find_nvrtc
    # shellcheck disable=SC2086
    run bench_wrnc_f32_fusion "${FUSION_TIMEOUT:-120}" "$WRNC" bench "${FUSION_NET:-examples/preresnet-164.net}" \
        --batch "$BATCH" --precision f32 --no-infer --profile $BENCH_ARGS --json
}

# issue 6's other must-shows, for a session after `session` (not part of it): WRN-16-4 and
# WRN-40-4 as WRN-28-10 in `first` (bf16, fused and unfused, beside PyTorch eager and
# torch.compile; batch-1 latency included), and WRN-28-10's inference throughput at batch
# ISSUE6_BIG_BATCH (1024) and PyTorch's batch-1 latency. Each wrnc bench at the default tile.
stage_issue6() {
    find_nvrtc
    local net slug
    for net in ${ISSUE6_NETS:-WRN-16-4 WRN-40-4}; do
        slug=$(echo "$net" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '-')
        # shellcheck disable=SC2086
        run "bench_wrnc_issue6_$slug" "${ISSUE6_TIMEOUT:-150}" "$WRNC" bench "$net" --batch "$BATCH" --precision bf16 \
            --tiles "${ISSUE6_TILES:-default}" $BENCH_ARGS --json
        "$WRNC" compile "$net" --emit graph >"$OUT/graph_$slug.txt" 2>/dev/null
        run "bench_pytorch_issue6_$slug" "${PYTORCH_TIMEOUT:-240}" python3 bench/pytorch_reference.py \
            --graph "$OUT/graph_$slug.txt" --batch "$BATCH" --precision bf16 --variants eager,compile \
            --warmup 5 --iters "${PYTORCH_ITERS:-20}" --no-matmul --out "$OUT/bench_pytorch_issue6_$slug.json"
        keep "$OUT/bench_pytorch_issue6_$slug.json"
    done
    local big=${ISSUE6_BIG_BATCH:-1024}
    # shellcheck disable=SC2086
    run bench_wrnc_bf16_infer_big "${ISSUE6_TIMEOUT:-150}" "$WRNC" bench "$NET" --batch "$big" --precision bf16 \
        --no-train --tiles "${ISSUE6_TILES:-default}" $BENCH_ARGS --json
    "$WRNC" compile "$NET" --emit graph >"$OUT/graph.txt" 2>/dev/null
    for b in 1 "$big"; do
        run "bench_pytorch_infer_b$b" "${PYTORCH_TIMEOUT:-240}" python3 bench/pytorch_reference.py \
            --graph "$OUT/graph.txt" --batch "$b" --precision bf16 --variants eager,compile --infer-only \
            --warmup 5 --iters "${PYTORCH_ITERS:-20}" --no-matmul --out "$OUT/bench_pytorch_infer_b$b.json"
        keep "$OUT/bench_pytorch_infer_b$b.json"
    done
}

# f32 with --tf32x3 (every convolution on the tensor cores as 3xTF32, fp32 accuracy), fused
# and unfused, training step only, tiles TF32X3_TILES (default: the default tile, no search)
stage_tf32x3() {
    find_nvrtc
    # shellcheck disable=SC2086
    run bench_wrnc_f32_tf32x3 "${TF32X3_TIMEOUT:-150}" "$WRNC" bench "$NET" --batch "$BATCH" --precision f32 \
        --tf32x3 --tiles "${TF32X3_TILES:-default}" --no-infer $BENCH_ARGS --json
}

# bf16 with --tma (wgmma with the weights by the tensor memory accelerator, sm_90 only; its
# own tile search and cache), fused only: the same bench as bench_wrnc_bf16_wgmma otherwise
stage_tma() {
    find_nvrtc
    # shellcheck disable=SC2086
    run bench_wrnc_bf16_tma "${TMA_TIMEOUT:-120}" "$WRNC" bench "$NET" --batch "$BATCH" --precision bf16 \
        --tma --fused-only $BENCH_ARGS --json
}

# bf16 with --k64 --tma (wgmma stages of 64 reduction indices in the 128-byte swizzle, the
# operands by TMA where their boxes fit; sm_90 only) at the default tile, fused only, the
# training step profiled (--profile)
stage_k64() {
    find_nvrtc
    # shellcheck disable=SC2086
    run bench_wrnc_bf16_k64 "${K64_TIMEOUT:-120}" "$WRNC" bench "$NET" --batch "$BATCH" --precision bf16 \
        --k64 --tma --tiles "${K64_TILES:-default}" --fused-only --profile $BENCH_ARGS --json
}

# the data gradients of strided convolutions in phase order (the default) against every tap
# (--dense-dgrad), bf16 at the default tile, fused training step only, one after the other in
# this call: what phase order saves (WRN-28-10: 4.8% of the step's GEMM work)
stage_dgrad() {
    find_nvrtc
    local v
    for v in phases dense; do
        # shellcheck disable=SC2086
        run "bench_wrnc_bf16_dgrad_$v" "${DGRAD_TIMEOUT:-90}" "$WRNC" bench "$NET" --batch "$BATCH" --precision bf16 \
            --tiles default --fused-only --no-infer $([ "$v" = dense ] && echo --dense-dgrad) $BENCH_ARGS --json
    done
}

# batch-1 inference with split-K (the default: the small grids' long reductions cut over
# more blocks, `_sk<N>` + `splitk_epilogue`) against without (--no-split-k), bf16 at the
# default tile, fused only, one after the other in this call: what split-K does to the latency
stage_splitk() {
    find_nvrtc
    local v
    for v in split whole; do
        # shellcheck disable=SC2086
        run "bench_wrnc_bf16_b1_$v" "${SPLITK_TIMEOUT:-90}" "$WRNC" bench "$NET" --batch 1 --precision bf16 \
            --tiles default --fused-only --no-train $([ "$v" = whole ] && echo --no-split-k) $BENCH_ARGS --json
    done
}

# bf16 with --stages ${DEEP_STAGES:-4} (cp.async rings beyond 48 KiB in dynamic shared memory;
# its own tile search and cache), fused only: the same bench as bench_wrnc_bf16 otherwise
stage_deep() {
    find_nvrtc
    # shellcheck disable=SC2086
    run bench_wrnc_bf16_deep "${DEEP_TIMEOUT:-120}" "$WRNC" bench "$NET" --batch "$BATCH" --precision bf16 \
        --stages "${DEEP_STAGES:-4}" --fused-only $BENCH_ARGS --json
}

# the dataset archives (gpu-carry/{train,test}.tar.xz, as in ../shared/datasets/cifar10-jpeg)
# unpacked into $DATA when it is not there yet
unpack_data() {
    if [ ! -d "$DATA/train" ] && [ ! -f "$DATA/train.tar.xz" ] && [ -f "${DATA_ARCHIVES:-gpu-carry}/train.tar.xz" ]; then
        mkdir -p "$DATA"
        for f in train test; do
            tar -xJf "${DATA_ARCHIVES:-gpu-carry}/$f.tar.xz" -C "$DATA" || log "unpack $f failed"
        done
        log "unpacked the CIFAR-10 archives into $DATA"
    fi
}

stage_tiles() {
    find_nvrtc
    # the tensor-core tiles of every bf16 schedule the bench stage measures, searched on this
    # GPU once and cached under WRNC_CACHE_DIR, so that stage's bf16 run finds them all; the
    # cache file (every GEMM's times per tile) is kept with the results
    run tiles "$TILES_TIMEOUT" "$WRNC" bench "$NET" --batch "$BATCH" --precision bf16 \
        --warmup 0 --iters 1 --tiles auto --json
    keep_tile_caches
}

stage_bench() {
    find_nvrtc
    # shellcheck disable=SC2086
    run bench_wrnc_f32 "$BENCH_TIMEOUT" "$WRNC" bench "$NET" --batch "$BATCH" --precision f32 --profile $BENCH_ARGS --json
    # shellcheck disable=SC2086
    run bench_wrnc_bf16 "$BENCH_TIMEOUT" "$WRNC" bench "$NET" --batch "$BATCH" --precision bf16 \
        --tiles "${BENCH_BF16_TILES:-auto}" --profile $BENCH_ARGS --json
    # the tensor cores on NCHW activations too (bf16's default is NHWC): the layouts side by side
    if [ "${BENCH_BF16_NCHW:-1}" = 1 ]; then
        # shellcheck disable=SC2086
        run bench_wrnc_bf16_nchw "$BENCH_TIMEOUT" "$WRNC" bench "$NET" --batch "$BATCH" --precision bf16 \
            --layout nchw --fused-only $BENCH_ARGS --json
    fi
    "$WRNC" compile "$NET" --emit graph >"$OUT/graph.txt" 2>/dev/null
    keep "$OUT/graph.txt"
    run bench_pytorch "${PYTORCH_TIMEOUT:-240}" python3 bench/pytorch_reference.py --graph "$OUT/graph.txt" \
        --batch "$BATCH" --precision both --variants eager,compile --warmup 5 --iters "${PYTORCH_ITERS:-20}" \
        --out "$OUT/bench_pytorch.json"
    keep "$OUT/bench_pytorch.json"
}

stage_train() {
    find_nvrtc
    unpack_data
    rm -rf "$OUT/train_ckpt" "$OUT/train_metrics.jsonl"
    # as many epochs as TRAIN_SECONDS allow: metrics and the checkpoint are written per epoch
    # shellcheck disable=SC2086
    run train "$TRAIN_SECONDS" "$WRNC" run "$TRAIN_NET" --train cifar10 --data "$DATA" --device cuda \
        --epochs "$TRAIN_EPOCHS" --metrics "$OUT/train_metrics.jsonl" --checkpoint "$OUT/train_ckpt" --quiet $TRAIN_ARGS
    keep "$OUT/train_metrics.jsonl"
}

# issue 6's accuracy check: the same recipe in bf16 (tensor-core convolutions); compare the test
# accuracy of equal epochs with stage_train's
stage_train_bf16() {
    find_nvrtc
    unpack_data
    rm -rf "$OUT/train_bf16_ckpt" "$OUT/train_bf16_metrics.jsonl"
    run train_bf16 "$TRAIN_SECONDS" "$WRNC" run "$TRAIN_NET" --train cifar10 --data "$DATA" --device cuda \
        --precision bf16 --epochs "$TRAIN_EPOCHS" --metrics "$OUT/train_bf16_metrics.jsonl" \
        --checkpoint "$OUT/train_bf16_ckpt" --quiet $TRAIN_ARGS
    keep "$OUT/train_bf16_metrics.jsonl"
}

# ON THE BUILD MACHINE (no GPU), before the carry: every module that `session` and `issue6`
# (and `train_bf16`) compile on the GPU, compiled now for PRECOMPILE_ARCH (default sm_90: H100,
# H200) by this machine's NVRTC, and packed as gpu-carry/cache.tar.xz (with the NVRTC version
# in gpu-carry/cache.nvrtc); the device call unpacks it (above). The stages run in precompile
# mode (`run`), with no time limit, into a scratch OUT.
stage_precompile() {
    local tmp rc
    tmp=$(mktemp -d)
    # a cache of its own: gpu-carry gets only the archive (the carry's 64 MiB)
    WRNC_CACHE_DIR=$tmp/cache PRECOMPILE_ARCH=${PRECOMPILE_ARCH:-sm_90} OUT=$tmp/out RESULTS=$tmp/results RAW=$tmp/raw \
        SESSION_SECONDS=100000000 SESSION_RESERVE=0 SELFTEST_JOBS=${SELFTEST_JOBS:-2} BENCH_SPLITK=1 \
        SELFTEST_COMPILE_JOBS=${SELFTEST_COMPILE_JOBS:-1} bash "$SELF" session issue6 train_bf16
    rc=$?
    grep -E "precompile rc=[^0]" "$tmp/out/run_gpu.log" && rc=1
    # the NVRTC that made them, as `wrnc precompile --json` reported it
    python3 -c "import json,sys; print('nvrtc', json.load(open(sys.argv[1]))['nvrtc'])" \
        "$tmp/out/selftest_quick.out" >gpu-carry/cache.nvrtc || rc=1
    tar -cf - -C "$tmp/cache" cubin | xz -T0 -6 >gpu-carry/cache.tar.xz.tmp
    if [ "${PIPESTATUS[0]}${PIPESTATUS[1]}" = 00 ]; then
        mv -f gpu-carry/cache.tar.xz.tmp gpu-carry/cache.tar.xz
    else
        rm -f gpu-carry/cache.tar.xz.tmp
        rc=1
    fi
    log "precompile: $(ls "$tmp/cache/cubin" | wc -l) modules, $(du -sh "$tmp/cache/cubin" | cut -f1) -> gpu-carry/cache.tar.xz $(du -h gpu-carry/cache.tar.xz | cut -f1) ($(cat gpu-carry/cache.nvrtc)); the nested log: $OUT/precompile_run_gpu.log; rc=$rc"
    cp -f "$tmp/out/run_gpu.log" "$OUT/precompile_run_gpu.log" 2>/dev/null
    rm -rf "$tmp"
    return $rc
}

stage_assemble() {
    RESULTS="$RESULTS" python3 - "$OUT" "$RAW" <<'PY'
import json, os, sys, datetime, re, subprocess
dirs = sys.argv[1:]
def load(name):
    for d in dirs:
        p = os.path.join(d, name)
        if os.path.exists(p):
            try:
                return json.load(open(p))
            except Exception:
                return None
    return None
def text(name):
    for d in dirs:
        p = os.path.join(d, name)
        if os.path.exists(p):
            return open(p, errors="replace").read()
    return ""
f32, bf16 = load("bench_wrnc_f32.out"), load("bench_wrnc_bf16.out")
pt = load("bench_pytorch.json") or {}
st = load("selftest_quick.out") or {}
full = text("selftest.out")
# selftest's last line: "N checks, F failed, U unresolved (--), E errors; max rel err vs CPU
# (resolved checks): f32 X, bf16 Y, tf32 Z" (tf32: the plain-TF32 checks; older binaries
# printed no tf32)
SUMMARY = r"(\d+) checks, (\d+) failed, (\d+) unresolved \(--\), (\d+) errors; max rel err vs CPU \(resolved checks\): f32 ([0-9.e+-]+|inf|NaN), bf16 ([0-9.e+-]+|inf|NaN)(?:, tf32 ([0-9.e+-]+|inf|NaN))?"
CLASSES = [(5, "f32"), (6, "bf16"), (7, "tf32")]
m = re.search(SUMMARY, full)
full_summary = None
if m:
    full_summary = {"checks": int(m.group(1)), "failed": int(m.group(2)), "unresolved": int(m.group(3)),
                    "errors": int(m.group(4)),
                    "max_rel_err_vs_cpu": {k: float(m.group(i)) for i, k in CLASSES if m.group(i) is not None}}
# stage selftest_par: one log per example network, their summary lines added up
par = sorted(set(f for d in dirs if os.path.isdir(d) for f in os.listdir(d)
                 if f.startswith("selftest_ex_") and f.endswith(".out")))
if par and not full_summary:
    full_summary = {"checks": 0, "failed": 0, "unresolved": 0, "errors": 0, "max_rel_err_vs_cpu": {},
                    "networks": len(par), "incomplete": []}
    for f in par:
        mm = re.search(SUMMARY, text(f))
        if not mm:
            full_summary["incomplete"].append(f[len("selftest_ex_"):-len(".out")])
            continue
        for i, k in [(1, "checks"), (2, "failed"), (3, "unresolved"), (4, "errors")]:
            full_summary[k] += int(mm.group(i))
        for i, k in CLASSES:
            if mm.group(i) is not None:
                e = full_summary["max_rel_err_vs_cpu"]
                e[k] = max(e.get(k, 0.0), float(mm.group(i)))
device = (f32 or bf16 or load("bench_wrnc_f32_tf32.out") or load("bench_wrnc_f32_tf32wg.out") or load("bench_wrnc_f32_tf32x3.out") or load("bench_wrnc_f32_fusion.out") or load("bench_wrnc_bf16_infer_big.out") or {}).get("device", {}).get("name") or pt.get("device") or "unknown-gpu"
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except Exception:
    commit = ""
if not commit and os.path.exists("gpu-carry/COMMIT"):
    # the device machine's copy of the tree has no .git: the commit the binary was built at
    commit = open("gpu-carry/COMMIT").read().strip()
def wr(b, key, which):
    return None if not b else (b.get(key) or {}).get(which)
def ptv(prec, variant, key):
    return ((pt.get("results") or {}).get(prec) or {}).get(variant, {}).get(key)
def profile(b):
    """`--profile`'s per-kernel times of every training run (fused, unfused): the step, the
    GEMMs' time and useful TFLOP/s, and the 12 kernels that took most."""
    res = {}
    for r in (b or {}).get("runs") or []:
        p = r.get("profile")
        if r.get("mode") == "train" and p:
            res["fused" if r.get("fused") else "unfused"] = dict(
                {k: p.get(k) for k in ["reps", "step_ms", "gemm_ms", "gemm_tflops"]}, kernels=(p.get("kernels") or [])[:12])
    return res or None
out = {"device": device, "commit": commit, "date": datetime.date.today().isoformat()}
for prec, b in [("f32", f32), ("bf16", bf16)]:
    out[prec] = {
        "net": (b or {}).get("net") or pt.get("net"), "batch": (b or {}).get("batch") or pt.get("batch"),
        "precision": prec,
        "train_step_ms": {"wrnc_fused": wr(b, "train_step_ms", "fused"), "wrnc_unfused": wr(b, "train_step_ms", "unfused"),
                          "pytorch_eager": ptv(prec, "eager", "train_step_ms"), "pytorch_compile": ptv(prec, "compile", "train_step_ms")},
        "infer_ms": {"wrnc_fused": wr(b, "infer_ms", "fused"), "wrnc_unfused": wr(b, "infer_ms", "unfused"),
                     "pytorch_eager": ptv(prec, "eager", "infer_ms"), "pytorch_compile": ptv(prec, "compile", "infer_ms")},
        "peak_mem_mb": {"wrnc_fused": wr(b, "peak_mem_mb", "fused"), "wrnc_unfused": wr(b, "peak_mem_mb", "unfused"),
                        "pytorch_eager": ptv(prec, "eager", "peak_mem_mb"), "pytorch_compile": ptv(prec, "compile", "peak_mem_mb")},
        "latency_b1_ms": (b or {}).get("latency_b1_ms"),
        # achieved (3 GEMMs per conv per step, 2 FLOPs per MAC) against cuBLAS's square GEMM
        "train_tflops": (b or {}).get("train_tflops"),
        # fused against unfused: speedup, DRAM bytes removed (estimate), the time between
        "fusion": (b or {}).get("fusion"),
        "matmul_tflops": (pt.get("matmul_tflops") or {}).get(prec),
        # where the step's time goes, kernel by kernel (`wrnc bench --profile`)
        "profile": profile(b),
    }
# the fused-only bf16 benches beside `first`'s: on wgmma, with stages of 64, and at searched
# tiles
for eng in ["wgmma", "k64", "tuned"]:
    b = load(f"bench_wrnc_bf16_{eng}.out")
    if b:
        out["bf16"]["train_step_ms"][f"wrnc_fused_{eng}"] = wr(b, "train_step_ms", "fused")
        out["bf16"]["infer_ms"][f"wrnc_fused_{eng}"] = wr(b, "infer_ms", "fused")
        out["bf16"]["latency_b1_ms"] = dict(out["bf16"]["latency_b1_ms"] or {}, **{f"fused_{eng}": wr(b, "latency_b1_ms", "fused")})
        out["bf16"][f"train_tflops_{eng}"] = (b.get("train_tflops") or {}).get("fused")
k64 = load("bench_wrnc_bf16_k64.out")
if k64:
    out["bf16"]["profile_k64"] = profile(k64)
tu = load("bench_wrnc_bf16_tuned.out")
if tu:
    t = tu.get("tiles") or {}
    out["bf16"]["tiles_tuned"] = {"searched": t.get("searched"), "gemms": t.get("gemms"), "search_s": t.get("search_s"),
                                  "tiles": t.get("tiles")}
for eng in ["tf32x3", "tf32", "tf32wg"]:
    x3 = load(f"bench_wrnc_f32_{eng}.out")
    if x3:
        for which in ["fused", "unfused"]:
            out["f32"]["train_step_ms"][f"wrnc_{which}_{eng}"] = wr(x3, "train_step_ms", which)
            out["f32"]["peak_mem_mb"][f"wrnc_{which}_{eng}"] = wr(x3, "peak_mem_mb", which)
        out["f32"][f"train_tflops_{eng}"] = x3.get("train_tflops")
        out["f32"][f"fusion_{eng}"] = x3.get("fusion")
        out["f32"][f"profile_{eng}"] = profile(x3)
fu = load("bench_wrnc_f32_fusion.out")
if fu:
    out["fusion_net"] = {"net": fu.get("net"), "batch": fu.get("batch"), "precision": fu.get("precision"),
                         "train_step_ms": {w: wr(fu, "train_step_ms", w) for w in ["fused", "unfused"]},
                         "peak_mem_mb": {w: wr(fu, "peak_mem_mb", w) for w in ["fused", "unfused"]},
                         "train_tflops": fu.get("train_tflops"), "fusion": fu.get("fusion"),
                         "profile": profile(fu)}
# issue 6's other networks (bf16, beside PyTorch) and inference at a large batch / batch 1
def pt_bf16(pj, key, variant):
    r = ((pj or {}).get("results") or {}).get("bf16", {}).get(variant) or {}
    return r.get(key)
issue6 = {}
for f in sorted(set(f for d in dirs if os.path.isdir(d) for f in os.listdir(d)
                    if f.startswith("bench_wrnc_issue6_") and f.endswith(".out"))):
    slug = f[len("bench_wrnc_issue6_"):-len(".out")]
    b6, p6 = load(f), load(f"bench_pytorch_issue6_{slug}.json")
    if not (b6 or p6):
        continue
    issue6[slug] = {
        "net": (b6 or {}).get("net") or (p6 or {}).get("net"),
        "batch": (b6 or {}).get("batch"),
        "precision": "bf16",
        **{k: {"wrnc_fused": wr(b6, k, "fused"), "wrnc_unfused": wr(b6, k, "unfused"),
               "pytorch_eager": pt_bf16(p6, k, "eager"), "pytorch_compile": pt_bf16(p6, k, "compile")}
           for k in ["train_step_ms", "infer_ms", "peak_mem_mb"]},
        "latency_b1_ms": {"wrnc_fused": wr(b6, "latency_b1_ms", "fused")},
        "train_tflops": (b6 or {}).get("train_tflops"),
        "fusion": (b6 or {}).get("fusion"),
    }
big = load("bench_wrnc_bf16_infer_big.out")
if big:
    pb = {f: load(f"bench_pytorch_infer_b{b}.json") for f, b in [("big", big.get("batch")), ("b1", 1)]}
    issue6["inference"] = {
        "net": big.get("net"), "precision": "bf16", "batch": big.get("batch"),
        "infer_ms": {"wrnc_fused": wr(big, "infer_ms", "fused"), "wrnc_unfused": wr(big, "infer_ms", "unfused"),
                     "pytorch_eager": pt_bf16(pb["big"], "infer_ms", "eager"),
                     "pytorch_compile": pt_bf16(pb["big"], "infer_ms", "compile")},
        "images_per_s_wrnc_fused": (big.get("batch") or 0) / wr(big, "infer_ms", "fused") * 1e3
            if wr(big, "infer_ms", "fused") else None,
        "latency_b1_ms": {"wrnc_fused": wr(big, "latency_b1_ms", "fused"),
                          "pytorch_eager": pt_bf16(pb["b1"], "infer_ms", "eager"),
                          "pytorch_compile": pt_bf16(pb["b1"], "infer_ms", "compile")},
    }
if issue6:
    out["issue6"] = issue6
tma = load("bench_wrnc_bf16_tma.out")
if tma:
    out["bf16"]["train_step_ms"]["wrnc_fused_tma"] = wr(tma, "train_step_ms", "fused")
    out["bf16"]["infer_ms"]["wrnc_fused_tma"] = wr(tma, "infer_ms", "fused")
    out["bf16"]["train_tflops_tma"] = (tma.get("train_tflops") or {}).get("fused")
deep = load("bench_wrnc_bf16_deep.out")
if deep:
    out["bf16"]["train_step_ms"]["wrnc_fused_deep"] = wr(deep, "train_step_ms", "fused")
    out["bf16"]["infer_ms"]["wrnc_fused_deep"] = wr(deep, "infer_ms", "fused")
    out["bf16"]["deep_stages"] = deep.get("stages")
dgp, dgd = load("bench_wrnc_bf16_dgrad_phases.out"), load("bench_wrnc_bf16_dgrad_dense.out")
if dgp or dgd:
    out["bf16"]["dgrad_phases"] = {"train_step_ms": {"phases": wr(dgp, "train_step_ms", "fused"),
                                                      "dense": wr(dgd, "train_step_ms", "fused")}}
b1s, b1w = load("bench_wrnc_bf16_b1_split.out"), load("bench_wrnc_bf16_b1_whole.out")
if b1s or b1w:
    out["bf16"]["split_k_b1"] = {"infer_ms": {"split": wr(b1s, "infer_ms", "fused"),
                                              "whole": wr(b1w, "infer_ms", "fused")}}
nchw = load("bench_wrnc_bf16_nchw.out")
if nchw:
    out["bf16"]["train_step_ms"]["wrnc_fused_nchw"] = wr(nchw, "train_step_ms", "fused")
    out["bf16"]["infer_ms"]["wrnc_fused_nchw"] = wr(nchw, "infer_ms", "fused")
    out["bf16"]["layout"] = (bf16 or {}).get("layout")
# top-level keys for the f32 run, as the results format asks
out.update({k: out["f32"][k] for k in ["net", "batch", "precision", "train_step_ms", "infer_ms", "peak_mem_mb"]})
# the largest (resolved) errors of every selftest that finished: the quick one's and the
# examples' that printed their summary; null where none did
errs = [e for e in [st.get("max_rel_err_vs_cpu") if st else None,
                    (full_summary or {}).get("max_rel_err_vs_cpu") if (full_summary or {}).get("checks") else None] if e]
# (a class no selftest that finished reported, e.g. tf32 from an older binary, is left out)
out["max_rel_err_vs_cpu"] = {k: max(e[k] for e in errs if e.get(k) is not None)
                             for k in ["f32", "bf16", "tf32"] if any(e.get(k) is not None for e in errs)} if errs else None
# what PyTorch ran: its versions, and whether its fp32 convolutions were TF32 (its default)
out["pytorch"] = {k: pt.get(k) for k in ["torch", "cuda", "cudnn", "cudnn_allow_tf32", "device"]} if pt else None
out["selftest_quick"] = {"failed": st.get("failed"), "unresolved": st.get("unresolved"), "errors": st.get("errors"), "checks": len(st.get("checks") or [])} if st else None
out["selftest_examples"] = full_summary or ({"incomplete": full.count("\n")} if full else None)
metrics = [json.loads(l) for l in text("train_metrics.jsonl").splitlines() if l.strip()]
out["training"] = {"net": os.environ.get("TRAIN_NET", "WRN-16-4"), "epochs": metrics} if metrics else None
m16 = [json.loads(l) for l in text("train_bf16_metrics.jsonl").splitlines() if l.strip()]
out["training_bf16"] = {"net": os.environ.get("TRAIN_NET", "WRN-16-4"), "precision": "bf16", "epochs": m16} if m16 else None
out["raw"] = sorted(set(f for d in dirs if os.path.isdir(d) for f in os.listdir(d)))
slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
path = os.path.join(os.environ.get("RESULTS", "bench/results"), f"{out['date']}-{slug}.json")
s = json.dumps(out, indent=2)
open(path, "w").write(s + "\n")
open(os.path.join(dirs[0], os.path.basename(path)), "w").write(s + "\n")
print(s)
print("wrote", path, file=sys.stderr)
PY
}

for s in "${stages[@]}"; do
    case "$s" in
        info|first|session|selftest|selftest_par|tiles|bench|tf32|tf32wg|tuned|fusion|wgmma|tf32x3|k64|tma|deep|dgrad|splitk|issue6|train|train_bf16|assemble) "stage_$s" ;;
        precompile) stage_precompile || exit 1 ;;
        all) stage_info; stage_selftest; stage_tiles; stage_bench; stage_train; stage_train_bf16; stage_assemble ;;
        *) echo "unknown stage $s (info first session selftest selftest_par tiles bench tf32 tf32wg tuned fusion wgmma tf32x3 k64 tma deep dgrad splitk issue6 train train_bf16 assemble all precompile)" >&2; exit 2 ;;
    esac
done
log "done: ${stages[*]}"
