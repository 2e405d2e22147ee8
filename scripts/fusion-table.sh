#!/usr/bin/env bash
# Prints the fused-vs-unfused table of the README (issue 4's networks, batch 128, f32) from
# `wrnc info --json`: launches per training step, estimated DRAM bytes per step, peak memory.
set -euo pipefail
W=${WRNC:-./target/release/wrnc}
echo "| network | launches/step fused / unfused | DRAM/step fused / unfused | peak memory fused / unfused |"
echo "| --- | --- | --- | --- |"
for net in WRN-28-10 'WRN-40-2-B(3,1,3)' PreResNet-164 ResNeXt-29-8x64d DenseNet-BC-100-12 PyramidNet-110-48; do
  $W info --json --batch 128 "$net" | python3 -c '
import json, sys
d = json.load(sys.stdin)
g = lambda b: b / 2**30
l, m, p = d["launches"], d["dram_bytes"], d["peak_bytes"]
print("| %s | %d / %d | %.1f / %.1f GiB | %.2f / %.2f GiB |" % (d["name"], l["train_fused"], l["train_unfused"], g(m["fused"]), g(m["unfused"]), g(p["fused"]), g(p["unfused"])))'
done
