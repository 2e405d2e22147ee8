#!/usr/bin/env python3
"""Which reading of wgmma's operands, and which TMA landing, explain a layout probe's dump.

    python3 scripts/probe_analyze.py DUMP.json      (from `wrnc selftest --probe-dump DUMP.json`)

For every wgmma run of the dump (a shared-memory image of random small integers and the raw
accumulator registers one `wgmma` left, runtime/src/cuda/probe.rs) it recomputes the registers
under each combination of candidate readings and prints those that give every register
exactly; likewise for each TMA box, the candidate landings that give every byte. wrnc's own
reading is `A swz64, B swz64, fragments mma` for runs in rows of 64 bytes, `A swz128, B
swz128, fragments mma` for rows of 128 (`--k64`), and `swz64` or `swz128` (TMA, the map's
swizzle); the selftest already
says whether that one holds, this says what holds instead.

Candidates (every address is a byte offset inside the operand's region, rows of W bytes, the
run's `row`: 64 or 128):
- an operand's element (row, k) at `swz(row * W + k_byte + k * size)`, `swz` one of the
  swizzle modes (none, 32, 64 or 128 bytes: chunk bits 4.. XORed with bits 7..), or in W's
  swizzle with its 8-row atoms twice as far apart (`swzW-sbo2x`), or, for B only, N-major
  (`nmajor`: element (k, n) at `k * 32 + n * size`, unswizzled);
- the accumulators in mma.sync's C layout per warp (`mma`: what wrnc assumes) or with rows and
  columns of each 8x8 block exchanged (`mma-t`).
Pure Python (no numpy): the GPU machine has Python, this needs nothing else.
"""
import itertools
import json
import struct
import sys

def swizzle(bits):
    """The swizzle of `bits` chunk bits: bits 4.. XORed with bits 7.. (0: none)."""
    mask = (1 << bits) - 1
    return lambda a: a ^ (((a >> 7) & mask) << 4)


def readings(w):
    """The candidate readings of an operand in rows of `w` bytes: (row, byte in row) -> byte."""
    own = {64: 2, 128: 3}[w]
    return {
        "none": lambda r, kb: r * w + kb,
        "swz32": lambda r, kb: swizzle(1)(r * w + kb),
        "swz64": lambda r, kb: swizzle(2)(r * w + kb),
        "swz128": lambda r, kb: swizzle(3)(r * w + kb),
        f"swz{w}-sbo2x": lambda r, kb: swizzle(own)((r // 8) * 16 * w + (r % 8) * w + kb),
    }


def element(img, at, tf32):
    if at < 0 or at + (4 if tf32 else 2) > len(img):
        return None
    if tf32:
        return struct.unpack_from("<f", img, at)[0]
    (h,) = struct.unpack_from("<H", img, at)
    return struct.unpack("<f", struct.pack("<I", h << 16))[0]


def position(frag, t, i, j):
    """(row, column) of register d[4 i + j] of thread t."""
    w, l = t // 32, t % 32
    r8, c8 = l // 4, 2 * (l % 4) + j % 2
    if frag == "mma-t":
        r8, c8 = c8, r8
    return 16 * (w % 4) + 8 * (j // 2) + r8, 8 * i + c8


def wgmma_matches(run):
    img = bytes.fromhex(run["image"])
    tf32, n, kbyte = run["tf32"], run["n"], run["k_byte"]
    # (dumps from before rows of 128 bytes: rows of 64, B at 4096)
    w, probe_b = run.get("row", 64), run.get("b_offset", 4096)
    size, ks = (4, 8) if tf32 else (2, 16)
    out = run["out"]
    regs = n // 2
    found = []
    a_readings = readings(w)
    b_readings = dict(a_readings)
    b_readings["nmajor"] = None
    for (an, af), (bn, bf), frag in itertools.product(
        a_readings.items(), b_readings.items(), ["mma", "mma-t"]
    ):
        a = {}
        for r in range(64):
            for k in range(ks):
                a[r, k] = element(img, af(r, kbyte + k * size), tf32)
        b = {}
        for c in range(n):
            for k in range(ks):
                at = (k * 32 + c * size) if bf is None else bf(c, kbyte + k * size)
                b[c, k] = element(img, probe_b + at, tf32)
        ok = True
        for t in range(128):
            for i in range(regs // 4):
                for j in range(4):
                    row, col = position(frag, t, i, j)
                    terms = [(a[row, k], b[col, k]) for k in range(ks)]
                    if any(x is None or y is None for x, y in terms):
                        ok = False
                        break
                    if sum(x * y for x, y in terms) != out[t * regs + 4 * i + j]:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            found.append(f"A {an}, B {bn}, fragments {frag}")
    return found


def tma_matches(run, dims=(96, 40)):
    landed = bytes.fromhex(run["landed"])
    c0, c1 = run["c0"], run["c1"]
    # a box of rows of the map's swizzle (dumps from before the 128-byte one: 64)
    box = (run.get("swizzle", 64) // 2, 16)
    found = []
    for name, f in [("none", swizzle(0)), ("swz32", swizzle(1)), ("swz64", swizzle(2)), ("swz128", swizzle(3))]:
        want = bytearray(len(landed))
        for i1 in range(box[1]):
            for i0 in range(box[0]):
                x, y = c0 + i0, c1 + i1
                v = (0x3000 + y * dims[0] + x) & 0xFFFF if x < dims[0] and y < dims[1] else 0
                at = f((i1 * box[0] + i0) * 2)
                if at + 2 <= len(want):
                    struct.pack_into("<H", want, at, v)
        if bytes(want) == landed:
            found.append(name)
    return found


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    d = json.load(open(sys.argv[1]))
    print(f"device: {d.get('device', {}).get('name', '?')}")
    bad = 0
    for run in d.get("wgmma", []):
        w = run.get("row", 64)
        what = f"wgmma {'tf32' if run['tf32'] else 'bf16'} m64n{run['n']} in {w}-byte rows at byte {run['k_byte']}"
        found = wgmma_matches(run)
        bad += f"A swz{w}, B swz{w}, fragments mma" not in found
        print(f"{what}: {'; '.join(found) if found else 'no candidate reading explains it'}")
    for run in d.get("tma", []):
        found = tma_matches(run)
        sw = run.get("swizzle", 64)
        bad += f"swz{sw}" not in found
        print(f"TMA box at ({run['c0']}, {run['c1']}) in the {sw}-byte swizzle: "
              f"{', '.join(found) if found else 'no candidate landing explains it'}")
    print("every run as wrnc reads it" if bad == 0 else f"{bad} runs not as wrnc reads them")


if __name__ == "__main__":
    main()
