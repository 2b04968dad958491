#!/usr/bin/env python
"""Loader throughput: the DALI TripletLoader beside the raw read ceiling and the torch path (BENCHMARKS.md).

Contenders, all on the same BatchPlans (TripletSampler(index, B, seed).plan(step, 0)), alternated
A B C ... within every repeat, each measurement in a fresh process:

  ceiling        PatchReader.prefetch(plans, depth=read_ahead): every read of a step concurrent, the
                 next `read_ahead` steps in flight, same tensorstore context as the loaders; no DALI,
                 no torch; the boxes the DALI loader reads (with a final patch and no augmentation
                 only its centre crop, as the loader; the torch contenders read whole boxes, as the
                 reference)
  torch          MultiExperimentTripletDataset in a torch DataLoader (batch_sampler = the plans,
                 identity_collate, num_workers=0)
  torch-threads  the same dataset on 2 thread workers (a DataLoader-like thread pool, 2 x
                 prefetch_factor 2 plans in flight, batches in order)
  torch-norm     torch-threads followed by the reference's batch transforms on the consumer's
                 device (its on_after_batch_transfer): per channel (x - sub) / (div + 1e-8) from
                 the collated norm-meta dicts, then the Z reduction and centre crop of the
                 configuration, in the reference's order: the same output as the DALI loader's
  dali           TripletLoader (CPU pipeline here), centre crop / Z reduction of the configuration,
                 cast and normalize, read_ahead and DALI prefetch 2
  dali-raw       the same loader with normalize=False (cast only): the in-situ cost of normalizing
  dali-workers   the normalizing loader with DALI's parallel external source (workers=2, spawned
                 processes reading one plan each; no in-process read-ahead)

plus, per configuration and repeat, `dali-ops`: the loader with reading made free (an in-memory
reader serving one batch's pixels for every plan), normalize on and off, and a pipeline with the
external source alone, in ms per batch: the cost of DALI's CPU work (copy, crop / Z reduction,
cast, normalize, iterator) apart from reading, which it shares the cores with.

Figures per process: pairs/s (pairs of the timed batches / the timed window: with read-ahead,
batches arrive in bursts, so a median batch time would flatter prefetchers), useful MB/s (bytes
of the whole read boxes in the stores' dtype, anchors + positives, before crop or Z reduction:
the same for every contender), decoded/useful bytes (PatchReader.stats of the contender's own
reader: chunk-grid bytes of the unique chunks of each step / bytes of the whole read boxes; not
available for dali-workers, whose readers live in the workers), peak RSS (VmHWM of the measuring process plus
its live children's: read-ahead, DALI's queues and buffers included), and the ratio to the
ceiling of the same repeat. Reported: median (min-max) over the fresh processes.

    python benchmarks/loader_throughput.py                      # 2-D, 3-D, small-chunk; 3 repeats
    python benchmarks/loader_throughput.py --small              # smoke run: tiny stores, 1 repeat
    python benchmarks/loader_throughput.py --configs 3-D --contenders ceiling dali
    python benchmarks/loader_throughput.py --gpu --reduced      # on a GPU machine: reduced GPU protocol

Benchmark stores are generated once with dali_pipeline.datasets.synthetic.write_synthetic
(benchmark_spec) and cached under --out/data, keyed by their parameters; their page cache is
warmed (every file read once) before measuring.

Goals (reported, not asserted): on this CPU the DALI loader with normalization >= 0.9 x the raw
read ceiling, and >= the torch path; on a GPU >= 0.95 x that machine's ceiling, GPU-side work
< 5 % of the step time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULT_MARK = "@@RESULT "
GEN_VERSION = 1  # bump to regenerate every cached store

# ============================================================================ configuration
#: BENCHMARKS.md's standard configurations; batch = CPU batch, gpu_batch = production batch
CONFIGS: dict[str, dict[str, Any]] = {
    "2-D": dict(store="production", channel_mode="bag", z_window=16, patch_yx=(256, 256), final_patch=(160, 160),
                z_reduction="max", batch=64, gpu_batch=256),
    "3-D": dict(store="production", channel_mode="all", z_window=16, patch_yx=(256, 256), final_patch=None,
                z_reduction=None, batch=32, gpu_batch=256),
    "small-chunk": dict(store="small-chunk", channel_mode="all", z_window=5, patch_yx=(256, 256), final_patch=None,
                        z_reduction=None, batch=64, gpu_batch=256),
}
STORE_LAYOUTS = {
    "production": dict(version="0.5", chunks=(1, 1, 16, 256, 256), shards=(1, 1, 16, 512, 512)),
    "small-chunk": dict(version="0.4", chunks=(1, 1, 1, 256, 256), shards=None),
}
#: store sizes: full = BENCHMARKS.md (>= 32 FOVs, 16 timepoints; 17 GB decoded, ~6.5 GB on disk per
#: layout, ~1-2 min to write here); small = smoke run; reduced = the GPU protocol's <= 2 GB store
STORE_SIZES = {
    "full": dict(n_fovs=32, t=16, z=16, yx=512, cells_per_fov=48),
    "small": dict(n_fovs=4, t=12, z=16, yx=512, cells_per_fov=48),
    "reduced": dict(n_fovs=8, t=7, z=16, yx=512, cells_per_fov=224),  # 1.88e9 B decoded; 3-D: 21 steps of 256
}
CONTENDERS = {
    "ceiling": "raw read ceiling (PatchReader.prefetch)",
    "torch": "torch DataLoader, 0 workers",
    "torch-threads": "torch dataset, 2 thread workers",
    "torch-norm": "torch dataset, 2 thread workers + reference's normalize / Z reduction / crop",
    "dali": "DALI TripletLoader, normalize",
    "dali-raw": "DALI TripletLoader, normalize=False",
    "dali-workers": "DALI TripletLoader, normalize, 2 spawned source workers",
}
DEFAULT_CONTENDERS = ["ceiling", "torch", "torch-threads", "torch-norm", "dali", "dali-raw", "dali-workers"]
GPU_CONTENDERS = ["ceiling", "torch-norm", "dali"]
THREAD_WORKERS, THREAD_PREFETCH = 2, 2
GOALS = {"cpu_ratio": 0.9, "gpu_ratio": 0.95, "gpu_work_fraction": 0.05}
PROTOCOL_MIN = {"warmup": 3, "timed": 20, "repeats": 3}


def _ensure_repo_on_path() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


# ============================================================================ small helpers
def _proc_status() -> dict[str, float]:
    """VmRSS / VmHWM of this process, MiB."""
    from procstat import proc_status  # benchmarks/procstat.py

    return proc_status()


def _children_peak_mib() -> float:
    """Sum of the peak RSS of this process's live children (spawned source workers), MiB."""
    total = 0.0
    try:
        pids = {p for task in os.listdir("/proc/self/task")
                for p in open(f"/proc/self/task/{task}/children").read().split()}
    except OSError:
        return total
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next((int(l.split()[1]) for l in f if l.startswith("VmHWM:")), 0) / 1024.0
        except OSError:
            pass
    return total


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5): per-contender peaks in one process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _uptime() -> str:
    """`uptime`'s line from /proc (no subprocess: the one-process mode must not fork after tensorstore)."""
    try:
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        with open("/proc/loadavg") as f:
            loads = f.read().split()[:3]
    except OSError:
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
    now = _dt.datetime.now().strftime("%H:%M:%S")
    return f"{now} up {int(up // 3600)}:{int(up % 3600 // 60):02d}, load average: {', '.join(loads)}"


def _emit(result: dict[str, Any]) -> None:
    sys.stdout.write(RESULT_MARK + json.dumps(result, default=str) + "\n")
    sys.stdout.flush()


def _summary(values: list[float]) -> dict[str, float]:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def _fmt(s: dict[str, float] | None, fmt: str) -> str:
    if s is None:
        return "–"
    if format(s["min"], fmt) == format(s["max"], fmt):
        return format(s["median"], fmt)
    return f"{format(s['median'], fmt)} ({format(s['min'], fmt)}–{format(s['max'], fmt)})"


def _git_state() -> dict[str, Any]:
    """Commit and uncommitted changes of the code under test (sampler/, dali_pipeline/)."""
    git: dict[str, Any] = {}
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, timeout=10).stdout
        git["commit"] = run("rev-parse", "HEAD").decode().strip()
        git["dirty"] = run("status", "--porcelain", "sampler", "dali_pipeline").decode().splitlines()
        diff = run("diff", "HEAD", "--", "sampler", "dali_pipeline")
        untracked = b"".join(open(REPO / f[3:], "rb").read() for f in git["dirty"] if f.startswith("?? ")
                             and (REPO / f[3:]).is_file())
        git["uncommitted_diff_sha1"] = hashlib.sha1(diff + untracked).hexdigest() if diff or untracked else None
    except (OSError, subprocess.SubprocessError):
        pass
    return git


def _machine(with_git: bool = True) -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for pkg in ("numpy", "pandas", "pyarrow", "tensorstore", "torch", "nvidia-dali-cuda120", "nvidia-dali-cuda130",
                "pyyaml"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    cpu_model, mem = None, None
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 1024**2
    except (OSError, StopIteration):
        pass
    git = _git_state() if with_git else {}
    return dict(platform=platform.platform(), python=platform.python_version(),
                processor=cpu_model or platform.processor(), cpu_count=os.cpu_count(),
                cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                memory_gib=round(mem, 1) if mem else None, versions=versions, git=git)


# ============================================================================ stores
def store_params(layout: str, size: str, seed: int) -> dict[str, Any]:
    """benchmark_spec keyword arguments of one store (JSON-able; the cache key)."""
    return dict(**STORE_SIZES[size], **STORE_LAYOUTS[layout], dtype="float32", seed=seed)


def store_folder(data_dir: Path, layout: str, params: dict[str, Any]) -> Path:
    key = hashlib.sha1(json.dumps([GEN_VERSION, params], sort_keys=True).encode()).hexdigest()[:8]
    p = params
    return data_dir / f"{layout}-{p['n_fovs']}fov-t{p['t']}-z{p['z']}-yx{p['yx']}-s{p['seed']}-{key}"


def generate_store(folder: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Write the store (unless its manifest exists); returns the manifest plus where and how."""
    from dali_pipeline.datasets.synthetic import MANIFEST_FILE, benchmark_spec, write_synthetic

    manifest_path = folder / MANIFEST_FILE
    cached = manifest_path.exists()
    if not cached:
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items()}
        write_synthetic(folder, benchmark_spec(**kwargs), overwrite=True)
    manifest = json.loads(manifest_path.read_text())
    manifest.pop("spec", None)  # the parameters say it; keeps the JSON short
    return dict(manifest, folder=str(folder), yaml=str(folder / "collection.yml"), params=params, cached=cached)


def warm_page_cache(folder: Path) -> dict[str, float]:
    """Read every file of a store once, so that no measurement waits for the disk."""
    t0, total = time.perf_counter(), 0
    for d, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(d, name), "rb", buffering=0) as f:
                while chunk := f.read(1 << 23):
                    total += len(chunk)
    return dict(bytes=total, seconds=time.perf_counter() - t0)


def gpu_problem() -> str | None:
    """Why a --gpu run cannot start here, or None: DALI must see a CUDA device and torch must have CUDA."""
    _ensure_repo_on_path()
    from dali_pipeline._dali import gpu_count

    if gpu_count() == 0:
        return "a GPU run needs a CUDA GPU visible to DALI (nvidia.dali.backend.GetCUDADeviceCount() == 0 here)"
    import torch

    if not torch.cuda.is_available():
        return ("DALI sees a GPU but torch.cuda.is_available() is False: the loader hands CUDA tensors to torch, "
                "install a CUDA build of torch")
    return None


# ============================================================================ measurement
@dataclass
class Setup:
    """What every contender of one measurement shares: index, sampler, the plans, options."""

    spec: dict[str, Any]
    config: dict[str, Any]
    index: Any
    sampler: Any
    plans: list
    batch: int
    device: str
    useful_bytes: int  # bytes of the read boxes of one plan (anchors + positives), stored dtype

    @property
    def device_id(self) -> int | None:
        return 0 if self.device == "gpu" else None


def setup(spec: dict[str, Any]) -> Setup:
    from dali_pipeline.reader import PatchReader
    from sampler import ExperimentRegistry, IndexConfig, LineageIndex, TripletSampler

    config = spec["config"]
    registry = ExperimentRegistry.from_yaml(spec["yaml"], z_window=config["z_window"])
    index = LineageIndex.build(registry, IndexConfig(patch_yx=tuple(config["patch_yx"]),
                                                     channel_mode=config["channel_mode"]), progress=False)
    sampler = TripletSampler(index, spec["batch"], seed=spec["seed"])
    # more plans than consumed, so that read-ahead never drains inside the timed window
    n_plans = spec["warmup"] + spec["timed"] + spec["read_ahead"] + 4
    if len(sampler) < n_plans:
        raise SystemExit(f"the store has {len(index.valid)} valid anchors: {len(sampler)} steps of {spec['batch']}, "
                         f"{n_plans} needed (warm-up + timed + read-ahead): use a larger store or fewer batches")
    plans = [sampler.plan(step, 0) for step in range(n_plans)]
    useful = PatchReader(index).plan_bytes(plans[0])
    return Setup(spec, config, index, sampler, plans, spec["batch"], spec["device"], useful)


@dataclass
class Contender:
    """An iterable of batches and the PatchReader whose stats tell its read amplification."""

    batches: Iterable
    reader: Any
    close: Callable[[], None] = field(default=lambda: None)


def reader_options(s: Setup) -> dict[str, Any]:
    """The same tensorstore context for every contender: no chunk cache, default concurrency."""
    return dict(cache_pool_bytes=0, concurrency=s.spec.get("concurrency"))


def contender_ceiling(s: Setup) -> Contender:
    """The boxes the DALI loader reads: its centre crop only where it reads only that (no augmentation)."""
    from dali_pipeline.reader import PatchReader, centre_crop, read_crop

    final = s.config["final_patch"]
    crop = read_crop(s.index, None, None if final is None else tuple(final))
    reader = PatchReader(s.index, crop_yx=crop, **reader_options(s))
    plans = s.plans if crop is None else [centre_crop(p, s.index.read_shape[1:], crop) for p in s.plans]
    return Contender(reader.prefetch(plans, depth=s.spec["read_ahead"]), reader)


class ThreadedBatches:
    """DataLoader-like thread workers: `collate_fn(dataset.__getitems__(plan))` on a pool of `workers`
    threads, `workers * prefetch_factor` plans in flight, batches yielded in plan order."""

    def __init__(self, dataset, plans, workers: int, prefetch_factor: int, collate_fn) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.dataset, self.plans, self.collate_fn = dataset, plans, collate_fn
        self.in_flight = workers * prefetch_factor
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="torch-worker")

    def _load(self, plan):
        return self.collate_fn(self.dataset.__getitems__(plan))

    def __iter__(self):
        plans = iter(self.plans)
        pending = deque(self.pool.submit(self._load, p) for p in islice(plans, self.in_flight))
        while pending:
            batch = pending.popleft().result()
            nxt = next(plans, None)
            if nxt is not None:
                pending.append(self.pool.submit(self._load, nxt))
            yield batch

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _to_device(batches: Iterable, device: str) -> Iterable:
    """The torch path on a GPU: patches moved to cuda:0 as the training step would receive them."""
    if device != "gpu":
        yield from batches
        return
    for batch in batches:
        yield dict(batch, anchor=batch["anchor"].to("cuda:0"), positive=batch["positive"].to("cuda:0"))


def reference_transforms(batch: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The reference's on_after_batch_transfer on the CPU/GPU tensors of one batch, in its order.

    Per channel key: the (B,) statistics stacked from the per-sample norm-meta dicts, then
    NormalizeSampled's (x - sub) / (div + 1e-8); then the Z reduction (max or centre slice) and
    the centre crop of the configuration. Output: the DALI loader's anchor and positive.
    """
    import torch

    out = {}
    for role in ("anchor", "positive"):
        x, meta = batch[role], batch[f"{role}_norm_meta"]
        channels = []
        for c, key in enumerate(meta[0]):
            level = next(iter(meta[0][key]))
            sub_name, div_name = meta[0][key][level]
            sub = torch.stack([m[key][level][sub_name] for m in meta]).to(x.device).view(-1, 1, 1, 1, 1)
            div = torch.stack([m[key][level][div_name] for m in meta]).to(x.device).view(-1, 1, 1, 1, 1)
            channels.append((x[:, c : c + 1].float() - sub) / (div + 1e-8))
        x = torch.cat(channels, dim=1)
        if config["z_reduction"] == "max":
            x = x.amax(dim=2, keepdim=True)
        elif config["z_reduction"] == "center":
            x = x[:, :, x.shape[2] // 2 : x.shape[2] // 2 + 1]
        if config["final_patch"] is not None:
            (fy, fx), (y, w) = config["final_patch"], x.shape[-2:]
            x = x[..., (y - fy) // 2 : (y - fy) // 2 + fy, (w - fx) // 2 : (w - fx) // 2 + fx]
        out[role] = x
    return out


def _transformed(batches: Iterable, config: dict[str, Any]) -> Iterable:
    for batch in batches:
        yield reference_transforms(batch, config)


def contender_torch(s: Setup, workers: int = 0, transforms: bool = False) -> Contender:
    from torch.utils.data import DataLoader

    from dali_pipeline.torch_dataset import MultiExperimentTripletDataset, identity_collate

    dataset = MultiExperimentTripletDataset(s.index, fit=True, **reader_options(s))
    if workers == 0:
        loader = DataLoader(dataset, batch_sampler=s.plans, collate_fn=identity_collate, num_workers=0)
        return Contender(_to_device(loader, s.device), dataset.reader)
    threaded = ThreadedBatches(dataset, s.plans, workers, THREAD_PREFETCH, identity_collate)
    batches = _to_device(threaded, s.device)
    return Contender(_transformed(batches, s.config) if transforms else batches, dataset.reader, threaded.close)


def contender_dali(s: Setup, normalize: bool = True, workers: int = 0) -> Contender:
    from dali_pipeline.loader import TripletLoader

    c = s.config
    loader = TripletLoader(s.index, s.sampler, device=s.device, device_id=s.device_id,
                           final_patch=None if c["final_patch"] is None else tuple(c["final_patch"]),
                           z_reduction=c["z_reduction"], normalize=normalize, prefetch=s.spec["prefetch"],
                           read_ahead=s.spec["read_ahead"], workers=workers, **reader_options(s))
    return Contender(loader, loader.reader)


CONTENDER_FACTORIES: dict[str, Callable[[Setup], Contender]] = {
    "ceiling": contender_ceiling,
    "torch": lambda s: contender_torch(s, 0),
    "torch-threads": lambda s: contender_torch(s, THREAD_WORKERS),
    "torch-norm": lambda s: contender_torch(s, THREAD_WORKERS, transforms=True),
    "dali": lambda s: contender_dali(s, True),
    "dali-raw": lambda s: contender_dali(s, False),
    "dali-workers": lambda s: contender_dali(s, True, workers=2),
}


def _sync_for(device: str) -> Callable[[], None]:
    if device != "gpu":
        return lambda: None
    import torch

    return torch.cuda.synchronize


def measure(s: Setup, name: str) -> dict[str, Any]:
    """The one measurement routine: warm up, time batches one after another, collect the figures."""
    from dali_pipeline.reader import kvstore_reads

    sync = _sync_for(s.device)
    baseline = _proc_status().get("VmRSS")
    load = os.getloadavg()[0]
    contender = CONTENDER_FACTORIES[name](s)
    clock = time.perf_counter
    batches = iter(contender.batches)
    t0 = clock()
    for _ in range(s.spec["warmup"]):
        batch = next(batches)
        sync()
    warmup_s = clock() - t0
    kv0 = kvstore_reads()
    times = []
    cpu0 = time.process_time()
    t = clock()
    for _ in range(s.spec["timed"]):
        batch = next(batches)
        sync()
        now = clock()
        times.append(now - t)
        t = now
    cpu_s = time.process_time() - cpu0
    stats1, kv1 = dict(contender.reader.stats.__dict__), kvstore_reads()
    peak = _proc_status().get("VmHWM")
    children = _children_peak_mib()
    del batch
    contender.close()
    # the rate over the whole timed window: with read-ahead batches arrive in bursts (several plans
    # finish together, then a long wait), so the median batch time would flatter any prefetcher
    per_batch = sum(times) / len(times)
    return dict(
        contender=name, batch=s.batch, timed=len(times), warmup=s.spec["warmup"], warmup_s=warmup_s,
        batch_s_mean=per_batch, batch_s_median=statistics.median(times), batch_s=times,
        pairs_per_s=s.batch / per_batch, pairs_per_s_of_median_batch=s.batch / statistics.median(times),
        # CPU seconds of all the process's threads per timed batch: on a CPU-bound machine the less
        # noisy cost figure (spawned workers' CPU is not in it)
        cpu_ms_per_batch=cpu_s / len(times) * 1e3,
        useful_bytes_per_batch=s.useful_bytes, useful_mb_per_s=s.useful_bytes / per_batch / 1e6,
        # over every plan the contender's reader issued (warm-up, timed and read-ahead): a per-plan
        # figure, so a window of a few plans would differ between contenders by the plans it holds
        # decoded bytes per byte of the whole read boxes, for every contender (also those reading a crop)
        decoded_per_useful=stats1["bytes_decoded"] / (stats1["steps"] * s.useful_bytes) if stats1["steps"] else None,
        chunks_decoded_per_step=stats1["chunks_decoded"] / stats1["steps"] if stats1["steps"] else None,
        reader_stats=stats1,
        kvstore_reads_per_batch=(kv1 - kv0) / len(times), baseline_rss_mib=baseline,
        peak_rss_mib=peak + children, main_peak_rss_mib=peak, workers_peak_rss_mib=children,
        loadavg_1min_at_start=load, loadavg_1min_at_end=os.getloadavg()[0],
    )


# ---------------------------------------------------------------------------- the loader without reads
class _Done:
    """A finished read (the PendingRead interface the feed uses: nbytes, result())."""

    def __init__(self, patches, nbytes: int) -> None:
        self.patches, self.nbytes = patches, nbytes

    def result(self):
        return self.patches


class InMemoryReader:
    """Stands in for a loader's reader: its first plan's pixels, read once, served for every plan (no I/O).

    The boxes are the loader's own (its centre crop, where it reads only that).
    """

    def __init__(self, loader) -> None:
        from dali_pipeline.reader import Patches

        self._reader = loader.reader
        pixels = loader.reader.read(loader.plan_for(0, 0))
        self._patches = lambda plan: Patches(plan, pixels.anchor, pixels.positive)

    def __getattr__(self, name: str):
        return getattr(self._reader, name)

    def submit(self, plan):
        return _Done(self._patches(plan), self._reader.plan_bytes(plan))


class _Recorder:
    """Stands in for the loader's feed and keeps the last source outputs it returned."""

    def __init__(self, feed) -> None:
        self._feed, self.last = feed, None

    def __getattr__(self, name: str):
        return getattr(self._feed, name)

    def __call__(self, info):
        self.last = self._feed(info)
        return self.last


class FixedSource:
    """A batch external source that serves the same arrays every iteration."""

    def __init__(self, arrays: tuple) -> None:
        self.arrays = arrays

    def __call__(self, info) -> tuple:
        return self.arrays


def _es_only_pipeline(source, n_outputs: int, batch: int, device: str, device_id: int | None, prefetch: int):
    """The external source alone, using the arrays in place as the loader's does (no_copy; on a GPU
    the host-to-device copy): the graph's floor."""
    from dali_pipeline._dali import require_dali

    dali = require_dali()

    @dali.pipeline_def(batch_size=batch, num_threads=2, device_id=device_id, prefetch_queue_depth=prefetch)
    def graph():
        nodes = dali.fn.external_source(source=source, num_outputs=n_outputs, batch=True, batch_info=True,
                                        no_copy=True)  # FixedSource keeps its arrays alive and unchanged
        return tuple(n.gpu() if device == "gpu" else n for n in nodes)

    return graph()


def _mean_batch_s(batches: Iterable, warmup: int, timed: int, sync: Callable[[], None]) -> float:
    it = iter(batches)
    for _ in range(warmup):
        next(it)
        sync()
    t0 = time.perf_counter()
    for _ in range(timed):
        next(it)
        sync()
    return (time.perf_counter() - t0) / timed


def dali_ops(s: Setup) -> dict[str, Any]:
    """ms per batch of the DALI loader when reading costs nothing (one batch's pixels served from memory).

    loader_ms: TripletLoader (normalize on) with an in-memory reader: the CPU (or GPU) work of the
    loader besides reading: external-source copy, crop / Z reduction, cast, normalize, iterator,
    meta. loader_raw_ms: the same with normalize=False. es_only_ms: a pipeline with the external
    source alone, on the same source outputs, used in place as the loader does (on a GPU: the
    host-to-device copy).
    """
    sync = _sync_for(s.device)
    n_timed = max(5, min(10, s.spec["timed"]))
    out: dict[str, Any] = {"timed": n_timed}
    recorded = None
    for key, normalize in (("loader_raw_ms", False), ("loader_ms", True)):
        loader = contender_dali(s, normalize).batches
        loader.reader = loader.feed.reader = InMemoryReader(loader)
        loader.feed = recorder = _Recorder(loader.feed)
        out[key] = _mean_batch_s(loader, s.spec["warmup"], n_timed, sync) * 1e3
        recorded = recorder.last
        del loader, recorder
        gc.collect()
    pipe = _es_only_pipeline(FixedSource(recorded), len(recorded), s.batch, s.device, s.device_id, s.spec["prefetch"])
    out["es_only_ms"] = _mean_batch_s(iter(pipe.run, None), s.spec["warmup"], n_timed, sync) * 1e3
    out["ops_ms"] = out["loader_ms"] - out["es_only_ms"]
    out["normalize_ms"] = out["loader_ms"] - out["loader_raw_ms"]
    out["peak_rss_mib"] = _proc_status().get("VmHWM")
    return out


# ============================================================================ children
def child_main(mode: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    _ensure_repo_on_path()
    if mode == "generate":
        _emit(generate_store(Path(spec["folder"]), spec["params"]))
    elif mode == "dali-ops":
        _emit(dali_ops(setup(spec)))
    else:
        _emit(measure(setup(spec), mode))


def run_child(mode: str, spec: dict[str, Any], log: Path | None = None) -> dict[str, Any]:
    """One measurement in a fresh interpreter (its own peak RSS); returns its result dict."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child", mode, json.dumps(spec)],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if log is not None and proc.stderr.strip():
        with open(log, "a") as f:
            f.write(f"--- {mode} {spec.get('config_name', '')}\n{proc.stderr[-4000:]}\n")
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"child {mode} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_MARK):])


# ============================================================================ reporting
def summarize(runs: list[dict[str, Any]], ceilings: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Median (min, max) of the per-process figures; ratios paired with the ceiling of the same repeat."""
    out = {k: _summary([r[k] for r in runs]) for k in
           ("pairs_per_s", "pairs_per_s_of_median_batch", "useful_mb_per_s", "batch_s_mean", "peak_rss_mib",
            "warmup_s", "kvstore_reads_per_batch")}
    if all("cpu_ms_per_batch" in r for r in runs):
        out["cpu_ms_per_batch"] = _summary([r["cpu_ms_per_batch"] for r in runs])
    amp = [r["decoded_per_useful"] for r in runs if r["decoded_per_useful"] is not None]
    out["decoded_per_useful"] = _summary(amp) if amp else None
    if ceilings:
        by_rep = {c["repeat"]: c for c in ceilings}
        ratios = [r["pairs_per_s"] / by_rep[r["repeat"]]["pairs_per_s"] for r in runs if r["repeat"] in by_rep]
        out["ratio_to_ceiling"] = _summary(ratios) if ratios else None
    return out


def table(results: dict[str, dict[str, Any]], contenders: list[str]) -> str:
    head = ["config", "contender", "batch", "pairs/s", "useful MB/s", "decoded/useful", "ratio to ceiling",
            "CPU ms / batch", "peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for cfg, res in results.items():
        for name in contenders:
            s = res["summary"].get(name)
            if s is None:
                continue
            lines.append("| " + " | ".join([
                cfg, CONTENDERS[name], str(res["batch"]), _fmt(s["pairs_per_s"], ".1f"),
                _fmt(s["useful_mb_per_s"], ".0f"), _fmt(s["decoded_per_useful"], ".2f"),
                "1.00" if name == "ceiling" else _fmt(s.get("ratio_to_ceiling"), ".2f"),
                _fmt(s.get("cpu_ms_per_batch"), ".0f"), _fmt(s["peak_rss_mib"], ".0f"),
            ]) + " |")
    return "\n".join(lines)


def ops_table(results: dict[str, dict[str, Any]]) -> str | None:
    rows = [(cfg, res) for cfg, res in results.items() if res.get("ops_summary")]
    if not rows:
        return None
    head = ["config", "batch", "source only ms", "loader w/o reads, normalize=False ms", "loader w/o reads ms",
            "normalize ms", "loader work / loader step", "loader step ms"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for cfg, res in rows:
        o = res["ops_summary"]
        lines.append("| " + " | ".join([
            cfg, str(res["batch"]), _fmt(o["es_only_ms"], ".0f"), _fmt(o["loader_raw_ms"], ".0f"),
            _fmt(o["loader_ms"], ".0f"), _fmt(o["normalize_ms"], ".0f"), _fmt(o.get("loader_fraction"), ".0%"),
            _fmt(o.get("loader_step_ms"), ".0f"),
        ]) + " |")
    return "\n".join(lines)


def summarize_ops(ops: list[dict[str, Any]], dali_runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: _summary([o[k] for o in ops]) for k in ("es_only_ms", "loader_raw_ms", "loader_ms", "ops_ms",
                                                      "normalize_ms")}
    if dali_runs:
        step = {r["repeat"]: r["batch_s_mean"] * 1e3 for r in dali_runs}
        fractions = [o["loader_ms"] / step[o["repeat"]] for o in ops if o["repeat"] in step]
        out["loader_step_ms"] = _summary(list(step.values()))
        out["loader_fraction"] = _summary(fractions) if fractions else None
    return out


def goal_report(results: dict[str, dict[str, Any]], gpu: bool) -> list[str]:
    out = []
    target = GOALS["gpu_ratio" if gpu else "cpu_ratio"]
    where = "GPU" if gpu else "this CPU"
    for cfg, res in results.items():
        s = res["summary"]
        dali = s.get("dali")
        if dali is None or dali.get("ratio_to_ceiling") is None:
            continue
        r = dali["ratio_to_ceiling"]["median"]
        line = (f"- {cfg}: DALI loader (normalize on) / raw ceiling = {r:.2f} (goal on {where} >= {target}) -> "
                f"{'met' if r >= target else 'NOT met'}")
        if "torch-norm" in s:  # like for like: both deliver normalized, reduced, cropped float32
            v = dali["pairs_per_s"]["median"] / s["torch-norm"]["pairs_per_s"]["median"]
            line += (f"; vs the torch path doing the same work (torch-norm) {v:.2f}x (goal >= 1) -> "
                     f"{'met' if v >= 1 else 'NOT met'}")
        raw_torch = [(s[n]["pairs_per_s"]["median"], n) for n in ("torch", "torch-threads") if n in s]
        if raw_torch:
            best, name = max(raw_torch)
            line += f"; vs the best torch path without its transforms ({name}) {dali['pairs_per_s']['median'] / best:.2f}x"
            if "dali-raw" in s:
                line += f", normalize=False {s['dali-raw']['pairs_per_s']['median'] / best:.2f}x"
        if "dali-raw" in s:
            raw = s["dali-raw"]["pairs_per_s"]["median"]
            line += f"; normalize=False runs {raw / dali['pairs_per_s']['median']:.2f}x the normalizing loader"
        o = res.get("ops_summary")
        if o and o.get("loader_fraction"):
            step = o["loader_step_ms"]["median"]
            line += (f"; loader work without reads {o['loader_ms']['median']:.0f} ms = {o['loader_fraction']['median']:.0%} "
                     f"of its step, of which normalize {o['normalize_ms']['median']:.0f} ms")
            if gpu:
                f = o["ops_ms"]["median"] / step
                line += (f"; graph work beyond the source copy {f:.1%} of the step (goal < "
                         f"{GOALS['gpu_work_fraction']:.0%}) -> {'met' if f < GOALS['gpu_work_fraction'] else 'NOT met'}")
        out.append(line)
    return out


def store_line(name: str, m: dict[str, Any]) -> str:
    return (f"store {name}: {m['fovs']} FOVs, shape {m['experiments'][0]['shape']} (TCZYX) float32, "
            f"{m['bytes_decoded'] / 1e9:.2f} GB decoded, {m['bytes_on_disk'] / 1e9:.2f} GB on disk, "
            f"compression ratio {m['compression_ratio']:.2f}, {m['observations']:,} observations, "
            f"{m['divisions']} divisions (" + ("cached" if m["cached"] else f"written in {m['write_seconds']:.0f} s") + ")")


def save(out: Path, doc: dict[str, Any], text: str) -> Path:
    stamp = doc["started"].replace(":", "").replace("-", "")[:15].replace("T", "-")
    label = "-reduced" if doc["protocol"].startswith("reduced") else ("-small" if doc["protocol"].startswith("smoke") else "")
    path = out / f"loader_throughput{label}-{stamp}.json"
    path.write_text(json.dumps(doc, indent=1, default=str))
    (out / f"loader_throughput{label}.json").write_text(json.dumps(doc, indent=1, default=str))
    path.with_suffix(".md").write_text(text + "\n")
    return path


# ============================================================================ drivers
def _child_spec(args, cfg_name: str, store: dict[str, Any], batch: int, device: str) -> dict[str, Any]:
    return dict(config_name=cfg_name, config=CONFIGS[cfg_name], yaml=store["yaml"], batch=batch, seed=args.seed,
                warmup=args.warmup, timed=args.batches, read_ahead=args.read_ahead, prefetch=args.prefetch,
                concurrency=args.concurrency, device=device)


def _protocol_label(args, reduced: bool) -> str:
    if reduced:
        return "reduced protocol"
    ok = args.warmup >= PROTOCOL_MIN["warmup"] and args.batches >= PROTOCOL_MIN["timed"] \
        and args.repeats >= PROTOCOL_MIN["repeats"] and not args.small
    if args.small:
        return "smoke run (--small): NOT the standard protocol"
    return "standard protocol" if ok else "NOT the standard protocol (fewer batches or repeats)"


def _report(args, out: Path, started, load_before: str, stores: dict, results: dict, contenders: list[str],
            protocol: str, gpu: bool, extra: dict[str, Any], machine: dict[str, Any]) -> None:
    load_after = _uptime()
    git_end = _git_state() if not (gpu or protocol.startswith("reduced")) else machine.get("git", {})
    code_changed = bool(git_end) and {k: git_end.get(k) for k in ("commit", "uncommitted_diff_sha1")} != \
        {k: machine.get("git", {}).get(k) for k in ("commit", "uncommitted_diff_sha1")}
    text_table = table(results, contenders)
    ops = ops_table(results)
    goals = goal_report(results, gpu)
    header = (f"Loader throughput ({protocol}; device {'gpu' if gpu else 'cpu'}): "
              f"{args.warmup} warm-up + {args.batches} timed batches per process, "
              + ("one process, contenders one after another" if protocol.startswith("reduced")
                 else f"median (min–max) over {args.repeats} fresh process(es) per contender, contenders alternated")
              + f"; read-ahead {args.read_ahead}, DALI prefetch {args.prefetch}, tensorstore cache off.")
    lines = [header, ""] + [store_line(k, m) for k, m in stores.items()]
    lines += ["", f"Throughput ({protocol}):", "", text_table]
    if ops:
        lines += ["", f"DALI loader with reading made free ({protocol}; one batch's pixels served from memory), ms per "
                      "batch; 'loader work / loader step' against the DALI loader's mean step above:", "", ops]
    lines += ["", "Goals (reported, not asserted):"] + (goals or ["- (no DALI/ceiling pair measured)"])
    lines += ["", "useful MB/s: bytes of the whole read boxes (anchors + positives, stored dtype, before crop / Z "
                  "reduction; the same for every contender, whether it reads the whole box or, without augmentation, "
                  "only the final crop as the DALI loader and the ceiling do). decoded/useful: PatchReader.stats "
                  "(unique chunks per step x chunk bytes / bytes of the whole read boxes). CPU ms / batch: CPU time of "
                  "all threads of the measuring process (spawned workers not included). "
                  "peak RSS: VmHWM of the measuring process" + (" (reset before each contender)." if protocol.startswith("reduced") else ".")]
    lines += [f"uptime before: {load_before}", f"uptime after:  {load_after}"]
    starts = [r["loadavg_1min_at_start"] for res in results.values() for rs in res["runs"].values() for r in rs]
    usable = machine.get("cpus_usable") or os.cpu_count() or 1
    under_load = bool(starts) and max(starts) > usable
    if under_load:
        lines.append(f"WARNING: taken under load: 1-min load average up to {max(starts):.2f} at measurement starts "
                     f"on {usable} usable CPU(s); absolute figures are pessimistic, compare ratios.")
    if code_changed:
        lines.append(f"WARNING: the code under test changed during the run (commit {machine['git'].get('commit', '?')[:8]} "
                     f"-> {git_end.get('commit', '?')[:8]} and/or uncommitted changes in sampler/, dali_pipeline/): "
                     "repeats measured different code; rerun on a quiet tree for published numbers.")
    text = "\n".join(lines)
    print()
    print(text)
    doc = dict(
        benchmark="loader_throughput", protocol=protocol, started=started.isoformat(timespec="seconds"),
        finished=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, "benchmarks/loader_throughput.py", *sys.argv[1:]]),
        machine=machine, git_at_end=git_end, code_changed_during_run=code_changed,
        uptime_before=load_before, uptime_after=load_after, under_load=under_load,
        loadavg_1min_at_starts=starts,
        config=dict({k: v for k, v in vars(args).items() if k != "_child"}, out=str(out),
                    configs={k: CONFIGS[k] for k in results}, contenders={k: CONTENDERS[k] for k in contenders},
                    thread_workers=dict(workers=THREAD_WORKERS, prefetch_factor=THREAD_PREFETCH)),
        stores=stores, goals=GOALS, goal_report=goals, results=results, table_markdown=text_table,
        ops_table_markdown=ops, **extra,
    )
    path = save(out, doc, text)
    print(f"saved {path} (and {path.stem.rsplit('-', 2)[0]}.json, .md)")


def run_cpu_protocol(args, out: Path) -> int:
    """Fresh processes, contenders alternated within every repeat, ops measured per config and repeat."""
    started = _dt.datetime.now().astimezone()
    machine = _machine()
    load_before = _uptime()
    print(f"uptime before: {load_before}", flush=True)
    size = "small" if args.small else "full"
    stores: dict[str, dict[str, Any]] = {}
    for layout in dict.fromkeys(CONFIGS[c]["store"] for c in args.configs):
        params = store_params(layout, size, args.seed)
        folder = store_folder(out / "data", layout, params)
        t0 = time.perf_counter()
        print(f"store {layout}: {folder} ...", flush=True)
        stores[layout] = run_child("generate", dict(folder=str(folder), params=params))
        stores[layout]["generate_call_s"] = time.perf_counter() - t0
        print("  " + store_line(layout, stores[layout]), flush=True)
    for layout, m in stores.items():
        m["page_cache_warm"] = warm_page_cache(Path(m["folder"]))
        print(f"  page cache warmed for {layout}: {m['page_cache_warm']['bytes'] / 1e9:.2f} GB read in "
              f"{m['page_cache_warm']['seconds']:.1f} s", flush=True)

    contenders = list(args.contenders)
    if "ceiling" not in contenders:
        print("note: no ceiling in --contenders: no ratios", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for cfg in args.configs:
        batch = args.batch or CONFIGS[cfg]["batch"]
        results[cfg] = dict(batch=batch, store=CONFIGS[cfg]["store"], runs={n: [] for n in contenders}, ops=[])
    log = out / "children.log"
    total = args.repeats * len(args.configs) * (len(contenders) + (0 if args.no_ops else 1))
    done = 0
    t_start = time.perf_counter()
    for rep in range(args.repeats):
        for cfg in args.configs:
            res = results[cfg]
            store = stores[CONFIGS[cfg]["store"]]
            warm = warm_page_cache(Path(store["folder"]))  # seconds: a few if nothing was evicted
            res.setdefault("page_cache_rewarm_s", []).append(warm["seconds"])
            spec = _child_spec(args, cfg, store, res["batch"], "cpu")
            for name in contenders:  # A B C ... within each repeat
                r = run_child(name, spec, log)
                r["repeat"] = rep
                res["runs"][name].append(r)
                done += 1
                print(f"[{done}/{total} {time.perf_counter() - t_start:.0f} s] rep {rep} {cfg:<11} {name:<13} "
                      f"{r['pairs_per_s']:7.1f} pairs/s {r['useful_mb_per_s']:6.0f} MB/s "
                      f"dec/useful {r['decoded_per_useful'] or float('nan'):.2f} peak {r['peak_rss_mib']:.0f} MiB "
                      f"(load {r['loadavg_1min_at_start']:.2f})", flush=True)
            if not args.no_ops:
                o = run_child("dali-ops", spec, log)
                o["repeat"] = rep
                res["ops"].append(o)
                done += 1
                print(f"[{done}/{total} {time.perf_counter() - t_start:.0f} s] rep {rep} {cfg:<11} dali-ops      "
                      f"loader w/o reads {o['loader_ms']:.0f} ms (normalize=False {o['loader_raw_ms']:.0f} ms), "
                      f"source only {o['es_only_ms']:.0f} ms", flush=True)
    for cfg, res in results.items():
        ceilings = res["runs"].get("ceiling")
        res["summary"] = {n: summarize(rs, None if n == "ceiling" else ceilings) for n, rs in res["runs"].items() if rs}
        if res["ops"]:
            res["ops_summary"] = summarize_ops(res["ops"], res["runs"].get("dali", []))
    _report(args, out, started, load_before, stores, results, contenders, _protocol_label(args, False), False, {},
            machine)
    return 0


def run_reduced_protocol(args, out: Path) -> int:
    """BENCHMARKS.md's reduced GPU protocol: one process, a <= 2 GB store, 2-D and 3-D at the production batch."""
    device = "gpu" if args.gpu else "cpu"
    started = _dt.datetime.now().astimezone()
    machine = _machine()  # before tensorstore: git runs as a subprocess
    load_before = _uptime()
    print(f"uptime before: {load_before}", flush=True)
    _ensure_repo_on_path()
    if args.gpu:
        problem = gpu_problem()
        if problem:
            print(f"error: {problem}; run --reduced without --gpu to exercise the protocol on the CPU", file=sys.stderr)
            return 2
        import torch

        from dali_pipeline._dali import gpu_count

        n = gpu_count()
        machine["gpu"] = dict(count=n, name=torch.cuda.get_device_name(0))
        print(f"GPU: {machine['gpu']['name']} ({n} visible)", flush=True)
    params = store_params("production", "reduced", args.seed)
    t0 = time.perf_counter()
    store = generate_store(store_folder(out / "data", "production", params), params)
    store["generate_call_s"] = time.perf_counter() - t0
    store["page_cache_warm"] = warm_page_cache(Path(store["folder"]))
    print(store_line("production (reduced)", store), flush=True)
    contenders = list(args.contenders)
    configs = [c for c in args.configs if CONFIGS[c]["store"] == "production"]
    results: dict[str, dict[str, Any]] = {}
    for cfg in configs:
        batch = args.batch or (CONFIGS[cfg]["gpu_batch"] if args.gpu else CONFIGS[cfg]["batch"])
        spec = _child_spec(args, cfg, store, batch, device)
        s = setup(spec)
        res = results[cfg] = dict(batch=batch, store="production", runs={}, ops=[])
        for name in contenders:
            _reset_peak_rss()
            r = measure(s, name)
            r["repeat"] = 0
            res["runs"][name] = [r]
            print(f"{cfg:<4} {name:<13} {r['pairs_per_s']:8.1f} pairs/s {r['useful_mb_per_s']:7.0f} MB/s "
                  f"dec/useful {r['decoded_per_useful'] or float('nan'):.2f} peak {r['peak_rss_mib']:.0f} MiB", flush=True)
            gc.collect()
        if not args.no_ops:
            _reset_peak_rss()
            o = dali_ops(s)
            o["repeat"] = 0
            res["ops"].append(o)
            print(f"{cfg:<4} dali-ops      loader w/o reads {o['loader_ms']:.1f} ms (normalize=False "
                  f"{o['loader_raw_ms']:.1f} ms), source only {o['es_only_ms']:.1f} ms", flush=True)
        ceilings = res["runs"].get("ceiling")
        res["summary"] = {n: summarize(rs, None if n == "ceiling" else ceilings) for n, rs in res["runs"].items()}
        if res["ops"]:
            res["ops_summary"] = summarize_ops(res["ops"], res["runs"].get("dali", []))
        del s
        gc.collect()
    args.repeats = 1
    _report(args, out, started, load_before, {"production (reduced)": store}, results, contenders,
            "reduced protocol", args.gpu, {}, machine)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Goals (reported, not asserted): CPU: DALI loader with normalization >= 0.9 x the raw read ceiling "
               "and >= the torch path; GPU: >= 0.95 x the ceiling, GPU-side work < 5 %% of the step.")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=None,
                        help=f"default: {' '.join(DEFAULT_CONTENDERS)} (--gpu: {' '.join(GPU_CONTENDERS)})")
    parser.add_argument("--small", action="store_true",
                        help="smoke run: 4-FOV stores, 1 repeat, 2 warm-up + 4 timed batches (not the protocol)")
    parser.add_argument("--gpu", action="store_true", help="device='gpu', device_id=0 (needs --reduced)")
    parser.add_argument("--reduced", action="store_true",
                        help="reduced GPU protocol: one process, <= 2 GB store of 8 FOVs, 2-D and 3-D, 3 + 10 batches")
    parser.add_argument("--repeats", type=int, default=None, help="fresh processes per contender (default 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up batches per process (default 3)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per process (default 20; reduced 10)")
    parser.add_argument("--batch", type=int, default=None, help="override every configuration's batch size")
    parser.add_argument("--read-ahead", type=int, default=2, help="plans in flight beyond the current one")
    parser.add_argument("--prefetch", type=int, default=2, help="DALI prefetch_queue_depth")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="PatchReader concurrency (tensorstore data-copy threads; default its own: max(2, cores))")
    parser.add_argument("--no-ops", action="store_true", help="skip the DALI-graph-alone measurement")
    parser.add_argument("--seed", type=int, default=0, help="store and sampler seed")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "loader_throughput",
                        help="results folder (stores cached under data/)")
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        child_main(*args._child)
        return 0
    if args.gpu and not args.reduced:
        parser.error("--gpu runs the reduced GPU protocol only: add --reduced")
    if args.contenders is None:
        args.contenders = GPU_CONTENDERS if args.gpu else DEFAULT_CONTENDERS
    args.contenders = list(dict.fromkeys(args.contenders))
    if args.reduced:
        args.configs = [c for c in args.configs if CONFIGS[c]["store"] == "production"]
        if not args.configs:
            parser.error("the reduced protocol runs the 2-D and 3-D configurations")
    defaults = dict(repeats=1, warmup=2, batches=4) if args.small else \
        dict(repeats=1, warmup=3, batches=10) if args.reduced else dict(repeats=3, warmup=3, batches=20)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = args.out.resolve()
    (out / "data").mkdir(parents=True, exist_ok=True)
    return run_reduced_protocol(args, out) if args.reduced else run_cpu_protocol(args, out)


if __name__ == "__main__":
    sys.exit(main())
