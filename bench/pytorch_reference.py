#!/usr/bin/env python3
"""The same network in PyTorch, timed like `wrnc bench`: a training step (forward, loss,
backward, SGD with Nesterov momentum and weight decay) and inference, at the same batch.

The network is read from wrnc's op-graph text (`wrnc compile NET --emit graph`), so any
network wrnc compiles is reproduced op for op (conv, bn, relu, dropout, stochastic depth,
add, zero-pad shortcut, concat, max/avg pool, global average pool, linear).

Variants: eager (channels_last, cudnn.benchmark) in fp32 and with bf16 autocast, and
torch.compile of the same. Times are CUDA-event medians after warm-up. Output: one JSON
object (stdout, or --out FILE).

    python3 bench/pytorch_reference.py --wrnc gpu-carry/wrnc --net WRN-28-10 --batch 128
    python3 bench/pytorch_reference.py --graph graph.txt --batch 128 --variants eager
    python3 bench/pytorch_reference.py --graph graph.txt --batch 1024 --infer-only --no-matmul
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

LINE = re.compile(r"^%(\d+) = (.*?) \((.*?)\) : (\d+)x(\d+)x(\d+)  # (.*)$")


def parse(text):
    """wrnc graph text -> (name, input shape, classes, nodes, output id)."""
    lines = text.strip().splitlines()
    head = re.match(r'^graph "(.*)" input (\d+)x(\d+)x(\d+) classes (\d+)$', lines[0])
    if not head:
        raise SystemExit(f"not a wrnc graph: {lines[0]!r}")
    name = head.group(1)
    shape = tuple(int(head.group(i)) for i in (2, 3, 4))
    classes = int(head.group(5))
    nodes, output = [], None
    for ln in lines[1:]:
        if ln.startswith("output %"):
            output = int(ln[len("output %"):])
            continue
        m = LINE.match(ln)
        if not m:
            raise SystemExit(f"cannot parse graph line: {ln!r}")
        args = [int(a.strip()[1:]) for a in m.group(3).split(",") if a.strip()]
        nodes.append({
            "id": int(m.group(1)), "op": m.group(2), "args": args,
            "shape": (int(m.group(4)), int(m.group(5)), int(m.group(6))), "name": m.group(7),
        })
    return name, shape, classes, nodes, output


def kv(words):
    out = {}
    for w in words:
        if "=" in w:
            k, v = w.split("=", 1)
            out[k] = v
    return out


class Net(nn.Module):
    """Runs the graph's nodes in (topological) order."""

    def __init__(self, nodes, output):
        super().__init__()
        self.nodes, self.output = nodes, output
        self.mods = nn.ModuleDict()
        self.plan = []
        for n in nodes:
            w = n["op"].split()
            op, key = w[0], f"n{n['id']}"
            a = kv(w[1:])
            if op == "conv":
                k = int(w[1].split("x")[0])
                cin, cout = (int(x) for x in w[2].split("->"))
                self.mods[key] = nn.Conv2d(cin, cout, k, stride=int(a.get("stride", 1)),
                                           padding=int(a.get("pad", (k - 1) // 2)),
                                           groups=int(a.get("groups", 1)), bias="bias" in w)
            elif op == "bn":
                self.mods[key] = nn.BatchNorm2d(int(w[1]), eps=1e-5, momentum=0.1)
            elif op == "linear":
                fin, fout = (int(x) for x in w[1].split("->"))
                self.mods[key] = nn.Linear(fin, fout)
            self.plan.append((op, key, a, w, n))

    def forward(self, x):
        vals = {}
        for op, key, a, w, n in self.plan:
            ins = [vals[i] for i in n["args"]]
            if op == "input":
                y = x
            elif op in ("conv", "bn"):
                y = self.mods[key](ins[0])
            elif op == "relu":
                y = F.relu(ins[0])
            elif op == "dropout":
                y = F.dropout(ins[0], float(a["p"]), self.training)
            elif op == "droppath":
                s = float(a["survival"])
                if self.training:
                    m = torch.empty(ins[0].shape[0], 1, 1, 1, device=ins[0].device).bernoulli_(s)
                    y = ins[0] * m / s
                else:
                    y = ins[0]
            elif op == "add":
                y = ins[0] + ins[1]
            elif op == "zeropad":
                st = int(a["stride"])
                t = F.avg_pool2d(ins[0], st) if st > 1 else ins[0]
                y = F.pad(t, (0, 0, 0, 0, 0, n["shape"][0] - t.shape[1]))
            elif op == "concat":
                y = torch.cat(ins, 1)
            elif op in ("maxpool", "avgpool"):
                k = int(w[1].split("x")[0])
                st, pd = int(a["stride"]), int(a["pad"])
                y = (F.max_pool2d(ins[0], k, st, pd) if op == "maxpool"
                     else F.avg_pool2d(ins[0], k, st, pd, count_include_pad=True))
            elif op == "gap":
                y = ins[0].mean((2, 3), keepdim=True)
            elif op == "linear":
                y = self.mods[key](torch.flatten(ins[0], 1))
            else:
                raise SystemExit(f"unsupported op {op}")
            vals[n["id"]] = y
        return vals[self.output]


def time_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(iters):
        s.record()
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e))
    return statistics.median(out)


def measure(nodes, output, shape, classes, batch, bf16, compiled, warmup, iters, infer_only=False):
    torch.manual_seed(0)
    model = Net(nodes, output).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    x = torch.randn(batch, *shape, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device="cuda")
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else torch.enable_grad
    train_fwd = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = F.cross_entropy(train_fwd(x), y)
        loss.backward()
        opt.step()

    train_ms = peak = first_s = None
    if not infer_only:
        model.train()
        t0 = time.time()
        step()
        torch.cuda.synchronize()
        first_s = time.time() - t0
        # the steady step's peak: not the first step's cuDNN algorithm search (cudnn.benchmark)
        # or torch.compile's compilation, which wrnc's planned bytes do not count either
        torch.cuda.reset_peak_memory_stats()
        train_ms = time_ms(step, warmup, iters)
        peak = torch.cuda.max_memory_allocated() / 2**20
    model.eval()
    infer_fwd = torch.compile(model) if compiled else model

    def infer():
        with torch.no_grad():
            with (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.no_grad()):
                infer_fwd(x)

    infer_ms = time_ms(infer, warmup, iters)
    del model, opt
    torch.cuda.empty_cache()
    return {"train_step_ms": train_ms, "infer_ms": infer_ms, "peak_mem_mb": peak,
            "first_step_s": first_s}


def matmul_tflops(dtype, n=8192, warmup=3, iters=10):
    """The GPU's measured dense GEMM rate: an n x n x n torch.matmul (cuBLAS), in TFLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_ms(lambda: torch.matmul(a, b), warmup, iters)
    del a, b
    torch.cuda.empty_cache()
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graph", help="wrnc graph text file (from `wrnc compile NET --emit graph`)")
    p.add_argument("--wrnc", help="the wrnc binary, to produce the graph of --net")
    p.add_argument("--net", help="network for --wrnc")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", choices=["f32", "bf16", "both"], default="both")
    p.add_argument("--variants", default="eager,compile", help="comma-separated: eager, compile")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", help="write the JSON here as well as to stdout")
    p.add_argument("--infer-only", action="store_true",
                   help="inference only (batch-1 latency, large-batch throughput): no training step")
    p.add_argument("--no-matmul", action="store_true", help="skip the cuBLAS matmul yardstick")
    a = p.parse_args()
    if a.graph:
        text = open(a.graph).read()
    elif a.wrnc and a.net:
        text = subprocess.run([a.wrnc, "compile", a.net, "--emit", "graph"], check=True,
                              capture_output=True, text=True).stdout
    else:
        p.error("give --graph FILE, or --wrnc BIN --net NET")
    name, shape, classes, nodes, output = parse(text)
    if not torch.cuda.is_available():
        print("error: PyTorch sees no CUDA GPU", file=sys.stderr)
        sys.exit(1)
    torch.backends.cudnn.benchmark = True
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "net": name, "batch": a.batch, "results": {}}
    # the yardstick for achieved TFLOP/s: cuBLAS on a large square GEMM (TF32 off for fp32)
    torch.backends.cuda.matmul.allow_tf32 = False
    if not a.no_matmul:
        res["matmul_tflops"] = {"bf16": matmul_tflops(torch.bfloat16), "f32": matmul_tflops(torch.float32)}
        print(f"matmul 8192^3: {res['matmul_tflops']}", file=sys.stderr)
    res["infer_only"] = a.infer_only
    res["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32  # PyTorch's default for fp32 convs
    precs = ["f32", "bf16"] if a.precision == "both" else [a.precision]
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    for v in variants:
        if v not in ("eager", "compile"):
            p.error(f"unknown variant {v}")
    # variant by variant (eager first: torch.compile's compilation is the slow part), and the
    # JSON rewritten after each, so a run stopped by a timeout keeps what it measured
    for key in variants:
        # bf16 before f32 under torch.compile: issue 6's targets are bf16
        for prec in precs if key == "eager" else precs[::-1]:
            try:
                r = measure(nodes, output, shape, classes, a.batch, prec == "bf16",
                            key == "compile", a.warmup, a.iters, a.infer_only)
            except Exception as e:  # report, keep going with the other variants
                r = {"error": f"{type(e).__name__}: {e}"[:2000]}
            res["results"].setdefault(prec, {})[key] = r
            print(f"{prec} {key}: {r}", file=sys.stderr)
            if a.out:
                write_atomic(a.out, json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
