"""DDP under torchrun over the real DALI CPU pipeline with gloo: sharding, collectives, predict coverage.

The test runs this file as the torchrun worker script (`__main__` below): every rank loads the same
saved index, builds its loader with `distributed_loader`, and reports what it received.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BATCH = 8
SEED = 3


# ---------------------------------------------------------------------- the worker (one per rank)
def _keys(meta) -> list[list]:
    return [[str(g), int(t)] for g, t in zip(meta["global_track_id"], meta["t"])]


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from dali_pipeline.distributed import (
        distributed_loader,
        init_distributed,
        load_index,
        load_loader_state,
        loader_state,
    )
    from sampler.augment import AugmentConfig, Flip, Noise

    topo = init_distributed()
    assert dist.is_initialized() and dist.get_backend() == "gloo", "gloo on the CPU"
    assert topo.world_size == int(os.environ["WORLD_SIZE"]) and topo.source == "process group"
    out: dict = dict(rank=topo.rank, world_size=topo.world_size, local_rank=topo.local_rank)
    fit = distributed_loader(args.index, BATCH, seed=SEED, device="cpu")
    assert fit.sampler.rank == topo.rank and fit.sampler.world_size == topo.world_size
    assert fit.spec.device == "cpu" and fit.device_id is None
    out["same_index_object"] = load_index(args.index) is fit.index  # loaded once per process
    steps, reduced = [], []
    for batch in fit:
        steps.append(_keys(batch["anchor_meta"]))
        count = torch.tensor([len(batch["anchor"])], dtype=torch.int64)
        dist.all_reduce(count)  # a collective per step: equal step counts on every rank or this hangs
        reduced.append(int(count))
    out["fit_steps"], out["reduced"] = steps, reduced
    touched = set()
    for s in range(len(fit)):
        plan = fit.sampler.plan(s, 0)
        touched |= set(plan.anchor_boxes.fov.tolist()) | set(plan.positive_boxes.fov.tolist())
    out["touched_fovs"] = sorted(int(f) for f in touched)
    out["opened_fovs"] = sorted(int(f) for f in fit.reader._stores)  # stores open in this process
    # noise fields come from each rank's DALI generator: a checkpoint written by rank 0 alone (as
    # Lightning's) must still resume every rank's own noise stream
    noisy = dict(seed=SEED, device="cpu", sampler_options=dict(
        augment=AugmentConfig(flip=Flip(0.5), noise=Noise(1.0, 0.5), crop=(4, 28, 28))))
    want = [b["anchor"].numpy().copy() for _, b in zip(range(5), distributed_loader(args.index, BATCH, **noisy))]
    first = distributed_loader(args.index, BATCH, **noisy)
    for _, _b in zip(range(3), first):
        pass
    box = [loader_state(first)]  # a collective: every rank's DALI checkpoint
    dist.broadcast_object_list(box, src=0)  # rank 0's copy is what the checkpoint file holds
    resumed = distributed_loader(args.index, BATCH, **noisy)
    load_loader_state(resumed, box[0])
    got = [b["anchor"].numpy() for _, b in zip(range(2), resumed)]
    out["noise_resumed_exactly"] = all(np.array_equal(g, w) for g, w in zip(got, want[3:5]))
    out["noise_streams_saved"] = len(box[0]["dali_ranks"])
    predict = distributed_loader(args.index, BATCH, predict=True, device="cpu")
    out["predict_steps"] = [
        [[str(e), str(f), int(k), int(t)] for e, f, k, t in
         zip(b["index"]["experiment"], b["index"]["fov_name"], b["index"]["track_id"], b["index"]["t"])]
        for b in predict
    ]
    Path(args.out, f"rank-{topo.rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------- the tests
def torchrun(nproc: int, script: Path, args: list[str], timeout: float = 150) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=nproc script args` on the loopback, with a timeout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["OMP_NUM_THREADS"] = "1"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    # --standalone: a c10d rendezvous on a port the store itself picks on localhost (no port race)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def saved_index(tmp_path_factory):
    from dali_pipeline.datasets.synthetic import demo_spec, write_synthetic
    from sampler import ExperimentRegistry, IndexConfig, LineageIndex

    root = tmp_path_factory.mktemp("ddp")
    yaml_path = write_synthetic(root / "demo", demo_spec())
    index = LineageIndex.build(ExperimentRegistry.from_yaml(yaml_path), IndexConfig(patch_yx=(32, 32)), progress=False)
    path = root / "index.npz"
    index.save(path)
    return index, path


@pytest.fixture(scope="module")
def ddp_runs(saved_index, tmp_path_factory):
    """{nproc: each rank's report}, one torchrun per world size (fit epoch 0, then predict)."""
    _, path = saved_index
    runs: dict[int, list[dict]] = {}

    def run(nproc: int) -> list[dict]:
        if nproc not in runs:
            out = tmp_path_factory.mktemp(f"ranks{nproc}")
            torchrun(nproc, Path(__file__), ["--index", str(path), "--out", str(out)])
            runs[nproc] = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(nproc)]
        return runs[nproc]

    return run


@pytest.mark.parametrize("nproc", [2, 3])
def test_ranks_take_disjoint_equal_slices_of_the_single_process_permutation(ddp_runs, saved_index, nproc):
    from sampler import TripletSampler

    index, _ = saved_index
    ranks = ddp_runs(nproc)
    assert [r["rank"] for r in ranks] == list(range(nproc)) and all(r["world_size"] == nproc for r in ranks)
    assert all(r["same_index_object"] for r in ranks)
    n_steps = len(index.valid) // (BATCH * nproc)
    assert [len(r["fit_steps"]) for r in ranks] == [n_steps] * nproc  # equal step counts
    assert all(r["reduced"] == [BATCH * nproc] * n_steps for r in ranks)  # every all-reduce completed
    per_rank = [{tuple(k) for step in r["fit_steps"] for k in step} for r in ranks]
    for a in range(nproc):
        for b in range(a + 1, nproc):
            assert not per_rank[a] & per_rank[b], "ranks share anchors"
    # the union, step by step, is the same prefix of the single-process permutation
    single = TripletSampler(index, BATCH, seed=SEED)
    order = np.concatenate([single.anchor_rows(s, 0) for s in range(len(single))])
    keys = list(zip(index.values("global_track_id", order).astype(str).tolist(), index.values("t", order).tolist()))
    span = BATCH * nproc
    for s in range(n_steps):
        for r, rank in enumerate(ranks):
            assert [tuple(k) for k in rank["fit_steps"][s]] == keys[s * span + r * BATCH:s * span + (r + 1) * BATCH]
    # with noise augmentation, a checkpoint saved on rank 0 resumes every rank's own noise stream
    assert all(r["noise_resumed_exactly"] and r["noise_streams_saved"] == nproc for r in ranks)
    # each rank opened exactly the stores its own plans read
    for rank in ranks:
        assert rank["opened_fovs"] == rank["touched_fovs"]


@pytest.mark.parametrize("nproc", [2, 3])
def test_predict_under_several_ranks_covers_every_row_exactly_once(ddp_runs, saved_index, nproc):
    index, _ = saved_index
    ranks = ddp_runs(nproc)
    counts = [len(r["predict_steps"]) for r in ranks]
    assert max(counts) - min(counts) <= 1
    seen = [tuple(k) for r in ranks for step in r["predict_steps"] for k in step]
    rows = np.arange(len(index))
    want = set(zip(index.values("experiment", rows).astype(str).tolist(), index.values("fov_name", rows).astype(str).tolist(),
                   index.values("track_id", rows).tolist(), index.values("t", rows).tolist()))
    assert len(seen) == len(set(seen)) == len(index)
    assert set(seen) == want


# ---------------------------------------------------------------------- in-process: topology and devices
def test_topology_from_the_environment(monkeypatch):
    from dali_pipeline.distributed import topology

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert topology() == topology(0, 1, 0).__class__(0, 1, 0, "single process")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    topo = topology()
    assert (topo.rank, topo.world_size, topo.local_rank, topo.source, topo.distributed) == (5, 8, 1, "environment", True)
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert topology().local_rank == 1  # 5 % 4
    assert topology(2, 3, 0).source == "explicit"
    monkeypatch.setenv("RANK", "8")
    with pytest.raises(ValueError, match="rank must lie in"):
        topology()
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="set both or neither"):
        topology()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="not an integer"):
        topology()


def test_device_resolution_on_a_cpu_machine():
    import torch

    from dali_pipeline.distributed import resolve_device

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert resolve_device("auto", 3) == ("cpu", None)
    assert resolve_device("cpu", 0) == ("cpu", None)
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        resolve_device("gpu", 0)
    with pytest.raises(ValueError):
        resolve_device("tpu", 0)


def test_loader_from_a_saved_index_with_explicit_ranks(saved_index):
    from dali_pipeline.distributed import distributed_loader, load_index

    index, path = saved_index
    assert load_index(path) is load_index(str(path))  # one load per process and file version
    loaders = [distributed_loader(path, BATCH, seed=SEED, rank=r, world_size=2, device="cpu") for r in range(2)]
    assert all(lo.index is loaders[0].index for lo in loaders)
    assert len(loaders[0]) == len(loaders[1]) == len(index.valid) // (2 * BATCH)
    firsts = [next(iter(lo)) for lo in loaders]
    a, b = ({tuple(k) for k in _keys(f["anchor_meta"])} for f in firsts)
    assert len(a) == len(b) == BATCH and not a & b
    with pytest.raises(FileNotFoundError, match="no saved index"):
        load_index(path.parent / "missing.npz")


@pytest.mark.gpu
def test_auto_device_puts_the_pipeline_on_the_local_rank_gpu(saved_index):
    import torch

    from dali_pipeline._dali import gpu_count
    from dali_pipeline.distributed import distributed_loader

    if not (torch.cuda.is_available() and gpu_count() > 0):
        pytest.skip("no CUDA device visible to torch and DALI")
    _, path = saved_index
    loader = distributed_loader(path, BATCH, rank=0, world_size=2, local_rank=0)  # device="auto"
    assert loader.spec.device == "gpu" and loader.device_id == 0
    batch = next(iter(loader))
    assert batch["anchor"].device == torch.device("cuda", 0) and batch["positive"].device == torch.device("cuda", 0)


def test_split_by_fov_follows_the_reference_rule(saved_index):
    from dali_pipeline.distributed import split_anchors

    index, _ = saved_index
    split = split_anchors(index, by="fov", ratio=0.5, seed=7)
    # the reference: per experiment in name order, sorted FOVs, max(1, int(n * ratio)) train after rng.shuffle
    rng = np.random.default_rng(7)
    want_train = set()
    for name in sorted(index.experiments.name):
        fovs = sorted(index.fovs.fov_name[index.fovs.experiment == name])
        n_train = max(1, int(len(fovs) * 0.5))
        rng.shuffle(fovs)
        want_train |= {f"{name}/{f}" for f in fovs[:n_train]}
    assert set(split.train_keys) == want_train and not want_train & set(split.val_keys)
    row_key = lambda ix: set(np.char.add(np.char.add(ix.values("experiment", ix.valid).astype(str), "/"),
                                         ix.values("fov_name", ix.valid).astype(str)))
    assert row_key(split.train) <= want_train and row_key(split.val) <= set(split.val_keys)
    assert len(split.train.valid) + len(split.val.valid) == len(index.valid)
    assert split.train.tracks is index.tracks  # a view: nothing copied or rebuilt
    assert split_anchors(index, ratio=1.0).val is None
    by_exp = split_anchors(index, by="experiment", val_experiments=["demo_15min"])
    assert by_exp.train_keys == ["demo_30min"] and set(by_exp.val.values("experiment", by_exp.val.valid)) == {"demo_15min"}
    with pytest.raises(ValueError, match="No training experiments"):
        split_anchors(index, by="experiment", val_experiments=["demo_15min", "demo_30min"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", required=True)
    parser.add_argument("--out", required=True)
    worker(parser.parse_args())
