#!/usr/bin/env bash
# Everything worth checking on a GPU (an H100 or H200), in one call of a few minutes:
# the kernels compiled for the GPU against their references, the kernel table (same-run XLA and
# cuDNN baselines), and the GPT-2 small train step of docs/BENCHMARKS.md against its same-run
# XLA baseline. docs/BENCHMARKS.md says how to read and record what it prints.
# Usage (from the repository root, on the GPU machine): OUT=/some/dir experiments/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. JAX_PLATFORMS=cuda JAXPASSES_CHECK=0
out="${OUT:-results/gpu_check}"
mkdir -p "$out"
python -c 'import jax; print(jax.__version__, jax.devices())' | tee "$out/device.txt"
timeout 180 python -m pytest -q -x -p no:cacheprovider tests/test_attention_kernel.py \
  tests/test_norm_kernels.py tests/test_dense_kernels.py tests/test_cross_entropy_kernels.py \
  > "$out/kernel_tests.txt" 2>&1; echo "kernel tests exit $?" | tee -a "$out/kernel_tests.txt"
tail -5 "$out/kernel_tests.txt"
timeout 150 python -m experiments.kernels --out "$out/kernels.json" 2>&1 | tail -30 | tee "$out/kernels.txt"
timeout 200 python -m experiments.run --preset gpt2-small-h100 --out "$out/gpt2_small" 2>&1 \
  | tail -30 | tee "$out/gpt2_small.txt"
