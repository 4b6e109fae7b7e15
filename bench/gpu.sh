#!/usr/bin/env bash
# One NVIDIA GPU, at most 8 minutes: the CUDA build of JAX, the tests that make sense on one GPU,
# then bench/gpu_suite.py (MoE layer with the ragged backend, train-step MFU against the
# published bf16 peak, FP8 against bf16 matmuls, decode tokens/s) and its table.
#
#   bash bench/gpu.sh             # on the GPU machine, from the repository root
#   bash bench/gpu.sh --dry-run   # anywhere: no install, no tests, tiny shapes on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=""
[[ "${1:-}" == "--dry-run" ]] && DRY="--dry-run"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ -z "$DRY" ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  # The CUDA 12 wheels of the installed jax version (plugin and pjrt), so jax itself stays put.
  JAX_VERSION="$("$PY" -c 'import jax; print(jax.__version__)')"
  timeout 180 "$PY" -m pip install -q "jax[cuda12]==${JAX_VERSION}"
  "$PY" -c 'import jax; d = jax.devices()[0]; assert d.platform == "gpu", d; print(d.device_kind)'
  # The suite's own tests fake 8 CPU devices (tests/conftest.py); on the GPU the MoE layer and
  # FP8 numerics run for real: the single-device layer tests and the FP8 kernels.
  JAX_PLATFORMS=cuda timeout 150 "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/test_moe_layer.py tests/test_fp8.py || echo "gpu tests: FAILED (above)"
fi
timeout 300 "$PY" bench/gpu_suite.py $DRY
