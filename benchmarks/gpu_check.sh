#!/usr/bin/env bash
# The checks that need a GPU, run on a lent GPU machine after DALI is installed there
# (../shared/tools/dali-for-device.sh). Prints the environment, then runs the GPU-marked tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 - <<'PY'
import nvidia.dali as dali, nvidia.dali.backend as backend, torch
print("DALI", dali.__version__, "| CUDA devices seen by DALI:", backend.GetCUDADeviceCount(),
      "| torch", torch.__version__, "cuda", torch.cuda.is_available())
PY
python3 -m pytest -q -m gpu -p no:cacheprovider tests "$@"
