"""The chunk cache (numpy as the array module here): patches equal the uncached reader's, each chunk is
read once while the budget holds the working set (tensorstore's own read counter), eviction stays
correct, the budget is never exceeded, and the loader with `cache_bytes` yields the uncached batches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from builders import expected_patches, make_experiment, track_rows, tracks_table, write_collection

from dali_pipeline import PatchReader, kvstore_reads
from dali_pipeline.cached_reader import CachedPatchReader
from dali_pipeline.chunk_cache import ChunkCache, array_module
from sampler import (
    BatchPlan,
    ExperimentRegistry,
    IndexConfig,
    LineageIndex,
    TripletSampler,
    make_plan,
)

SHAPE = (4, 64, 64)
N_T = 6
LAYOUTS = {
    # chunks of 2 x 16 x 16: a 3 x 32 x 32 box spans up to 2 x 3 x 3 chunks
    "0.4": dict(version="0.4", chunks=(1, 1, 2, 16, 16)),
    "0.5-sharded": dict(version="0.5", chunks=(1, 1, 2, 16, 16), shards=(1, 1, 4, 32, 32)),
}


def cells():
    return tracks_table(
        track_rows(1, range(3), y=30.0, x=33.0),
        track_rows(2, range(3, 6), y=40.0, x=20.5, parent=1),
        track_rows(3, range(3, 6), y=22.0, x=45.0, parent=1),
        track_rows(4, range(6), y=9.0, x=55.0),  # at the border: clamped
        track_rows(5, range(6), y=50.5, x=12.0),
    )


def build(root: Path, **layout) -> LineageIndex:
    a = make_experiment(root, "a", {"A/1/0": cells(), "B/2/0": cells()}, ["Phase3D", "GFP"],
                        {"phase": "Phase3D", "gfp": "GFP"}, shape=SHAPE, n_t=N_T, **layout)
    b = make_experiment(root, "b", {"A/1/0": cells()}, ["GFP", "Mito", "BF"], {"phase": "BF", "gfp": "GFP"},
                        shape=SHAPE, n_t=N_T, dtype="uint8", **layout)
    path = write_collection(root, [a, b], labels=["phase", "gfp"])
    registry = ExperimentRegistry.from_yaml(path, z_window=3)
    return LineageIndex.build(registry, IndexConfig(patch_yx=(32, 32)), progress=False)


def chunks_of(index: LineageIndex, plans: list[BatchPlan]) -> set[tuple[int, ...]]:
    """Every (fov, t, c, z, y, x) chunk the plans' boxes touch, counted independently with Python ranges."""
    touched = set()
    for plan in plans:
        for boxes in (plan.anchor_boxes, plan.positive_boxes):
            for f, t, z0, y0, x0, ch in zip(boxes.fov, boxes.t, boxes.z, boxes.y, boxes.x, boxes.channels):
                g = index.fovs.iloc[f][[f"chunk_{a}" for a in "tczyx"]].to_numpy().astype(int)
                z, y, x = index.read_shape
                for c in ch:
                    for cz in range(z0 // g[2], (z0 + z - 1) // g[2] + 1):
                        for cy in range(y0 // g[3], (y0 + y - 1) // g[3] + 1):
                            for cx in range(x0 // g[4], (x0 + x - 1) // g[4] + 1):
                                touched.add((int(f), int(t) // g[0], int(c) // g[1], cz, cy, cx))
    return touched


@pytest.fixture(scope="module", params=list(LAYOUTS))
def index(request, tmp_path_factory) -> LineageIndex:
    return build(tmp_path_factory.mktemp(request.param), **LAYOUTS[request.param])


def epoch_plans(index: LineageIndex, epoch: int = 0) -> list[BatchPlan]:
    sampler = TripletSampler(index, 8, seed=3, drop_last=False)
    return [sampler.plan(s, epoch) for s in range(len(sampler))]


def test_patches_equal_the_uncached_reader_and_numpy(index):
    plans = epoch_plans(index)
    cached, plain = CachedPatchReader(index, cache_bytes=64 << 20), PatchReader(index)
    spans = 0
    for plan in plans:
        got, want = cached.read(plan), plain.read(plan)
        assert got.anchor.dtype == want.anchor.dtype == np.uint16  # uint8 experiment promoted
        assert got.anchor.flags.c_contiguous and got.positive.flags.c_contiguous
        np.testing.assert_array_equal(got.anchor, want.anchor)
        np.testing.assert_array_equal(got.positive, want.positive)
        np.testing.assert_array_equal(got.positive, expected_patches(index, plan.positive_boxes))
        b = plan.anchor_boxes
        spans += int(((b.z % 2 != 0) & (b.y % 16 != 0) & (b.x % 16 != 0)).sum())  # 2 x 3 x 3 chunks
    assert spans > 0  # boxes straddling chunks in every axis were exercised
    border = index.tracks.track_id.to_numpy()[np.concatenate([p.anchor_rows for p in plans])] == 4
    assert border.any()


def test_each_chunk_is_read_once_per_epoch_when_the_budget_holds_it(index):
    plans = epoch_plans(index, epoch=0)
    reader = CachedPatchReader(index, cache_bytes=64 << 20)
    reader.read(plans[0])
    for fov in range(len(index.fovs)):  # open every store (metadata reads) before counting
        reader._raw_store(fov)
    working_set = chunks_of(index, plans)
    before = kvstore_reads()
    for patches in reader.prefetch(plans[1:], depth=2):
        pass
    new_chunks = working_set - chunks_of(index, plans[:1])
    assert reader.stats.chunks_decoded == len(working_set)
    if index.fovs.zarr_format.iloc[0] == 2:  # one file per chunk: tensorstore's reads are chunk reads
        assert kvstore_reads() - before == len(new_chunks)
    # the next epoch, other plans: only chunks no plan of epoch 0 touched are read
    before = kvstore_reads()
    plans_1 = epoch_plans(index, epoch=1)
    for plan in plans_1:
        reader.read(plan)
    unseen = chunks_of(index, plans_1) - working_set
    assert len(unseen) < len(working_set) // 4  # the anchors are the same, some positives differ
    assert reader.stats.chunks_decoded == len(working_set) + len(unseen)
    if index.fovs.zarr_format.iloc[0] == 2:
        assert kvstore_reads() - before == len(unseen)
    assert reader.cache.stats.hits > 0 and reader.stats.amplification < 1


def test_eviction_under_a_tiny_budget_stays_correct_and_within_budget(index):
    chunk = 2 * 16 * 16 * 2  # one uint16 chunk
    budget = 7 * chunk
    reader = CachedPatchReader(index, cache_bytes=budget)
    plain = PatchReader(index)
    peak = 0
    for plan in epoch_plans(index)[:6]:
        got = reader.read(plan)
        peak = max(peak, reader.cache.nbytes)
        np.testing.assert_array_equal(got.anchor, plain.read(plan).anchor)
        assert reader.cache.nbytes <= budget
    assert reader.cache.stats.peak_bytes <= budget and peak > 0
    assert reader.cache.stats.evictions > 0
    assert reader.stats.chunks_decoded > len(chunks_of(index, epoch_plans(index)[:6]))  # re-read after eviction


def test_evicted_buffers_are_reused_only_once_no_pending_plan_reads_them(index):
    chunk = 2 * 16 * 16 * 2
    reader = CachedPatchReader(index, cache_bytes=11 * chunk)  # far below a step's chunks: constant eviction
    plain = PatchReader(index)
    allocated, decoded = [], []
    for epochs in ((0, 1), (2, 3)):
        plans = [plan for epoch in epochs for plan in epoch_plans(index, epoch)]
        for plan, got in zip(plans, reader.prefetch(plans, depth=3)):  # 4 plans pinning chunks at once
            want = plain.read(plan)
            np.testing.assert_array_equal(got.anchor, want.anchor)
            np.testing.assert_array_equal(got.positive, want.positive)
        allocated.append(reader.buffers["allocated"])
        decoded.append(reader.stats.chunks_decoded)
    # buffers ever allocated: at most the cache plus the chunks of 4 pending plans, and flat once reached
    most = max(len(chunks_of(index, [plan])) for plan in plans)
    assert allocated[-1] <= 11 + 4 * most
    assert allocated[1] - allocated[0] < 0.1 * (decoded[1] - decoded[0])
    assert not reader._pins and not reader._retired and reader.cache.nbytes <= 11 * chunk


def test_read_ahead_shares_chunks_in_flight_between_plans(index):
    plan = epoch_plans(index)[0]
    reader = CachedPatchReader(index, cache_bytes=64 << 20)
    first, second = reader.submit(plan), reader.submit(plan)  # the same chunks, both before any result
    a, b = first.result(), second.result()
    np.testing.assert_array_equal(a.anchor, b.anchor)
    assert reader.stats.chunks_decoded == len(chunks_of(index, [plan]))


def test_a_corrupt_chunk_still_names_the_box_or_is_skipped(tmp_path):
    index = build(tmp_path, version="0.4", chunks=(1, 1, 2, 64, 64))
    fov = index.fovs[index.fovs.experiment == "b"].iloc[0]
    rows = np.flatnonzero((index.tracks.experiment == "b").to_numpy() & (index.column("t") == 3))[:2]
    plan = make_plan(index, rows, None, predict=True)
    z_chunk = int(plan.anchor_boxes.z[0]) // 2
    victim = Path(fov.url[len("file://"):]) / "3" / "0" / str(z_chunk) / "0" / "0"  # t=3, GFP (zarr channel 0)
    raw = victim.read_bytes()
    victim.write_bytes(os.urandom(len(raw)))
    from dali_pipeline import PatchReadError

    with pytest.raises(PatchReadError, match=r"Experiment 'b', FOV A/1/0, t=3: anchor box"):
        CachedPatchReader(index, cache_bytes=1 << 20).read(plan)
    mixed = make_plan(index, np.concatenate([rows, np.flatnonzero(index.column("t") == 0)[:20]]), None, predict=True)
    reader = CachedPatchReader(index, cache_bytes=1 << 20, on_read_error="skip", max_skip_fraction=0.5)
    got = reader.read(mixed)
    assert reader.stats.skipped == 2 and got.anchor.shape[0] == len(mixed)


def test_chunk_cache_lru_and_budget():
    cache = ChunkCache(budget_bytes=3 * 8)
    for key in "abc":
        cache.put(key, np.zeros(1, np.float64))
    assert cache.get("a") is not None  # a is now the most recent: b goes first
    cache.put("d", np.zeros(1, np.float64))
    assert "b" not in cache and {"a", "c", "d"} <= set(cache._items) and cache.nbytes == 24
    cache.put("huge", np.zeros(4, np.float64))  # larger than the budget: not kept, nothing evicted
    assert "huge" not in cache and len(cache) == 3
    assert cache.stats.evictions == 1 and cache.stats.hits == 1
    with pytest.raises(ValueError, match="budget"):
        ChunkCache(-1)
    assert array_module("cpu") is np
    with pytest.raises(ValueError, match="device"):
        array_module("tpu")


def test_loader_with_a_cache_yields_the_uncached_batches(index):
    pytest.importorskip("nvidia.dali")
    from dali_pipeline.loader import TripletLoader

    def batches(**options):
        sampler = TripletSampler(index, 8, seed=1, drop_last=False)
        loader = TripletLoader(index, sampler, device="cpu", z_reduction="max", **options)
        out = [[b["anchor"].numpy().copy(), b["positive"].numpy().copy(), list(b["anchor_meta"]["track_id"])]
               for epoch in range(2) for b in loader]
        return out, loader

    plain, _ = batches()
    cached, loader = batches(cache_bytes=64 << 20)
    assert len(cached) == len(plain) == 2 * len(loader)
    for (a, p, ids), (a2, p2, ids2) in zip(plain, cached):
        np.testing.assert_array_equal(a, a2)
        np.testing.assert_array_equal(p, p2)
        assert ids == ids2
    assert loader.reader.cache.stats.hits > 0
    with pytest.raises(ValueError, match="workers=0"):
        TripletLoader(index, TripletSampler(index, 8), device="cpu", cache_bytes=1 << 20, workers=2)


@pytest.mark.gpu
def test_gpu_cache_in_device_memory_yields_the_uncached_batches(index):
    pytest.importorskip("cupy")
    from dali_pipeline._dali import gpu_count
    from dali_pipeline.loader import TripletLoader

    if gpu_count() == 0:
        pytest.skip("no CUDA device visible to DALI")
    import torch

    def loader(**options):
        sampler = TripletSampler(index, 8, seed=1, drop_last=False)
        return TripletLoader(index, sampler, device="gpu", device_id=0, final_patch=(24, 24), **options)

    plain, cached = loader(), loader(cache_bytes=64 << 20)
    assert cached.reader.xp.__name__ == "cupy"
    for epoch in range(2):  # the second epoch comes mostly from chunks already in GPU memory
        for g, c in zip(plain, cached):
            assert c["anchor"].device == torch.device("cuda", 0)
            torch.testing.assert_close(c["anchor"], g["anchor"].to(c["anchor"].device), rtol=0, atol=0)
            torch.testing.assert_close(c["positive"], g["positive"].to(c["positive"].device), rtol=0, atol=0)
    assert cached.reader.cache.stats.hits > 0
