"""Trust (issue 15, items 1 and 5): --overwrite never loses data, flags are checked where they are parsed,
every CLI error is one line, and an interrupt leaves no temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dali_pipeline import cli
from dali_pipeline.cli import main
from sampler.atomic import MARKER, read_marker
from test_atomic import foreign_folder, hidden, interrupt_when_ready, snapshot
from test_cli import collection, csv_path



def run(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_line_error(err: str, *needles: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


# ---------------------------------------------------------------------- item 1: overwrite cannot lose data
def cli_targets(tmp_path: Path) -> list[tuple[list, Path]]:
    """(argv, foreign folder it points --overwrite at) for every command that writes."""
    yml = collection(tmp_path / "c")
    d = tmp_path / "dest"
    return [
        (["index", yml, "--save", d / "index", "--overwrite"], d / "index"),
        (["index", yml, "--plot-lineage", "A/1/0", "--out", d / "tree", "--overwrite"], d / "tree"),
        (["preview", yml, "--out", d / "pairs", "--overwrite"], d / "pairs"),
        (["make-synthetic", d / "synthetic", "--overwrite"], d / "synthetic"),
        (["convert-ctc", tmp_path / "seq", d / "ctc", "--interval-minutes", 5, "--overwrite"], d / "ctc"),
        (["bench", yml, "--out", d / "bench", "--overwrite"], d / "bench" / "bench.json"),
        (["demo", "--out", d / "demo", "--overwrite"], d / "demo" / "pairs.png"),
        (["import-cell-index", tmp_path / "x.parquet", d / "cells.yml", "--overwrite"], d / "cells_tracks"),
    ]


def test_every_command_refuses_to_overwrite_a_foreign_folder(tmp_path, capsys):
    for argv, target in cli_targets(tmp_path):
        before = foreign_folder(target)
        rc, err = run(argv, capsys)
        assert rc == 2, (argv, err)
        one_line_error(err, f"{target} exists and was not replaced", "Move it away or choose another output path")
        assert snapshot(target) == before, argv  # byte for byte


def test_make_synthetic_refuses_the_current_directory_and_replaces_its_own_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "syn"
    assert run(["make-synthetic", out], capsys)[0] == 0
    assert read_marker(out)["writer"] == "synthetic"
    (out / "collection.yml").write_text("stale")
    monkeypatch.chdir(out)
    rc, err = run(["make-synthetic", ".", "--overwrite"], capsys)
    assert rc == 2
    one_line_error(err, "it is the current directory or holds it")
    assert (out / "collection.yml").read_text() == "stale"
    monkeypatch.chdir(tmp_path)
    assert run(["make-synthetic", out, "--overwrite"], capsys)[0] == 0
    assert (out / "collection.yml").read_text() != "stale" and hidden(tmp_path) == []


def test_index_replaces_its_own_npz_and_png_but_not_other_files(tmp_path, capsys):
    yml = collection(tmp_path)
    npz, png = tmp_path / "i.npz", tmp_path / "t.png"
    assert run(["index", yml, "--save", npz, "--plot-lineage", "A/1/0", "--out", png], capsys)[0] == 0
    assert run(["index", yml, "--save", npz, "--plot-lineage", "A/1/0", "--out", png, "--overwrite"], capsys)[0] == 0
    other = tmp_path / "other.npz"
    np.savez(other, x=np.arange(3))  # an npz, but not an index
    rc, err = run(["index", yml, "--save", other, "--overwrite"], capsys)
    one_line_error(err, "other.npz exists and was not replaced", "not a lineage index")
    assert rc == 2 and np.load(other)["x"].tolist() == [0, 1, 2]


def test_library_writers_refuse_a_foreign_folder(tmp_path):
    from dali_pipeline.datasets.ctc import import_ctc
    from dali_pipeline.datasets.omezarr import write_plate
    from dali_pipeline.datasets.synthetic import write_synthetic
    from dali_pipeline.embeddings import write_embeddings
    from dali_pipeline.plots import loss_figure, save_png
    from test_ctc import make_sequence
    from test_embeddings import fake_predictions
    from test_synthetic import tiny_spec

    seq = make_sequence(tmp_path)
    d = tmp_path / "dest"
    writers = {
        "synthetic": lambda p: write_synthetic(p, tiny_spec(), overwrite=True),
        "ctc": lambda p: import_ctc(seq, p, interval_minutes=5, overwrite=True, progress=False),
        "plate.zarr": lambda p: write_plate(p, {"A/1/0": np.zeros((1, 1, 1, 4, 4), "uint16")}, ["c"], overwrite=True),
        "emb.parquet": lambda p: write_embeddings(fake_predictions(np.arange(4), 2), p, overwrite=True),
        "loss.png": lambda p: save_png(loss_figure([1.0, 0.5], "t"), p, overwrite=True),
    }
    for name, write in writers.items():
        before = foreign_folder(d / name)
        with pytest.raises(FileExistsError, match="exists and was not replaced"):
            write(d / name)
        assert snapshot(d / name) == before, name
        assert hidden(d) == [], name
    # and what they wrote is theirs to replace
    write_plate(tmp_path / "p.zarr", {"A/1/0": np.zeros((1, 1, 1, 4, 4), "uint16")}, ["c"])
    assert read_marker(tmp_path / "p.zarr")["writer"] == "plate"
    write_plate(tmp_path / "p.zarr", {"A/1/0": np.ones((1, 1, 1, 4, 4), "uint16")}, ["c"], overwrite=True)
    assert (tmp_path / "p.zarr" / MARKER).is_file()


# ---------------------------------------------------------------------- item 5: flags and one-line errors
BAD_FLAGS = [
    (["index", "--z-window", "0"], "argument --z-window: must be >= 1, got 0"),
    (["bench", "--z-window", "-2"], "argument --z-window: must be >= 1, got -2"),
    (["index", "--tau-hours", "0.5", "inf"], "argument --tau-hours: must be a finite number, got inf"),
    (["preview", "--tau-hours", "0.5", "nan"], "argument --tau-hours: must be a finite number, got nan"),
    (["index", "--tau-hours", "2", "1"], "argument --tau-hours: LOW must be <= HIGH, got 2 1"),
    (["index", "--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["index", "--patch", "32", "x"], "argument --patch: expected an integer >= 1, got 'x'"),
    (["index", "--tau-decay", "-1"], "argument --tau-decay: must be >= 0, got -1"),
    (["demo", "--batch-size", "1"], "argument --batch-size: must be >= 2, got 1"),
    (["demo", "--lr", "0"], "argument --lr: must be > 0, got 0"),
    (["preview", "--n", "0"], "argument --n: must be >= 1, got 0"),
    (["make-synthetic", "out", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["convert-ctc", "a", "b", "--interval-minutes", "inf"], "argument --interval-minutes: must be a finite number"),
    (["import-cell-index", "a.parquet", "b.yml", "--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["index", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize("argv,needle", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_are_refused_by_the_parser_in_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    one_line_error(err, needle, "see dynaclr-dali", "--help")


def test_library_errors_name_the_file(tmp_path, capsys):
    yml = collection(tmp_path / "a")
    (tmp_path / "a" / "exp.zarr" / "zarr.json").write_text("[1, 2]")
    rc, err = run(["index", yml], capsys)
    assert rc == 2
    one_line_error(err, f"{tmp_path / 'a' / 'exp.zarr' / 'zarr.json'} is not a JSON object (it holds a list)")
    yml = collection(tmp_path / "b")
    csv_path(tmp_path / "b").write_text("track_id,t,y,x,y\n1,0,30,30,1\n1,1,30,30,1\n")
    rc, err = run(["index", yml], capsys)
    assert rc == 2
    one_line_error(err, "tracks.csv: columns ['y'] appear more than once in the header")


def test_an_unforeseen_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(args):
        raise AttributeError("'list' object has no attribute 'get'")

    monkeypatch.setattr(cli, "cmd_make_synthetic", broken)
    rc, err = run(["make-synthetic", tmp_path / "o"], capsys)
    assert rc == 2
    one_line_error(err, "dynaclr-dali make-synthetic: error: unexpected AttributeError", "rerun with --debug")
    rc, err = run(["make-synthetic", tmp_path / "o", "--debug"], capsys)
    assert rc == 2 and "Traceback" in err and "AttributeError" in err


def test_sigint_during_make_synthetic_leaves_no_temporary(tmp_path):
    """The writer is held inside its first FOV (a patched frame writer), then interrupted like Ctrl-C."""
    code = (
        "import sys, time\n"
        "from dali_pipeline import cli\n"
        "from dali_pipeline.datasets import synthetic\n"
        "real = synthetic._write_fov\n"
        "def held(*a, **k):\n"
        "    out = real(*a, **k); print('ready', flush=True); time.sleep(60); return out\n"
        "synthetic._write_fov = held\n"
        "sys.exit(cli.main(['make-synthetic', sys.argv[1]]))\n"
    )
    def temporary_exists():
        assert hidden(tmp_path)

    returncode, err = interrupt_when_ready(code, tmp_path / "out", temporary_exists)
    assert returncode == 130, err
    assert err.decode().splitlines()[-1] == "dynaclr-dali make-synthetic: interrupted"
    assert os.listdir(tmp_path) == []
