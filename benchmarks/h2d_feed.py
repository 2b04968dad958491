#!/usr/bin/env python
"""How fast DALI moves a batch of patches from host memory to the GPU: pageable vs pinned source arrays.

A source-only pipeline (external source -> .gpu() -> output) at the 3-D production batch (256
pairs of 2 x 16 x 256 x 256 float32 by default: 4.3 GB per step) fed from a ring of `prefetch + 2`
host buffers, each run in this process one after another: pageable numpy with DALI's own copy
(`no_copy=False`), pageable in place (`no_copy=True`, what the loader does today), and pinned
(cudaHostAlloc through cupy) in place. Pixels are not checked (a copy); ms per step and GB/s are
reported. It tells whether a pinned step ring pays on this machine before the loader gets one.

    python benchmarks/h2d_feed.py [--batch 256] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def host_ring(kind: str, n: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    if kind == "pageable":
        return [np.ones(shape, np.float32) for _ in range(n)]
    import cupy

    count = int(np.prod(shape))
    out = []
    for _ in range(n):
        memory = cupy.cuda.alloc_pinned_memory(count * 4)
        array = np.frombuffer(memory, np.float32, count).reshape(shape)
        array[...] = 1.0
        out.append(array)
    return out


def measure(kind: str, no_copy: bool, batch: int, sample: tuple[int, ...], steps: int, prefetch: int = 2) -> dict:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    ring = host_ring(kind, prefetch + 2, (2 * batch, *sample))

    def source(info):
        return (ring[info.iteration % len(ring)],)

    @pipeline_def(batch_size=2 * batch, num_threads=4, device_id=0, prefetch_queue_depth=prefetch)
    def pipe():
        (x,) = fn.external_source(source=source, num_outputs=1, batch=True, batch_info=True, no_copy=no_copy,
                                  dtype=[types.FLOAT], ndim=[len(sample)], layout=["CDHW"])
        return x.gpu()

    iterator = DALIGenericIterator(pipe(), ["x"], size=-1, auto_reset=False)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        out = next(iterator)[0]["x"]
        out.sum().item()  # the step's data arrived
        if i >= 2:
            times.append(time.perf_counter() - t0)
    step_bytes = ring[0].nbytes
    ms = statistics.median(times) * 1000
    return dict(kind=kind, no_copy=no_copy, ms_per_step=ms, gb_per_s=step_bytes / ms / 1e6, step_gb=step_bytes / 1e9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--sample", type=int, nargs=4, default=[2, 16, 256, 256], metavar=("C", "Z", "Y", "X"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    rows = [measure(kind, no_copy, args.batch, tuple(args.sample), args.steps)
            for kind, no_copy in (("pageable", False), ("pageable", True), ("pinned", True))]
    lines = ["| host memory | no_copy | GB per step | ms per step | GB/s |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['kind']} | {r['no_copy']} | {r['step_gb']:.2f} | {r['ms_per_step']:.0f} | {r['gb_per_s']:.1f} |"
              for r in rows]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "h2d_feed.json").write_text(json.dumps(dict(benchmark="h2d_feed", args=vars(args) | {"out": str(args.out)},
                                                            rows=rows, table_markdown="\n".join(lines)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
