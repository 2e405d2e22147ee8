#!/usr/bin/env bash
# A dress rehearsal of bench/run_gpu.sh on the fake GPU (emu/fakecuda.cpp), for a machine
# without one: every stage but selftest (tests/fake_gpu.rs covers it) runs with a tiny network,
# tiny batches and a 64-image subset, through the same wrnc commands, logs and `assemble` as on
# a lent GPU, so a session that gets a GPU does not spend it on a script bug. The PyTorch
# reference needs torch and a GPU: its stage fails here and `assemble` must cope with that.
#
#   bash bench/rehearse_gpu.sh [DATA]     DATA: CIFAR-10 for `wrnc run --data` (default: a
#                                         generated set of 80 training and 64 test images)
# Writes everything under $OUT (default /tmp/wrnc-rehearsal), never into bench/results.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out=${OUT:-/tmp/wrnc-rehearsal}
rm -rf "$out"; mkdir -p "$out/results"
data=${1:-}
if [ -z "$data" ]; then
    data="$out/data"
    python3 - "$data" <<'PY'
import os, sys
d = os.path.join(sys.argv[1], "cifar-10-batches-bin"); os.makedirs(d, exist_ok=True)
def rec(i):
    label = (i * 7) % 10; r = bytearray([label])
    for ch in range(3):
        for p in range(1024):
            r.append((200 if (p // 32 + ch * 3) % 10 == label else 40) + (i * 13 + p) % 30)
    return bytes(r)
for b in range(1, 6):
    open(os.path.join(d, f"data_batch_{b}.bin"), "wb").write(b"".join(rec(i + b * 1000) for i in range(16)))
open(os.path.join(d, "test_batch.bin"), "wb").write(b"".join(rec(i) for i in range(64)))
PY
fi
[ -x target/release/wrnc ] || cargo build --release
tiny='network "tiny" { conv(3x3, 8, stride=2) residual { body bn relu conv(3x3, 8) } bn relu gap fc }'
OUT="$out/gpu-out" RESULTS="$out/results" WRNC=target/release/wrnc WRNC_DATA_DIR="$data" \
BENCH_NET="$tiny" BENCH_BATCH=4 BENCH_ARGS="--warmup 1 --iters 2" BENCH_TIMEOUT=1200 WGMMA_TIMEOUT=1200 TF32_TIMEOUT=1200 TF32WG_TIMEOUT=1200 TUNED_TIMEOUT=1200 FUSION_NET="$tiny" FUSION_TIMEOUT=1200 TF32X3_TIMEOUT=1200 TMA_TIMEOUT=1200 K64_TIMEOUT=1200 DEEP_TIMEOUT=1200 DGRAD_TIMEOUT=1200 SPLITK_TIMEOUT=1200 \
TRAIN_NET="$tiny" TRAIN_EPOCHS=1 TRAIN_SECONDS=1200 \
TRAIN_ARGS="--batch-size 16 --subset 64 --test-subset 64" \
WRNC_FAKE_HOME="$out/fake" WRNC_CACHE_DIR="$out/cache" \
    bash scripts/fakegpu.sh bash bench/run_gpu.sh info bench tf32 tf32wg tuned fusion wgmma k64 tf32x3 tma deep dgrad splitk train train_bf16 assemble
# What the GPU session's results file must hold.
python3 - "$out/results" <<'PY'
import glob, json, sys
files = glob.glob(sys.argv[1] + "/*.json")
assert len(files) == 1, files
r = json.load(open(files[0]))
missing = [k for k in ["device", "commit", "net", "batch", "precision", "train_step_ms", "infer_ms",
                       "peak_mem_mb", "max_rel_err_vs_cpu"] if k not in r]
assert not missing, f"missing keys {missing}"
for prec in ["f32", "bf16"]:
    for k in ["train_step_ms", "infer_ms", "peak_mem_mb"]:
        for v in ["wrnc_fused", "wrnc_unfused"]:
            assert r[prec][k][v] is not None, (prec, k, v)
for k in ["train_step_ms", "infer_ms"]:
    assert r["bf16"][k]["wrnc_fused_wgmma"] is not None, k
    assert r["bf16"][k]["wrnc_fused_k64"] is not None, k
    assert r["bf16"][k]["wrnc_fused_tuned"] is not None, k
    assert r["bf16"][k]["wrnc_fused_deep"] is not None, k
    assert r["bf16"][k]["wrnc_fused_tma"] is not None, k
for prec in ["f32", "bf16"]:
    for v in ["fused", "unfused"]:
        p = r[prec]["profile"][v]
        assert p["kernels"] and p["gemm_tflops"] is not None, (prec, v, p)
assert r["f32"]["profile_tf32wg"]["fused"]["kernels"], "tf32wg profile"
assert r["bf16"]["profile_k64"]["fused"]["kernels"], "k64 profile"
for v in ["phases", "dense"]:
    assert r["bf16"]["dgrad_phases"]["train_step_ms"][v] is not None, v
for v in ["split", "whole"]:
    assert r["bf16"]["split_k_b1"]["infer_ms"][v] is not None, v
for v in ["wrnc_fused_tf32x3", "wrnc_unfused_tf32x3", "wrnc_fused_tf32", "wrnc_unfused_tf32",
          "wrnc_fused_tf32wg", "wrnc_unfused_tf32wg"]:
    assert r["f32"]["train_step_ms"][v] is not None, v
    assert r["f32"]["peak_mem_mb"][v] is not None, v
assert r["bf16"]["tiles_tuned"]["gemms"] and r["bf16"]["tiles_tuned"]["tiles"], r["bf16"]["tiles_tuned"]
for w in ["fused", "unfused"]:
    assert r["fusion_net"]["train_step_ms"][w] is not None, w
for t in ["training", "training_bf16"]:
    assert r[t] and r[t]["epochs"] and "test_acc" in r[t]["epochs"][0], t
print("rehearsal: the results file has every field wrnc fills:", files[0])
PY
