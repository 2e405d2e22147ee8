#!/usr/bin/env python3
"""PyTorch twin of a wrnc network: the same graph built from wrnc's own description, loading a
wrnc checkpoint with safetensors.torch, compared with wrnc's logits.

    python3 bench/pytorch_twin.py NET [--weights CKPT] [--batch 2] [--seed 0] [--device cpu]

1. `wrnc compile NET --emit graph` gives the op graph, one node a line (generic for every
   family: WRN, ResNet, PreResNet, ResNeXt, DenseNet, PyramidNet and structural nets).
2. Modules are registered under the wrnc node names (`3.body.2` is `twin._modules['3']
   ._modules['body']._modules['2']`), so the twin's state_dict keys ARE wrnc's tensor names
   (`<node>.weight|bias|running_mean|running_var`; BatchNorm's `num_batches_tracked` is
   removed). The key sets are compared exactly before loading.
3. Weights: --weights (a wrnc checkpoint; `momentum.*` keys are skipped), else fresh ones from
   `wrnc export NET --seed S --save-weights` (optionally --perturb-bn for non-default BN state).
4. wrnc's logits: `wrnc export NET --weights W --input x.bin --logits y.bin` (the CPU reference
   backend); when onnxruntime imports, also the ONNX export run by onnxruntime.
5. Prints the max relative error `max|twin - wrnc| / max(max|wrnc|, 1e-3)` and exits 1 above
   --tolerance (1e-4). TF32 is switched off so that GPU convolutions are true fp32.

--backend numpy runs the same interpreter with NumPy kernels instead of PyTorch (for machines
without torch: it checks the graph reading, the naming and the semantics, not torch).
Exit codes: 0 match, 1 mismatch, 2 bad arguments or a wrnc error, 3 torch missing.
"""
import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

FLOOR = 1e-3
BN_EPS = 1e-5  # wrnc's BN epsilon (compiler/src/lower.rs BN_EPS), PyTorch's default too

# ---------------------------------------------------------------- the graph text (no torch)

NODE = re.compile(r"^%(\d+) = (.*?) \(([^)]*)\) : (\d+)x(\d+)x(\d+)  # (\S+)$")
HEAD = re.compile(r'^graph "(.*)" input (\d+)x(\d+)x(\d+) classes (\d+)$')


def parse_op(text):
    """`conv 3x3 16->32 stride=2 bias` -> dict(op='conv', k=3, cin=16, cout=32, stride=2, ...)."""
    words = text.split()
    op, rest = words[0], words[1:]
    d = {"op": op}
    opts = {}
    for w in rest:
        if "=" in w:
            key, val = w.split("=", 1)
            opts[key] = float(val) if "." in val else int(val)
        elif w == "bias":
            opts["bias"] = True
        elif "->" in w:
            a, b = w.split("->")
            if a:
                d["cin"] = int(a)
            d["cout"] = int(b)
        elif re.fullmatch(r"\d+x\d+", w):
            d["k"] = int(w.split("x")[0])
        elif re.fullmatch(r"\d+", w):
            d["c"] = int(w)
        else:
            raise ValueError(f"cannot read op `{text}`")
    if op == "conv":
        d.update(stride=opts.get("stride", 1), pad=opts.get("pad", (d["k"] - 1) // 2),
                 groups=opts.get("groups", 1), bias=opts.get("bias", False))
    elif op in ("maxpool", "avgpool"):
        d.update(stride=opts["stride"], pad=opts["pad"])
    elif op == "zeropad":
        d.update(stride=opts["stride"])
    elif op not in ("input", "bn", "relu", "dropout", "droppath", "add", "concat", "gap", "linear"):
        raise ValueError(f"unknown op `{op}` in `{text}`")
    return d


def parse_graph(text):
    """The output of `wrnc compile --emit graph` -> (header dict, [node dict], output index)."""
    lines = text.strip().splitlines()
    m = HEAD.match(lines[0])
    if not m:
        raise ValueError(f"not a wrnc graph: {lines[0]!r}")
    head = {"name": m.group(1), "input": tuple(int(m.group(i)) for i in (2, 3, 4)),
            "classes": int(m.group(5))}
    nodes = []
    out = None
    for line in lines[1:]:
        if line.startswith("output %"):
            out = int(line[len("output %"):])
            continue
        m = NODE.match(line)
        if not m:
            raise ValueError(f"cannot read graph line {line!r}")
        i = int(m.group(1))
        if i != len(nodes):
            raise ValueError(f"nodes out of order at {line!r}")
        d = parse_op(m.group(2))
        d["args"] = [int(a.strip()[1:]) for a in m.group(3).split(",") if a.strip()]
        d["shape"] = tuple(int(m.group(j)) for j in (4, 5, 6))
        d["name"] = m.group(7)
        nodes.append(d)
    if out is None:
        raise ValueError("the graph has no output line")
    return head, nodes, out


def expected_tensors(nodes):
    """{tensor name: shape} of a checkpoint of this graph, by the wrnc naming scheme."""
    t = {}
    for n in nodes:
        name = n["name"]
        if n["op"] == "conv":
            t[f"{name}.weight"] = (n["cout"], n["cin"] // n["groups"], n["k"], n["k"])
            if n["bias"]:
                t[f"{name}.bias"] = (n["cout"],)
        elif n["op"] == "bn":
            for s in ("weight", "bias", "running_mean", "running_var"):
                t[f"{name}.{s}"] = (n["c"],)
        elif n["op"] == "linear":
            t[f"{name}.weight"] = (n["cout"], n["cin"])
            t[f"{name}.bias"] = (n["cout"],)
    return t


def safetensors_header(path):
    """{name: shape} from a safetensors file's JSON header (no safetensors package needed)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def check_names(nodes, ckpt):
    """The checkpoint holds exactly the graph's tensors (momentum.* aside); returns problems."""
    want = expected_tensors(nodes)
    have = {k: v for k, v in safetensors_header(ckpt).items() if not k.startswith("momentum.")}
    problems = [f"missing {k} {want[k]}" for k in sorted(want.keys() - have.keys())]
    problems += [f"unexpected {k}" for k in sorted(have.keys() - want.keys())]
    problems += [f"{k}: checkpoint {have[k]}, graph {want[k]}"
                 for k in sorted(want.keys() & have.keys()) if want[k] != have[k]]
    return problems


# ---------------------------------------------------------------- one interpreter, two backends

def run_graph(nodes, out, x, ops):
    """Evaluates the graph on `x` with the kernels in `ops` (eval mode), freeing dead values."""
    last_use = {}
    for i, n in enumerate(nodes):
        for a in n["args"]:
            last_use[a] = i
    env = {}
    for i, n in enumerate(nodes):
        a = [env[j] for j in n["args"]]
        op = n["op"]
        if op == "input":
            y = x
        elif op in ("dropout", "droppath"):
            y = a[0]
        elif op == "add":
            y = a[0] + a[1]
        else:
            y = getattr(ops, op)(n, *a)
        env[i] = y
        for j in n["args"]:
            if last_use[j] == i and j != out:
                del env[j]
    return env[out].reshape(x.shape[0], -1)


class NumpyOps:
    """Reference kernels in NumPy (float64), weights from a {name: array} dict."""

    def __init__(self, np, w):
        self.np, self.w = np, w

    def conv(self, n, x):
        np = self.np
        k, s, p, g = n["k"], n["stride"], n["pad"], n["groups"]
        w = self.w[n["name"] + ".weight"].astype(np.float64)
        x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        N, C, H, W = x.shape
        oh, ow = (H - k) // s + 1, (W - k) // s + 1
        cols = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s][:, :, :oh, :ow]
        cg, og = C // g, n["cout"] // g
        ys = [np.einsum("nchwij,ocij->nohw", cols[:, gi * cg:(gi + 1) * cg], w[gi * og:(gi + 1) * og],
                        optimize=True) for gi in range(g)]
        y = np.concatenate(ys, axis=1)
        if n["bias"]:
            y = y + self.w[n["name"] + ".bias"].reshape(1, -1, 1, 1)
        return y

    def bn(self, n, x):
        np, w, name = self.np, self.w, n["name"]
        r = lambda s: w[f"{name}.{s}"].astype(np.float64).reshape(1, -1, 1, 1)
        return (x - r("running_mean")) / np.sqrt(r("running_var") + BN_EPS) * r("weight") + r("bias")

    def relu(self, n, x):
        return self.np.maximum(x, 0)

    def concat(self, n, a, b):
        return self.np.concatenate([a, b], axis=1)

    def _windows(self, n, x, fill):
        np, k, s, p = self.np, n["k"], n["stride"], n["pad"]
        x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=fill)
        oh, ow = (x.shape[2] - k) // s + 1, (x.shape[3] - k) // s + 1
        return np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s][:, :, :oh, :ow]

    def maxpool(self, n, x):
        return self._windows(n, x, -self.np.inf).max(axis=(4, 5))

    def avgpool(self, n, x):  # count_include_pad: zeros count, divide by k*k
        return self._windows(n, x, 0.0).mean(axis=(4, 5))

    def gap(self, n, x):
        return x.mean(axis=(2, 3), keepdims=True)

    def zeropad(self, n, x):
        s = n["stride"]
        if s > 1:
            N, C, H, W = x.shape
            x = x.reshape(N, C, H // s, s, W // s, s).mean(axis=(3, 5))
        return self.np.pad(x, ((0, 0), (0, n["cout"] - x.shape[1]), (0, 0), (0, 0)))

    def linear(self, n, x):
        x = x.reshape(x.shape[0], -1)
        return x @ self.w[n["name"] + ".weight"].astype(self.np.float64).T + self.w[n["name"] + ".bias"]


def torch_twin(torch, nodes, out):
    """An nn.Module whose state_dict keys are the wrnc names and whose forward is the graph."""
    nn, F = torch.nn, torch.nn.functional

    class Ops:
        def __init__(self, root):
            self.root = root

        def mod(self, name):
            m = self.root
            for part in name.split("."):
                m = m._modules[part]
            return m

        def conv(self, n, x):
            return self.mod(n["name"])(x)

        bn = conv

        def relu(self, n, x):
            return F.relu(x)

        def concat(self, n, a, b):
            return torch.cat([a, b], dim=1)

        def maxpool(self, n, x):
            return F.max_pool2d(x, n["k"], n["stride"], n["pad"])

        def avgpool(self, n, x):
            return F.avg_pool2d(x, n["k"], n["stride"], n["pad"], count_include_pad=True)

        def gap(self, n, x):
            return x.mean(dim=(2, 3), keepdim=True)

        def zeropad(self, n, x):
            if n["stride"] > 1:
                x = F.avg_pool2d(x, n["stride"])
            return F.pad(x, (0, 0, 0, 0, 0, n["cout"] - x.shape[1]))

        def linear(self, n, x):
            return self.mod(n["name"])(torch.flatten(x, 1))

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            for n in nodes:
                if n["op"] == "conv":
                    m = nn.Conv2d(n["cin"], n["cout"], n["k"], n["stride"], n["pad"],
                                  groups=n["groups"], bias=n["bias"])
                elif n["op"] == "bn":
                    m = nn.BatchNorm2d(n["c"], eps=BN_EPS, momentum=0.1)
                    m.register_buffer("num_batches_tracked", None)  # not a wrnc tensor
                elif n["op"] == "linear":
                    m = nn.Linear(n["cin"], n["cout"])
                else:
                    continue
                parent = self
                *path, leaf = n["name"].split(".")
                for part in path:
                    if part not in parent._modules:
                        parent.add_module(part, nn.Module())
                    parent = parent._modules[part]
                parent.add_module(leaf, m)

        def forward(self, x):
            return run_graph(nodes, out, x, Ops(self))

    return Twin()


# ---------------------------------------------------------------- driver

def wrnc_cmd(args, *rest):
    cmd = [args.wrnc, *rest]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"pytorch_twin: `{' '.join(cmd)}` failed ({r.returncode}):\n{r.stderr}", file=sys.stderr)
        sys.exit(2)
    return r.stdout


def rel_err(np, a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), FLOOR))


def perturb_bn(np, path, out, seed):
    """A copy of checkpoint `path` with non-default BN state and biases (mild, seeded)."""
    from safetensors.numpy import load_file, save_file
    t = load_file(path)
    rng = np.random.default_rng(seed)
    for k in sorted(t):
        v = t[k]
        if k.endswith(".running_var"):
            t[k] = (v * rng.uniform(0.8, 1.25, v.shape)).astype(np.float32)
        elif k.endswith(".running_mean") or (k.endswith(".bias")):
            t[k] = (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
        elif k.endswith(".weight") and v.ndim == 1:
            t[k] = (v * rng.uniform(0.8, 1.2, v.shape)).astype(np.float32)
    save_file(t, out)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("net", help="a .net file or an inline expression, as for wrnc")
    ap.add_argument("--weights", help="a wrnc checkpoint (file or folder); default: fresh weights")
    ap.add_argument("--seed", type=int, default=0, help="input (and fresh weights) seed")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", choices=["torch", "numpy"], default="torch")
    ap.add_argument("--perturb-bn", action="store_true", help="non-default BN state for fresh weights")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--wrnc", default=os.environ.get("WRNC", os.path.join(here, "..", "target", "release", "wrnc")))
    ap.add_argument("--keep", help="keep the intermediate files in this folder")
    args = ap.parse_args()
    if args.batch < 1 or args.batch > 4096:
        ap.error("--batch must be 1..4096")
    import numpy as np

    head, nodes, out = parse_graph(wrnc_cmd(args, "compile", args.net, "--emit", "graph"))
    work = args.keep or tempfile.mkdtemp(prefix="wrnc-twin-")
    os.makedirs(work, exist_ok=True)
    ckpt = args.weights
    if ckpt and os.path.isdir(ckpt):
        ckpt = os.path.join(ckpt, "last.safetensors")
    if not ckpt:
        ckpt = os.path.join(work, "weights.safetensors")
        wrnc_cmd(args, "export", args.net, "--seed", str(args.seed), "--save-weights", ckpt)
        if args.perturb_bn:
            perturb_bn(np, ckpt, ckpt, args.seed)
    problems = check_names(nodes, ckpt)
    if problems:
        print("pytorch_twin: the checkpoint does not fit the graph:\n  " + "\n  ".join(problems[:20]),
              file=sys.stderr)
        return 2
    print(f"{head['name']}: {len(nodes)} nodes, {len(expected_tensors(nodes))} tensors, names match")

    c, h, w = head["input"]
    x = np.random.default_rng(args.seed).standard_normal((args.batch, c, h, w)).astype(np.float32)
    x_path, y_path, onnx_path = (os.path.join(work, f) for f in ("x.bin", "wrnc.bin", "model.onnx"))
    x.astype("<f4").tofile(x_path)
    wrnc_cmd(args, "export", args.net, "--weights", ckpt, "--input", x_path, "--logits", y_path,
             "--onnx", onnx_path)
    ref = np.fromfile(y_path, dtype="<f4").reshape(args.batch, head["classes"])

    results = {}
    try:
        import onnxruntime as ort
        sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        results["onnxruntime"] = sess.run(["logits"], {"input": x})[0]
    except ImportError:
        print("(onnxruntime not importable: ONNX not compared)")

    if args.backend == "numpy":
        from safetensors.numpy import load_file
        weights = load_file(ckpt)
        results["numpy twin"] = run_graph(nodes, out, x.astype(np.float64), NumpyOps(np, weights))
    else:
        try:
            import torch
            from safetensors.torch import load_file
        except Exception as e:  # ImportError, or a broken install (missing CUDA libraries)
            print(f"pytorch_twin: torch is not usable ({e!r}); try --backend numpy", file=sys.stderr)
            return 3
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        twin = torch_twin(torch, nodes, out)
        state = {k: v for k, v in load_file(ckpt).items() if not k.startswith("momentum.")}
        keys = set(twin.state_dict().keys())
        if keys != set(state):
            print(f"pytorch_twin: state_dict keys differ: only in torch {sorted(keys - set(state))[:5]}, "
                  f"only in the checkpoint {sorted(set(state) - keys)[:5]}", file=sys.stderr)
            return 1
        # strict=False only because BatchNorm's loader adds `num_batches_tracked` to state dicts
        # without version metadata; the key sets were compared exactly just above, and here.
        res = twin.load_state_dict(state, strict=False)
        extra = [k for k in res.unexpected_keys if not k.endswith(".num_batches_tracked")]
        if res.missing_keys or extra:
            print(f"pytorch_twin: load_state_dict: missing {res.missing_keys[:5]}, unexpected {extra[:5]}",
                  file=sys.stderr)
            return 1
        twin = twin.to(args.device).eval()
        with torch.no_grad():
            results[f"pytorch ({args.device})"] = twin(torch.from_numpy(x).to(args.device)).cpu().numpy()

    worst = 0.0
    for who, y in results.items():
        if y.shape != ref.shape:
            print(f"{who}: logits shape {y.shape}, wrnc {ref.shape}")
            return 1
        e = rel_err(np, y, ref)
        worst = max(worst, e)
        print(f"{who} vs wrnc CPU: max relative error {e:.3e}")
    if worst > args.tolerance:
        print(f"FAIL: {worst:.3e} > {args.tolerance:g}")
        return 1
    print(f"ok: within {args.tolerance:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
