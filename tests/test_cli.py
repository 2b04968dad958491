"""`dynaclr-dali index` and every bad-input case of the CLI: exit code 2 and one line naming what and how to fix."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import yaml

from builders import make_experiment, track_rows, tracks_table, write_collection
from dali_pipeline.cli import main
from sampler import LineageIndex


def lineage_tracks() -> pd.DataFrame:
    return tracks_table(track_rows(1, range(0, 4)), track_rows(2, range(4, 8), parent=1),
                        track_rows(3, range(4, 8), parent=1))


def collection(tmp_path, tracks=None, **options):
    e = make_experiment(tmp_path, "exp", {"A/1/0": lineage_tracks() if tracks is None else tracks}, ["P"], {"p": "P"},
                        **options)
    return write_collection(tmp_path, [e])


def csv_path(tmp_path):
    return tmp_path / "exp_tracks" / "A" / "1" / "0" / "tracks.csv"


def run(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_index_prints_summary_and_saves(tmp_path, capsys):
    out = tmp_path / "i.npz"
    rc, text, _ = run(["index", collection(tmp_path), "--patch", 32, 32, "--save", out], capsys)
    assert rc == 0
    assert "divisions" in text and "exp" in text and "saved" in text and "valid_ancestry" in text
    # where each experiment is read from: the resolved paths (not the YAML's text)
    assert str(tmp_path / "exp.zarr") in text and str(tmp_path / "exp_tracks") in text
    index = LineageIndex.load(out)
    assert index.summary().iloc[0].divisions == 1 and len(index) == 12
    again = collection(tmp_path / "again")
    rc, _, err = run(["index", again, "--patch", 32, 32, "--save", out], capsys)
    assert rc == 2 and err.count("\n") == 1 and f"{out} exists; pass --overwrite to replace it" in err
    assert run(["index", again, "--patch", 32, 32, "--save", out, "--overwrite"], capsys)[0] == 0


def test_help_everywhere(capsys):
    for command in ([], ["demo"], ["index"], ["preview"], ["convert-ctc"], ["import-cell-index"],
                    ["make-synthetic"], ["bench"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: dynaclr-dali" in capsys.readouterr().out


# ---------------------------------------------------------------------- bad input: one case each
def yaml_unparsable(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("experiments:\n  - name: a\n    data_path: [unclosed\n")
    return ["index", bad], [f"{bad}: not valid YAML at line", "fix the syntax"]


def yaml_missing_field(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("experiments: [{name: a, tracks_path: t}]\n")
    return ["index", bad], [f"{bad}: experiments[0] (name 'a').data_path: missing; add data_path: the HCS OME-Zarr"]


def yaml_missing_file(tmp_path):
    return ["index", tmp_path / "missing.yml"], ["missing.yml: no such collection YAML"]


def data_path_missing(tmp_path):
    path = collection(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["experiments"][0]["data_path"] = str(tmp_path / "nowhere.zarr")
    path.write_text(yaml.safe_dump(doc))
    return ["index", path], [f"{path}: experiments[0] (name 'exp').data_path: does not exist", "nowhere.zarr",
                             "fix data_path"]


def data_path_not_a_plate(tmp_path):
    path = collection(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["experiments"][0]["data_path"] = str(tmp_path / "exp.zarr" / "A" / "1" / "0")  # an FOV, not the plate
    path.write_text(yaml.safe_dump(doc))
    return ["index", path], [f"{path}: experiments[0] (name 'exp').data_path: ", "not an OME-Zarr HCS plate",
                             "data_path must be"]


def data_path_plain_folder(tmp_path):
    path = collection(tmp_path)
    (tmp_path / "plain").mkdir()
    doc = yaml.safe_load(path.read_text())
    doc["experiments"][0]["data_path"] = str(tmp_path / "plain")
    path.write_text(yaml.safe_dump(doc))
    return ["index", path], [f"{path}: experiments[0] (name 'exp').data_path: ", "no OME-Zarr group here",
                             "data_path must be"]


def channel_missing_in_zarr(tmp_path):
    e = make_experiment(tmp_path, "exp", {"A/1/0": lineage_tracks()}, ["P"], {"p": "Nope"})
    path = write_collection(tmp_path, [e])
    return ["index", path], [f"{path}: experiments[0] (name 'exp').channels: zarr channels ['Nope'] not found",
                             "available: ['P']", "map each label"]


def channel_label_missing(tmp_path):
    a = make_experiment(tmp_path, "a", {"A/1/0": lineage_tracks()}, ["P", "G"], {"p": "P", "g": "G"})
    b = make_experiment(tmp_path, "b", {"A/1/0": lineage_tracks()}, ["P"], {"p": "P"})
    return ["index", write_collection(tmp_path, [a, b]), "--patch", 32, 32], [
        "Experiment 'b' maps no zarr channel to labels ['g']", "channel_mode='bag'"]


def no_tracks_csv(tmp_path):
    path = collection(tmp_path)
    csv_path(tmp_path).unlink()
    return ["index", path], ["No tracking CSV in", "A/1/0", "exclude_fovs"]


def two_tracks_csvs(tmp_path):
    path = collection(tmp_path)
    shutil.copy(csv_path(tmp_path), csv_path(tmp_path).with_name("other.csv"))
    return ["index", path], ["Expected exactly one tracking CSV", "['other.csv', 'tracks.csv']", "keep one"]


def csv_missing_column(tmp_path):
    path = collection(tmp_path)
    csv_path(tmp_path).write_text("track_id,t,y\n1,0,5\n")
    return ["index", path], [f"{csv_path(tmp_path)}: missing required columns ['x']", "needs track_id, t, y, x"]


def csv_non_numeric(tmp_path):
    path = collection(tmp_path)
    csv_path(tmp_path).write_text("track_id,t,y,x\n1,0,30,30\n1,1,abc,30\n")
    return ["index", path], [f"{csv_path(tmp_path)}: column 'y' has a missing or non-numeric value 'abc' at data row 2",
                             "fix or remove"]


def csv_nan_coordinates(tmp_path):
    path = collection(tmp_path)
    csv_path(tmp_path).write_text("track_id,t,y,x\n1,0,30,30\n1,1,30,NaN\n1,2,31,31\n")
    return ["index", path], [f"{csv_path(tmp_path)}: column 'x' has a missing (empty or NaN) coordinate at data row 2",
                             "fix or remove"]


def csv_infinite_coordinates(tmp_path):
    path = collection(tmp_path)
    csv_path(tmp_path).write_text("track_id,t,y,x\n1,0,30,30\n1,1,inf,30\n1,2,31,31\n")
    return ["index", path], [f"{csv_path(tmp_path)}: column 'y' has a NaN or infinite coordinate (inf) at data row 2",
                             "fix or remove"]


def csv_duplicate_rows(tmp_path):
    path = collection(tmp_path)
    csv_path(tmp_path).write_text("track_id,t,y,x\n1,0,30,30\n1,1,30,30\n1,1,31,31\n")
    return ["index", path], [f"{csv_path(tmp_path)}: duplicate (track_id, t) = (1, 1) at data row 3",
                             "own track_id"]


def fov_all_outside(tmp_path):
    tracks = tracks_table(track_rows(1, range(0, 4), y=6400.0, x=3200.0))  # microns, not pixels
    return ["index", collection(tmp_path, tracks), "--patch", 32, 32], [
        "Experiment 'exp', FOV A/1/0: all 4 rows of its tracks CSV lie outside the image (10 frames of 64x64 px",
        "y=6400", "in pixels"]


def parent_cycle(tmp_path):
    tracks = tracks_table(track_rows(1, range(0, 4), parent=2), track_rows(2, range(4, 8), parent=1))
    return ["index", collection(tmp_path, tracks), "--patch", 32, 32], [
        "Experiment 'exp', FOV A/1/0: parent_track_id links form a cycle through tracks [1, 2]",
        "fix their parent_track_id"]


def no_valid_anchors(tmp_path):
    return ["index", collection(tmp_path), "--patch", 32, 32, "--tau-hours", 10, 20], [
        "no valid anchors in 12 observations", "exp 20..40", "widen --tau-hours"]


def missing_normalization(tmp_path):
    return ["index", collection(tmp_path, with_norm=False), "--patch", 32, 32], [
        "Experiment 'exp', FOV A/1/0: normalization statistics timepoint_statistics/mean,std missing",
        "choose another norm_level"]


def patch_larger_than_image(tmp_path):
    return ["index", collection(tmp_path), "--patch", 128, 128], [
        "Experiment 'exp', FOV A/1/0: image 64x64 is smaller than", "patch_yx (128, 128)", "choose a smaller patch"]


CASES = [yaml_unparsable, yaml_missing_field, yaml_missing_file, data_path_missing, data_path_not_a_plate,
         data_path_plain_folder, channel_missing_in_zarr, channel_label_missing, no_tracks_csv, two_tracks_csvs,
         csv_missing_column, csv_non_numeric, csv_nan_coordinates, csv_infinite_coordinates, csv_duplicate_rows, fov_all_outside,
         parent_cycle, no_valid_anchors, missing_normalization, patch_larger_than_image]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    argv, needles = case(tmp_path)
    rc, _, err = run(argv, capsys)
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("dynaclr-dali index: error: ")
    for needle in needles:
        assert needle in err, (needle, err)


def test_debug_shows_the_traceback(tmp_path, capsys):
    for argv in (["index", "--debug", tmp_path / "missing.yml"], ["--debug", "index", tmp_path / "missing.yml"]):
        rc, _, err = run(argv, capsys)
        assert rc == 2 and "Traceback" in err and "no such collection YAML" in err


def test_rows_partly_outside_are_dropped_and_counted(tmp_path, capsys):
    tracks = tracks_table(track_rows(1, range(0, 4)), track_rows(2, range(0, 4), y=-5.0))
    rc, out, _ = run(["index", collection(tmp_path, tracks), "--patch", 32, 32], capsys)
    assert rc == 0
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if "dropped_outside" in line.split())  # the summary's header
    assert dict(zip(lines[at].split(), lines[at + 1].split()))["dropped_outside"] == "4"


def test_plot_lineage_errors(tmp_path, capsys):
    path = collection(tmp_path)
    rc, _, err = run(["index", path, "--patch", 32, 32, "--plot-lineage", "Z/9/9", "--out", tmp_path / "t.png"], capsys)
    assert rc == 2 and "no such FOV in the index; FOVs are ['exp/A/1/0']" in err and err.count("\n") == 1
    (tmp_path / "t.png").write_bytes(b"x")
    rc, _, err = run(["index", path, "--plot-lineage", "A/1/0", "--out", tmp_path / "t.png"], capsys)
    assert rc == 2 and "t.png exists; pass --overwrite" in err
