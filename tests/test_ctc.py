"""CTC ground truth reader: counts on the real Fluo-N2DH-SIM+ 02 sequence, centroids, file validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dali_pipeline.datasets.ctc import centroids_from_masks, ctc_tracks, read_man_track

CTC = Path(__file__).resolve().parents[2] / "shared" / "data" / "ctc"
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
