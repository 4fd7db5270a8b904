#!/usr/bin/env bash
# The cloud's benchmarks on a CUDA machine, in one go (a few minutes).
#
#   tools/gpu_bench.sh [OUT_DIR]        # run from the repository root, with fogline[cloud] installed
#
# Runs tools/bench_cloud.py on cuda (whole model vs HF; concurrent sessions through a real
# `fogline cloud serve --device cuda`; the GPU's matmul/bandwidth bounds), then, if present,
# tools/bench_capacity.py's cloud-only part. Writes each tool's output to OUT_DIR (default
# out/gpu) and prints it. Needs the demo bundle (made by bench_cloud on first use: out/k20q8).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-out/gpu}"
mkdir -p "$out"
py="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c 'import torch, sys; ok = torch.cuda.is_available(); print("cuda:", ok, torch.cuda.get_device_name(0) if ok else ""); sys.exit(0 if ok else 1)' \
  || { echo "no CUDA device: nothing to do" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
timeout 420 "$py" tools/bench_cloud.py --device cuda --threads 0 --bundle out/k20q8 \
  --sessions 1,16,64 --repeats 1 --new-tokens 32 2>&1 | tee "$out/bench_cloud.txt"
if [ -f tools/bench_capacity.py ]; then
  timeout 300 "$py" tools/bench_capacity.py --cloud-only-part --device cuda --json "$out/capacity.json" 2>&1 \
    | tee "$out/bench_capacity.txt" || echo "bench_capacity failed (rc $?)" >&2
fi
