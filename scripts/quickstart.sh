#!/usr/bin/env bash
# Installs what wrnc needs, builds it, and runs the main job end to end on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release
W=./target/release/wrnc
$W info WRN-28-10
$W compile examples/wrn-28-10.net --emit expanded,graph,dot -o out/wrn-28-10
$W compile examples/wrn-28-10.net --train --emit cuda,ptx,schedule -o out/wrn-28-10
# Data: $WRNC_DATA, else the JPEG copy beside the checkout, else the official archive.
DATA="${WRNC_DATA:-}"
if [[ -z "$DATA" && -d ../shared/datasets/cifar10-jpeg ]]; then DATA=../shared/datasets/cifar10-jpeg; fi
if [[ -z "$DATA" ]]; then
  DATA=data/cifar10
  [[ -d "$DATA" ]] || $W data download cifar10 --to "$DATA"
fi
$W run examples/wrn-10-2.net --train cifar10 --data "$DATA" --epochs 1 --subset 10000 \
  --batch-size 64 --seed 1 --device cpu --metrics out/wrn-10-2.metrics.jsonl --checkpoint out/wrn-10-2
$W plot out/wrn-10-2.metrics.jsonl -o out/wrn-10-2.png
