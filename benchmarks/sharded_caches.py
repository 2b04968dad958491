#!/usr/bin/env python
"""Chunk caches under DDP, uniform vs FOV-sharded epochs: chunks decoded per epoch, summed over ranks.

    python benchmarks/sharded_caches.py                  # W = 2 and 4, writes benchmarks/results/sharded_caches.{json,png}
    python benchmarks/sharded_caches.py --worlds 2 --epochs 2

The driver writes a synthetic store (16 FOVs, 8 frames, 4 x 256 x 256, uint16, chunks 4 x 64 x 64,
about 67 MB) and its index once, then runs `torchrun --nproc_per_node=W` (gloo, CPU; torchrun starts
fresh processes, no fork) of this file per world size. Every rank builds a TripletSampler (uniform,
then fov_shards=True) and a CachedPatchReader over a ChunkStore of 1.1x its share of the working
set: the bytes of the chunks its FOVs' rows touch (`sampler.shards().chunk_bytes[rank]`) with FOV
shards, the whole working set / W uniformly (the same memory per rank for both). It reads every plan
of each epoch (anchors and positives, no DALI) and reports per epoch: chunks decoded, cache hits and
misses, and the distinct chunks its plans touched; rank 0 gathers them (all_gather_object).

Reported per world size, mode and epoch: `decoded` (chunks decoded, summed over ranks), `touched`
(distinct chunks the epoch's plans touched, union over ranks), `decoded / touched`, the hit rate.
Nothing is asserted: this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

MODES = ("uniform", "fov_shards")


def worker(args: argparse.Namespace) -> None:
    """One rank: both modes, `args.epochs` epochs each; rank 0 writes the gathered report."""
    import torch.distributed as dist

    from dali_pipeline.cached_reader import CachedPatchReader, ChunkStore
    from dali_pipeline.distributed import load_index
    from dali_pipeline.reader import chunk_overlaps
    from sampler import ReadBoxes, TripletSampler
    from sampler.shards import fov_chunk_bytes

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    index = load_index(args.index)
    total = int(fov_chunk_bytes(index, index.valid).sum())
    grid = index.fovs[[f"chunk_{a}" for a in "tczyx"]].to_numpy().astype(np.int64)
    report = []
    for mode in MODES:
        sampler = TripletSampler(index, args.batch_size, seed=args.seed, rank=rank, world_size=world,
                                 fov_shards=mode == "fov_shards")
        share = int(sampler.shards().chunk_bytes[rank]) if mode == "fov_shards" else total // world
        store = ChunkStore(int(1.1 * share))
        reader = CachedPatchReader(index, store=store)
        for epoch in range(args.epochs):
            before = (reader.stats.chunks_decoded, reader.stats.bytes_decoded, store.cache.stats.hits,
                      store.cache.stats.misses)
            touched: set[tuple[int, ...]] = set()
            for plan in sampler.iter_from(0, epoch):
                reader.submit(plan).result()
                a, p = plan.anchor_boxes, plan.positive_boxes
                boxes = ReadBoxes(*(np.concatenate([getattr(a, f), getattr(p, f)])
                                    for f in ("fov", "t", "z", "y", "x", "channels")))
                over = chunk_overlaps(boxes, reader.box_shapes(boxes), grid)
                touched.update(map(tuple, np.column_stack([over.fov[over.owner], over.index]).tolist()))
            after = (reader.stats.chunks_decoded, reader.stats.bytes_decoded, store.cache.stats.hits,
                     store.cache.stats.misses)
            d = [y - x for x, y in zip(before, after)]
            report.append(dict(mode=mode, epoch=epoch, rank=rank, steps=len(sampler), budget_bytes=store.budget_bytes,
                               share_bytes=share, decoded=d[0], decoded_bytes=d[1], hits=d[2], misses=d[3],
                               touched=sorted(touched)))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, report)
    if rank == 0:
        rows = [r for part in gathered for r in part]
        out = []
        for mode in MODES:
            for epoch in range(args.epochs):
                mine = [r for r in rows if r["mode"] == mode and r["epoch"] == epoch]
                union = {tuple(k) for r in mine for k in r["touched"]}
                decoded = sum(r["decoded"] for r in mine)
                hits, misses = sum(r["hits"] for r in mine), sum(r["misses"] for r in mine)
                out.append(dict(
                    world_size=world, mode=mode, epoch=epoch, steps_per_rank=mine[0]["steps"],
                    budget_bytes_per_rank=[r["budget_bytes"] for r in sorted(mine, key=lambda r: r["rank"])],
                    working_set_bytes=total, decoded_chunks=decoded, touched_chunks=len(union),
                    decoded_over_touched=decoded / len(union), decoded_bytes=sum(r["decoded_bytes"] for r in mine),
                    hit_rate=hits / (hits + misses) if hits + misses else None,
                    decoded_per_rank=[r["decoded"] for r in sorted(mine, key=lambda r: r["rank"])],
                ))
        Path(args.out).write_text(json.dumps(out, indent=1))
    dist.destroy_process_group()


def write_data(work: Path) -> Path:
    """The synthetic store and its saved index (once)."""
    from dali_pipeline.datasets.synthetic import benchmark_spec, write_synthetic
    from sampler import ExperimentRegistry, IndexConfig, LineageIndex

    index_path = work / "index.npz"
    if not index_path.exists():
        spec = benchmark_spec(n_fovs=16, t=8, z=4, yx=256, dtype="uint16", chunks=(1, 1, 4, 64, 64), shards=None,
                              version="0.4", cells_per_fov=24)
        yaml_path = write_synthetic(work / "data", spec, overwrite=True)
        index = LineageIndex.build(ExperimentRegistry.from_yaml(yaml_path), IndexConfig(patch_yx=(32, 32)),
                                   progress=False)
        index.save(index_path)
    return index_path


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({r["world_size"] for r in rows})
    fig, axes = plt.subplots(1, len(worlds), figsize=(5 * len(worlds), 3.6), squeeze=False)
    for ax, w in zip(axes[0], worlds):
        for mode, color in zip(MODES, ("tab:red", "tab:blue")):
            mine = sorted((r for r in rows if r["world_size"] == w and r["mode"] == mode), key=lambda r: r["epoch"])
            ax.plot([r["epoch"] for r in mine], [r["decoded_over_touched"] for r in mine], "o-", color=color,
                    label=f"{mode} (warm hit rate {mine[-1]['hit_rate']:.2f})")
        ax.set_title(f"W = {w}, per-rank cache 1.1x its share")
        ax.set_xlabel("epoch")
        ax.set_ylabel("chunks decoded (all ranks) / working set")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=Path)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sharded_caches.json")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="folder for the synthetic store (default: a temp dir)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="sharded_caches_"))
    work.mkdir(parents=True, exist_ok=True)
    index_path = write_data(work)
    rows = []
    for w in args.worlds:
        part = work / f"w{w}.json"
        # --standalone: a c10d rendezvous on a port the store picks on localhost
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={w}",
               str(Path(__file__).resolve()), "--worker", "--index", str(index_path), "--out",
               str(part), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        subprocess.run(cmd, check=True, env=env, timeout=1200)
        rows += json.loads(part.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(command=" ".join(sys.argv), rows=rows), indent=1))
    plot(rows, args.out.with_suffix(".png"))
    for r in rows:
        print(f"W={r['world_size']} {r['mode']:>10} epoch {r['epoch']}: decoded {r['decoded_chunks']:>5} chunks "
              f"= {r['decoded_over_touched']:.2f} x the {r['touched_chunks']} touched, hit rate {r['hit_rate']:.3f}")


if __name__ == "__main__":
    main()
