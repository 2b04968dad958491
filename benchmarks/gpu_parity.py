#!/usr/bin/env python
"""GPU acceptance: the GPU loader's batches equal the CPU loader's on the same plans, cached and uncached.

For each configuration the CPU loader (uncached) is the reference; the GPU loader uncached and with
its chunk cache in GPU memory read the same sampler's plans (same seed) for two epochs (the second
mostly from cached chunks). Tolerance: exact for `normalize=False` (a cast), and |gpu - cpu| <=
1e-5 + 1e-5 |cpu| for normalized float32 (the two devices' normalize kernels may round differently).
Also per cached run: kernel launches per step (goal: 1) and the loader's device memory accounting.
Exit status 1 if any comparison fails.

    python benchmarks/gpu_parity.py            # on a GPU machine (the demo collection, ~13 MB)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

import numpy as np  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "2-D bag, max, crop 48": dict(channel_mode="bag", final_patch=(48, 48), z_reduction="max", normalize=True),
    "3-D all channels": dict(channel_mode="all", final_patch=None, z_reduction=None, normalize=True),
    "3-D, normalize=False": dict(channel_mode="all", final_patch=None, z_reduction=None, normalize=False),
}
RTOL = ATOL = 1e-5


def batches(index, config: dict[str, Any], device: str, cache_bytes: int, epochs: int, batch: int):
    from dali_pipeline.loader import TripletLoader
    from sampler import TripletSampler

    sampler = TripletSampler(index, batch, seed=7, drop_last=False)
    loader = TripletLoader(index, sampler, device=device, device_id=0 if device == "gpu" else None,
                           final_patch=config["final_patch"], z_reduction=config["z_reduction"],
                           normalize=config["normalize"], cache_bytes=cache_bytes)
    out = []
    for _ in range(epochs):
        for b in loader:
            out.append({k: b[k].cpu().numpy().copy() for k in ("anchor", "positive")}
                       | {"ids": np.asarray(b["anchor_meta"]["global_track_id"]).copy()})
    return out, loader


def compare(want: list[dict], got: list[dict], exact: bool) -> dict[str, Any]:
    worst, ok = 0.0, len(want) == len(got)
    for w, g in zip(want, got):
        ok &= bool((w["ids"] == g["ids"]).all())
        for role in ("anchor", "positive"):
            diff = np.abs(g[role].astype(np.float64) - w[role])
            worst = max(worst, float(diff.max()))
            ok &= bool((diff == 0).all() if exact else (diff <= ATOL + RTOL * np.abs(w[role])).all())
    return dict(batches=len(got), max_abs_diff=worst, ok=bool(ok))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    from dali_pipeline.cli import demo_collection
    from sampler import ExperimentRegistry, IndexConfig, LineageIndex

    started = time.perf_counter()
    registry = ExperimentRegistry.from_yaml(demo_collection())
    results: dict[str, Any] = {}
    for name, config in CONFIGS.items():
        index = LineageIndex.build(registry, IndexConfig(patch_yx=(64, 64), channel_mode=config["channel_mode"]),
                                   progress=False)
        reference, _ = batches(index, config, "cpu", 0, args.epochs, args.batch)
        row: dict[str, Any] = {}
        for label, cache in (("gpu", 0), ("gpu cached", 64 << 20)):
            got, loader = batches(index, config, "gpu", cache, args.epochs, args.batch)
            row[label] = compare(reference, got, exact=not config["normalize"])
            if cache:
                stats = loader.reader.arrays.stats()
                row[label] |= dict(launches_per_step=stats["launches"] / max(1, stats["steps_timed"]),
                                   memory=loader.memory(), arrays=stats)
        results[name] = row
        print(f"{name}: " + "; ".join(f"{k} {'ok' if v['ok'] else 'DIFFERS'} (max |diff| {v['max_abs_diff']:.2g}, "
                                      f"{v['batches']} batches"
                                      + (f", {v['launches_per_step']:.2f} launches/step" if "launches_per_step" in v else "")
                                      + ")" for k, v in row.items()), flush=True)
    ok = all(v["ok"] for row in results.values() for v in row.values())
    launches = all(v.get("launches_per_step", 1) == 1 for row in results.values() for v in row.values())
    doc = dict(benchmark="gpu_parity", tolerance=dict(rtol=RTOL, atol=ATOL, normalize_false="exact"),
               seconds=time.perf_counter() - started, ok=ok, one_launch_per_step=launches, results=results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_parity.json").write_text(json.dumps(doc, indent=1, default=str))
    print(f"parity {'holds' if ok else 'FAILS'}; one assembly launch per step: {launches}; "
          f"saved {args.out / 'gpu_parity.json'} ({doc['seconds']:.0f} s)")
    return 0 if ok and launches else 1


if __name__ == "__main__":
    sys.exit(main())
