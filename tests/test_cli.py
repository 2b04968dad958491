"""`dynaclr-dali index`: summary on success, one-line errors and exit code 2 on bad input."""

from __future__ import annotations

from builders import make_experiment, track_rows, tracks_table, write_collection
from dali_pipeline.cli import main
from sampler import LineageIndex


def collection(tmp_path):
    tracks = tracks_table(track_rows(1, range(0, 4)), track_rows(2, range(4, 8), parent=1),
                          track_rows(3, range(4, 8), parent=1))
    e = make_experiment(tmp_path, "exp", {"A/1/0": tracks}, ["P"], {"p": "P"})
    return write_collection(tmp_path, [e])


def test_index_prints_summary_and_saves(tmp_path, capsys):
    out = tmp_path / "i.npz"
    assert main(["index", str(collection(tmp_path)), "--patch", "32", "32", "--save", str(out)]) == 0
    text = capsys.readouterr().out
    assert "divisions" in text and "exp" in text and "saved" in text
    index = LineageIndex.load(out)
    assert index.summary().iloc[0].divisions == 1 and len(index) == 12
    assert main(["index", str(collection(tmp_path / "again")), "--patch", "32", "32", "--save", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; pass overwrite=True" in err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["index", str(tmp_path / "missing.yml")]) == 2
    err = capsys.readouterr().err
    assert "missing.yml: no such collection YAML" in err and "Traceback" not in err
    bad = tmp_path / "bad.yml"
    bad.write_text("experiments: [{name: a}]\n")
    assert main(["index", str(bad)]) == 2
    assert "Experiment 'a': missing required key 'data_path'" in capsys.readouterr().err
