"""Soak: many epochs with the CPU TripletLoader over a small synthetic collection, RSS every epoch.

    python benchmarks/soak.py                     # 30 epochs, results under benchmarks/results/soak/
    python benchmarks/soak.py --epochs 5 --quick  # smoke run

Prints the RSS curve, saves `soak-<time>.json` and `.png`, and says whether RSS after epoch 3 grew by
more than 5 % (the goal: it must not). Also reports the index's memory per observation (bytes/row)
at 10^6 rows, measured in a child process on index_scaling.py's cached collection
(benchmarks/results/index_scaling/data/n1000000-seed0-g3; generated with its `generate` if absent).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS = HERE / "results" / "soak"
GROWTH_LIMIT = 0.05


def rss_bytes() -> int:
    """Resident set size of this process: psutil when installed, else VmRSS from /proc/self/status."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no psutil and no /proc/self/status: cannot read RSS") from None
    return int(psutil.Process().memory_info().rss)


def soak(epochs: int, batch: int, data: Path, read_ahead: int, budget_bytes: int | None,
         cache_bytes: int = 0) -> dict[str, Any]:
    from dali_pipeline.datasets.synthetic import demo_spec, write_synthetic
    from dali_pipeline.loader import TripletLoader
    from sampler import ExperimentRegistry, IndexConfig, LineageIndex, TripletSampler

    yaml_path = data / "collection.yml"
    if not yaml_path.exists():
        yaml_path = write_synthetic(data, demo_spec(), progress=False)
    index = LineageIndex.build(ExperimentRegistry.from_yaml(yaml_path), IndexConfig(patch_yx=(32, 32)), progress=False)
    sampler = TripletSampler(index, batch, seed=0)
    loader = TripletLoader(index, sampler, device="cpu", read_ahead=read_ahead, budget_bytes=budget_bytes)
    if cache_bytes:  # a chunk cache of cache_bytes: the loader's budget adds its batches in flight
        loader = TripletLoader(index, sampler, device="cpu", read_ahead=read_ahead, budget_bytes=budget_bytes,
                               cache_bytes=cache_bytes + loader.queue_bytes)
    curve, times, checksum = [], [], 0.0
    start_rss = rss_bytes()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        steps = 0
        for b in loader:
            checksum += float(b["anchor"][:, :, :, 0, 0].sum())  # touch the data, keep nothing
            steps += 1
        times.append(time.perf_counter() - t0)
        gc.collect()
        curve.append(rss_bytes())
        print(f"epoch {epoch + 1:3d}: {steps} steps in {times[-1]:.2f} s, RSS {curve[-1] / 2**20:8.1f} MiB", flush=True)
    ref = curve[2] if len(curve) >= 3 else curve[0]
    growth = (max(curve[3:]) - ref) / ref if len(curve) > 3 else 0.0
    return dict(epochs=epochs, batch=batch, steps_per_epoch=len(loader), observations=len(index),
                read_ahead=read_ahead, budget_bytes=budget_bytes, cache_bytes=cache_bytes,
                cache_stats=loader.reader.cache.stats.as_dict() if cache_bytes else None,
                rss_start_bytes=start_rss, rss_bytes=curve,
                epoch_s=times, growth_after_epoch3=growth, growth_limit=GROWTH_LIMIT,
                met=growth <= GROWTH_LIMIT, read_stats=loader.reader.stats.as_dict(),
                rss_source="psutil" if _has_psutil() else "/proc/self/status VmRSS")


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------- index memory per row
def index_child(yaml_path: str) -> None:
    """In a fresh process: build the index, report RSS delta and the bytes its arrays hold, per row."""
    import numpy as np
    import pandas as pd

    from sampler import ExperimentRegistry, IndexConfig, LineageIndex

    gc.collect()
    before = rss_bytes()
    index = LineageIndex.build(ExperimentRegistry.from_yaml(yaml_path), IndexConfig(patch_yx=(64, 64)), progress=False)
    gc.collect()
    after = rss_bytes()
    seen: set[int] = set()

    def held(value: Any) -> int:
        if isinstance(value, np.ndarray):
            base = value
            while isinstance(base.base, np.ndarray):
                base = base.base
            if id(base) in seen:
                return 0
            seen.add(id(base))
            return int(base.nbytes)
        if isinstance(value, pd.DataFrame):
            return int(value.memory_usage(deep=True, index=True).sum())
        if isinstance(value, dict):
            return sum(held(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(held(v) for v in value)
        return 0

    parts = {k: held(v) for k, v in vars(index).items()}
    rows = len(index)
    print(json.dumps(dict(rows=rows, valid=int(len(index.valid)), rss_delta_bytes=after - before,
                          held_bytes=sum(parts.values()), bytes_per_row_rss=(after - before) / rows,
                          bytes_per_row_held=sum(parts.values()) / rows,
                          largest_parts={k: v for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:6]})))


def index_memory(size: int = 1_000_000) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    import index_scaling

    folder = HERE / "results" / "index_scaling" / "data" / f"n{size}-seed0-g{index_scaling.GEN_VERSION}"
    if not (folder / "manifest.json").exists():
        print(f"generating {folder} ...", flush=True)
        index_scaling.generate(size, 0, folder)
    out = subprocess.run([sys.executable, __file__, "--index-child", str(folder / "collection.yml")],
                         capture_output=True, text=True, check=True, cwd=REPO)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["collection"] = str(folder.relative_to(REPO))
    return result


# ---------------------------------------------------------------------------- report
def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = [v / 2**20 for v in result["rss_bytes"]]
    epochs = list(range(1, len(mib) + 1))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, mib, marker="o", ms=3, label="RSS after epoch")
    if len(mib) >= 3:
        ref = mib[2]
        ax.axhline(ref * (1 + GROWTH_LIMIT), color="tab:red", ls="--", lw=1, label="epoch 3 + 5 %")
        ax.axhline(ref, color="grey", ls=":", lw=1, label="epoch 3")
    ax.set_xlabel("epoch")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(0, max(mib) * 1.15)
    ax.set_title(f"Soak: CPU TripletLoader, {result['steps_per_epoch']} steps x batch {result['batch']} per epoch; "
                 f"growth after epoch 3: {100 * result['growth_after_epoch3']:+.2f} %", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--read-ahead", type=int, default=2)
    parser.add_argument("--budget-bytes", type=int, default=None)
    parser.add_argument("--cache-mb", type=int, default=0, help="read through a chunk cache of this many MiB")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--skip-index", action="store_true", help="do not measure index memory at 10^6 rows")
    parser.add_argument("--index-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.index_child:
        index_child(args.index_child)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    result = soak(args.epochs, args.batch, args.out / "data" / "demo", args.read_ahead, args.budget_bytes,
                  args.cache_mb << 20)
    if not args.skip_index:
        result["index_memory"] = index_memory()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path, png_path = args.out / f"soak-{stamp}.json", args.out / f"soak-{stamp}.png"
    json_path.write_text(json.dumps(result, indent=1))
    plot(result, png_path)
    mib = " ".join(f"{v / 2**20:.0f}" for v in result["rss_bytes"])
    print(f"\nRSS curve (MiB, epochs 1..{args.epochs}): {mib}")
    verdict = "met" if result["met"] else "NOT met"
    print(f"RSS growth after epoch 3: {100 * result['growth_after_epoch3']:+.2f} % (limit +5 %) -> {verdict}")
    if "index_memory" in result:
        im = result["index_memory"]
        print(f"index memory at {im['rows']:,} rows: {im['bytes_per_row_held']:.1f} B/row held by its arrays, "
              f"{im['bytes_per_row_rss']:.1f} B/row RSS delta of the build")
    print(f"saved {json_path} and {png_path}")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
