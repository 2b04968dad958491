#!/usr/bin/env python
"""DDP training of the demo encoder on the DALI loader: gloo on CPUs, nccl on GPUs, one pipeline per rank.

    torchrun --nproc_per_node=4 benchmarks/ddp_train.py                       # the built-in demo dataset
    torchrun --nproc_per_node=8 benchmarks/ddp_train.py --index index.npz --final-patch 160 160 \\
        --z-reduction max --batch-size 64 --epochs 2
    python benchmarks/ddp_train.py --device cpu --epochs 1                    # one process

Every rank loads the same saved index (rank 0 builds and saves it first when --index does not
exist), builds its loader with `dali_pipeline.distributed.distributed_loader` (device_id =
local rank on GPUs), and trains a small 3-D conv encoder with a projection head and NT-Xent under
DistributedDataParallel. Reported per rank and in total (rank 0 writes JSON and Markdown to --out):

  startup_s      process start to the first batch (imports, process group, index load, pipeline build)
  pairs_per_s    anchor/positive pairs trained per second, after --warmup steps
  data_wait      share of a step spent waiting for the loader (the rest is forward/backward/all-reduce)
  loss           first and last mean loss (the encoder learns: the last is lower)

Nothing is asserted: this is a measurement. `--max-steps` caps the steps of each epoch.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402


class DemoEncoder(nn.Module):
    """Conv3d stem -> two strided conv blocks -> global pool: features (D), then a projection head (P)."""

    def __init__(self, channels: int, features: int = 128, projection: int = 32, width: int = 32) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv3d(channels, width, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.GroupNorm(8, width), nn.GELU(),
            nn.Conv3d(width, 2 * width, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            nn.GroupNorm(8, 2 * width), nn.GELU(),
            nn.Conv3d(2 * width, 4 * width, kernel_size=3, stride=(1, 2, 2), padding=1), nn.GroupNorm(8, 4 * width),
            nn.GELU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4 * width, features),
        )
        self.head = nn.Sequential(nn.Linear(features, features), nn.GELU(), nn.Linear(features, projection))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)
        return f, self.head(f)


def nt_xent(a: torch.Tensor, p: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent over the 2B views of this rank's batch (the positive of view i is its pair)."""
    z = nn.functional.normalize(torch.cat([a, p]), dim=1)
    sim = (z @ z.T) / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(sim.device)
    return nn.functional.cross_entropy(sim, target)


def prepare_index(args, topo) -> Path:
    """The saved index every rank loads: --index, built by rank 0 (from --collection or the demo) if missing."""
    from sampler import ExperimentRegistry, IndexConfig, LineageIndex

    path = Path(args.index)
    if topo.rank == 0 and not path.exists():
        if args.collection:
            collection = Path(args.collection)
        else:
            from dali_pipeline.cli import demo_collection

            collection = demo_collection()
        registry = ExperimentRegistry.from_yaml(collection, **({"z_window": args.z_window} if args.z_window else {}))
        config = IndexConfig(patch_yx=tuple(args.patch), tau_range_hours=tuple(args.tau_hours))
        path.parent.mkdir(parents=True, exist_ok=True)
        LineageIndex.build(registry, config, progress=False).save(path)
    if topo.distributed:
        dist.barrier()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--index", default=str(REPO / "benchmarks" / "results" / "ddp_train" / "demo_index.npz"),
                        help="saved index (built by rank 0 when missing)")
    parser.add_argument("--collection", help="collection YAML for building a missing index (default: the demo)")
    parser.add_argument("--patch", type=int, nargs=2, default=(32, 32), help="read patch (Y X) for a built index")
    parser.add_argument("--tau-hours", type=float, nargs=2, default=(0.5, 2.0))
    parser.add_argument("--z-window", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step and rank")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="cap on the steps of each epoch")
    parser.add_argument("--warmup", type=int, default=3, help="steps not timed at the start of the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--final-patch", type=int, nargs=2, default=None)
    parser.add_argument("--z-reduction", choices=["max", "center"], default=None)
    parser.add_argument("--read-ahead", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="spawned reader processes per rank")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads per rank (on CPUs, 1 avoids spinning against DALI's threads)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ddp_train")
    args = parser.parse_args(argv)

    from dali_pipeline.distributed import distributed_loader, init_distributed, resolve_device

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    topo = init_distributed()
    kind, device_id = resolve_device(args.device, topo.local_rank)
    device = torch.device("cuda", device_id) if kind == "gpu" else torch.device("cpu")
    backend = dist.get_backend() if dist.is_initialized() else "none"
    index_path = prepare_index(args, topo)
    loader = distributed_loader(
        index_path, args.batch_size, seed=args.seed, device=kind, final_patch=args.final_patch,
        z_reduction=args.z_reduction, read_ahead=args.read_ahead, workers=args.workers,
    )
    torch.manual_seed(args.seed)
    model = DemoEncoder(channels=loader.index.n_channels).to(device)
    if topo.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device_id] if kind == "gpu" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    steps = len(loader) if args.max_steps is None else min(len(loader), args.max_steps)
    sync = torch.cuda.synchronize if kind == "gpu" else (lambda: None)
    first_batch_s = None
    timed_steps, pairs, wait_s, busy_s, losses = 0, 0, 0.0, 0.0, []
    global_step = 0
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        it = iter(loader)
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            if first_batch_s is None:
                first_batch_s = t1 - T0
            _, a = model(batch["anchor"])
            _, p = model(batch["positive"])
            loss = nt_xent(a, p)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP all-reduces the gradients here
            optimizer.step()
            losses.append(float(loss.detach()))
            sync()
            t2 = time.perf_counter()
            global_step += 1
            if global_step > args.warmup:
                timed_steps += 1
                pairs += len(batch["anchor"])
                wait_s += t1 - t0
                busy_s += t2 - t1
        it.close()  # an epoch cut short by --max-steps: the loader drains it before the next

    mine = dict(rank=topo.rank, local_rank=topo.local_rank, device=str(device), steps=global_step,
                timed_steps=timed_steps, pairs=pairs, wall_s=wait_s + busy_s, wait_s=wait_s,
                startup_s=first_batch_s, loss_first=sum(losses[:3]) / max(1, len(losses[:3])),
                loss_last=sum(losses[-3:]) / max(1, len(losses[-3:])))
    ranks = [mine]
    if topo.distributed:
        ranks = [None] * topo.world_size
        dist.all_gather_object(ranks, mine)
    if topo.rank == 0:
        report(args, topo, backend, kind, loader, ranks)
    if topo.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def report(args, topo, backend, kind, loader, ranks) -> None:
    total_pairs = sum(r["pairs"] for r in ranks)
    wall = max(r["wall_s"] for r in ranks) or float("nan")
    rows = []
    for r in ranks:
        rate = r["pairs"] / r["wall_s"] if r["wall_s"] else float("nan")
        rows.append(f"| {r['rank']} | {r['device']} | {r['steps']} | {rate:,.0f} | "
                    f"{r['wait_s'] / r['wall_s'] if r['wall_s'] else float('nan'):.1%} | {r['startup_s']:.1f} | "
                    f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    table = "\n".join([
        f"DDP demo encoder: world size {topo.world_size}, backend {backend}, pipeline on {kind}, batch "
        f"{args.batch_size}/rank, read shape {loader.index.read_shape}, final patch {args.final_patch}, "
        f"z_reduction {args.z_reduction}",
        "",
        "| rank | device | steps | pairs/s | data wait | startup s | loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"total: {total_pairs / wall:,.0f} pairs/s over {topo.world_size} rank(s)",
    ])
    print(table)
    doc = dict(
        benchmark="ddp_train", time=_dt.datetime.now().isoformat(timespec="seconds"), world_size=topo.world_size,
        backend=backend, device=kind, args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        torch=torch.__version__, index_rows=len(loader.index), valid_anchors=int(len(loader.index.valid)),
        steps_per_epoch=len(loader), total_pairs_per_s=total_pairs / wall, ranks=ranks, table_markdown=table,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in (f"ddp_train-{stamp}.json", "ddp_train.json"):
        (args.out / name).write_text(json.dumps(doc, indent=1, default=str))
    (args.out / f"ddp_train-{stamp}.md").write_text(table + "\n")
    print(f"saved {args.out / f'ddp_train-{stamp}.json'}")


if __name__ == "__main__":
    raise SystemExit(main())
