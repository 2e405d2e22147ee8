#!/usr/bin/env python3
"""What removing element-wise traffic can buy a training step, from the compiler's estimates.

For each network, from `wrnc info --json` (f32 and batch 128 unless --precision, --batch): F,
the step's convolution and linear FLOPs (3 GEMMs per layer, 2 FLOPs per MAC), and B_f / B_u,
the DRAM bytes the fused / unfused step moves (the compiler's estimate). Fusion removes
B_u - B_f bytes of traffic and no arithmetic, so at best

    unfused step = fused step + (B_u - B_f) / BW     (BW: the bandwidth at which the unfused
                                                      step moved the bytes fusion removes)
    fused step  >= F / P                              (P: the rate the GEMMs run at)

and the fused step is `ratio` times faster than the unfused one only if

    P >= (ratio - 1) * BW * F / (B_u - B_f).

An upper bound on the ratio (the fused step taken as nothing but its GEMMs), on estimates:
it says which targets a GPU run can meet at all, and at what GEMM speed, not what it will
measure.

    python3 scripts/fusion_bound.py [--wrnc target/release/wrnc] [--bw 3.4] [--ratio 1.3]
                                    [--precision f32|bf16] [--batch 128] NET...
"""
import argparse, json, subprocess

ap = argparse.ArgumentParser()
ap.add_argument("--wrnc", default="target/release/wrnc")
ap.add_argument("--bw", type=float, default=3.4, help="bandwidth of the removed traffic, TB/s")
ap.add_argument("--ratio", type=float, default=1.3)
ap.add_argument("--batch", type=int, default=128)
ap.add_argument("--precision", default="f32", choices=["f32", "bf16"])
ap.add_argument("nets", nargs="+")
a = ap.parse_args()
print(f"# {a.precision}, batch {a.batch}; unfused = fused + (B_u - B_f)/BW, fused >= F/P; BW = {a.bw} TB/s;"
      f" fused {a.ratio}x faster than unfused needs P >= the last column")
print(f"{'network':34} {'F TFLOP':>8} {'B_f GB':>7} {'B_u GB':>7} {'B_u/B_f':>7}  P needed (TFLOP/s)")
for net in a.nets:
    o = subprocess.run([a.wrnc, "info", net, "--json", "--batch", str(a.batch), "--precision", a.precision],
                       capture_output=True, text=True, check=True)
    v = json.loads(o.stdout)
    f = 3 * 2 * v["macs"] * v["batch"]
    bf, bu = v["dram_bytes"]["fused"], v["dram_bytes"]["unfused"]
    saved = bu - bf
    need = "impossible" if saved <= 0 else f"{(a.ratio - 1) * a.bw * 1e12 * f / saved / 1e12:.0f}"
    print(f"{v['name'][:34]:34} {f / 1e12:8.2f} {bf / 1e9:7.1f} {bu / 1e9:7.1f} {bu / bf:7.2f}  {need}")
