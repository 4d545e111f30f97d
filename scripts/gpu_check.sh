#!/usr/bin/env bash
# The TensorRT GPU checks (tests/gpu/test_tensorrt_gpu.py): real engines for the zoo ResNet,
# the zoo transformer and a quantized ResNet in fp32, fp16 and int8, built, run on CPU and
# CUDA tensors, reloaded and compared with the graph. Needs an NVIDIA GPU, a CUDA build of
# torch and TensorRT 10 or 11 (pip install 'fxopt[tensorrt]'). Fails, rather than skips,
# when one of them is missing, and stops after ${GPU_CHECK_TIMEOUT:-290} seconds.
#
#   scripts/gpu_check.sh              # from the repository root
#   PYTHON=.venv/bin/python scripts/gpu_check.sh -k resnet
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'PYEOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; nothing was checked")
try:
    import tensorrt
except ImportError as e:
    sys.exit(f"gpu_check: TensorRT is not installed ({e}): pip install 'fxopt[tensorrt]'")
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), TensorRT "
      f"{tensorrt.__version__}, GPU {torch.cuda.get_device_name()} "
      f"sm {'.'.join(map(str, torch.cuda.get_device_capability()))}")
PYEOF

exec timeout --signal=INT "${GPU_CHECK_TIMEOUT:-290}" \
    "$PY" -m pytest -q -m gpu tests/gpu/test_tensorrt_gpu.py -rA -p no:cacheprovider "$@"
