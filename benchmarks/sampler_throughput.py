#!/usr/bin/env python
"""TripletSampler throughput: plans/s and pairs/s vs batch size, with and without composition.

On a synthetic index of ~3e6 observations (the collection generator of benchmarks/index_scaling.py:
metadata-only OME-Zarr plates and tracking CSVs; collection and index cached under --out), one
process pinned to one core (BLAS/OpenMP threads = 1) measures, for every composition config and
batch size, --repeats times (interleaved):

  setup       sampler construction + the epoch's draws (the permutation, or the composed epoch)
  plan        `sampler.plan(step)` on the even steps from 0 (>= --min-seconds, >= --min-steps in all):
              plans/s and pairs/s (one pair per anchor)
  sampler     on the odd steps, `sampler.step_inputs(step)` alone (rows + step generator): pairs/s
  make_plan   and then `make_plan(index, rows, generator)` on those inputs: its share of a step
              (make_plan / (make_plan + sampler))
  epoch       pairs/s over a whole epoch including its setup: B*len / (setup + len * plan time)

Times are CPU time of the measuring thread (`time.thread_time`: one core's work, robust when other
processes share the machine); wall-clock pairs/s of the plans are reported beside them. The median
over repeats is reported (min-max in the JSON). A Markdown table is printed and saved
with the JSON in --out.

    python benchmarks/sampler_throughput.py                       # 3e6 observations, batch 64..1024, 3 repeats
    python benchmarks/sampler_throughput.py --size 1e5 --repeats 1 --batches 256

Goals (reported, not asserted): >= 1e6 pairs/s at batch 256 without composition, >= 3e5 with
stratification, on one core.
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
REPO = HERE.parent
RESULT_MARK = "@@RESULT "
GOALS = {"plain_pairs_per_s_b256": 1e6, "stratified_pairs_per_s_b256": 3e5}

CONFIGS: dict[str, dict[str, Any]] = {
    "none": {},
    "stratify": dict(stratify_by=["perturbation", "experiment"]),
    "group+leaky+stratify": dict(group_by="experiment", leaky=0.2, stratify_by="perturbation"),
    "stratify+temporal": dict(stratify_by="perturbation", temporal_enrichment=True),
}


def _paths() -> None:
    for p in (str(REPO), str(HERE)):
        if p not in sys.path:
            sys.path.insert(0, p)


def _emit(result: dict[str, Any]) -> None:
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------- preparation (driver)
def prepare(size: int, seed: int, out: Path, threads: int) -> tuple[Path, dict[str, Any]]:
    """The cached collection (index_scaling's generator) and its saved index."""
    _paths()
    import index_scaling  # benchmarks/index_scaling.py

    from sampler.index import FORMAT_VERSION

    folder = out / "data" / f"n{size}-seed{seed}-g{index_scaling.GEN_VERSION}"
    t0 = time.perf_counter()
    manifest = index_scaling.generate(size, seed, folder)
    print(f"collection: {manifest['observations']:,} observations, {manifest['fovs']} FOVs "
          f"({time.perf_counter() - t0:.1f} s, cached under {folder})", flush=True)
    # the index file format is part of the key: a cached index of an older format is rebuilt
    index_path = out / "index" / f"n{size}-seed{seed}-g{index_scaling.GEN_VERSION}-f{FORMAT_VERSION}.npz"
    if not index_path.exists():
        from sampler import ExperimentRegistry, IndexConfig, LineageIndex

        index_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        index = LineageIndex.build(ExperimentRegistry.from_yaml(folder / "collection.yml"),
                                   IndexConfig(patch_yx=(256, 256)), threads=threads, progress=True)
        index.save(index_path)
        print(f"index built in {time.perf_counter() - t0:.1f} s: {len(index):,} rows, {len(index.valid):,} valid",
              flush=True)
        del index
    return index_path, manifest


# ---------------------------------------------------------------------------- measurement (child)
def _measure_one(index, config: dict[str, Any], batch: int, repeat: int, spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from sampler import make_plan
    from sampler.epoch import TripletSampler

    clock = time.thread_time  # CPU time of this thread: robust when other processes share the core
    wall = time.perf_counter
    t0 = clock()
    sampler = TripletSampler(index, batch, seed=spec["seed"] + repeat, **config)
    t1 = clock()
    sampler.anchor_rows(0)  # the epoch's permutation or composed draws
    t2 = clock()
    n_steps = len(sampler)
    # consecutive steps from 0, alternating (so that load drift hits both alike, and no step reuses the
    # cache lines of another): even steps time the plan, odd steps time its two parts, the sampler's
    # (rows + step generator) and make_plan's on those inputs
    plan_t, rows_t, make_t, wall_t = [], [], [], []
    k = 0
    start = wall()
    while k < n_steps and (k < spec["min_steps"] or wall() - start < spec["min_seconds"]):
        if k % 2 == 0:
            w = wall()
            a = clock()
            sampler.plan(k)
            plan_t.append(clock() - a)
            wall_t.append(wall() - w)
        else:
            a = clock()
            rows, gen = sampler.step_inputs(k)
            b = clock()
            make_plan(index, rows, gen)
            make_t.append(clock() - b)
            rows_t.append(b - a)
        k += 1
    plan_s, rows_s, make_plan_s = float(np.mean(plan_t)), float(np.mean(rows_t)), float(np.mean(make_t))
    setup_s = t2 - t0
    return dict(
        batch=batch, repeat=repeat, steps=k, steps_per_epoch=n_steps, construct_s=t1 - t0, epoch_draws_s=t2 - t1,
        setup_s=setup_s, plans_per_s=1 / plan_s, pairs_per_s=batch / plan_s,
        wall_pairs_per_s=batch / float(np.mean(wall_t)),
        step_us_median=float(np.median(plan_t)) * 1e6, step_us_p90=float(np.percentile(plan_t, 90)) * 1e6,
        make_plan_share=make_plan_s / (make_plan_s + rows_s), make_plan_pairs_per_s=batch / make_plan_s,
        sampler_pairs_per_s=batch / rows_s, sampler_us_per_step=rows_s * 1e6,
        epoch_pairs_per_s=batch * n_steps / (setup_s + n_steps * plan_s),
    )


def child_measure(spec: dict[str, Any]) -> dict[str, Any]:
    _paths()
    from sampler import LineageIndex

    t0 = time.perf_counter()
    index = LineageIndex.load(spec["index"])
    load_s = time.perf_counter() - t0
    results: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(spec["repeats"]):  # repeats interleaved
        for name in spec["configs"]:
            for batch in spec["batches"]:
                r = _measure_one(index, CONFIGS[name], batch, repeat, spec)
                results.setdefault(f"{name}@{batch}", []).append(r)
                sys.stderr.write(f"repeat {repeat} {name:>22} B={batch:>5}: {r['pairs_per_s'] / 1e3:8.1f}k pairs/s, "
                                 f"make_plan {100 * r['make_plan_share']:.0f}%, setup {r['setup_s']:.2f} s\n")
                sys.stderr.flush()
    cpu = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return dict(load_s=load_s, rows=len(index), valid=int(len(index.valid)), cpu=cpu, results=results)


def run_child(spec: dict[str, Any], pin_cpu: int | None) -> dict[str, Any]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = "1"
    spec = {**spec, "pin_cpu": pin_cpu}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:])
        raise RuntimeError(f"measurement child failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_MARK):])


# ---------------------------------------------------------------------------- report
def _summary(values: list[float]) -> dict[str, float]:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def _si(v: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}"


KEYS = ("plans_per_s", "pairs_per_s", "wall_pairs_per_s", "make_plan_share", "make_plan_pairs_per_s", "sampler_pairs_per_s",
        "sampler_us_per_step", "setup_s", "epoch_draws_s", "epoch_pairs_per_s", "step_us_median")


def _table(rows: list[dict[str, Any]]) -> str:
    head = ["composition", "batch", "plans/s", "pairs/s", "make_plan share", "sampler only pairs/s",
            "sampler µs/step", "epoch setup s", "pairs/s over an epoch (with setup)", "wall pairs/s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        s = r["summary"]
        lines.append("| " + " | ".join([
            r["config"], str(r["batch"]), f"{s['plans_per_s']['median']:,.0f}",
            f"{_si(s['pairs_per_s']['median'])} ({_si(s['pairs_per_s']['min'])}–{_si(s['pairs_per_s']['max'])})",
            f"{100 * s['make_plan_share']['median']:.0f} %", _si(s["sampler_pairs_per_s"]["median"]),
            f"{s['sampler_us_per_step']['median']:.0f}", f"{s['setup_s']['median']:.2f}",
            _si(s["epoch_pairs_per_s"]["median"]), _si(s["wall_pairs_per_s"]["median"]),
        ]) + " |")
    return "\n".join(lines)


def _goals(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for config, key, label in (("none", "plain_pairs_per_s_b256", "without composition"),
                               ("stratify", "stratified_pairs_per_s_b256", "with stratification")):
        hit = [r for r in rows if r["config"] == config and r["batch"] == 256]
        if not hit:
            continue
        s = hit[0]["summary"]
        v, goal = s["pairs_per_s"]["median"], GOALS[key]
        out.append(
            f"- {label}, batch 256, one core: {_si(v)} pairs/s (goal {_si(goal)}) -> {'met' if v >= goal else 'NOT met'}; "
            f"make_plan is {100 * s['make_plan_share']['median']:.0f} % of a step (make_plan alone "
            f"{_si(s['make_plan_pairs_per_s']['median'])} pairs/s), the sampler alone "
            f"{_si(s['sampler_pairs_per_s']['median'])} pairs/s"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", type=lambda s: int(float(s)), default=3_000_000, help="observations (1e6 notation ok)")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (fresh sampler each); median reported")
    parser.add_argument("--min-steps", type=int, default=50, help="timed steps per run, at least")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timed plan seconds per run, at least")
    parser.add_argument("--seed", type=int, default=0, help="collection generator seed; sampler seed = repeat")
    parser.add_argument("--threads", type=int, default=8, help="threads of the one-time index build")
    parser.add_argument("--cpu", type=int, default=None, help="core to pin the measuring process to (default: last)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sampler_throughput")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        spec = json.loads(args._child)
        if spec.get("pin_cpu") is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {int(spec["pin_cpu"])})
        _emit(child_measure(spec))
        return 0

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now().astimezone()
    index_path, manifest = prepare(args.size, args.seed, out, args.threads)
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    cpu = args.cpu if args.cpu is not None else usable[-1]
    load_before = os.getloadavg()
    spec = dict(index=str(index_path), configs=args.configs, batches=args.batches, repeats=args.repeats,
                min_steps=args.min_steps, min_seconds=args.min_seconds, seed=0)
    measured = run_child(spec, cpu)
    load_after = os.getloadavg()

    rows = []
    for name in args.configs:
        for batch in args.batches:
            runs = measured["results"][f"{name}@{batch}"]
            rows.append(dict(config=name, options=CONFIGS[name], batch=batch,
                             summary={k: _summary([r[k] for r in runs]) for k in KEYS}, runs=runs))
    table = _table(rows)
    goals = _goals(rows)
    print()
    print(f"Sampler throughput: {measured['rows']:,} observations, {measured['valid']:,} valid anchors; one core "
          f"(CPU {cpu}), thread CPU time, median of {args.repeats} run(s), (min–max) for pairs/s")
    print()
    print(table)
    print()
    print("Goals (reported, not asserted):")
    print("\n".join(goals))
    print(f"load average before {load_before}, after {load_after}")

    _paths()
    import index_scaling

    doc = dict(
        benchmark="sampler_throughput", started=started.isoformat(timespec="seconds"),
        finished=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join(["python", "benchmarks/sampler_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        machine=index_scaling._machine(), load_before=load_before, load_after=load_after,
        config=dict(vars(args) | {"out": str(out), "_child": None, "cpu": cpu}), configs=CONFIGS,
        collection=manifest, index=dict(path=str(index_path), rows=measured["rows"], valid=measured["valid"],
                                        load_s=measured["load_s"]),
        goals=GOALS, goal_report=goals, results=rows, table_markdown=table,
    )
    stamp = started.strftime("%Y%m%d-%H%M%S")
    for name in (f"sampler_throughput-{stamp}.json", "sampler_throughput.json"):
        (out / name).write_text(json.dumps(doc, indent=1, default=str))
    (out / f"sampler_throughput-{stamp}.md").write_text(table + "\n\n" + "\n".join(goals) + "\n")
    print(f"saved {out / f'sampler_throughput-{stamp}.json'} (and sampler_throughput.json, .md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
