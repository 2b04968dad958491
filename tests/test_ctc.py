"""CTC ground truth reader and sequence importer: the real Fluo-N2DH-SIM+ 02 sequence, tiny synthetic ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorstore as ts
import yaml

from dali_pipeline.datasets import ctc
from dali_pipeline.datasets.ctc import centroids_from_masks, ctc_tracks, import_ctc, read_man_track
from sampler import ExperimentRegistry, IndexConfig, LineageIndex
from sampler.plate import read_fov, read_plate

CTC = Path(__file__).resolve().parents[2] / "shared" / "data" / "ctc"
SEQ = CTC / "Fluo-N2DH-SIM+_02"
GT = CTC / "Fluo-N2DH-SIM+_02_GT"


@pytest.fixture(scope="module")
def tracks() -> pd.DataFrame:
    if not (GT / "TRA" / "man_track.txt").is_file():
        pytest.skip(f"CTC data not found at {CTC} (expects Fluo-N2DH-SIM+_02_GT/TRA/man_track.txt)")
    return ctc_tracks(GT)


def per_track(tracks: pd.DataFrame) -> pd.DataFrame:
    """One row per track: first frame B, last frame E, parent (independent of the reader's layout)."""
    return tracks.groupby("track_id").agg(B=("t", "min"), E=("t", "max"), parent=("parent_track_id", "first"))


def test_real_sequence_counts(tracks):
    assert list(tracks.columns) == ["track_id", "t", "parent_track_id"]
    assert all(tracks[c].dtype == np.int64 for c in tracks.columns)
    assert len(tracks) == 3371
    assert not tracks.duplicated(["track_id", "t"]).any()
    assert tracks.equals(tracks.sort_values(["track_id", "t"]).reset_index(drop=True))

    tr = per_track(tracks)
    assert len(tr) == 107
    assert (tr.E - tr.B + 1).sum() == len(tracks)  # contiguous rows B..E per track
    assert (tr.parent != -1).sum() == 90
    assert (tr.parent == -1).sum() == 17  # lineages: root tracks
    daughters = tr.parent[tr.parent != -1].value_counts()
    assert (daughters == 2).sum() == 44  # divisions
    assert (daughters == 1).sum() == 2
    assert daughters.max() <= 2


def test_real_sequence_daughters_start_after_mother_ends(tracks):
    tr = per_track(tracks)
    kids = tr[tr.parent != -1]
    assert kids.parent.isin(tr.index).all()
    np.testing.assert_array_equal(kids.B.to_numpy(), tr.E.loc[kids.parent].to_numpy() + 1)


def test_real_centroids_match_numpy(tracks):
    tifffile = pytest.importorskip("tifffile")
    subset = tracks[tracks.t <= 2]
    out = centroids_from_masks(GT / "TRA", subset)
    assert out.attrs["dropped_no_pixels"] == 0
    assert len(out) == len(subset)
    assert out.y.dtype == np.float64 and out.x.dtype == np.float64
    pd.testing.assert_frame_equal(out[["track_id", "t", "parent_track_id"]], subset.reset_index(drop=True))

    label, t = 4, 1
    mask = tifffile.imread(GT / "TRA" / f"man_track{t:03d}.tif")
    expected = np.argwhere(mask == label).mean(0)
    got = out.loc[(out.track_id == label) & (out.t == t), ["y", "x"]].to_numpy()
    assert got.shape == (1, 2)
    np.testing.assert_allclose(got[0], expected)


def test_centroids_drop_labels_missing_from_frame(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    m0 = np.zeros((6, 8), np.uint16)
    m0[1:3, 2:4] = 1  # centroid (1.5, 2.5)
    m0[4, 6] = 2
    m1 = np.zeros_like(m0)
    m1[5, 0] = 1  # label 2 absent: a gap
    tifffile.imwrite(tmp_path / "man_track000.tif", m0)
    tifffile.imwrite(tmp_path / "man_track001.tif", m1)
    tracks = pd.DataFrame({"track_id": [1, 1, 2, 2, 9], "t": [0, 1, 0, 1, 0], "parent_track_id": -1})

    out = centroids_from_masks(tmp_path, tracks)
    assert out.attrs["dropped_no_pixels"] == 2  # label 2 at t=1, label 9 never drawn
    assert out[["track_id", "t"]].values.tolist() == [[1, 0], [1, 1], [2, 0]]
    np.testing.assert_allclose(out[["y", "x"]].to_numpy(), [[1.5, 2.5], [5.0, 0.0], [4.0, 6.0]])


def test_read_man_track_rows_and_parents(tmp_path):
    f = tmp_path / "man_track.txt"
    f.write_text("3 2 3 1\n1 0 1 0\n\n")
    df = read_man_track(f)
    assert df.values.tolist() == [[1, 0, -1], [1, 1, -1], [3, 2, 1], [3, 3, 1]]


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("1 0 4 0\n2 5 6\n", 2, "exactly 4 integers"),
        ("1 0 4 0\n2 5 x 1\n", 2, "exactly 4 integers"),
        ("1 0 4 0\n2 7 6 1\n", 2, "B > E"),
        ("1 0 4 0\n2 5 6 1\n1 5 6 0\n", 3, "already defined on line 1"),
        ("1 0 4 0\n2 5 6 7\n", 2, "parent label 7"),
    ],
    ids=["field_count", "not_integer", "B_gt_E", "duplicate_label", "unknown_parent"],
)
def test_read_man_track_validation(tmp_path, text, line, needle):
    f = tmp_path / "man_track.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=f"line {line}: ") as err:
        read_man_track(f)
    assert str(f) in str(err.value)
    assert needle in str(err.value)


# ---------------------------------------------------------------------- importer: helpers
STATS = ("mean", "std", "median", "iqr", "min", "max", "p1", "p5", "p95", "p99")


def numpy_stats(values: np.ndarray) -> dict[str, float]:
    """The statistics of one normalization level, computed here independently of the importer."""
    v = np.asarray(values, dtype=np.float64).ravel()
    p1, p5, p25, p50, p75, p95, p99 = np.percentile(v, [1, 5, 25, 50, 75, 95, 99])
    return dict(mean=v.mean(), std=v.std(), median=p50, iqr=p75 - p25, min=v.min(), max=v.max(),
                p1=p1, p5=p5, p95=p95, p99=p99)


def assert_stats(got: dict, expected: dict) -> None:
    for k in STATS:
        assert got[k] == pytest.approx(expected[k], rel=1e-9, abs=1e-9), k


def open_array(plate: Path, fov: str = "A/1/0") -> ts.TensorStore:
    meta = read_fov(read_plate(str(plate)), fov)
    driver = "zarr3" if meta.array.zarr_format == 3 else "zarr"
    return ts.open({"driver": driver, "kvstore": meta.array.url}).result()


def fov_attrs(plate: Path, fov: str = "A/1/0") -> dict:
    return read_fov(read_plate(str(plate)), fov).attrs


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary folders (atomic writes) left in `folder`."""
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def build_index(yaml_path: Path, patch: int = 32) -> LineageIndex:
    registry = ExperimentRegistry.from_yaml(yaml_path)
    config = IndexConfig(patch_yx=(patch, patch), max_border_shift=patch // 2)
    return LineageIndex.build(registry, config, progress=False)


# ---------------------------------------------------------------------- importer: the real sequence
@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """The real sequence imported once for the module (a few seconds); its collection YAML."""
    if not ((SEQ / "t000.tif").is_file() and (GT / "TRA" / "man_track.txt").is_file()):
        pytest.skip(f"CTC data not found at {CTC} (expects Fluo-N2DH-SIM+_02/tNNN.tif and "
                    "Fluo-N2DH-SIM+_02_GT/TRA): the importer's real-data tests need ../shared/data/ctc")
    pytest.importorskip("tifffile")
    return import_ctc(SEQ, tmp_path_factory.mktemp("ctc_import") / "sim02", interval_minutes=30, progress=False)


def test_real_import_layout_and_manifest(imported):
    root = imported.parent
    assert imported.name == "collection.yml"
    doc = yaml.safe_load(imported.read_text())
    assert doc == {
        "name": "Fluo-N2DH-SIM+_02", "channels": ["nuclei"],
        "experiments": [{
            "name": "Fluo-N2DH-SIM+_02", "data_path": "Fluo-N2DH-SIM+_02.zarr", "tracks_path": "tracks",
            "channels": {"nuclei": "nuclei"}, "perturbation_wells": {"none": ["A/1"]},
            "interval_minutes": 30.0, "start_hpi": 0.0,
        }],
    }
    assert sorted(os.listdir(root)) == [".dynaclr-dali.json", "Fluo-N2DH-SIM+_02.zarr", "collection.yml",
                                        "manifest.json", "tracks"]  # the marker lets a later overwrite replace it
    assert read_plate(str(root / "Fluo-N2DH-SIM+_02.zarr")).fov_names == ["A/1/0"]
    m = json.loads((root / "manifest.json").read_text())
    assert (m["frames"], m["tracks"], m["observations"], m["divisions"], m["single_daughter_mothers"],
            m["lineages"], m["dropped_no_pixels"]) == (150, 107, 3371, 44, 2, 17, 0)
    assert m["shape"] == [150, 1, 1, 773, 739] and m["dtype"] == "uint16"
    assert m["source"]["man_track"] == str(GT / "TRA" / "man_track.txt")
    assert m["source"]["sequence_dir"] == str(SEQ)
    assert m["bytes_decoded"] == 150 * 773 * 739 * 2
    assert m["compression_ratio"] == pytest.approx(m["bytes_decoded"] / m["bytes_on_disk"])
    assert m["compression_ratio"] > 1


def test_real_import_builds_registry_and_index(imported):
    index = build_index(imported, patch=32)
    s = index.summary().iloc[0]
    assert (s.tracks, s.observations, s.lineages, s.divisions, s.single_daughter) == (107, 3371, 17, 44, 2)
    assert s.dropped_outside == 0 and s.dropped_border == 0
    assert s.valid_lineage > 0


def test_real_import_tracks_match_man_track(imported):
    csv = pd.read_csv(imported.parent / "tracks" / "A" / "1" / "0" / "tracks.csv")
    assert list(csv.columns) == ["track_id", "t", "y", "x", "parent_track_id", "id"]
    assert len(csv) == 3371 and csv.id.tolist() == list(range(len(csv)))
    assert not csv.duplicated(["track_id", "t"]).any()
    man = pd.DataFrame(np.loadtxt(GT / "TRA" / "man_track.txt", dtype=np.int64, ndmin=2),
                       columns=["L", "B", "E", "P"]).set_index("L")
    assert set(csv.track_id) == set(man.index)
    B, E = man.B.loc[csv.track_id].to_numpy(), man.E.loc[csv.track_id].to_numpy()
    assert ((B <= csv.t.to_numpy()) & (csv.t.to_numpy() <= E)).all()
    assert len(csv) == (man.E - man.B + 1).sum()  # every frame of every track (no label without pixels)
    parent = csv.groupby("track_id").parent_track_id.agg(["min", "max"])
    assert (parent["min"] == parent["max"]).all()
    man_parent = man.P.loc[parent.index].to_numpy()
    np.testing.assert_array_equal(parent["min"].to_numpy(), np.where(man_parent == 0, -1, man_parent))
    assert ((csv.y >= 0) & (csv.y <= 772) & (csv.x >= 0) & (csv.x <= 738)).all()


def test_real_import_pixels_equal_the_tif_frames(imported):
    tifffile = pytest.importorskip("tifffile")
    array = open_array(imported.parent / "Fluo-N2DH-SIM+_02.zarr")
    assert array.shape == (150, 1, 1, 773, 739) and array.dtype.numpy_dtype == np.uint16
    for t in (0, 4, 77, 149):
        np.testing.assert_array_equal(array[t, 0, 0].read().result(), tifffile.imread(SEQ / f"t{t:03d}.tif"))


def test_real_import_normalization_matches_numpy(imported):
    tifffile = pytest.importorskip("tifffile")
    norm = fov_attrs(imported.parent / "Fluo-N2DH-SIM+_02.zarr")["normalization"]
    assert list(norm) == ["nuclei"]
    levels = norm["nuclei"]
    assert sorted(levels["timepoint_statistics"], key=int) == [str(t) for t in range(150)]
    for t in (0, 63, 149):
        grid = tifffile.imread(SEQ / f"t{t:03d}.tif")[::32, ::32]
        assert grid.shape == (25, 24)
        assert_stats(levels["timepoint_statistics"][str(t)], numpy_stats(grid))
    # the FOV level covers every frame's grid; one FOV, so the dataset level is the same
    grid = open_array(imported.parent / "Fluo-N2DH-SIM+_02.zarr")[:, 0, 0, ::32, ::32].read().result()
    assert_stats(levels["fov_statistics"], numpy_stats(grid))
    assert_stats(levels["dataset_statistics"], numpy_stats(grid))


def test_real_import_refuses_to_overwrite(imported):
    root = imported.parent
    before = {p: p.stat().st_mtime_ns for p in root.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        import_ctc(SEQ, root, interval_minutes=30, progress=False)
    assert {p: p.stat().st_mtime_ns for p in root.iterdir()} == before


def test_real_import_interrupted_leaves_nothing(imported, tmp_path, monkeypatch):
    tifffile = pytest.importorskip("tifffile")
    real = tifffile.imread
    reads: list[str] = []

    def failing(path, *args, **kwargs):
        name = Path(path).name
        if name.startswith("t"):
            reads.append(name)
            if len(reads) == 5:
                raise OSError(f"simulated read failure at {name}")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tifffile, "imread", failing)
    with pytest.raises(OSError, match="simulated read failure at t004.tif"):
        import_ctc(SEQ, tmp_path / "out", interval_minutes=30, progress=False)
    assert reads == [f"t{t:03d}.tif" for t in range(5)]
    assert os.listdir(tmp_path) == []  # no destination, no temporary folder


# ---------------------------------------------------------------------- importer: tiny synthetic sequences
TINY_TRACKS = "1 0 1 0\n2 2 3 1\n3 2 3 1\n4 0 3 0\n"  # 1 divides into 2 and 3; 4 is alone
#: label -> {t: (y0, x0)} of a 3x3 square; label 4 has no pixels at t=3 (a CTC gap)
TINY_SPOTS = {1: {0: (10, 10), 1: (11, 12)}, 2: {2: (8, 20), 3: (9, 21)}, 3: {2: (16, 20), 3: (17, 22)},
              4: {0: (26, 34), 1: (27, 33), 2: (28, 32)}}


def make_sequence(root: Path, n_t: int = 4, shape: tuple[int, int] = (40, 48), tracks: str = TINY_TRACKS,
                  seed: int = 0) -> Path:
    """A tiny CTC sequence `root/seq` + `root/seq_GT/TRA`: random uint16 frames and square label masks."""
    tifffile = pytest.importorskip("tifffile")
    seq, tra = root / "seq", root / "seq_GT" / "TRA"
    seq.mkdir(parents=True)
    tra.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for t in range(n_t):
        tifffile.imwrite(seq / f"t{t:03d}.tif", rng.integers(0, 4000, shape, dtype=np.uint16))
        mask = np.zeros(shape, np.uint16)
        for label, spots in TINY_SPOTS.items():
            if t in spots:
                y0, x0 = spots[t]
                mask[y0:y0 + 3, x0:x0 + 3] = label
        tifffile.imwrite(tra / f"man_track{t:03d}.tif", mask)
    (tra / "man_track.txt").write_text(tracks)
    return seq


def test_tiny_import_tracks_pixels_stats_and_index(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    seq = make_sequence(tmp_path)
    yml = import_ctc(seq, tmp_path / "out", name="tiny", channel="H2B", interval_minutes=15, progress=False)
    assert yml == tmp_path / "out" / "collection.yml"
    doc = yaml.safe_load(yml.read_text())
    assert doc["channels"] == ["H2B"] and doc["experiments"][0]["channels"] == {"H2B": "H2B"}
    assert doc["experiments"][0]["interval_minutes"] == 15.0

    csv = pd.read_csv(tmp_path / "out" / "tracks" / "A" / "1" / "0" / "tracks.csv")
    expected = sorted((label, t, y0 + 1.0, x0 + 1.0, 1 if label in (2, 3) else -1)
                      for label, spots in TINY_SPOTS.items() for t, (y0, x0) in spots.items())
    assert csv[["track_id", "t", "y", "x", "parent_track_id"]].values.tolist() == [list(r) for r in expected]
    assert csv.id.tolist() == list(range(9))

    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (m["tracks"], m["observations"], m["observations_in_man_track"], m["dropped_no_pixels"],
            m["divisions"], m["lineages"], m["frames"]) == (4, 9, 10, 1, 1, 2, 4)

    plate = tmp_path / "out" / "tiny.zarr"
    array = open_array(plate)
    assert array.shape == (4, 1, 1, 40, 48) and array.dtype.numpy_dtype == np.uint16
    frames = np.stack([tifffile.imread(seq / f"t{t:03d}.tif") for t in range(4)])
    np.testing.assert_array_equal(array[:, 0, 0].read().result(), frames)
    norm = fov_attrs(plate)["normalization"]["H2B"]
    for t in range(4):
        assert_stats(norm["timepoint_statistics"][str(t)], numpy_stats(frames[t, ::32, ::32]))
    assert_stats(norm["fov_statistics"], numpy_stats(frames[:, ::32, ::32]))
    assert read_fov(read_plate(str(plate)), "A/1/0").channel_names == ["H2B"]

    s = build_index(yml, patch=8).summary().iloc[0]
    assert (s.tracks, s.observations, s.lineages, s.divisions) == (4, 9, 2, 1)


@pytest.mark.parametrize(("version", "chunks", "shards"), [
    ("0.4", (1, 1, 1, 16, 16), None),
    ("0.5", (1, 1, 1, 16, 16), (2, 1, 1, 32, 32)),
], ids=["ngff04", "ngff05_sharded"])
def test_tiny_import_versions_and_chunking(tmp_path, version, chunks, shards):
    tifffile = pytest.importorskip("tifffile")
    seq = make_sequence(tmp_path)
    yml = import_ctc(seq, tmp_path / "out", version=version, chunks=chunks, shards=shards, interval_minutes=30, progress=False)
    plate = yml.parent / "seq.zarr"
    assert read_plate(str(plate)).version == version
    array = open_array(plate)
    for t in range(4):
        np.testing.assert_array_equal(array[t, 0, 0].read().result(), tifffile.imread(seq / f"t{t:03d}.tif"))
    assert build_index(yml, patch=8).summary().iloc[0].observations == 9


def test_tiny_import_overwrites_only_when_asked(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    seq = make_sequence(tmp_path)
    out = tmp_path / "out"
    import_ctc(seq, out, interval_minutes=30, progress=False)
    frame = np.full((40, 48), 7, np.uint16)
    tifffile.imwrite(seq / "t002.tif", frame)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        import_ctc(seq, out, interval_minutes=30, progress=False)
    assert open_array(out / "seq.zarr")[2, 0, 0].read().result().max() > 7  # untouched
    import_ctc(seq, out, overwrite=True, interval_minutes=30, progress=False)
    np.testing.assert_array_equal(open_array(out / "seq.zarr")[2, 0, 0].read().result(), frame)
    assert leftovers(tmp_path) == []


def _rewrite(path: Path, data: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, data)


@pytest.mark.parametrize(("break_it", "error", "needles"), [
    (lambda seq: _rewrite(seq / "t002.tif", np.zeros((2, 40, 48), np.uint16)),
     ValueError, ["t002.tif", "2-D"]),
    (lambda seq: _rewrite(seq / "t002.tif", np.zeros((40, 47), np.uint16)),
     ValueError, ["t002.tif", "(40, 47)", "(40, 48)"]),
    (lambda seq: _rewrite(seq / "t003.tif", np.zeros((40, 48), np.uint8)),
     ValueError, ["t003.tif", "uint8", "uint16"]),
    (lambda seq: (seq / "t003.tif").unlink(),
     FileNotFoundError, ["t003.tif", "missing", "up to frame 3"]),
    (lambda seq: (seq / "t001.tif").unlink(),
     FileNotFoundError, ["1 raw frame(s) missing: t001.tif"]),
    (lambda seq: [p.unlink() for p in seq.glob("t*.tif")],
     FileNotFoundError, ["no raw frames"]),
    (lambda seq: (seq / "t002.tif").write_bytes(b"not a tiff"),
     ValueError, ["t002.tif", "cannot read"]),
    (lambda seq: _rewrite(seq.parent / "seq_GT" / "TRA" / "man_track001.tif", np.zeros((40, 40), np.uint16)),
     ValueError, ["man_track001.tif", "(40, 40)", "(40, 48)"]),
    (lambda seq: (seq.parent / "seq_GT" / "TRA" / "man_track002.tif").unlink(),
     FileNotFoundError, ["man_track002.tif"]),
    (lambda seq: (seq.parent / "seq_GT" / "TRA" / "man_track.txt").unlink(),
     FileNotFoundError, ["man_track.txt"]),
    (lambda seq: (seq.parent / "seq_GT" / "TRA" / "man_track.txt").write_text("1 0 3 0\n2 1 2 5\n"),
     ValueError, ["man_track.txt, line 2", "parent label 5"]),
], ids=["frame_not_2d", "frame_shape", "frame_dtype", "frames_short_of_man_track", "frame_gap", "no_frames",
        "frame_not_tiff", "mask_shape", "mask_missing", "no_man_track", "bad_man_track"])
def test_tiny_import_validation_errors(tmp_path, break_it, error, needles):
    seq = make_sequence(tmp_path)
    break_it(seq)
    with pytest.raises(error) as err:
        import_ctc(seq, tmp_path / "out", interval_minutes=30, progress=False)
    for needle in needles:
        assert needle in str(err.value)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_tiny_import_needs_the_sibling_gt_folder(tmp_path):
    seq = make_sequence(tmp_path)
    (tmp_path / "seq_GT").rename(tmp_path / "elsewhere_GT")
    with pytest.raises(FileNotFoundError, match="seq_GT") as err:
        import_ctc(seq, tmp_path / "out", interval_minutes=30, progress=False)
    assert "ground-truth folder not found" in str(err.value)
    with pytest.raises(FileNotFoundError, match="CTC sequence folder not found"):
        import_ctc(tmp_path / "nope", tmp_path / "out", interval_minutes=30, progress=False)
    assert not (tmp_path / "out").exists()


def test_tiny_import_rejects_bad_arguments(tmp_path):
    seq = make_sequence(tmp_path)
    for kwargs, needle in [
        (dict(name="a/b"), "plain file name"), (dict(interval_minutes=0), "positive"),
        (dict(version="0.3"), "version"), (dict(version="0.4", shards=(1, 1, 1, 40, 48)), "shards"),
    ]:
        with pytest.raises(ValueError, match=needle):
            import_ctc(seq, tmp_path / "out", progress=False, **{"interval_minutes": 30, **kwargs})
    assert not (tmp_path / "out").exists()


def test_tiny_import_failure_while_streaming_removes_everything(tmp_path, monkeypatch):
    seq = make_sequence(tmp_path)
    tifffile = pytest.importorskip("tifffile")
    real = tifffile.imread

    def failing(path, *args, **kwargs):
        if Path(path).name == "t002.tif":
            raise OSError("disk gone")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tifffile, "imread", failing)
    with pytest.raises(OSError, match="disk gone"):
        import_ctc(seq, tmp_path / "out", interval_minutes=30, progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_frame_numbers_with_four_digits(tmp_path):
    seq = tmp_path / "seq"
    seq.mkdir()
    for t in (0, 1, 3):
        (seq / f"t{t:04d}.tif").write_bytes(b"")
    found, digits = ctc._frame_files(seq)
    assert digits == 4 and sorted(found) == [0, 1, 3]
    with pytest.raises(FileNotFoundError, match="t0002.tif, t0004.tif"):
        ctc._check_frame_numbers(seq, found, digits, last_tracked=4)
