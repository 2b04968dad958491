"""`dynaclr-dali bench`: a short side-by-side comparison of the loader paths on the same plans.

Three paths read the same BatchPlans (`TripletSampler(index, batch_size, seed).plan(step, epoch)`):

* raw read ceiling: `PatchReader.prefetch` (tensorstore reads into native-dtype buffers, no
  cast, no normalization, nothing handed to a framework);
* DALI: `TripletLoader` (the same reads, then cast, normalize and hand over on the device);
* torch: a `DataLoader` over `MultiExperimentTripletDataset` (the reference path), with cast and
  normalization done in torch on the same device so that it delivers what DALI delivers.

The page cache is warmed by one untimed pass; each path then runs `warmup` untimed steps and
`steps` timed ones, in `rounds` interleaved rounds, and the best round counts (MB/s counts the
native-dtype pixels read). This is a quick look; `benchmarks/` holds the thorough measurements.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dali_pipeline.reader import PatchReader
from dali_pipeline.torch_dataset import MultiExperimentTripletDataset, identity_collate
from sampler import BatchPlan, LineageIndex, TripletSampler

PATHS = {
    "raw": "PatchReader.prefetch (raw read ceiling)",
    "dali": "DALI TripletLoader",
    "torch": "torch DataLoader (MultiExperimentTripletDataset)",
}
SHORT = {"raw": "raw read ceiling", "dali": "DALI loader", "torch": "torch DataLoader"}


def plans_for(sampler: TripletSampler, n: int) -> list[BatchPlan]:
    """The first n plans of the sampler, epoch after epoch."""
    per_epoch = len(sampler)
    return [sampler.plan(s % per_epoch, s // per_epoch) for s in range(n)]


def _timed(batches, warmup: int, steps: int, sync) -> tuple[float, float]:
    """(seconds to the first batch, seconds for `steps` batches after `warmup`)."""
    start = time.perf_counter()
    first = timed_from = None
    count = 0
    for _ in batches:
        sync()
        count += 1
        now = time.perf_counter()
        if first is None:
            first = now - start
        if count == warmup:
            timed_from = now
        if count == warmup + steps:
            return first, now - timed_from
    raise RuntimeError(f"the path delivered {count} batches, fewer than the {warmup + steps} asked for")


def _run_path(path: str, index: LineageIndex, plans: list[BatchPlan], *, batch_size: int, seed: int, device: str,
              warmup: int, steps: int) -> tuple[float, float, dict[str, Any]]:
    """(first batch s, timed s, extra fields) of one path over `plans`."""
    torch_device = torch.device("cuda", 0) if device == "gpu" else torch.device("cpu")
    sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
    if path == "raw":
        reader = PatchReader(index)
        first, seconds = _timed(reader.prefetch(plans, depth=2), warmup, steps, lambda: None)
        return first, seconds, {"read_amplification": reader.stats.amplification}
    if path == "dali":
        from dali_pipeline.loader import TripletLoader

        loader = TripletLoader(index, TripletSampler(index, batch_size, seed=seed), device=device,
                               device_id=0 if device == "gpu" else None)

        def epochs():
            while True:
                got = 0
                for batch in loader:
                    got += 1
                    yield batch
                if not got:
                    return

        first, seconds = _timed(epochs(), warmup, steps, sync)
        return first, seconds, {"device": device}
    if path == "torch":
        data = DataLoader(MultiExperimentTripletDataset(index), batch_sampler=plans, collate_fn=identity_collate,
                          num_workers=0)

        def normalized():
            for plan, batch in zip(plans, data):
                out = []
                for role, norm in (("anchor", plan.anchor_norm), ("positive", plan.positive_norm)):
                    stats = torch.from_numpy(norm).to(torch_device)[:, :, :, None, None, None]
                    x = batch[role].to(torch_device).float()
                    out.append((x - stats[:, :, 0]) / (stats[:, :, 1] + 1e-8))
                yield out

        first, seconds = _timed(normalized(), warmup, steps, sync)
        return first, seconds, {"device": device, "num_workers": 0}
    raise ValueError(f"unknown path {path!r}; choose from {sorted(PATHS)}")


def compare(
    index: LineageIndex,
    *,
    steps: int = 30,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    warmup: int = 2,
    rounds: int = 2,
    paths: tuple[str, ...] = ("raw", "dali", "torch"),
) -> dict[str, Any]:
    """Pairs/s of each path over the same plans (best of `rounds` interleaved rounds); a JSON-ready dict."""
    if steps < 1 or warmup < 1 or rounds < 1:
        raise ValueError(f"steps, warmup and rounds must be >= 1, got {steps}, {warmup} and {rounds}")
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise ValueError(f"unknown paths {unknown}; choose from {sorted(PATHS)}")
    sampler = TripletSampler(index, batch_size, seed=seed)
    plans = plans_for(sampler, warmup + steps)
    pair_bytes = 2 * index.n_channels * int(np.prod(index.read_shape)) * np.dtype(index.batch_dtype).itemsize
    for _ in PatchReader(index).prefetch(plans, depth=2):  # warm the page cache for every path alike
        pass
    results: dict[str, dict[str, Any]] = {}
    for r in range(rounds):
        for path in paths:
            first, seconds, extra = _run_path(path, index, plans, batch_size=batch_size, seed=seed, device=device,
                                              warmup=warmup, steps=steps)
            pairs = steps * batch_size
            best = results.get(path)
            if best is None or seconds < best["seconds"]:
                results[path] = dict(
                    name=PATHS[path], short=SHORT[path], pairs_per_s=pairs / seconds,
                    mb_per_s=pairs * pair_bytes / seconds / 1e6, seconds=seconds,
                    first_batch_s=first if best is None else best["first_batch_s"], **extra)
    if "torch" in results:
        for res in results.values():
            res["vs_torch"] = res["pairs_per_s"] / results["torch"]["pairs_per_s"]
    return dict(steps=steps, warmup=warmup, rounds=rounds, batch_size=batch_size, seed=seed, device=device,
                read_shape=list(index.read_shape), channels=index.n_channels, dtype=str(np.dtype(index.batch_dtype)),
                observations=len(index), valid_anchors=len(index.valid), results=results)


def table(report: dict[str, Any]) -> str:
    """The comparison as a text table."""
    rows = [f"{'path':<50} {'pairs/s':>10} {'MB/s':>9} {'first batch':>12} {'vs torch':>9}"]
    for r in report["results"].values():
        vs = f"{r['vs_torch']:.2f}x" if "vs_torch" in r else "-"
        rows.append(f"{r['name']:<50} {r['pairs_per_s']:>10,.0f} {r['mb_per_s']:>9,.1f} {r['first_batch_s']:>11.2f}s "
                    f"{vs:>9}")
    return "\n".join(rows)
