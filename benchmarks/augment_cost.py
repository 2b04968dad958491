#!/usr/bin/env python
"""Augmentation cost: the TripletLoader with the production 2-D preset vs no augmentation.

Same index, same plans (same seed), contenders alternated (A B A B ...) in one process per run,
3 warm-up and --batches timed batches each, median of --repeats fresh processes. The 2-D preset's
random crop (10, 192, 192) is scaled to the read box of the collection when it is smaller.

    python benchmarks/augment_cost.py                      # built-in demo collection, CPU
    python benchmarks/augment_cost.py COLLECTION.yml --patch 256 256 --z-window 16 --device gpu

Goal (issue 7, reported, not asserted): augmentation under 10 % of loader time on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(args: argparse.Namespace) -> dict[str, float]:
    """pairs/s of each contender, alternated, in this process."""
    sys.path.insert(0, str(REPO))
    from dali_pipeline.cli import demo_collection
    from dali_pipeline.loader import TripletLoader
    from sampler import AugmentConfig, ExperimentRegistry, IndexConfig, LineageIndex, TripletSampler

    collection = args.collection or demo_collection()
    registry = ExperimentRegistry.from_yaml(collection, z_window=args.z_window)
    index = LineageIndex.build(registry, IndexConfig(patch_yx=tuple(args.patch), channel_mode="bag"), progress=False)
    z, y, x = index.read_shape
    preset = AugmentConfig.preset("2d")
    crop = tuple(min(c, s) for c, s in zip(preset.crop, (z, y, x)))
    final = (min(160, crop[1]), min(160, crop[2]))
    configs = {"none": None, "2d preset": replace(preset, crop=crop)}
    device_id = 0 if args.device == "gpu" else None

    def loader(config):
        sampler = TripletSampler(index, args.batch_size, seed=0, augment=config)
        return TripletLoader(index, sampler, device=args.device, device_id=device_id, final_patch=final,
                             z_reduction="max")

    loaders = {name: iter(loader(cfg)) for name, cfg in configs.items()}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(3):  # warm-up
        for it in loaders.values():
            next(it)
    for _ in range(args.batches):
        for name, it in loaders.items():
            t0 = time.perf_counter()
            batch = next(it)
            if args.device == "gpu":
                import torch

                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            del batch
    return {name: args.batch_size / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("collection", nargs="?", help="collection YAML (default: the built-in demo)")
    parser.add_argument("--patch", type=int, nargs=2, default=(64, 64))
    parser.add_argument("--z-window", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "augment_cost.json")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(measure(args)))
        return
    if args.device == "gpu":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from loader_throughput import gpu_problem

        if problem := gpu_problem():
            parser.exit(2, f"error: {problem}\n")
    print("uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    runs = []
    for _ in range(args.repeats):
        child = subprocess.run([sys.executable, __file__, "--_child", *sys.argv[1:]], capture_output=True, text=True,
                               check=True)
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print("uptime after: ", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    names = list(runs[0])
    median = {n: statistics.median(r[n] for r in runs) for n in names}
    cost = 1 - median["2d preset"] / median["none"]
    print(f"| augmentation ({args.device}) | pairs/s median (min-max) of {args.repeats} processes |")
    print("|---|---:|")
    for n in names:
        values = [r[n] for r in runs]
        print(f"| {n} | {median[n]:,.0f} ({min(values):,.0f}-{max(values):,.0f}) |")
    print(f"augmentation share of loader time: {cost:.1%} (goal on a GPU: < 10 %)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, runs=runs, median=median,
                                        augmentation_share=cost), indent=1))


if __name__ == "__main__":
    main()
