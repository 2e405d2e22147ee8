#!/usr/bin/env bash
# Prints the inference schedules' figures (compiler estimates, no GPU): per network, precision
# and batch, the launches per batch and in setup, the estimated DRAM bytes per batch (setup
# excluded), and how many ReLU and weight-pack launches run with every batch.
#   WRNC=path/to/wrnc bash scripts/infer-table.sh [NET...]
set -euo pipefail
W=${WRNC:-./target/release/wrnc}
nets=("$@")
[ ${#nets[@]} -gt 0 ] || nets=(WRN-28-10 WRN-16-4 ResNet-56 ResNeXt-29-8x64d PreResNet-164)
echo "| network | precision | batch | launches/batch | setup launches | DRAM/batch | relu launches | pack launches |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for net in "${nets[@]}"; do
  for p in f32 bf16; do
    for b in 1 128 1024; do
      "$W" compile "$net" --infer --batch "$b" --precision "$p" --emit schedule 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
size = {"f32": 4, "bf16": 2, "i32": 4}
def traffic(l):
    t = 0
    for a in l["buffers"]:
        x = a["len"] * size.get(s["buffers"][a["buffer"]]["dtype"], 4)
        t += 2 * x if a["access"] == "read_write" else x
    return t
name = lambda l: s["kernels"][l["kernel"]]["name"]
ls = s["launches"]
print("| %s | %s | %d | %d | %d | %.1f MiB | %d | %d |" % (s["name"], s["precision"], s["batch"], len(ls), len(s["setup"]),
      sum(map(traffic, ls)) / 2**20, sum(name(l).startswith("relu_fwd") for l in ls),
      sum(name(l).startswith("pack_weight") for l in ls)))'
    done
  done
done
