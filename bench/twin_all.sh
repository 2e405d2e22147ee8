#!/usr/bin/env bash
# The PyTorch twin (bench/pytorch_twin.py) on every example network with fresh weights and
# non-default BN state, then on a checkpoint that `wrnc run` writes here: WRN-16-4 trained for
# 16 steps on the CIFAR-10 in DATA (argument 1; skipped without it). Needs torch, safetensors
# and onnxruntime in `python3` (or $PYTHON), and a release build of wrnc. Exits non-zero if any
# twin disagrees.
#
#   bash bench/twin_all.sh [DATA] > bench/results/cpu/DATE-pytorch-twin.log 2>&1
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WRNC=${WRNC:-target/release/wrnc}
export WRNC
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
echo "machine: $(uname -m), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
$PY -c 'import torch, numpy, onnxruntime, safetensors; print(f"torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), numpy {numpy.__version__}, onnxruntime {onnxruntime.__version__}, safetensors {safetensors.__version__}")' || exit 3
fail=0
run() {
    echo "== $*"
    $PY bench/pytorch_twin.py "$@" || fail=1
}
for net in examples/*.net; do
    run "$net" --perturb-bn --seed 1
done
if [ $# -ge 1 ]; then
    ck=$(mktemp -d)
    cmd=("$WRNC" run examples/wrn-16-4.net --train cifar10 --data "$1" --epochs 1 --subset 1024
         --test-subset 1000 --batch-size 64 --seed 3 --device cpu --checkpoint "$ck" -q --json)
    echo "== a trained checkpoint: ${cmd[*]}"
    "${cmd[@]}" || fail=1
    run examples/wrn-16-4.net --weights "$ck/last.safetensors" --seed 2 --batch 4
    rm -rf "$ck"
fi
echo "twin_all: $([ $fail = 0 ] && echo 'every twin agrees' || echo 'SOME TWIN DISAGREES')"
exit $fail
