"""Synthetic collections: the index builds on them, centre pixels name their cell, stats, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorstore as ts
import yaml

from dali_pipeline.datasets import synthetic
from dali_pipeline.datasets.omezarr import PlateWriter
from dali_pipeline.datasets.synthetic import (
    ExperimentSpec, SyntheticSpec, benchmark_spec, decode, decode_channel, demo_spec, encode, write_synthetic,
)
from sampler import ExperimentRegistry, IndexConfig, LineageIndex
from sampler.plate import read_fov, read_plate

STATS = ("mean", "std", "median", "iqr", "min", "max", "p1", "p5", "p95", "p99")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo collection's YAML, written once for the module."""
    return write_synthetic(tmp_path_factory.mktemp("synthetic") / "demo", demo_spec())


def tiny_spec(seed: int = 0) -> SyntheticSpec:
    exp = ExperimentSpec(
        name="tiny", channel_names=("G", "P"), channels={"p": "P", "g": "G"}, perturbation_wells={"mock": ("A/1",)},
        fovs_per_well=1, t=4, zyx=(2, 48, 48), cells_per_fov=4, division_prob=0.3, seed=seed,
    )
    return SyntheticSpec(name="tiny", labels=("p", "g"), experiments=(exp,))


def collection(yaml_path: Path) -> dict:
    with open(yaml_path) as f:
        return yaml.safe_load(f)


def open_array(plate: Path, fov: str) -> ts.TensorStore:
    meta = read_fov(read_plate(str(plate)), fov)
    driver = "zarr3" if meta.array.zarr_format == 3 else "zarr"
    return ts.open({"driver": driver, "kvstore": meta.array.url}).result()


def fovs_of(exp: dict, root: Path):
    """(fov name, array, tracks CSV read independently) of every FOV of one experiment entry."""
    plate = root / exp["data_path"]
    for fov in read_plate(str(plate)).fov_names:
        yield fov, open_array(plate, fov), pd.read_csv(root / exp["tracks_path"] / fov / "tracks.csv")


def zarr_attrs(plate: Path, fov: str) -> dict:
    folder = plate / fov
    if (folder / "zarr.json").exists():
        return json.loads((folder / "zarr.json").read_text())["attributes"]
    return json.loads((folder / ".zattrs").read_text())


# ---------------------------------------------------------------------- codes and specs
def test_encode_decode_roundtrip_through_float32_and_uint16():
    tid, t, ch = np.meshgrid(np.arange(1, 256), np.arange(64), np.arange(4), indexing="ij")
    for dtype in (np.uint16, np.float32):
        value = encode(tid, t, ch).astype(dtype)
        got_tid, got_t = decode(value.astype(np.float32))
        assert np.array_equal(got_tid, tid) and np.array_equal(got_t, t)
        assert np.array_equal(decode_channel(value), ch)
    assert decode(encode(7, 3, 1)) == (7, 3)
    with pytest.raises(ValueError):
        encode(1, 64)
    with pytest.raises(ValueError):
        encode(256, 0)


def test_spec_validation_and_benchmark_layout():
    with pytest.raises(ValueError, match="shards need version '0.5'"):
        ExperimentSpec(name="x", channel_names=("A",), channels={"a": "A"}, perturbation_wells={"m": ("A/1",)},
                       version="0.4", shards=(1, 1, 1, 64, 64))
    with pytest.raises(ValueError, match="not among channel_names"):
        ExperimentSpec(name="x", channel_names=("A",), channels={"a": "B"}, perturbation_wells={"m": ("A/1",)})
    spec = benchmark_spec()
    assert sum(len(e.fov_names) for e in spec.experiments) == 32
    e = spec.experiments[0]
    assert e.shape == (16, 2, 16, 512, 512) and e.dtype == "float32" and e.version == "0.5"
    assert e.chunks == (1, 1, 16, 256, 256) and e.shards == (1, 1, 16, 512, 512)
    assert {x.interval_minutes for x in spec.experiments} == {30.0, 15.0}
    with pytest.raises(ValueError, match="multiple"):
        benchmark_spec(n_fovs=6)


# ---------------------------------------------------------------------- the demo collection
def test_demo_builds_registry_and_index_with_divisions(demo):
    doc = collection(demo)
    registry = ExperimentRegistry.from_yaml(demo, z_window=2)
    assert registry.labels == ["phase", "reporter"]
    assert registry.channel_maps == {"demo_30min": {0: 0, 1: 1}, "demo_15min": {0: 1, 1: 0}}
    assert {registry.plates[n].version for n in registry.names} == {"0.4", "0.5"}
    index = LineageIndex.build(registry, IndexConfig(patch_yx=(32, 32)), progress=False)
    summary = index.summary().set_index("experiment")
    manifest = json.loads((demo.parent / "manifest.json").read_text())
    assert [e["name"] for e in doc["experiments"]] == list(summary.index)
    for entry in manifest["experiments"]:
        s = summary.loc[entry["name"]]
        assert s.divisions > 0 and s.divisions == entry["divisions"] and s.tracks == entry["tracks"]
        assert s.single_daughter == 0 and s.valid_lineage > 0 and s.fovs == 4
        assert s.observations + s.dropped_outside + s.dropped_border == entry["observations"]
    assert summary.loc["demo_30min"].tau_frames == "1..4" and summary.loc["demo_15min"].tau_frames == "2..8"

    # the index's (truncated) read-box centres land inside the cores of their own cell
    tracks = index.tracks
    unshifted = ((tracks.y_clamp - tracks.y).abs() < 1) & ((tracks.x_clamp - tracks.x).abs() < 1)
    root = demo.parent
    checked = 0
    for exp in doc["experiments"]:
        for fov, array, _ in fovs_of(exp, root):
            rows = tracks[unshifted & (tracks.experiment == exp["name"]) & (tracks.fov_name == fov)]
            data = array.read().result()
            value = data[rows.t.to_numpy(), 0, 0, rows.y_clamp.to_numpy(), rows.x_clamp.to_numpy()]
            got_tid, got_t = decode(value)
            assert np.array_equal(got_tid, rows.track_id) and np.array_equal(got_t, rows.t)
            checked += len(rows)
    assert checked > 500


def test_patch_centres_decode_to_their_csv_rows_in_every_channel_and_z(demo):
    doc = collection(demo)
    labels = doc["channels"]
    root = demo.parent
    dy, dx = (a.ravel() for a in np.mgrid[-2:3, -2:3])
    in_core = dy ** 2 + dx ** 2 <= 4
    for exp in doc["experiments"]:
        plate = read_plate(str(root / exp["data_path"]))
        zarr_names = read_fov(plate, plate.fov_names[0]).channel_names
        label_of = {z: label for label, z in exp["channels"].items()}
        expected_channel = np.array([labels.index(label_of[z]) for z in zarr_names])
        n_rows = 0
        for fov, array, csv in fovs_of(exp, root):
            T, C, Z, H, W = array.shape
            y, x = np.rint(csv.y.to_numpy()).astype(int), np.rint(csv.x.to_numpy()).astype(int)
            # a 32 x 32 patch read at each centroid whose patch fits: its centre pixel names the row
            fits = np.flatnonzero((y >= 16) & (y <= H - 16) & (x >= 16) & (x <= W - 16))
            for r in fits[:: max(1, len(fits) // 15)]:
                patch = array[csv.t[r], :, :, y[r] - 16:y[r] + 16, x[r] - 16:x[r] + 16].read().result()
                centre = patch[:, :, 16, 16]  # (C, Z)
                got_tid, got_t = decode(centre)
                assert (got_tid == csv.track_id[r]).all() and (got_t == csv.t[r]).all()
                assert (decode_channel(centre) == expected_channel[:, None]).all()
            # every row: the whole core disk, in every channel and Z slice, holds its own code
            data = array.read().result()
            yy, xx = y[:, None] + dy[None], x[:, None] + dx[None]
            inside = in_core[None] & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            r_idx, k = np.nonzero(inside)
            values = data[csv.t.to_numpy()[r_idx], :, :, yy[r_idx, k], xx[r_idx, k]]  # (pixels, C, Z)
            got_tid, got_t = decode(values)
            assert (got_tid == csv.track_id.to_numpy()[r_idx, None, None]).all()
            assert (got_t == csv.t.to_numpy()[r_idx, None, None]).all()
            assert (decode_channel(values) == expected_channel[None, :, None]).all()
            n_rows += len(csv)
        assert n_rows > 300


def test_normalization_attributes_match_numpy_on_the_written_array(demo):
    doc = collection(demo)
    root = demo.parent
    for exp, fov, channel, t in ((doc["experiments"][0], "A/2/1", "GFP", 5), (doc["experiments"][1], "B/1/0", "BF", 9)):
        plate = root / exp["data_path"]
        c = read_fov(read_plate(str(plate)), fov).channel_names.index(channel)
        samples = {name: array.read().result()[:, c, :, ::32, ::32].astype(np.float64)
                   for name, array, _ in fovs_of(exp, root)}
        norm = zarr_attrs(plate, fov)["normalization"][channel]
        expect = {
            "timepoint_statistics": samples[fov][t],
            "fov_statistics": samples[fov],
            "dataset_statistics": np.concatenate([s.ravel() for s in samples.values()]),
        }
        for level, values in expect.items():
            got = norm[level][str(t)] if level == "timepoint_statistics" else norm[level]
            p1, p5, p25, p50, p75, p95, p99 = np.percentile(values, [1, 5, 25, 50, 75, 95, 99])
            want = dict(mean=values.mean(), std=values.std(), median=p50, iqr=p75 - p25, min=values.min(),
                        max=values.max(), p1=p1, p5=p5, p95=p95, p99=p99)
            for stat in STATS:
                assert got[stat] == pytest.approx(want[stat], rel=1e-9, abs=1e-9), (level, stat)
        assert sorted(norm["timepoint_statistics"], key=int) == [str(i) for i in range(12)]


def test_manifest_reports_a_realistic_compression_ratio(demo):
    manifest = json.loads((demo.parent / "manifest.json").read_text())
    for entry in manifest["experiments"]:
        assert 1.2 < entry["compression_ratio"] < 20
        on_disk = sum(f.stat().st_size for f in (demo.parent / f"{entry['name']}.zarr").rglob("*") if f.is_file())
        assert entry["bytes_on_disk"] == on_disk
        assert entry["bytes_decoded"] == 4 * 12 * 2 * 4 * 128 * 128 * 2
    assert manifest["spec"]["experiments"][1]["version"] == "0.4"
    assert manifest["divisions"] == sum(e["divisions"] for e in manifest["experiments"]) > 0


# ---------------------------------------------------------------------- determinism and atomic writes
def written(yaml_path: Path) -> tuple[bytes, np.ndarray]:
    root = yaml_path.parent
    csv = (root / "tiny_tracks" / "A/1/0" / "tracks.csv").read_bytes()
    return csv, open_array(root / "tiny.zarr", "A/1/0").read().result()


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = written(write_synthetic(tmp_path / "a", tiny_spec(seed=3)))
    b = written(write_synthetic(tmp_path / "b", tiny_spec(seed=3)))
    c = written(write_synthetic(tmp_path / "c", tiny_spec(seed=4)))
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
    assert a[0] != c[0] and not np.array_equal(a[1], c[1])


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "out"
    first = written(write_synthetic(out, tiny_spec(seed=0)))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_synthetic(out, tiny_spec(seed=1))
    assert written(out / "collection.yml")[0] == first[0]
    replaced = written(write_synthetic(out, tiny_spec(seed=1), overwrite=True))
    assert replaced[0] != first[0]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_interrupted_writers_leave_nothing_behind(tmp_path, monkeypatch):
    real = synthetic.render_frame
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_frame", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_synthetic(tmp_path / "out", tiny_spec())
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(KeyError):
        with PlateWriter(tmp_path / "plate.zarr", ["A"]) as plate:
            fov = plate.add_fov("A/1/0", (2, 1, 1, 8, 8), "uint16")
            fov.write(0, np.ones((1, 1, 8, 8), np.uint16))
            raise KeyError("stop")
    assert list(tmp_path.iterdir()) == []


def test_plate_writer_streams_frames_and_replaces_only_when_asked(tmp_path):
    path = tmp_path / "plate.zarr"
    data = np.arange(3 * 2 * 1 * 8 * 8, dtype=np.float32).reshape(3, 2, 1, 8, 8)
    for version in ("0.4", "0.5"):
        with PlateWriter(path, ["A", "B"], version=version, overwrite=True) as plate:
            fov = plate.add_fov("B/3/0", data.shape, "float32", {"note": 1})
            for t in range(3):
                fov.write(t, data[t])
            fov.attrs["later"] = 2  # attributes may change until the plate closes
        meta = read_fov(read_plate(str(path)), "B/3/0")
        assert meta.channel_names == ["A", "B"] and meta.attrs["note"] == 1 and meta.attrs["later"] == 2
        assert np.array_equal(open_array(path, "B/3/0").read().result(), data)
    with pytest.raises(FileExistsError):
        with PlateWriter(path, ["A", "B"]):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["plate.zarr"]
