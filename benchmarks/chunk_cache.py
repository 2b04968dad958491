#!/usr/bin/env python
"""Chunk cache: epoch 1 and warm epochs of the DALI loader with the cache off and on (issue 10).

Both contenders are TripletLoaders (normalize, the configuration's crop / Z reduction, read-ahead
and DALI prefetch 2) over whole epochs of the same sampler (seed fixed, so the same plans), each
in a fresh process; the order off/on alternates between repeats. Per epoch: pairs/s (pairs / wall
time from `iter()` to the last batch), decoded/useful bytes (reader.stats deltas: chunk bytes
actually read / bytes of the read boxes) and, with the cache, hit rate and cached bytes. One
denominator: the uncached loader's epoch 1 of the same repeat.

    python benchmarks/chunk_cache.py                   # 2-D and 3-D, 3 epochs, 3 repeats (~15 min here)
    python benchmarks/chunk_cache.py --small           # smoke run
    python benchmarks/chunk_cache.py --gpu --reduced   # on a GPU machine (cupy cache in GPU memory)

The store (>= 32 FOVs of 512 x 512, as BENCHMARKS.md asks, but 4 timepoints and 8 cells per FOV so
that whole epochs fit in minutes and the working set, 4.3 GB decoded, fits the cache) is written
once with dali_pipeline.datasets.synthetic and cached under --out/data; its page cache is warmed.

Goals (reported, not asserted): epoch 1 with the cache <= 1.25 x the uncached epoch's time; warm
epochs >= 2 x the uncached loader on this CPU (>= 5 x on a GPU); amortised decoded/useful < 1.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from loader_throughput import (
    CONFIGS,
    RESULT_MARK,
    _emit,
    _fmt,
    _machine,
    _summary,
    _uptime,
    generate_store,
    gpu_problem,
    store_folder,
    warm_page_cache,
)

SIZES = {
    "full": dict(n_fovs=32, t=4, z=16, yx=512, cells_per_fov=8),
    "small": dict(n_fovs=4, t=4, z=16, yx=512, cells_per_fov=8),
    "reduced": dict(n_fovs=8, t=4, z=16, yx=512, cells_per_fov=48),
}
GOALS = {"epoch1_max_cost": 1.25, "warm_speedup_cpu": 2.0, "warm_speedup_gpu": 5.0,
         "gpu_upload_assembly_share_max": 0.05, "gpu_warm_pairs_per_s_2d": 1500}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Whole epochs of one loader (cache off or on) in this process."""
    from dali_pipeline.loader import TripletLoader
    from sampler import ExperimentRegistry, IndexConfig, LineageIndex, TripletSampler

    config = spec["config"]
    registry = ExperimentRegistry.from_yaml(spec["yaml"], z_window=config["z_window"])
    index = LineageIndex.build(registry, IndexConfig(patch_yx=tuple(config["patch_yx"]),
                                                     channel_mode=config["channel_mode"]), progress=False)
    sampler = TripletSampler(index, spec["batch"], seed=spec["seed"], locality_frames=spec["locality"])
    options = dict(device=spec["device"], device_id=0 if spec["device"] == "gpu" else None,
                   final_patch=config["final_patch"], z_reduction=config["z_reduction"])
    loader = TripletLoader(index, sampler, **options)
    cache = 0
    if spec["contender"] == "on":  # cache_bytes is the loader's whole budget: its queue first, then the chunks
        cache = spec["cache_bytes"] + loader.queue_bytes
        loader = TripletLoader(index, sampler, cache_bytes=cache, **options)
    sync = _sync(spec["device"])
    used = _gpu_used(spec["device"])
    baseline = used()
    epochs = []
    for epoch in range(spec["epochs"]):
        stats0 = dict(loader.reader.stats.as_dict())
        hits0 = loader.reader.cache.stats.as_dict() if cache else None
        arrays0 = loader.reader.arrays.stats() if cache else None
        t0 = time.perf_counter()
        pairs, peak = 0, 0
        for batch in loader:
            pairs += int(batch["anchor"].shape[0])
            peak = max(peak, used())
        sync()
        seconds = time.perf_counter() - t0
        stats = loader.reader.stats.as_dict()
        delivered = stats["bytes_delivered"] - stats0["bytes_delivered"]
        row = dict(epoch=epoch + 1, steps=len(loader), pairs=pairs, seconds=seconds, pairs_per_s=pairs / seconds,
                   decoded_per_useful=(stats["bytes_decoded"] - stats0["bytes_decoded"]) / delivered)
        if cache:
            c = loader.reader.cache.stats.as_dict()
            lookups = (c["hits"] - hits0["hits"]) + (c["misses"] - hits0["misses"])
            row.update(hit_rate=(c["hits"] - hits0["hits"]) / lookups if lookups else None,
                       cached_gb=loader.reader.cache.nbytes / 1e9, evictions=c["evictions"])
            a = loader.reader.arrays.stats()
            if a["device"] == "gpu":  # CUDA-event times of uploads + assembly against the epoch's wall time
                steps = a["steps_timed"] - arrays0["steps_timed"]
                gpu_ms = a["upload_ms"] + a["assembly_ms"] - arrays0["upload_ms"] - arrays0["assembly_ms"]
                row.update(launches_per_step=(a["launches"] - arrays0["launches"]) / max(1, steps),
                           upload_assembly_ms_per_step=gpu_ms / max(1, steps),
                           upload_assembly_share=gpu_ms / (1000 * seconds))
        if spec["device"] == "gpu":
            row["peak_gpu_mib_above_start"] = (peak - baseline) / 2**20
        epochs.append(row)
        print(f"  {spec['config_name']} cache {spec['contender']} epoch {epoch + 1}: {row['pairs_per_s']:.1f} pairs/s "
              f"({seconds:.1f} s), decoded/useful {row['decoded_per_useful']:.2f}", file=sys.stderr, flush=True)
    from procstat import proc_status

    return dict(contender=spec["contender"], repeat=spec["repeat"], epochs=epochs, memory=loader.memory(),
                peak_rss_mib=proc_status().get("VmHWM"), loadavg_at_start=spec.get("load"))


def _gpu_used(device: str):
    """Bytes in use on GPU 0 (everything: DALI, cupy, torch), sampled per step; 0 on the CPU."""
    if device != "gpu":
        return lambda: 0
    import cupy

    def used() -> int:
        free, total = cupy.cuda.runtime.memGetInfo()
        return total - free

    return used


def _sync(device: str):
    if device != "gpu":
        return lambda: None
    import torch

    return torch.cuda.synchronize


def run_child(mode: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement (or the store's generation) in a fresh interpreter; its result dict."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child", mode, json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True)  # progress lines (stderr) pass through
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:])
        raise RuntimeError(f"child {mode} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_MARK):])


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per contender: median (min-max) over repeats of epoch-1 and warm-epoch figures, ratios to the
    uncached loader's epoch 1 of the same repeat."""
    base = {r["repeat"]: r["epochs"][0]["pairs_per_s"] for r in runs if r["contender"] == "off"}
    out: dict[str, Any] = {}
    for name in ("off", "on"):
        mine = [r for r in runs if r["contender"] == name]
        if not mine:
            continue
        warm = [statistics.median(e["pairs_per_s"] for e in r["epochs"][1:]) for r in mine]
        out[name] = dict(
            epoch1_pairs_per_s=_summary([r["epochs"][0]["pairs_per_s"] for r in mine]),
            warm_pairs_per_s=_summary(warm),
            epoch1_decoded_per_useful=_summary([r["epochs"][0]["decoded_per_useful"] for r in mine]),
            warm_decoded_per_useful=_summary([statistics.median(e["decoded_per_useful"] for e in r["epochs"][1:])
                                              for r in mine]),
            amortised_decoded_per_useful=_summary([
                sum(e["decoded_per_useful"] for e in r["epochs"]) / len(r["epochs"]) for r in mine]),
            epoch1_ratio=_summary([r["epochs"][0]["pairs_per_s"] / base[r["repeat"]] for r in mine]),
            warm_ratio=_summary([w / base[r["repeat"]] for w, r in zip(warm, mine)]),
            peak_rss_mib=_summary([r["peak_rss_mib"] for r in mine]),
        )
    return out


def table(results: dict[str, Any]) -> str:
    head = ["config", "cache", "batch", "epoch 1 pairs/s", "epochs 2+ pairs/s", "epoch 1 / uncached",
            "epochs 2+ / uncached", "decoded/useful epoch 1", "decoded/useful epochs 2+", "peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for cfg, res in results.items():
        for name, s in res["summary"].items():
            lines.append("| " + " | ".join([
                cfg, name, str(res["batch"]), _fmt(s["epoch1_pairs_per_s"], ".1f"), _fmt(s["warm_pairs_per_s"], ".1f"),
                _fmt(s["epoch1_ratio"], ".2f"), _fmt(s["warm_ratio"], ".2f"),
                _fmt(s["epoch1_decoded_per_useful"], ".2f"), _fmt(s["warm_decoded_per_useful"], ".2f"),
                _fmt(s["peak_rss_mib"], ".0f")]) + " |")
    return "\n".join(lines)


def goal_lines(results: dict[str, Any], gpu: bool) -> list[str]:
    lines = []
    warm_goal = GOALS["warm_speedup_gpu" if gpu else "warm_speedup_cpu"]
    for cfg, res in results.items():
        on = res["summary"].get("on")
        if on is None or "off" not in res["summary"]:
            continue
        cost = 1 / on["epoch1_ratio"]["median"]
        speed = on["warm_ratio"]["median"]
        amort = on["amortised_decoded_per_useful"]["median"]
        lines.append(f"- {cfg}: epoch 1 costs {cost:.2f} x the uncached epoch (goal <= {GOALS['epoch1_max_cost']}: "
                     f"{'met' if cost <= GOALS['epoch1_max_cost'] else 'NOT met'}); warm epochs {speed:.2f} x "
                     f"(goal >= {warm_goal}: {'met' if speed >= warm_goal else 'NOT met'}); amortised decoded/useful "
                     f"{amort:.2f} over {len(res['runs'][0]['epochs'])} epochs (goal < 1: {'met' if amort < 1 else 'NOT met'})")
        cold = [r["epochs"][0] for r in res["runs"] if r["contender"] == "on"]
        if gpu and cold and "upload_assembly_share" in cold[0]:
            share = statistics.median(e["upload_assembly_share"] for e in cold)
            launches = max(e["launches_per_step"] for r in res["runs"] if r["contender"] == "on" for e in r["epochs"])
            peak = max(e.get("peak_gpu_mib_above_start", 0) for r in res["runs"] for e in r["epochs"])
            warm = on["warm_pairs_per_s"]["median"]
            line = (f"- {cfg} on the GPU: uploads + assembly {share:.1%} of a cold step (CUDA events; goal < "
                    f"{GOALS['gpu_upload_assembly_share_max']:.0%}: {'met' if share < GOALS['gpu_upload_assembly_share_max'] else 'NOT met'}); "
                    f"{launches:.2f} assembly launches per step (goal 1: {'met' if launches == 1 else 'NOT met'}); "
                    f"peak GPU memory above the start {peak:,.0f} MiB")
            if cfg == "2-D":
                goal = GOALS["gpu_warm_pairs_per_s_2d"]
                line += f"; warm {warm:,.0f} pairs/s (goal >= {goal:,}: {'met' if warm >= goal else 'NOT met'})"
            lines.append(line)
    return lines


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Pairs/s per epoch, cache off and on, one panel per configuration (median over repeats)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (cfg, res) in zip(axes[0], results.items()):
        for name in ("off", "on"):
            runs = [r for r in res["runs"] if r["contender"] == name]
            if not runs:
                continue
            n = len(runs[0]["epochs"])
            ys = [statistics.median(r["epochs"][e]["pairs_per_s"] for r in runs) for e in range(n)]
            ax.plot(range(1, n + 1), ys, marker="o", label=f"cache {name}")
            ax.set_xticks(range(1, n + 1))
        ax.set_title(f"{cfg} (batch {res['batch']})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("pairs/s")
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["2-D", "3-D"], choices=["2-D", "3-D"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-gb", type=float, default=6.0,
                        help="the chunks' budget (GB; holds the full store): the loader gets this plus its queue")
    parser.add_argument("--locality", type=int, default=None, help="TripletSampler(locality_frames=...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="smoke run: 4 FOVs, 1 repeat")
    parser.add_argument("--gpu", action="store_true", help="GPU pipeline, cache in GPU memory (cupy)")
    parser.add_argument("--reduced", action="store_true", help="the GPU check's store: 8 FOVs, 1 repeat")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        mode, spec = args._child
        _emit(generate_store(Path(json.loads(spec)["folder"]), json.loads(spec)["params"]) if mode == "generate"
              else measure(json.loads(spec)))
        return 0
    if args.gpu and (problem := gpu_problem()):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    size = "small" if args.small else "reduced" if args.reduced else "full"
    repeats = 1 if (args.small or args.reduced) else args.repeats
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now().astimezone()
    load_before = _uptime()
    print(f"uptime before: {load_before}", flush=True)
    params = dict(SIZES[size], version="0.5", chunks=[1, 1, 16, 256, 256], shards=[1, 1, 16, 512, 512], dtype="float32",
                  seed=args.seed)
    folder = store_folder(out / "data", "cache-" + size, params)
    store = run_child("generate", dict(folder=str(folder), params=params))
    warm = warm_page_cache(folder)
    print(f"store: {store['fovs']} FOVs, {store['bytes_decoded'] / 1e9:.2f} GB decoded, compression "
          f"{store['compression_ratio']:.2f}; page cache warmed ({warm['bytes'] / 1e9:.2f} GB in {warm['seconds']:.1f} s)",
          flush=True)
    device = "gpu" if args.gpu else "cpu"
    results: dict[str, Any] = {}
    for cfg in args.configs:
        batch = CONFIGS[cfg]["gpu_batch" if args.gpu else "batch"]
        runs = []
        for rep in range(repeats):
            order = ["off", "on"] if rep % 2 == 0 else ["on", "off"]
            for contender in order:
                spec = dict(config_name=cfg, config=CONFIGS[cfg], yaml=store["yaml"], batch=batch, seed=args.seed,
                            epochs=args.epochs, contender=contender, repeat=rep, device=device,
                            cache_bytes=int(args.cache_gb * 1e9), locality=args.locality,
                            load=os.getloadavg()[0])
                runs.append(run_child("measure", spec))
        results[cfg] = dict(batch=batch, runs=runs, summary=summarize(runs))
    protocol = ("reduced protocol (GPU check)" if args.reduced else "smoke run (--small)" if args.small
                else f"{repeats} fresh processes per contender, alternated")
    text_table = table(results)
    goals = goal_lines(results, args.gpu)
    load_after = _uptime()
    text = "\n".join([
        f"Chunk cache ({protocol}; device {device}; {args.epochs} epochs per process, cache budget {args.cache_gb:g} GB"
        + (f", locality_frames={args.locality}" if args.locality else ", uniform anchor order") + "):",
        f"store: {store['fovs']} FOVs, {store['bytes_decoded'] / 1e9:.2f} GB decoded, compression "
        f"{store['compression_ratio']:.2f}, {store['observations']:,} observations",
        "", text_table, "", "Goals (reported, not asserted):", *goals,
        "", "ratios: to the uncached loader's epoch 1 in the same repeat; epochs 2+: median over the warm epochs.",
        f"uptime before: {load_before}", f"uptime after:  {load_after}",
    ])
    print()
    print(text)
    label = ("-reduced" if args.reduced else "-small" if args.small else "") \
        + (f"-locality{args.locality}" if args.locality else "") \
        + (f"-cache{args.cache_gb:g}GB" if args.cache_gb != parser.get_default("cache_gb") else "")
    doc = dict(benchmark="chunk_cache", protocol=protocol, started=started.isoformat(timespec="seconds"),
               command=" ".join(["python", "benchmarks/chunk_cache.py", *sys.argv[1:]]), machine=_machine(),
               uptime_before=load_before, uptime_after=load_after, store=store, config=vars(args) | {"out": str(out)},
               goals=GOALS, goal_report=goals, results=results, table_markdown=text_table)
    path = out / f"chunk_cache{label}.json"
    path.write_text(json.dumps(doc, indent=1, default=str))
    path.with_suffix(".md").write_text(text + "\n")
    png = plot(results, path.with_suffix(".png"))
    print(f"saved {path}, {path.with_suffix('.md').name}" + (f", {png.name}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
