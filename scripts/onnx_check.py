#!/usr/bin/env python3
"""Run a wrnc ONNX export with onnxruntime (CPU execution provider) after onnx.checker.

    onnx_check.py --probe
        exit 0 if onnx and onnxruntime import (prints their versions), 3 if not.
    onnx_check.py MODEL.onnx INPUT.bin LOGITS.bin
        checks MODEL with onnx.checker (full check: strict shape inference), checks its
        interface (input `input` [N, C, H, W] float, output `logits` [N, classes]), reads
        INPUT.bin as raw little-endian f32 shaped [-1, C, H, W] (C, H, W from the model),
        runs it, and writes the logits as raw little-endian f32 to LOGITS.bin.

Exit codes: 0 ok, 1 a check failed, 2 bad arguments, 3 onnx/onnxruntime/numpy missing.
"""
import sys


def imports():
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        print(f"onnx_check: cannot import: {e}", file=sys.stderr)
        sys.exit(3)
    return np, onnx, ort


def dims(value_info):
    out = []
    for d in value_info.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else d.dim_param)
    return out


def main(argv):
    if argv == ["--probe"]:
        np, onnx, ort = imports()
        print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}")
        return 0
    no_opt = "--no-opt" in argv
    argv = [a for a in argv if a != "--no-opt"]
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    np, onnx, ort = imports()
    model_path, input_path, logits_path = argv
    model = onnx.load(model_path)
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    inputs = [i for i in g.input if i.name not in {t.name for t in g.initializer}]
    if [i.name for i in inputs] != ["input"] or [o.name for o in g.output] != ["logits"]:
        print(f"onnx_check: interface is {[i.name for i in inputs]} -> {[o.name for o in g.output]}",
              file=sys.stderr)
        return 1
    shape = dims(inputs[0])
    if len(shape) != 4 or not isinstance(shape[0], str) or not all(isinstance(d, int) for d in shape[1:]):
        print(f"onnx_check: input shape {shape} is not [N, C, H, W]", file=sys.stderr)
        return 1
    x = np.fromfile(input_path, dtype="<f4")
    per = shape[1] * shape[2] * shape[3]
    if x.size == 0 or x.size % per:
        print(f"onnx_check: {input_path} holds {x.size} floats, not a multiple of {per}", file=sys.stderr)
        return 1
    x = x.reshape(-1, *shape[1:])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    if no_opt:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (y,) = sess.run(["logits"], {"input": x})
    out_shape = dims(g.output[0])
    if y.shape != (x.shape[0], out_shape[1]):
        print(f"onnx_check: logits shape {y.shape}, declared {out_shape}", file=sys.stderr)
        return 1
    y.astype("<f4").tofile(logits_path)
    print(f"onnx_check: {model_path}: {len(g.node)} nodes, {len(g.initializer)} initializers, "
          f"input {list(x.shape)} -> logits {list(y.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
