#!/usr/bin/env bash
# What wrnc needs beyond Rust: NVRTC 13.0 (compiles generated CUDA to PTX; no GPU needed), and
# for the interop tests onnxruntime, onnx and safetensors. Idempotent.
set -euo pipefail
python3 -m pip install --quiet --disable-pip-version-check \
  "nvidia-cuda-nvrtc==13.0.88" "numpy<3" "safetensors" "onnxruntime" "onnx" 2>&1 | grep -v "^\[notice\]" || true
# Where the pip package put libnvrtc.so.13 (wrnc finds it by itself through python3).
python3 -m pip show -f nvidia-cuda-nvrtc 2>/dev/null | grep -E "libnvrtc\.so" | sed 's/^ */nvrtc: /' || true
