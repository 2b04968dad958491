#!/usr/bin/env bash
# The GPU acceptance, for a lent GPU machine (no network, no pip install): DALI is put on PYTHONPATH
# by ../shared/tools/dali-for-device.sh; this repository is imported from its checkout.
#
#   bash benchmarks/gpu_check.sh               # every stage, in this order (about 4 minutes on an H200)
#   bash benchmarks/gpu_check.sh parity cache  # only those stages
#
# Stages (acceptance first; each under its own time limit; a failing stage does not stop the next):
#   env         DALI, CUDA devices, torch, cupy
#   tests       the GPU-marked tests: batch contract and parity with device="gpu", the chunk cache's
#               stand-in tests against real cupy (one launch per step, device and stream)
#   parity      benchmarks/gpu_parity.py: GPU loader = CPU loader on the same plans, uncached and cached
#   cache       benchmarks/chunk_cache.py --gpu --reduced: cold vs warm epochs, launches per step, upload
#               + assembly share of a cold step (CUDA events), peak GPU memory, 2-D production pairs/s
#   throughput  benchmarks/loader_throughput.py --gpu --reduced: DALI loader vs raw read ceiling vs torch
#   augment     benchmarks/augment_cost.py on the GPU: production 2-D preset vs none
#   h2d         benchmarks/h2d_feed.py: DALI's host-to-GPU feed from pageable vs pinned step buffers
# The summary (stages, seconds, status and the goal lines of each benchmark) is printed and written
# to benchmarks/results/gpu_check.json; the exit status is non-zero if any stage failed.
# The GPU machine has no pydantic (the collection schema needs it): carry its wheels in .whl/ as
# docs/gpu.md says; with them there, this script installs them into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export DYNACLR_DALI_CACHE="${TMPDIR:-/tmp}/dynaclr-dali-cache"
if ! python3 -c 'import pydantic' 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
ALL=(env tests parity cache throughput augment h2d)
STAGES=("${@:-${ALL[@]}}")
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
status_file="$RESULTS/gpu_check.stages.tsv"
: >"$status_file"
failed=0

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2 t0=$SECONDS rc status
  shift 2
  echo "=== $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  if [ "$rc" -eq 0 ]; then status=ok; elif [ "$rc" -eq 124 ]; then status="timed out"; else status="exit $rc"; fi
  [ "$rc" -eq 0 ] || failed=1
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >>"$status_file"
}

for s in "${STAGES[@]}"; do
  case "$s" in
    env) stage env 30 python3 -c '
import cupy, nvidia.dali as dali, nvidia.dali.backend as backend, torch
print("DALI", dali.__version__, "| CUDA devices seen by DALI:", backend.GetCUDADeviceCount(),
      "| torch", torch.__version__, "cuda", torch.cuda.is_available(), "| cupy", cupy.__version__)' ;;
    tests) stage tests 90 python3 -m pytest -q -m gpu -p no:cacheprovider --no-cov tests ;;
    parity) stage parity 60 python3 benchmarks/gpu_parity.py ;;
    cache) stage cache 80 python3 benchmarks/chunk_cache.py --gpu --reduced --epochs 2 ;;
    throughput) stage throughput 110 python3 benchmarks/loader_throughput.py --gpu --reduced ;;
    augment) stage augment 40 python3 benchmarks/augment_cost.py --device gpu --repeats 1 --batches 10 --batch-size 64 ;;
    h2d) stage h2d 60 python3 benchmarks/h2d_feed.py --batch 64 --steps 6 ;;
    *) echo "unknown stage '$s' (stages: ${ALL[*]})" >&2; exit 2 ;;
  esac
done

echo "=== summary"
python3 - "$RESULTS" <<'PY'
import json, sys
from pathlib import Path

results = Path(sys.argv[1])
stages = [dict(zip(("stage", "status", "seconds"), line.split("\t"))) for line in
          (results / "gpu_check.stages.tsv").read_text().splitlines()]
summary = {"stages": stages, "goals": {}}
for name, path in (("parity", "gpu_parity.json"), ("cache", "chunk_cache-reduced.json"),
                   ("throughput", "loader_throughput/loader_throughput-reduced.json"), ("h2d", "h2d_feed.json")):
    if (results / path).exists():
        doc = json.loads((results / path).read_text())
        summary["goals"][name] = (doc.get("goal_report") or doc.get("table_markdown", "").splitlines()
                                  or {k: doc[k] for k in ("ok", "one_launch_per_step") if k in doc})
for s in stages:
    print(f"{s['status']:<10} {s['stage']} ({s['seconds']} s)")
for name, goals in summary["goals"].items():
    print(f"{name}:", *(goals if isinstance(goals, list) else [json.dumps(goals)]), sep="\n  ")
(results / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(f"saved {results / 'gpu_check.json'}")
PY
exit "$failed"
