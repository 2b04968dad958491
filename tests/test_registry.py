"""ExperimentRegistry: YAML forms, plate metadata (NGFF 0.4 and 0.5), channel maps, tau, Z, errors."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import yaml

from builders import make_experiment, track_rows, tracks_table, write_collection
from sampler import ExperimentRegistry

TRACKS = {"A/1/0": tracks_table(track_rows(0, range(10)))}


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_channel_maps_follow_each_experiments_own_channel_order(tmp_path, version):
    a = make_experiment(tmp_path, "a", TRACKS, ["Phase3D", "GFP"], {"phase": "Phase3D", "reporter": "GFP"},
                        version=version)
    b = make_experiment(tmp_path, "b", TRACKS, ["mCherry", "BF", "GFP"],
                        [{"name": "GFP", "marker": "reporter"}, {"name": "BF", "marker": "phase"}], version=version)
    reg = ExperimentRegistry.from_yaml(write_collection(tmp_path, [a, b], labels=["phase", "reporter"]))
    assert reg.labels == ["phase", "reporter"]
    assert reg.zarr_channels["b"] == ["mCherry", "BF", "GFP"]
    assert reg.channel_maps == {"a": {0: 0, 1: 1}, "b": {0: 1, 1: 2}}
    assert reg.plates["a"].version == version
    assert reg.selected_fovs("a") == ["A/1/0"]


def test_labels_default_to_first_appearance_order(tmp_path):
    a = make_experiment(tmp_path, "a", TRACKS, ["P", "G"], {"g": "G", "p": "P"})
    b = make_experiment(tmp_path, "b", TRACKS, ["P", "R"], {"p": "P", "r": "R"})
    reg = ExperimentRegistry.from_yaml(write_collection(tmp_path, [a, b]))
    assert reg.labels == ["g", "p", "r"]
    assert reg.channel_maps["b"] == {1: 0, 2: 1}


@pytest.mark.parametrize(
    "interval, hours, frames",
    [(10, (0.5, 2.0), (3, 12)), (20, (0.5, 2.0), (2, 6)), (30, (0.5, 2.0), (1, 4)), (60, (0.5, 2.0), (0, 2)),
     (45, (0.75, 1.5), (1, 2))],
)
def test_tau_range_frames_uses_python_rounding(tmp_path, interval, hours, frames):
    e = make_experiment(tmp_path, "a", TRACKS, ["P"], {"p": "P"}, interval_minutes=interval)
    reg = ExperimentRegistry.from_yaml(write_collection(tmp_path, [e]))
    assert reg.tau_range_frames("a", hours) == frames


def test_z_window_centres_on_plate_focus(tmp_path):
    focus = {"focus_slice": {"P": {"dataset_statistics": {"z_focus_mean": 6.6}}}}
    e = make_experiment(tmp_path, "a", TRACKS, ["P", "G"], {"p": "P"}, shape=(12, 32, 32), n_t=2,
                        plate_attrs=focus)
    path = write_collection(tmp_path, [e])
    # centre round(6.6) = 7, 4 slices, half below: [5, 9)
    assert ExperimentRegistry.from_yaml(path, z_window=4).z_ranges["a"] == (5, 9)
    # offset 0.25 puts one slice below focus
    assert ExperimentRegistry.from_yaml(path, z_window=4, z_focus_offset=0.25).z_ranges["a"] == (6, 10)
    # windows are shifted inside the stack, never cut
    assert ExperimentRegistry.from_yaml(path, z_window=12).z_ranges["a"] == (0, 12)
    assert ExperimentRegistry.from_yaml(path).z_ranges["a"] == (0, 12)
    with pytest.raises(ValueError, match=r"extraction range \(3\) < z_window \(4\)"):
        ExperimentRegistry.from_yaml(path, z_window=4, z_extraction_window=3)
    with pytest.raises(ValueError, match="12 Z slices, fewer than the 13"):
        ExperimentRegistry.from_yaml(path, z_window=13)


def test_z_window_without_focus_uses_the_middle(tmp_path):
    e = make_experiment(tmp_path, "a", TRACKS, ["P"], {"p": "P"}, shape=(9, 32, 32), n_t=2)
    assert ExperimentRegistry.from_yaml(write_collection(tmp_path, [e]), z_window=3).z_ranges["a"] == (3, 6)


def test_different_depths_without_a_window_are_an_error(tmp_path):
    a = make_experiment(tmp_path, "a", TRACKS, ["P"], {"p": "P"}, shape=(4, 32, 32), n_t=2)
    b = make_experiment(tmp_path, "b", TRACKS, ["P"], {"p": "P"}, shape=(6, 32, 32), n_t=2)
    path = write_collection(tmp_path, [a, b])
    with pytest.raises(ValueError, match="different Z depths"):
        ExperimentRegistry.from_yaml(path)
    assert ExperimentRegistry.from_yaml(path, z_window=4).z_ranges == {"a": (0, 4), "b": (1, 5)}


def test_relative_paths_and_datasets_root(tmp_path):
    e = make_experiment(tmp_path, "a", TRACKS, ["P"], {"p": "P"})
    e["data_path"] = "${datasets_root}/a.zarr"
    e["tracks_path"] = "a_tracks"
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({"datasets_root": str(tmp_path), "experiments": [e]}))
    reg = ExperimentRegistry.from_yaml(path)
    assert reg["a"].data_path == str(tmp_path / "a.zarr")
    assert reg["a"].tracks_path == str(tmp_path / "a_tracks")
    # the resolved locations are reported, with the URL the reader opens
    assert reg.describe().to_dict("records") == [dict(
        experiment="a", data_path=str(tmp_path / "a.zarr"), tracks_path=str(tmp_path / "a_tracks"),
        data_url=f"file://{tmp_path}/a.zarr/", fovs=1)]


def test_well_and_fov_selection(tmp_path):
    tracks = {f: tracks_table(track_rows(0, range(10))) for f in ("A/1/0", "A/1/1", "B/2/0", "B/3/0")}
    e = make_experiment(tmp_path, "a", tracks, ["P"], {"p": "P"},
                        perturbation_wells={"mock": ["A/1", "B/2"], "drug": ["B/3"]},
                        exclude_fovs=["A/1/1"], exclude_wells=["B/2"])
    reg = ExperimentRegistry.from_yaml(write_collection(tmp_path, [e]))
    assert reg.selected_fovs("a") == ["A/1/0", "B/3/0"]
    assert reg["a"].perturbation_of("B/3") == "drug"


def _error(tmp_path, match, labels=None, **change):
    """The error of expA's collection with `change`: it starts with the YAML, the experiment and the field."""
    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))
    e = make_experiment(tmp_path, "expA", TRACKS, ["Phase3D", "GFP"], {"p": "Phase3D"})
    e.update(change)
    path = write_collection(tmp_path, [e], labels=labels)
    with pytest.raises(ValueError, match=re.escape(f"{path}: experiments[0] (name 'expA').") + match):
        ExperimentRegistry.from_yaml(path)


def test_error_interval_not_positive(tmp_path):
    _error(tmp_path, r"interval_minutes: expected a number > 0, got 0; interval_minutes: minutes between frames",
           interval_minutes=0)
    _error(tmp_path, r"interval_minutes: expected a number > 0, got -5", interval_minutes=-5)


def test_error_empty_wells(tmp_path):
    _error(tmp_path, r"perturbation_wells: must not be empty", perturbation_wells={})
    _error(tmp_path, r"perturbation_wells.mock: must not be empty", perturbation_wells={"mock": []})


def test_error_missing_data_path(tmp_path):
    _error(tmp_path, r"data_path: does not exist: .*nowhere.zarr; fix data_path", data_path=str(tmp_path / "nowhere.zarr"))


def test_error_channels_absent_from_zarr_lists_what_is_there(tmp_path):
    _error(tmp_path, r"channels: zarr channels \['RFP'\] not found in the plate \(FOV A/1/0\); available: "
                     r"\['Phase3D', 'GFP'\]", channels={"p": "Phase3D", "r": "RFP"})


def test_error_unknown_label_and_wells(tmp_path):
    _error(tmp_path, r"channels: labels \['p'\] are not among the collection's labels \['x'\]", labels=["x"])
    _error(tmp_path, r"perturbation_wells.mock: \['C/9'\] is not in the plate .* there: \['A/1'\]",
           perturbation_wells={"mock": ["A/1", "C/9"]})


def test_error_duplicate_names_and_missing_keys(tmp_path):
    e = make_experiment(tmp_path, "expA", TRACKS, ["P"], {"p": "P"})
    path = write_collection(tmp_path, [e, dict(e)])
    with pytest.raises(ValueError, match=re.escape(f"{path}: experiments[1] (name 'expA').name: duplicate "
                                                   "experiment name 'expA'; give each experiment a unique name")):
        ExperimentRegistry.from_yaml(path)
    path = write_collection(tmp_path, [{k: v for k, v in e.items() if k != "tracks_path"}])
    with pytest.raises(ValueError, match=re.escape(f"{path}: experiments[0] (name 'expA').tracks_path: missing; "
                                                   "add tracks_path: the folder holding")):
        ExperimentRegistry.from_yaml(path)
    path = write_collection(tmp_path, [])
    with pytest.raises(ValueError, match=re.escape(f"{path}: experiments: must not be empty")):
        ExperimentRegistry.from_yaml(path)


def test_error_not_a_plate(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    _error(tmp_path, r"data_path: .*not an OME-Zarr HCS plate.*; data_path must be an OME-Zarr HCS plate",
           data_path=str(tmp_path / "plain"))
