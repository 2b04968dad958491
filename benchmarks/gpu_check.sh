#!/usr/bin/env bash
# The checks that need a GPU, for a lent GPU machine (no network, no pip install): DALI is put on
# PYTHONPATH by ../shared/tools/dali-for-device.sh; this repository is imported from its checkout.
#   1. the environment (DALI, CUDA devices, torch);
#   2. the GPU-marked tests (batch contract and parity with device="gpu", tensors on cuda:0);
#   3. the reduced GPU protocol of ../shared/BENCHMARKS.md (a <= 2 GB synthetic store generated here,
#      2-D and 3-D at the production batch, DALI loader vs raw read ceiling vs torch path), one table;
#   4. the chunk cache on the GPU (cupy): epoch 1 and warm epochs, cache off and on, reduced store;
#   5. the augmentation cost on the GPU (production 2-D preset vs none, demo collection).
# Budget: under 5 minutes. Every stage runs under its own time limit and a failing stage does not
# stop the next (a failed test must not cost the benchmark figures); a summary ends the output
# and the exit status is non-zero if any stage failed. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DYNACLR_DALI_CACHE="${TMPDIR:-/tmp}/dynaclr-dali-cache"
summary=()
failed=0

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  if [ "$rc" -eq 0 ]; then
    summary+=("ok      $name ($((SECONDS - t0)) s)")
  else
    [ "$rc" -eq 124 ] && why="timed out" || why="exit $rc"
    summary+=("FAILED  $name ($why after $((SECONDS - t0)) s)")
    failed=1
  fi
}

stage environment 60 python3 -c '
import nvidia.dali as dali, nvidia.dali.backend as backend, torch
print("DALI", dali.__version__, "| CUDA devices seen by DALI:", backend.GetCUDADeviceCount(),
      "| torch", torch.__version__, "cuda", torch.cuda.is_available())'
stage "GPU tests" 80 python3 -m pytest -q -m gpu -p no:cacheprovider tests "$@"
stage "loader throughput, reduced GPU protocol" 110 python3 benchmarks/loader_throughput.py --gpu --reduced
stage "chunk cache on the GPU" 70 python3 benchmarks/chunk_cache.py --gpu --reduced --epochs 2
stage "augmentation cost on the GPU" 40 \
  python3 benchmarks/augment_cost.py --device gpu --repeats 1 --batches 10 --batch-size 64

echo "=== summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
