"""PyTorch DDP: one DALI pipeline per rank, built from one saved index, sharded by the sampler.

Every rank loads the same index file (`load_index`, cached per process) instead of rebuilding it,
builds a `TripletSampler` with its own rank and the world size (disjoint anchors, the same number
of steps on every rank, and an epoch that is a prefix of one world-size-independent permutation),
and a `TripletLoader` on its own GPU (`device_id=local_rank`) or, without one, on the CPU. The
reader opens a store the first time a plan of this rank touches it, so each rank opens only the
stores it reads.

Under torchrun:

    topo = init_distributed()                 # gloo on CPU, nccl on GPUs; reads RANK/WORLD_SIZE/LOCAL_RANK
    loader = distributed_loader("index.npz", batch_size=64, seed=0)
    for epoch in range(n):
        loader.set_epoch(epoch)
        for batch in loader: ...              # batch tensors already on cuda:local_rank (or CPU)

Train/validation splits (`split_anchors`) restrict the anchors of an index without copying it.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import numpy as np
import torch

from sampler import LineageIndex, TripletSampler

Device = Literal["auto", "cpu", "gpu"]


# ---------------------------------------------------------------------- topology
@dataclass(frozen=True)
class Topology:
    """Where this process stands: global rank, world size, rank on its node, and where that came from."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single process"  # "process group", "environment", "explicit" or "single process"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _default_local_rank(rank: int) -> int:
    local = _env_int("LOCAL_RANK")
    if local is not None:
        return local
    per_node = _env_int("LOCAL_WORLD_SIZE")
    if per_node:
        return rank % per_node
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return rank % torch.cuda.device_count()
    return rank


def topology(rank: int | None = None, world_size: int | None = None, local_rank: int | None = None) -> Topology:
    """This process's place in the job.

    Explicit arguments win; then an initialised `torch.distributed` group (its rank and size; the
    local rank from LOCAL_RANK); then torchrun's RANK, WORLD_SIZE and LOCAL_RANK; else one process.
    Without LOCAL_RANK the local rank is `rank % LOCAL_WORLD_SIZE`, else `rank % visible GPUs`.
    """
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("pass both rank and world_size, or neither")
        source = "explicit"
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size, source = torch.distributed.get_rank(), torch.distributed.get_world_size(), "process group"
    else:
        env_rank, env_world = _env_int("RANK"), _env_int("WORLD_SIZE")
        if (env_rank is None) != (env_world is None):
            raise ValueError(
                f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: a launcher sets "
                "both (torchrun does); set both or neither"
            )
        if env_rank is None:
            rank, world_size, source = 0, 1, "single process"
        else:
            rank, world_size, source = env_rank, env_world, "environment"
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank!r} ({source})")
    local = _default_local_rank(rank) if local_rank is None else local_rank
    if not (isinstance(local, int) and 0 <= local <= rank):
        raise ValueError(f"local_rank must lie in [0, rank={rank}], got {local!r}")
    return Topology(int(rank), int(world_size), int(local), source)


def resolve_device(device: Device, local_rank: int = 0) -> tuple[Literal["cpu", "gpu"], int | None]:
    """("gpu", the local rank's CUDA device) or ("cpu", None).

    "auto" takes the GPU when both torch and DALI see one. With one visible GPU per process
    (CUDA_VISIBLE_DEVICES set per rank) every rank uses device 0.
    """
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "cpu":
        return "cpu", None
    from dali_pipeline._dali import gpu_count

    torch_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = min(torch_gpus, gpu_count()) if torch_gpus else 0
    if gpus == 0:
        if device == "auto":
            return "cpu", None
        raise RuntimeError(
            f"device='gpu' but no CUDA device is visible (torch sees {torch_gpus}, DALI sees {gpu_count()}; "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); pass device='cpu' for the CPU pipeline"
        )
    if local_rank < gpus:
        return "gpu", int(local_rank)
    if gpus == 1:
        return "gpu", 0
    raise RuntimeError(
        f"local rank {local_rank} has no GPU: {gpus} are visible on this node. Start at most {gpus} processes per "
        "node (torchrun --nproc_per_node), or give each process one GPU through CUDA_VISIBLE_DEVICES"
    )


def init_distributed(backend: str = "auto", timeout: timedelta | None = None) -> Topology:
    """Join the torchrun job (once): nccl when this rank has a GPU, gloo otherwise.

    Reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (env://). A single process (no RANK)
    starts no group. On a GPU it also makes the local rank's device current.
    """
    topo = topology()
    if not topo.distributed or torch.distributed.is_initialized():
        return topo
    kind, device_id = resolve_device("auto", topo.local_rank)
    if backend == "auto":
        backend = "nccl" if kind == "gpu" else "gloo"
    options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    if kind == "gpu":
        torch.cuda.set_device(device_id)
        if backend == "nccl":
            options["device_id"] = torch.device("cuda", device_id)
    torch.distributed.init_process_group(backend=backend, init_method="env://", rank=topo.rank,
                                         world_size=topo.world_size, **options)
    return topology()


# ---------------------------------------------------------------------- the index
_INDEX_CACHE: OrderedDict[tuple, LineageIndex] = OrderedDict()
_INDEX_LOCK = threading.Lock()
_INDEX_CACHE_SIZE = 2


def load_index(index: LineageIndex | str | os.PathLike[str]) -> LineageIndex:
    """A saved index (every rank reads the same file), loaded once per process and file version.

    A LineageIndex passes through. The cache is keyed by the file's real path, size and mtime, so a
    rewritten file is read again; the two most recent files stay cached.
    """
    if isinstance(index, LineageIndex):
        return index
    path = os.path.realpath(os.fspath(index))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{index}: no saved index. Build it once (LineageIndex.build(...).save(path) or `dynaclr-dali index "
            "--save PATH`) before starting the ranks"
        ) from None
    key = (path, st.st_size, st.st_mtime_ns)
    with _INDEX_LOCK:
        cached = _INDEX_CACHE.get(key)
        if cached is not None:
            _INDEX_CACHE.move_to_end(key)
            return cached
    loaded = LineageIndex.load(path)
    with _INDEX_LOCK:
        _INDEX_CACHE[key] = loaded
        while len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
            _INDEX_CACHE.popitem(last=False)
    return loaded


def with_anchors(index: LineageIndex, rows: np.ndarray) -> LineageIndex:
    """The same index (every array shared, nothing rebuilt) with its valid anchors restricted to `rows`.

    Positives are still drawn from every row of the index: a split by FOV or experiment keeps each
    lineage whole, so the anchors of one side only ever pair with rows of the same side.
    """
    rows = np.asarray(rows, dtype=np.int64)
    unknown = np.setdiff1d(rows, index.valid)
    if len(unknown):
        raise ValueError(f"{len(unknown)} of the rows are not valid anchors of the index (e.g. row {int(unknown[0])})")
    view = copy.copy(index)  # shallow: tracks, hot block, lookup tables and caches are shared
    view.valid = np.sort(rows)
    return view


@dataclass(frozen=True)
class Split:
    """A train/validation split of an index's anchors: index views and what went where."""

    train: LineageIndex
    val: LineageIndex | None
    train_keys: list[str]  # "experiment/fov_name" (fov split) or experiment names
    val_keys: list[str]


def split_anchors(
    index: LineageIndex,
    by: Literal["fov", "experiment"] = "fov",
    ratio: float = 0.8,
    seed: int = 0,
    val_experiments: Sequence[str] | None = None,
) -> Split:
    """Split the valid anchors by FOV or by experiment, reproducibly from `seed`.

    FOV split (the reference's rule): `rng = np.random.default_rng(seed)`; for each experiment in
    name order, its FOVs sorted, `n_train = max(1, int(n * ratio))`, `rng.shuffle`, the first n_train
    train. Experiment split: `val_experiments` if given, else the experiments sorted by name,
    shuffled by the same generator, the first `max(1, int(n * ratio))` train. `ratio=1.0` (and no
    `val_experiments`) means no validation set (`val` is None). The valid anchors are partitioned,
    not recomputed.
    """
    if by not in ("fov", "experiment"):
        raise ValueError(f"split must be 'fov' or 'experiment', got {by!r}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"split_ratio must lie in (0, 1], got {ratio!r}")
    if val_experiments is not None and by != "experiment":
        raise ValueError("val_experiments names a held-out experiment set: use split='experiment'")
    valid = np.asarray(index.valid, dtype=np.int64)
    names = sorted(index.experiments.name.astype(str).tolist())
    row_exp = index.values("experiment", valid).astype(str)
    if by == "experiment":
        if val_experiments is not None:
            val_names = [str(v) for v in val_experiments]
            unknown = sorted(set(val_names) - set(names))
            if unknown:
                raise ValueError(f"val_experiments {unknown} are not experiments of the index: {names}")
            train_names = [n for n in names if n not in set(val_names)]
            if not train_names:
                raise ValueError(f"No training experiments remaining after splitting: val_experiments={val_names} "
                                 f"holds every experiment of the index")
            if not val_names:
                warnings.warn("val_experiments is empty: no validation set", stacklevel=2)
        else:
            rng = np.random.default_rng(seed)
            order = np.array(names, dtype=object)
            n_train = max(1, int(len(order) * ratio))
            rng.shuffle(order)
            train_names, val_names = sorted(order[:n_train].tolist()), sorted(order[n_train:].tolist())
        train_mask = np.isin(row_exp, train_names)
        val_mask = np.isin(row_exp, val_names)
        train_keys, val_keys = train_names, val_names
    else:
        rng = np.random.default_rng(seed)
        fovs = index.fovs
        train_pairs: set[tuple[str, str]] = set()
        val_pairs: set[tuple[str, str]] = set()
        for name in names:
            exp_fovs = np.array(sorted(fovs.fov_name[fovs.experiment.astype(str) == name].astype(str).tolist()),
                                dtype=object)
            n_train = max(1, int(len(exp_fovs) * ratio))
            rng.shuffle(exp_fovs)
            train_pairs.update((name, f) for f in exp_fovs[:n_train])
            val_pairs.update((name, f) for f in exp_fovs[n_train:])
        row_fov = index.values("fov_name", valid).astype(str)
        keys = np.char.add(np.char.add(row_exp.astype(str), "/"), row_fov)
        train_keys = sorted(f"{e}/{f}" for e, f in train_pairs)
        val_keys = sorted(f"{e}/{f}" for e, f in val_pairs)
        train_mask = np.isin(keys, train_keys)
        val_mask = np.isin(keys, val_keys)
    if not train_mask.any():
        raise ValueError(f"the {by} split leaves no valid anchor to train on (train: {train_keys})")
    train = with_anchors(index, valid[train_mask])
    val = with_anchors(index, valid[val_mask]) if val_keys else None
    if val is not None and len(val.valid) == 0:
        raise ValueError(f"the {by} split's validation set ({val_keys}) holds no valid anchor; change the seed, "
                         "the ratio or the held-out experiments")
    return Split(train, val, train_keys, val_keys)


# ---------------------------------------------------------------------- loader state under DDP
def _group_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def loader_state(loader: Any) -> dict[str, Any]:
    """`loader.state_dict()` fit for a checkpoint that only rank 0 writes (Lightning's, torch.save on rank 0).

    The sampler position is the same on every rank (equal steps), but with noise augmentation the
    state holds this rank's DALI generator checkpoint (`"dali"`): every rank's is gathered into
    `"dali_ranks"`, so that each rank resumes its own noise stream. That gather is a collective:
    under DDP with noise fields, call this on every rank at the same point (as Lightning does when
    it saves a checkpoint). Without noise fields it is the loader's state, no communication.
    """
    state = loader.state_dict()
    if loader.checkpointing and _group_size() > 1:
        gathered: list[Any] = [None] * _group_size()
        torch.distributed.all_gather_object(gathered, state.get("dali"))
        state["dali_ranks"] = gathered
    return state


def load_loader_state(loader: Any, state: Mapping[str, Any]) -> None:
    """Restore a `loader_state` on this rank: the sampler position, and this rank's DALI checkpoint.

    A DALI checkpoint of another rank or world size is dropped (with a warning): the noise stream
    then starts afresh from (seed, rank) at the resumed step; every other choice is still exact.
    """
    state = dict(state)
    per_rank = state.pop("dali_ranks", None)
    rank, world = loader.sampler.rank, loader.sampler.world_size
    if per_rank is not None:
        if len(per_rank) == world and per_rank[rank] is not None:
            state["dali"] = per_rank[rank]
        else:
            state.pop("dali", None)
            if len(per_rank) != world:
                warnings.warn(f"the state holds the DALI noise streams of {len(per_rank)} ranks, this job has {world}: "
                              "noise fields restart from (seed, rank) at the resumed step", stacklevel=2)
    elif "dali" in state and world > 1:
        state.pop("dali")
        warnings.warn("the state holds one rank's DALI noise stream (saved without loader_state); each rank's "
                      "noise fields restart from (seed, rank) at the resumed step", stacklevel=2)
    loader.load_state_dict(state)


# ---------------------------------------------------------------------- the loader
def distributed_loader(
    index: LineageIndex | str | os.PathLike[str],
    batch_size: int,
    *,
    seed: int = 0,
    predict: bool = False,
    drop_last: bool = True,
    device: Device = "auto",
    rank: int | None = None,
    world_size: int | None = None,
    local_rank: int | None = None,
    sampler_options: Mapping[str, Any] | None = None,
    **loader_options: Any,
):
    """This rank's TripletLoader: the saved index, a sampler sharded by rank, a pipeline on its device.

    `index` is a saved index path (loaded once per process, see `load_index`) or a LineageIndex.
    The rank and world size come from `topology()` unless given. `device="auto"` runs the pipeline
    on this rank's GPU (`device_id=local_rank`) when there is one, else on the CPU.
    `sampler_options` go to TripletSampler (group_by, stratify_by, label_columns, ...), the rest to
    TripletLoader (final_patch, z_reduction, normalize, meta, prefetch, read_ahead, workers, ...).
    """
    from dali_pipeline.loader import TripletLoader

    topo = topology(rank, world_size, local_rank)
    index = load_index(index)
    kind, device_id = resolve_device(device, topo.local_rank)
    sampler = TripletSampler(index, batch_size, seed=seed, rank=topo.rank, world_size=topo.world_size,
                             drop_last=drop_last, predict=predict, **dict(sampler_options or {}))
    return TripletLoader(index, sampler, device=kind, device_id=device_id, **loader_options)
