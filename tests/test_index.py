"""LineageIndex on hand-built lineages: lineage ids, borders, policies, channels, norm, persistence."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from builders import known_norm, make_experiment, track_rows, tracks_table, write_collection
from sampler import ExperimentRegistry, IndexConfig, LineageIndex, make_plan

PATCH = IndexConfig(patch_yx=(32, 32))


def family() -> pd.DataFrame:
    """1 divides into 2 (long) and 3 (short); 4 alone; 5 has one daughter 6; 7's parent 99 is absent."""
    return tracks_table(
        track_rows(1, range(0, 5)),
        track_rows(2, range(5, 10), parent=1),
        track_rows(3, range(5, 7), parent=1),
        track_rows(4, range(0, 10)),
        track_rows(5, range(0, 4)),
        track_rows(6, range(4, 10), parent=5),
        track_rows(7, range(0, 3), parent=99),
    )


def build(tmp_path, tracks=None, config=PATCH, **kw) -> LineageIndex:
    e = make_experiment(tmp_path, "exp", {"A/1/0": family() if tracks is None else tracks}, ["P", "G"],
                        {"p": "P", "g": "G"}, **kw)
    return LineageIndex.build(ExperimentRegistry.from_yaml(write_collection(tmp_path, [e])), config, progress=False)


def row_of(index, track_id, t):
    tr = index.tracks
    hit = np.flatnonzero((tr.track_id == track_id).to_numpy() & (tr.t == t).to_numpy())
    assert len(hit) == 1
    return int(hit[0])


def test_lineage_ids_follow_parents_inside_the_fov(tmp_path):
    index = build(tmp_path)
    lin = index.tracks.groupby("track_id").lineage_id.first().astype(str).to_dict()
    assert lin == {1: "exp_A/1/0_1", 2: "exp_A/1/0_1", 3: "exp_A/1/0_1", 4: "exp_A/1/0_4",
                   5: "exp_A/1/0_5", 6: "exp_A/1/0_5", 7: "exp_A/1/0_7"}
    gtid = index.tracks.groupby("track_id").global_track_id.first().astype(str)
    assert gtid[3] == "exp_A/1/0_3"
    s = index.summary().iloc[0]
    assert (s.tracks, s.lineages, s.divisions, s.single_daughter, s.observations) == (7, 4, 1, 1, 35)


def test_positives_cross_divisions_and_ancestry_excludes_sisters(tmp_path):
    lineage = build(tmp_path)
    ancestry = lineage.with_policy("ancestry")
    # mother's last frame: daughters 2 and 3 are both positives under either policy
    mother = row_of(lineage, 1, 4)
    got = {}
    for index in (lineage, ancestry):
        pos = make_plan(index, np.full(4000, mother), np.random.default_rng(1)).positive_rows
        got[index.config.positive_policy] = set(index.tracks.track_id.to_numpy()[pos])
    assert got == {"lineage": {2, 3}, "ancestry": {2, 3}}
    # the short daughter at t=5: its sister 2 is a candidate at t=7.. under "lineage" only
    short = row_of(lineage, 3, 5)
    pos_l = make_plan(lineage, np.full(4000, short), np.random.default_rng(2)).positive_rows
    pos_a = make_plan(ancestry, np.full(4000, short), np.random.default_rng(2))
    assert set(lineage.tracks.track_id.to_numpy()[pos_l]) == {2, 3}
    assert set(ancestry.tracks.track_id.to_numpy()[pos_a.positive_rows]) == {3}
    assert set(pos_a.tau) == {1}
    # its last frame has only the sister ahead: valid under "lineage", not under "ancestry"
    last = row_of(lineage, 3, 6)
    assert last in lineage.valid and last not in ancestry.valid
    with pytest.raises(ValueError, match="no positive under policy 'ancestry'"):
        make_plan(ancestry, np.array([last]), np.random.default_rng(0))


def test_single_daughter_and_absent_parent(tmp_path):
    index = build(tmp_path)
    pos = make_plan(index, np.full(500, row_of(index, 5, 3)), np.random.default_rng(0)).positive_rows
    assert set(index.tracks.track_id.to_numpy()[pos]) == {6}
    # a track whose parent is absent is its own root, valid while it has a future
    assert row_of(index, 7, 1) in index.valid and row_of(index, 7, 2) not in index.valid


def test_valid_anchors_need_a_future_within_tau(tmp_path):
    index = build(tmp_path)  # 30 min interval: tau in 1..4
    tr = index.tracks.iloc[index.valid]
    by_track = tr.groupby("track_id").t.agg(["min", "max"]).to_dict("index")
    assert by_track[4] == {"min": 0, "max": 8}
    assert by_track[2] == {"min": 5, "max": 8}
    assert by_track[1] == {"min": 0, "max": 4}


def test_cycle_is_an_error_naming_its_tracks(tmp_path):
    tracks = tracks_table(track_rows(1, range(3), parent=3), track_rows(2, range(3), parent=1),
                          track_rows(3, range(3), parent=2), track_rows(4, range(3)))
    with pytest.raises(ValueError, match=r"FOV A/1/0: parent_track_id links form a cycle through tracks \[1, 2, 3\]"):
        build(tmp_path, tracks)


def test_self_parent_is_a_cycle(tmp_path):
    with pytest.raises(ValueError, match=r"cycle through tracks \[5\]"):
        build(tmp_path, tracks_table(track_rows(5, range(3), parent=5)))


@pytest.mark.parametrize(
    "shift, expected",
    [
        # quarter patch (8 px): a shift of exactly 8 is kept, 8.5 is dropped
        (None, {8.0: 16, 56.0: 48, 16.0: 16, 15.9: 16, 48.0: 48, 48.1: 48, 20.0: 20}),
        # 0: only patches fully inside the image
        (0, {16.0: 16, 48.0: 48, 20.0: 20}),
    ],
)
def test_border_clamp_and_drop_exactly_at_max_shift(tmp_path, shift, expected):
    ys = [8.0, 7.5, 56.0, 56.5, 16.0, 15.9, 48.0, 48.1, 20.0, -1.0, 64.0]
    tracks = tracks_table(*[track_rows(i, range(2), y=y) for i, y in enumerate(ys)])
    index = build(tmp_path, tracks, IndexConfig(patch_yx=(32, 32), max_border_shift=shift))
    got = dict(zip(index.tracks.y.to_numpy().tolist(), index.tracks.y_clamp.to_numpy().tolist()))
    assert got == expected
    fov = index.fovs.iloc[0]
    assert fov.dropped_outside == 4  # y=-1 and y=64, two rows each
    assert fov.dropped_border == 2 * (len(ys) - 2 - len(expected))
    boxes = make_plan(index, np.arange(len(index)), None, predict=True).anchor_boxes
    assert (boxes.y == index.tracks.y_clamp.to_numpy() - 16).all()
    assert boxes.y.min() >= 0 and (boxes.y + 32).max() <= 64


def test_two_experiments_keep_their_own_clock_and_lineages(tmp_path):
    a = make_experiment(tmp_path, "a", {"A/1/0": family()}, ["P"], {"p": "P"}, interval_minutes=30)
    b = make_experiment(tmp_path, "b", {"A/1/0": family()}, ["P"], {"p": "P"}, interval_minutes=15, start_hpi=2.0)
    index = LineageIndex.build(ExperimentRegistry.from_yaml(write_collection(tmp_path, [a, b])), PATCH,
                               progress=False)
    assert index.experiments.set_index("name")[["tau_min", "tau_max"]].to_dict("index") == {
        "a": {"tau_min": 1, "tau_max": 4}, "b": {"tau_min": 2, "tau_max": 8}}
    tr = index.tracks
    hpi_b = tr[tr.experiment == "b"]
    np.testing.assert_allclose(hpi_b.hours_post_perturbation, 2.0 + hpi_b.t * 0.25)
    plan = make_plan(index, np.repeat(index.valid, 20), np.random.default_rng(3))
    exp_a = tr.experiment.to_numpy()[plan.anchor_rows]
    assert (exp_a == tr.experiment.to_numpy()[plan.positive_rows]).all()
    assert (tr.lineage_id.to_numpy()[plan.anchor_rows] == tr.lineage_id.to_numpy()[plan.positive_rows]).all()
    tau_a, tau_b = plan.tau[exp_a == "a"], plan.tau[exp_a == "b"]
    assert tau_a.min() >= 1 and tau_a.max() <= 4 and tau_b.min() >= 2 and tau_b.max() <= 8
    assert set(tau_b) > set(range(2, 5))
    dt = tr.t.to_numpy()[plan.positive_rows] - tr.t.to_numpy()[plan.anchor_rows]
    assert (dt == plan.tau).all()


def test_norm_stats_per_row_and_channel_in_canonical_order(tmp_path):
    a = make_experiment(tmp_path, "a", {"A/1/0": family()}, ["Phase3D", "GFP"], {"p": "Phase3D", "g": "GFP"})
    b = make_experiment(tmp_path, "b", {"A/1/0": family()}, ["GFP-long", "BF"], {"p": "BF", "g": "GFP-long"})
    path = write_collection(tmp_path, [a, b], labels=["p", "g"])
    index = LineageIndex.build(ExperimentRegistry.from_yaml(path), PATCH, progress=False)
    names = {"a": ["Phase3D", "GFP"], "b": ["BF", "GFP-long"]}
    expected = np.array([[known_norm(n, t) for n in names[e]]
                         for e, t in zip(index.tracks.experiment.astype(str), index.tracks.t)])
    np.testing.assert_allclose(index.norm, expected)
    assert index.norm.dtype == np.float32 and index.norm.shape == (len(index), 2, 2)
    plan = make_plan(index, index.valid[:5], np.random.default_rng(0))
    np.testing.assert_array_equal(plan.anchor_norm, index.norm[plan.anchor_rows])
    assert (plan.anchor_boxes.channels == np.where(index.tracks.experiment.to_numpy()[plan.anchor_rows, None] == "a",
                                                   [[0, 1]], [[1, 0]])).all()
    fov_level = LineageIndex.build(ExperimentRegistry.from_yaml(path),
                                   IndexConfig(patch_yx=(32, 32), norm_level="fov_statistics", norm_divisor="iqr"),
                                   progress=False)
    assert (fov_level.norm == np.array([50.0, 3.0], np.float32)).all()


def test_missing_norm_stats_name_fov_channel_and_t(tmp_path):
    with pytest.raises(ValueError, match=r"Experiment 'exp', FOV A/1/0: normalization statistics "
                                         r"timepoint_statistics/mean,std missing for channel 'g' \(zarr channel 'G'\) at t=0"):
        build(tmp_path, with_norm=False)


def test_no_normalization_level(tmp_path):
    index = build(tmp_path, config=IndexConfig(patch_yx=(32, 32), norm_level=None), with_norm=False)
    assert (index.norm == np.array([0.0, 1.0], np.float32)).all()


def test_bag_of_channels_rows_per_label_with_well_limits(tmp_path):
    e = make_experiment(tmp_path, "a", {"A/1/0": family(), "B/1/0": family()}, ["P", "G"],
                        [{"name": "P", "marker": "phase"}, {"name": "G", "marker": "gfp", "wells": ["A/1"]}])
    reg = ExperimentRegistry.from_yaml(write_collection(tmp_path, [e]))
    with pytest.raises(ValueError, match=r"labels \['gfp'\] are limited to other wells"):
        LineageIndex.build(reg, PATCH, progress=False)
    index = LineageIndex.build(reg, IndexConfig(patch_yx=(32, 32), channel_mode="bag"), progress=False)
    tr = index.tracks
    counts = tr.groupby(["fov_name", "marker"], observed=True).size().to_dict()
    assert counts == {("A/1/0", "phase"): 35, ("A/1/0", "gfp"): 35, ("B/1/0", "phase"): 35}
    assert (index.channel_indices(np.arange(len(tr)))[:, 0] == np.where(tr.marker == "gfp", 1, 0)).all()
    np.testing.assert_allclose(
        index.norm[:, 0], [known_norm("G" if m == "gfp" else "P", t) for m, t in zip(tr.marker, tr.t)])
    plan = make_plan(index, np.repeat(index.valid, 5), np.random.default_rng(0))
    assert (tr.marker.to_numpy()[plan.anchor_rows] == tr.marker.to_numpy()[plan.positive_rows]).all()
    assert plan.anchor_norm.shape == (len(plan), 1, 2)


def test_all_channels_mode_needs_every_label(tmp_path):
    a = make_experiment(tmp_path, "a", {"A/1/0": family()}, ["P", "G"], {"p": "P", "g": "G"})
    b = make_experiment(tmp_path, "b", {"A/1/0": family()}, ["P"], {"p": "P"})
    reg = ExperimentRegistry.from_yaml(write_collection(tmp_path, [a, b]))
    with pytest.raises(ValueError, match=r"Experiment 'b' maps no zarr channel to labels \['g'\]"):
        LineageIndex.build(reg, PATCH, progress=False)
    bag = LineageIndex.build(reg, IndexConfig(patch_yx=(32, 32), channel_mode="bag"), progress=False)
    assert set(bag.tracks[bag.tracks.experiment == "b"].marker) == {"p"}


def test_batch_dtype_promotion(tmp_path):
    a = make_experiment(tmp_path, "a", {"A/1/0": family()}, ["P"], {"p": "P"}, dtype="uint8")
    b = make_experiment(tmp_path, "b", {"A/1/0": family()}, ["P"], {"p": "P"}, dtype="uint16")
    c = make_experiment(tmp_path, "c", {"A/1/0": family()}, ["P"], {"p": "P"}, dtype="float32")
    def dtype(*exps):
        path = write_collection(tmp_path, list(exps))
        return LineageIndex.build(ExperimentRegistry.from_yaml(path), PATCH, progress=False).batch_dtype
    assert dtype(a, b) == np.uint16
    assert dtype(a, b, c) == np.float32
    assert dtype(a) == np.uint8


@pytest.mark.parametrize(
    "csv, match",
    [
        ("track_id,t,y,x\n1,0,5,5\n1,0,6,6\n", r"duplicate \(track_id, t\) = \(1, 0\) at data row 2"),
        ("track_id,t,y\n1,0,5\n", r"missing required columns \['x'\]"),
        ("track_id,t,y,x\n1,0,5,5\n1,zz,6,6\n", r"column 't' has a missing or non-numeric value 'zz' at data row 2"),
        ("track_id,t,y,x\n1,0.5,5,5\n", r"column 't' must hold integers"),
        ("track_id,t,y,x,parent_track_id\n1,0,5,5,-1\n1,1,5,5,4\n4,0,3,3,-1\n", r"track 1 has different parent_track_id"),
    ],
)
def test_bad_csv_errors_name_the_file_and_row(tmp_path, csv, match):
    e = make_experiment(tmp_path, "exp", {"A/1/0": family()}, ["P"], {"p": "P"})
    with open(os.path.join(e["tracks_path"], "A/1/0", "tracks.csv"), "w") as f:
        f.write(csv)
    reg = ExperimentRegistry.from_yaml(write_collection(tmp_path, [e]))
    with pytest.raises(ValueError, match=match) as err:
        LineageIndex.build(reg, PATCH, progress=False)
    assert "A/1/0" in str(err.value)


def test_missing_or_extra_csv(tmp_path):
    e = make_experiment(tmp_path, "exp", {"A/1/0": family()}, ["P"], {"p": "P"})
    folder = os.path.join(e["tracks_path"], "A/1/0")
    reg = ExperimentRegistry.from_yaml(write_collection(tmp_path, [e]))
    with open(os.path.join(folder, "other.csv"), "w") as f:
        f.write("track_id,t,y,x\n")
    with pytest.raises(ValueError, match=r"Expected exactly one tracking CSV in .*A/1/0/, found: \['other.csv', 'tracks.csv'\]"):
        LineageIndex.build(reg, PATCH, progress=False)
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    with pytest.raises(FileNotFoundError, match=r"No tracking CSV in .*A/1/0/"):
        LineageIndex.build(reg, PATCH, progress=False)


def test_save_load_roundtrip_gives_identical_plans(tmp_path):
    index = build(tmp_path, config=IndexConfig(patch_yx=(32, 32), positive_policy="ancestry", channel_mode="bag"))
    path = tmp_path / "index.npz"
    index.save(path)
    loaded = LineageIndex.load(path)
    pd.testing.assert_frame_equal(loaded.tracks, index.tracks)
    pd.testing.assert_frame_equal(loaded.fovs, index.fovs, check_dtype=False)
    np.testing.assert_array_equal(loaded.norm, index.norm)
    np.testing.assert_array_equal(loaded.valid, index.valid)
    assert loaded.config == index.config
    a = make_plan(index, index.valid, np.random.default_rng(7))
    b = make_plan(loaded, loaded.valid, np.random.default_rng(7))
    np.testing.assert_array_equal(a.positive_rows, b.positive_rows)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        index.save(path)
    index.save(path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".index-")] == []


def test_no_valid_anchors_is_a_clear_error_at_the_sampler(tmp_path):
    from sampler import TripletSampler

    lonely = tracks_table(*[track_rows(i, range(i, i + 1)) for i in range(5)])  # one frame per track
    index = build(tmp_path, lonely)
    assert len(index) == 5 and len(index.valid) == 0
    with pytest.raises(ValueError, match=r"No valid anchors in 5 observations: .* policy 'lineage' at "
                                         r"tau_range_hours=\(0.5, 2.0\) \(frames per experiment: \{'exp': '1..4'\}"):
        TripletSampler(index, 4)
    TripletSampler(index, 4, predict=True)  # predict needs no positives
