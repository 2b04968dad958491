#!/usr/bin/env bash
# The checks that need a GPU, for a lent GPU machine (no network, no pip install): DALI is put on
# PYTHONPATH by ../shared/tools/dali-for-device.sh; this repository is imported from its checkout.
#   1. the environment (DALI, CUDA devices, torch);
#   2. the GPU-marked tests (batch contract and parity with device="gpu", tensors on cuda:0);
#   3. the reduced GPU protocol of ../shared/BENCHMARKS.md (a <= 2 GB synthetic store generated here,
#      2-D and 3-D at the production batch, DALI loader vs raw read ceiling vs torch path), one table;
#   4. the chunk cache on the GPU (cupy): epoch 1 and warm epochs, cache off and on, reduced store;
#   5. the augmentation cost on the GPU (production 2-D preset vs none, demo collection).
# Budget: under 5 minutes. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY'
import nvidia.dali as dali, nvidia.dali.backend as backend, torch
print("DALI", dali.__version__, "| CUDA devices seen by DALI:", backend.GetCUDADeviceCount(),
      "| torch", torch.__version__, "cuda", torch.cuda.is_available())
PY
python3 -m pytest -q -m gpu -p no:cacheprovider tests "$@"
python3 benchmarks/loader_throughput.py --gpu --reduced
python3 benchmarks/chunk_cache.py --gpu --reduced --epochs 3
DYNACLR_DALI_CACHE="${TMPDIR:-/tmp}/dynaclr-dali-cache" \
  python3 benchmarks/augment_cost.py --device gpu --repeats 1 --batches 10 --batch-size 64
