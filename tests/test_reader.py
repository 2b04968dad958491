"""PatchReader against numpy slices of the written arrays: layouts, borders, chunks, faults, http."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from builders import expected_patches, make_experiment, track_rows, tracks_table, write_collection
from dali_pipeline import PatchReader, PatchReadError, kvstore_reads
from sampler import BatchPlan, ExperimentRegistry, IndexConfig, LineageIndex, ReadBoxes, make_plan

SHAPE = (3, 64, 64)
N_T = 10


def cells() -> "pd.DataFrame":  # noqa: F821
    """A division plus cells at the borders (clamped) in one FOV."""
    return tracks_table(
        track_rows(1, range(0, 5), y=30.0, x=33.0),
        track_rows(2, range(5, 10), y=40.0, x=20.5, parent=1),
        track_rows(3, range(5, 10), y=22.0, x=45.0, parent=1),
        track_rows(4, range(0, 10), y=9.0, x=55.0),  # clamped to (16, 48)
        track_rows(5, range(0, 10), y=50.5, x=12.0),
    )


LAYOUTS = {
    "0.4-small-chunks": dict(version="0.4", chunks=(1, 1, 1, 16, 16)),
    "0.5-sharded": dict(version="0.5", chunks=(1, 1, 2, 16, 16), shards=(1, 1, 2, 32, 32)),
    "0.5-whole-planes": dict(version="0.5"),
}


def collection(root: Path, **layout) -> Path:
    a = make_experiment(root, "a", {"A/1/0": cells(), "B/2/0": cells()}, ["Phase3D", "GFP"],
                        {"phase": "Phase3D", "gfp": "GFP"}, shape=SHAPE, n_t=N_T, **layout)
    b = make_experiment(root, "b", {"A/1/0": cells()}, ["GFP", "Mito", "BF"], {"phase": "BF", "gfp": "GFP"},
                        shape=SHAPE, n_t=N_T, dtype="uint8", **layout)
    return write_collection(root, [a, b], labels=["phase", "gfp"])


def build(root: Path, **layout) -> LineageIndex:
    registry = ExperimentRegistry.from_yaml(collection(root, **layout), z_window=2)
    return LineageIndex.build(registry, IndexConfig(patch_yx=(32, 32)), progress=False)


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_patches_equal_numpy_slices_in_canonical_channel_order(tmp_path, layout):
    index = build(tmp_path, **LAYOUTS[layout])
    before = tree_hash(tmp_path)
    plan = make_plan(index, index.valid, np.random.default_rng(0))
    got = PatchReader(index).read(plan)
    assert got.anchor.dtype == np.uint16 and got.anchor.shape == (len(plan), 2, 2, 32, 32)
    assert got.anchor.flags.c_contiguous and got.positive.flags.c_contiguous
    np.testing.assert_array_equal(got.anchor, expected_patches(index, plan.anchor_boxes))
    np.testing.assert_array_equal(got.positive, expected_patches(index, plan.positive_boxes))
    # the border cell (y=9, x=55) is read off-centre, inside the image
    border = index.tracks.track_id.to_numpy()[plan.anchor_rows] == 4
    assert border.any() and (plan.anchor_boxes.y[border] == 0).all() and (plan.anchor_boxes.x[border] == 32).all()
    assert tree_hash(tmp_path) == before  # reading never touches the store


def test_chunk_accounting_on_a_known_grid(tmp_path):
    index = build(tmp_path, version="0.5", chunks=(1, 1, 3, 32, 32))  # 2 x 2 chunks per plane
    a_fov = int(np.flatnonzero(index.fovs.experiment == "a")[0])

    def boxes(ys, xs):
        n = len(ys)
        return ReadBoxes(fov=np.full(n, a_fov, np.int32), t=np.zeros(n, np.int32), z=np.zeros(n, np.int32),
                         y=np.array(ys, np.int32), x=np.array(xs, np.int32), channels=np.tile([[0, 1]], (n, 1)))

    norm = np.zeros((2, 2, 2), np.float32)
    reader = PatchReader(index)
    # opening the store reads its metadata: do that with a first read of one aligned box
    warm = BatchPlan(anchor_rows=np.zeros(1, np.int64), anchor_boxes=boxes([32], [32]), anchor_norm=norm[:1])
    reader.read(warm)
    assert reader.stats.chunks_decoded == 2  # 1 chunk x 2 channels
    # two identical aligned boxes share one chunk per channel
    shared = BatchPlan(anchor_rows=np.zeros(2, np.int64), anchor_boxes=boxes([0, 0], [0, 0]), anchor_norm=norm)
    reads = kvstore_reads()
    reader.read(shared)
    assert reader.stats.chunks_decoded == 2 + 2
    assert kvstore_reads() - reads == 2  # tensorstore fetched each shared chunk once
    # one box straddling four chunks per channel
    straddle = BatchPlan(anchor_rows=np.zeros(1, np.int64), anchor_boxes=boxes([16], [16]), anchor_norm=norm[:1])
    reader.read(straddle)
    assert reader.stats.chunks_decoded == 2 + 2 + 8
    chunk_bytes = 3 * 32 * 32 * 2
    patch_bytes = 2 * 2 * 32 * 32 * 2  # C x Z x Y x X x uint16
    assert reader.stats.bytes_decoded == 12 * chunk_bytes
    assert reader.stats.bytes_delivered == 4 * patch_bytes
    assert reader.stats.amplification == pytest.approx(12 * chunk_bytes / (4 * patch_bytes))


def test_missing_chunk_reads_fill_value_and_fails_in_strict_mode(tmp_path):
    index = build(tmp_path, version="0.4", chunks=(1, 1, 1, 64, 64))
    fov = int(np.flatnonzero(index.fovs.experiment == "a")[0])
    rows = np.flatnonzero((index.column("fov") == fov) & (index.column("t") == 0))[:1]
    plan = make_plan(index, rows, None, predict=True)
    z0 = int(plan.anchor_boxes.z[0])
    victim = Path(index.fovs.url[fov][len("file://"):]) / "0" / "0" / str(z0) / "0" / "0"
    assert victim.exists()
    victim.unlink()  # t=0, channel 0, first slice of the box
    got = PatchReader(index).read(plan).anchor
    assert (got[0, 0, 0] == 0).all() and (got[0, 0, 1] != 0).any() and (got[0, 1] != 0).any()
    with pytest.raises(PatchReadError, match=r"Experiment 'a', FOV A/1/0, t=0: anchor box z\[\d+:\d+\] y\[\d+:\d+\]"):
        PatchReader(index, strict=True).read(plan)


@pytest.mark.parametrize("layout, key", [
    # zarr v2, one chunk per (t, c, z) plane: t=0, channel 0, slice z0
    (dict(version="0.4", chunks=(1, 1, 1, 64, 64)), "0/0/{z0}/0/0"),
    # zarr v3 sharded: the shard of t=0, channel 0 holds every slice
    (dict(version="0.5", chunks=(1, 1, 1, 32, 32), shards=(1, 1, 3, 64, 64)), "c/0/0/0/0/0"),
], ids=["0.4-chunk", "0.5-shard"])
@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
def test_a_folder_at_a_chunk_or_shard_path_is_an_error_naming_the_box(tmp_path, layout, key, cached):
    from dali_pipeline.cached_reader import CachedPatchReader, ChunkStore

    index = build(tmp_path, **layout)
    fov = int(np.flatnonzero(index.fovs.experiment == "a")[0])
    rows = np.flatnonzero((index.column("fov") == fov) & (index.column("t") == 0))[:1]
    plan = make_plan(index, rows, None, predict=True)
    victim = Path(index.fovs.url[fov][len("file://"):]) / key.format(z0=int(plan.anchor_boxes.z[0]))
    assert victim.is_file()
    victim.unlink()
    victim.mkdir()  # tensorstore's file kvstore reports a folder as a missing key
    (victim / "stray").write_bytes(b"x")

    def reader() -> PatchReader:
        return CachedPatchReader(index, store=ChunkStore(1 << 26)) if cached else PatchReader(index)

    with pytest.raises(PatchReadError, match=(
        r"Experiment 'a', FOV A/1/0, t=0: anchor box z\[\d+:\d+\] y\[\d+:\d+\] x\[\d+:\d+\] channels \[0, 1\]: "
        rf"chunk file .*{key.format(z0=int(plan.anchor_boxes.z[0]))} is a folder")):
        reader().read(plan)
    # without the folder the chunk is missing, which reads as the fill value (zarr semantics)
    (victim / "stray").unlink()
    victim.rmdir()
    got = reader().read(plan).anchor
    assert (got[0, 0, 0] == 0).all() and (got[0, 1] != 0).any()


def test_a_deleted_chunk_beside_a_truncated_one_still_reads_as_the_fill_value(tmp_path):
    # local stores are read without filling missing chunks first: the missing one must not be
    # mistaken for a failure (raised, or skipped) when another chunk of the step is corrupt
    index = build(tmp_path, version="0.5", chunks=(1, 1, 3, 64, 64))
    in_b = (index.tracks.experiment == "b").to_numpy()
    rows = np.concatenate([np.flatnonzero(in_b & (index.column("t") == t))[:2] for t in (3, 4)])
    plan = make_plan(index, rows, None, predict=True)
    folder = Path(index.fovs[index.fovs.experiment == "b"].iloc[0].url[len("file://"):])
    (folder / "c" / "3" / "0" / "0" / "0" / "0").unlink()  # t=3, GFP: fill value
    truncated = folder / "c" / "4" / "0" / "0" / "0" / "0"  # t=4, GFP: an error
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(PatchReadError, match=r"Experiment 'b', FOV A/1/0, t=4: anchor box"):
        PatchReader(index).read(plan)
    reader = PatchReader(index, on_read_error="skip", max_skip_fraction=0.5)
    got = reader.read(plan)
    assert reader.stats.skipped == 2
    np.testing.assert_array_equal(got.plan.anchor_rows, rows[[0, 1, 0, 0]])  # the next good sample, cyclically
    assert (got.anchor[:, 1] == 0).all() and (got.anchor[:, 0] != 0).any()  # GFP filled, BF read


def test_truncated_and_garbage_chunks_name_the_box(tmp_path):
    index = build(tmp_path, version="0.5", chunks=(1, 1, 3, 64, 64))
    rows = np.flatnonzero((index.tracks.experiment == "b").to_numpy() & (index.column("t") == 3))[:2]
    plan = make_plan(index, rows, None, predict=True)
    fov = index.fovs[index.fovs.experiment == "b"].iloc[0]
    victim = Path(fov.url[len("file://"):]) / "c" / "3" / "0" / "0" / "0" / "0"  # t=3, GFP
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(PatchReadError, match=r"Experiment 'b', FOV A/1/0, t=3: anchor box .* channels \[\d, \d\] failed"):
        PatchReader(index).read(plan)
    victim.write_bytes(os.urandom(len(raw)))
    with pytest.raises(PatchReadError, match=r"Experiment 'b', FOV A/1/0, t=3"):
        PatchReader(index).read(plan)


def test_read_ahead_keeps_plans_in_flight_within_the_budget(tmp_path):
    index = build(tmp_path, version="0.5")
    plans = [make_plan(index, index.valid[i::5], np.random.default_rng(i)) for i in range(5)]
    reader = PatchReader(index)
    events: list[str] = []
    submit = reader.submit

    def recording_submit(plan):
        events.append(f"submit {plans.index(plan)}")
        return submit(plan)

    reader.submit = recording_submit
    for i, patches in enumerate(reader.prefetch(plans, depth=2)):
        events.append(f"yield {i}")
        np.testing.assert_array_equal(patches.anchor, expected_patches(index, plans[i].anchor_boxes))
    assert events[:4] == ["submit 0", "submit 1", "submit 2", "yield 0"]
    # with room for one plan, the next is issued only after the previous was handed out
    one_plan = max(reader.plan_bytes(p) for p in plans)
    events.clear()
    for i, _ in enumerate(reader.prefetch(plans, depth=2, budget_bytes=one_plan)):
        events.append(f"yield {i}")
    assert events[:4] == ["submit 0", "yield 0", "submit 1", "yield 1"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


def test_reads_over_http_from_a_local_server(tmp_path):
    yaml_path = collection(tmp_path, version="0.5", chunks=(1, 1, 1, 32, 32))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        text = yaml_path.read_text().replace(f"data_path: {tmp_path}", f"data_path: {base}")
        assert text.count(base) == 2
        remote = tmp_path / "remote.yml"
        remote.write_text(text)
        registry = ExperimentRegistry.from_yaml(remote, z_window=2)
        index = LineageIndex.build(registry, IndexConfig(patch_yx=(32, 32)), progress=False)
        assert index.fovs.url.str.startswith("http://").all()
        plan = make_plan(index, index.valid, np.random.default_rng(1))
        got = PatchReader(index).read(plan)
        np.testing.assert_array_equal(got.positive, expected_patches(index, plan.positive_boxes))
    finally:
        server.shutdown()


# ---------------------------------------------------------------------- reading only the centre crop
def test_a_centre_crop_read_is_the_crop_of_the_whole_box_and_decodes_fewer_chunks(tmp_path):
    from dali_pipeline.reader import CentreCrops, read_crop
    from sampler.augment import AugmentConfig

    index = build(tmp_path, version="0.4", chunks=(1, 1, 1, 16, 16))
    plans = [make_plan(index, index.valid[i:i + 6], np.random.default_rng(i)) for i in range(0, 30, 6)]
    crops = CentreCrops(lambda step, epoch: plans[step], index.read_shape[1:], (12, 10))
    whole, cropped = PatchReader(index), PatchReader(index, crop_yx=(12, 10))
    for step in range(len(plans)):
        full, part = whole.read(plans[step]), cropped.read(crops(step, 0))
        for role in ("anchor", "positive"):  # (32 - 12) // 2 = 10, (32 - 10) // 2 = 11
            want = expected_patches(index, getattr(plans[step], f"{role}_boxes"))[..., 10:22, 11:21]
            np.testing.assert_array_equal(getattr(part, role), want)
            np.testing.assert_array_equal(getattr(full, role)[..., 10:22, 11:21], want)
    assert cropped.stats.chunks_decoded < whole.stats.chunks_decoded
    assert cropped.plan_bytes(crops(0, 0)) * 32 * 32 == whole.plan_bytes(plans[0]) * 12 * 10
    # the policy: only without augmentations, for one box size, and when the crop fits
    assert read_crop(index, None, (12, 10)) == (12, 10)
    assert read_crop(index, AugmentConfig(), (12, 10)) is None and read_crop(index, None, None) is None
    assert read_crop(index, None, (40, 10)) is None
    with pytest.raises(ValueError, match=r"crop_yx \(40, 10\) must fit inside the read patch \(32, 32\)"):
        PatchReader(index, crop_yx=(40, 10))
