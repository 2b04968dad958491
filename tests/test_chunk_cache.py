"""The chunk cache (numpy as the array module here): patches equal the uncached reader's, each chunk is
read once while the budget holds the working set (tensorstore's own read counter), eviction stays
correct, the budget is never exceeded, and the loader with `cache_bytes` yields the uncached batches."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from builders import expected_patches, make_experiment, track_rows, tracks_table, write_collection
from fake_cupy import FakeCupy

from dali_pipeline import PatchReader, kvstore_reads
from dali_pipeline.cached_reader import CachedPatchReader, ChunkStore
from dali_pipeline.assembly import KERNEL_SOURCE, NX, NY, NZ, kernel_name, launch_shape, piece_table
from dali_pipeline.chunk_cache import ChunkCache
from dali_pipeline.device_arrays import device_arrays
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
    cached, plain = CachedPatchReader(index, store=ChunkStore(64 << 20)), PatchReader(index)
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
    reader = CachedPatchReader(index, store=ChunkStore(64 << 20))
    reader.read(plans[0])
    for fov in range(len(index.fovs)):  # open every store (metadata reads) before counting
        reader._raw_store(fov, lenient=True)  # the stores the cache reads chunks from
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
    reader = CachedPatchReader(index, store=ChunkStore(budget))
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
    reader = CachedPatchReader(index, store=ChunkStore(11 * chunk))  # far below a step's chunks: constant eviction
    plain = PatchReader(index)
    allocated, decoded = [], []
    for epochs in ((0, 1), (2, 3)):
        plans = [plan for epoch in epochs for plan in epoch_plans(index, epoch)]
        for plan, got in zip(plans, reader.prefetch(plans, depth=3)):  # 4 plans pinning chunks at once
            want = plain.read(plan)
            np.testing.assert_array_equal(got.anchor, want.anchor)
            np.testing.assert_array_equal(got.positive, want.positive)
        allocated.append(reader.arrays.buffers["allocated"])
        decoded.append(reader.stats.chunks_decoded)
    # buffers ever allocated: at most the cache plus the chunks of 4 pending plans, and flat once reached
    most = max(len(chunks_of(index, [plan])) for plan in plans)
    assert allocated[-1] <= 11 + 4 * most
    assert allocated[1] - allocated[0] < 0.1 * (decoded[1] - decoded[0])
    assert not reader.store.pins and not reader.store.retired and reader.cache.nbytes <= 11 * chunk


def test_read_ahead_shares_chunks_in_flight_between_plans(index):
    plan = epoch_plans(index)[0]
    reader = CachedPatchReader(index, store=ChunkStore(64 << 20))
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
        CachedPatchReader(index, store=ChunkStore(1 << 20)).read(plan)
    mixed = make_plan(index, np.concatenate([rows, np.flatnonzero(index.column("t") == 0)[:20]]), None, predict=True)
    reader = CachedPatchReader(index, store=ChunkStore(1 << 20), on_read_error="skip", max_skip_fraction=0.5)
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
    assert cache.get("b") is None and cache.stats.as_dict()["hit_rate"] == 0.5  # 1 hit, 1 miss
    assert np.isnan(ChunkCache(8).stats.hit_rate)
    with pytest.raises(ValueError, match="budget"):
        ChunkCache(-1)
    with pytest.raises(ValueError, match="device"):
        device_arrays("tpu")
    with pytest.raises(ValueError, match="device_id"):
        device_arrays("gpu")


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
    assert cached.reader.arrays.device == "gpu" and cached.reader.stream_ptr
    for epoch in range(2):  # the second epoch comes mostly from chunks already in GPU memory
        for g, c in zip(plain, cached):
            assert c["anchor"].device == torch.device("cuda", 0)
            torch.testing.assert_close(c["anchor"], g["anchor"].to(c["anchor"].device), rtol=0, atol=0)
            torch.testing.assert_close(c["positive"], g["positive"].to(c["positive"].device), rtol=0, atol=0)
    assert cached.reader.cache.stats.hits > 0


# ---------------------------------------------------------------------------------------------
# The GPU path on the CPU: the same reader with a numpy-backed stand-in for cupy (tests/fake_cupy.py)
# that records devices, streams, pinned buffers and launches; on a GPU machine the same tests run
# against real cupy too (the recording checks only with the stand-in).

@pytest.fixture(params=["standin", pytest.param("cupy", marks=pytest.mark.gpu)])
def gpu(request, monkeypatch):
    """(cupy-like module, device_id, stand-in or None): the stand-in on its second GPU, or real cupy."""
    if request.param == "standin":
        fake = FakeCupy(device_count=2)
        monkeypatch.setitem(sys.modules, "cupy", fake)
        return fake, 1, fake
    cupy = pytest.importorskip("cupy")
    if not cupy.is_available():
        pytest.skip("no CUDA device for cupy")
    return cupy, cupy.cuda.runtime.getDeviceCount() - 1, None


def test_gpu_path_assembles_numpy_patches_with_one_launch_per_step_on_its_own_gpu_and_stream(index, gpu):
    cupy, device_id, fake = gpu
    reader = CachedPatchReader(index, store=ChunkStore(64 << 20, "gpu", device_id))
    plans = epoch_plans(index, 0) + epoch_plans(index, 1)  # epoch 2 mostly from cached chunks
    for plan, got in zip(plans, reader.prefetch(plans, depth=2)):
        assert got.anchor.device.id == device_id and got.positive.device.id == device_id
        np.testing.assert_array_equal(got.anchor.get(), expected_patches(index, plan.anchor_boxes))
        np.testing.assert_array_equal(got.positive.get(), expected_patches(index, plan.positive_boxes))
    stats = reader.arrays.stats()
    assert stats["launches"] == stats["steps_timed"] == len(plans)  # one assembly kernel per step
    assert stats["uploads"] == reader.stats.chunks_decoded + len(plans)  # each chunk once, plus the step's table
    assert stats["upload_ms"] >= 0 and stats["assembly_ms"] >= 0
    assert {chunk.device.id for chunk in reader.cache._items.values()} == {device_id}
    assert reader.cache.stats.hits > 0
    if fake is None:
        return
    stream = reader.arrays.stream
    assert stream.non_blocking and stream.device_id == device_id and reader.stream_ptr == stream.ptr
    assert {(d, s) for d, s, _ in fake.allocations} == {(device_id, stream)}  # nothing on the current GPU 0
    assert all(launch.device == device_id and launch.stream is stream and launch.arrays_devices == {device_id}
               and launch.name == f"copy_pieces_{np.dtype(index.batch_dtype).itemsize}" for launch in fake.launches)
    assert fake.copies and all(d == device_id and s is stream and pinned for d, s, pinned, _ in fake.copies)


def test_gpu_staging_buffers_are_reused_only_after_their_upload(index, monkeypatch):
    fake = FakeCupy(events_complete=False)  # uploads stay in flight until an event is synchronized
    monkeypatch.setitem(sys.modules, "cupy", fake)
    reader = CachedPatchReader(index, store=ChunkStore(64 << 20, "gpu", 0))
    plans = epoch_plans(index)
    requests = []  # staging buffers asked for per step: its new chunks, plus its piece table
    for step in range(3):
        if step == 2:
            fake.completed = fake.clock  # every upload so far has finished
        before = len(fake.pinned)
        reader.read(plans[step])
        new_chunks = len(chunks_of(index, plans[:step + 1])) - len(chunks_of(index, plans[:step]))
        requests.append((new_chunks + 1, len(fake.pinned) - before))
    assert requests[0][0] == requests[0][1] and requests[1][0] == requests[1][1]  # in flight: never reused
    assert requests[2][0] > 1 and requests[2][1] < requests[2][0]  # finished: reused
    assert reader.arrays.stats()["steps_timed"] == 3


def test_gpu_fallback_reads_through_pinned_staging_and_still_names_the_box(tmp_path, monkeypatch):
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    index = build(tmp_path, version="0.4", chunks=(1, 1, 2, 64, 64))
    fov = index.fovs[index.fovs.experiment == "b"].iloc[0]
    rows = np.flatnonzero((index.tracks.experiment == "b").to_numpy() & (index.column("t") == 3))[:2]
    plan = make_plan(index, np.concatenate([rows, np.flatnonzero(index.column("t") == 0)[:20]]), None, predict=True)
    z_chunk = int(plan.anchor_boxes.z[0]) // 2
    victim = Path(fov.url[len("file://"):]) / "3" / "0" / str(z_chunk) / "0" / "0"
    victim.write_bytes(os.urandom(len(victim.read_bytes())))
    from dali_pipeline import PatchReadError

    with pytest.raises(PatchReadError, match=r"Experiment 'b', FOV A/1/0, t=3: anchor box"):
        CachedPatchReader(index, store=ChunkStore(1 << 20, "gpu", 1)).read(plan)
    reader = CachedPatchReader(index, store=ChunkStore(1 << 20, "gpu", 1), on_read_error="skip",
                               max_skip_fraction=0.5)
    got = reader.read(plan)
    want = PatchReader(index, on_read_error="skip", max_skip_fraction=0.5).read(plan)
    assert reader.stats.skipped == 2 and got.anchor.device.id == 1 and fake.copies[-1][2]  # from pinned memory
    np.testing.assert_array_equal(got.anchor.get(), want.anchor)


def test_gpu_arrays_refuse_a_missing_cupy_or_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ImportError, match=r"dynaclr-dali\[cu12\]"):
        device_arrays("gpu", 0)
    monkeypatch.setitem(sys.modules, "cupy", FakeCupy(device_count=1))
    with pytest.raises(RuntimeError, match="InvalidDevice"):
        device_arrays("gpu", 1)


def _brute_force_pieces(chunk_grid, volume_shape, boxes, box_shape):
    """Pieces listed with Python loops: per box, channel and overlapping chunk, the intersection."""
    rows = []
    chunk_ids = {}
    for b, (t, channels, corner) in enumerate(boxes):
        for k, c in enumerate(channels):
            lo, hi = np.array(corner), np.array(corner) + box_shape
            for idx in np.ndindex(*[(h - 1) // g - l // g + 1 for l, h, g in zip(lo, hi, chunk_grid)]):
                first = np.array(idx) + lo // chunk_grid
                origin = first * chunk_grid
                end = np.minimum(origin + chunk_grid, volume_shape)
                a, z = np.maximum(lo, origin), np.minimum(hi, end)
                key = (t, c, *first.tolist())
                cid = chunk_ids.setdefault(key, len(chunk_ids))
                src = [t, c] + [v for d in range(3) for v in (a[d] - origin[d], z[d] - origin[d])]
                dst = [v for d in range(3) for v in (a[d] - lo[d], z[d] - lo[d])]
                rows.append((cid, b, k, src, dst))
    return chunk_ids, rows


def test_piece_table_copies_equal_numpy_slicing_and_launch_shape_covers_every_piece():
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 60000, size=(3, 4, 7, 45, 38)).astype(np.uint16)  # T, C, Z, Y, X
    grid = np.array([3, 16, 16])  # edge chunks are smaller on every axis
    box_shape = np.array([4, 20, 17])
    boxes = [(int(rng.integers(3)), rng.choice(4, 2, replace=False).tolist(),
              [int(rng.integers(0, s - b + 1)) for s, b in zip(volume.shape[2:], box_shape)]) for _ in range(9)]
    chunk_ids, rows = _brute_force_pieces(grid, np.array(volume.shape[2:]), boxes, box_shape)
    chunks = [None] * len(chunk_ids)
    for (t, c, *first), cid in chunk_ids.items():
        o = np.array(first) * grid
        chunks[cid] = np.ascontiguousarray(volume[t:t + 1, c:c + 1, o[0]:o[0] + grid[0], o[1]:o[1] + grid[1],
                                                  o[2]:o[2] + grid[2]])
    groups = np.array([b % 2 for b in range(len(boxes))])  # two destination buffers, as with two box shapes
    order = np.array([int(np.sum(groups[:b] == groups[b])) for b in range(len(boxes))])
    out_shapes = np.array([[np.sum(groups == g), 2, *box_shape] for g in (0, 1)], np.int64)
    cid, box, k, src, dst = (np.array(v) for v in zip(*rows))
    src[:, :2] = 0  # chunk-local t and c
    table = piece_table(np.array([c.shape for c in chunks], np.int64), cid, src, groups[box], order[box], k, dst,
                        out_shapes)
    for threads in (1, 3):
        outs = [np.zeros(tuple(s), np.uint16) for s in out_shapes]
        device_arrays("cpu", copy_threads=threads).assemble(table, chunks, outs)
        for b, (t, channels, corner) in enumerate(boxes):
            z, y, x = corner
            want = volume[t][channels][:, z:z + box_shape[0], y:y + box_shape[1], x:x + box_shape[2]]
            np.testing.assert_array_equal(outs[groups[b]][order[b]], want)
    (rows_, columns), (threads,) = launch_shape(table)
    largest = int(np.max(np.prod(table[:, [NZ, NY, NX]], axis=1)))
    assert rows_ == len(table) and columns * threads * 4 >= largest > (columns - 1) * threads * 4
    assert launch_shape(table[:0])[0] == (1, 1)
    with pytest.raises(ValueError, match="3-byte"):
        kernel_name(3)
    assert f"COPY_PIECES({kernel_name(2)}, unsigned short)" in KERNEL_SOURCE


def test_loader_cache_budget_holds_the_queue_first(index):
    pytest.importorskip("nvidia.dali")
    from dali_pipeline.loader import TripletLoader

    loader = TripletLoader(index, TripletSampler(index, 8), device="cpu", cache_bytes=64 << 20)
    memory = loader.memory()
    assert memory["cache_budget"] + memory["queue"] == memory["budget"] == 64 << 20
    assert memory["queue"] == loader.queue_bytes > 0 and memory["staging_host"] == 0
    assert TripletLoader(index, TripletSampler(index, 8), device="cpu").memory() == {"budget": 0,
                                                                                     "queue": loader.queue_bytes}
    with pytest.raises(ValueError, match=rf"cache_bytes=1,000 cannot hold.*{loader.queue_bytes:,} bytes"):
        TripletLoader(index, TripletSampler(index, 8), device="cpu", cache_bytes=1000)


def test_loaders_sharing_a_store_reserve_their_queues_from_one_budget(index):
    pytest.importorskip("nvidia.dali")
    from dali_pipeline.loader import TripletLoader

    budget = 4 << 20
    store = ChunkStore(budget)
    train = TripletLoader(index, TripletSampler(index, 8), device="cpu", cache_bytes=store)
    val = TripletLoader(index, TripletSampler(index, 4, seed=1), device="cpu", cache_bytes=store)
    assert train.reader.cache is val.reader.cache
    memory = val.memory()
    assert memory["other_queues"] == train.queue_bytes
    assert memory["cache_budget"] == budget - train.queue_bytes - val.queue_bytes == store.cache.budget_bytes
    with pytest.raises(ValueError, match=rf"\+ {train.queue_bytes + val.queue_bytes:,} reserved by the other loaders"):
        TripletLoader(index, TripletSampler(index, 16), device="cpu", cache_bytes=store)
    val.close()
    assert store.cache.budget_bytes == budget - train.queue_bytes
    with pytest.raises(ValueError, match="share a store only between loaders of one device"):
        TripletLoader(index, TripletSampler(index, 8), device="gpu", device_id=0, cache_bytes=store)


def test_readers_of_two_indexes_of_one_collection_share_decoded_chunks(tmp_path):
    """Keys name FOVs by URL: an index of the same collection with other FOV rows finds the first one's chunks."""
    first_index = build(tmp_path, version="0.4", chunks=(1, 1, 2, 16, 16))
    doc = yaml.safe_load((tmp_path / "collection.yml").read_text())
    doc["experiments"].reverse()  # the same arrays under other FOV rows
    (tmp_path / "reversed.yml").write_text(yaml.safe_dump(doc))
    second_index = LineageIndex.build(ExperimentRegistry.from_yaml(tmp_path / "reversed.yml", z_window=3),
                                      IndexConfig(patch_yx=(32, 32)), progress=False)
    assert first_index.fovs.url.tolist() != second_index.fovs.url.tolist()

    def by_url(index, plans):
        return {(index.fovs.url.iloc[k[0]], *k[1:]) for k in chunks_of(index, plans)}

    store = ChunkStore(64 << 20)
    first, second = CachedPatchReader(first_index, store=store), CachedPatchReader(second_index, store=store)
    plans = [epoch_plans(first_index), epoch_plans(second_index)]
    for reader, index, mine in ((first, first_index, plans[0]), (second, second_index, plans[1])):
        for plan, got in zip(mine, reader.prefetch(mine, depth=2)):
            np.testing.assert_array_equal(got.anchor, expected_patches(index, plan.anchor_boxes))
            np.testing.assert_array_equal(got.positive, expected_patches(index, plan.positive_boxes))
    new = by_url(second_index, plans[1]) - by_url(first_index, plans[0])
    assert second.stats.chunks_decoded == len(new) < len(by_url(second_index, plans[1]))


def test_readers_sharing_a_tiny_store_never_recycle_a_chunk_the_other_still_reads(index):
    chunk = 2 * 16 * 16 * 2
    store = ChunkStore(11 * chunk)  # constant eviction across both readers
    readers = [CachedPatchReader(index, store=store), CachedPatchReader(index, store=store)]
    plans = [epoch_plans(index, 0), epoch_plans(index, 1)]
    streams = [r.prefetch(p, depth=3) for r, p in zip(readers, plans)]
    for step in range(min(map(len, plans))):
        for k in (0, 1):
            got = next(streams[k])
            np.testing.assert_array_equal(got.anchor, expected_patches(index, plans[k][step].anchor_boxes))
            np.testing.assert_array_equal(got.positive, expected_patches(index, plans[k][step].positive_boxes))


def test_a_chunk_store_needs_a_budget_and_a_cached_reader_stays_in_its_process(index):
    import pickle

    with pytest.raises(ValueError, match="budget > 0"):
        ChunkStore(0)
    with pytest.raises(TypeError, match="lives in one process"):
        pickle.dumps(CachedPatchReader(index, store=ChunkStore(1 << 20)))


def test_a_chunk_refetched_after_a_failed_plan_is_not_dropped_by_an_older_fetch(index, monkeypatch):
    """Plan A fails on one chunk and forgets its unfinished reads; plan C reads one of them again;
    plan B, which shares A's original read of it, must not drop C's read from the in-flight table."""
    plan = epoch_plans(index)[0]
    reader = CachedPatchReader(index, store=ChunkStore(64 << 20))
    first, second = reader.submit(plan), reader.submit(plan)  # B shares A's reads
    fetches = [f for f in first.held if f is not None and f.chunk is None]
    broken, shared = fetches[0], fetches[1]

    class Failed:
        def result(self):
            raise ValueError("corrupt chunk")

    broken.future = Failed()
    first.result()  # falls back to the uncached path and forgets its unfinished reads
    assert shared.key not in reader.store.inflight
    third = reader.submit(plan)  # reads the forgotten chunks again
    again = reader.store.inflight[shared.key]
    assert again is not shared
    reader._resolve(shared)  # B's copy of the shared read finishes after C issued its own
    assert reader.store.inflight.get(shared.key) is again  # C's read is still in flight
    want = expected_patches(index, plan.anchor_boxes)
    np.testing.assert_array_equal(second.result().anchor, want)  # B holds the broken read too: falls back
    np.testing.assert_array_equal(third.result().anchor, want)
