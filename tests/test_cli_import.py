"""`import-cell-index` (the reference's cell-index parquet, built here as its builder does) and `convert-ctc`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from builders import make_experiment, track_rows, tracks_table
from dali_pipeline.cell_index import CELL_INDEX_SCHEMA
from dali_pipeline.cli import main
from sampler import ExperimentRegistry, IndexConfig, LineageIndex

#: reference-implementation.md section 3.1, in order
SCHEMA_COLUMNS = (
    "cell_id experiment store_path tracks_path fov well y x z perturbation channel_name t track_id global_track_id "
    "lineage_id parent_track_id hours_post_perturbation interval_minutes gene_name reporter sgRNA microscope marker "
    "organelle pixel_size_xy_um pixel_size_z_um T_shape C_shape Z_shape Y_shape X_shape z_focus_mean norm_mean "
    "norm_std norm_median norm_iqr norm_max norm_min"
).split()


def fov_tracks(offset: int) -> pd.DataFrame:
    """Three generations (1 -> 2, 3; 2 -> 4, 5), a lone track, a parent absent from the FOV, an empty parent."""
    df = tracks_table(
        track_rows(1, range(0, 3), y=20.0 + offset, x=20.0),
        track_rows(2, range(3, 6), y=18.0, x=22.0 + offset, parent=1),
        track_rows(3, range(3, 8), y=24.0, x=22.0, parent=1),
        track_rows(4, range(6, 8), y=16.0, x=24.0, parent=2),
        track_rows(5, range(6, 8), y=19.5, x=25.25, parent=2),
        track_rows(6, range(0, 8), y=40.0, x=40.0),
        track_rows(7, range(2, 8), y=44.0, x=30.0, parent=99),
    )
    df["parent_track_id"] = df.parent_track_id.astype(object)
    df.loc[df.track_id == 6, "parent_track_id"] = None  # written as an empty field
    return df


EXPERIMENTS = [
    dict(name="expA", channel_names=["Phase3D", "GFP"], markers={"Phase3D": "Phase3D", "GFP": "SEC61"},
         fovs={"A/1/0": 0, "B/1/0": 1}, wells={"ctrl": ["A/1"], "treated": ["B/1"]}, interval=30.0, start_hpi=3.0),
    dict(name="expB", channel_names=["GFP", "Phase3D", "mCherry"],
         markers={"GFP": "G3BP1", "Phase3D": "Phase3D", "mCherry": "pAL17"}, fovs={"A/1/0": 2},
         wells={"infected": ["A/1"]}, interval=15.0, start_hpi=1.5),
]


def reference_lineage(g: pd.DataFrame) -> pd.Series:
    """`_reconstruct_lineage` of the reference (section 3.2.3) for one FOV, verbatim in spirit."""
    tid_to_gtid = dict(zip(g.track_id, g.global_track_id))
    parent_map = {}
    for row in g.drop_duplicates("track_id").itertuples():
        p = row.parent_track_id
        if pd.notna(p) and int(p) in tid_to_gtid:
            parent_map[row.global_track_id] = tid_to_gtid[int(p)]

    def find_root(gid):
        seen = set()
        while gid in parent_map and gid not in seen:
            seen.add(gid)
            gid = parent_map[gid]
        return gid

    return g.global_track_id.map({gid: find_root(gid) for gid in g.global_track_id.unique()})


def build_cell_index(root: Path, out: Path) -> Path:
    """Plates and CSVs, then a parquet as the reference's `build_timelapse_cell_index` writes it."""
    frames = []
    for spec in EXPERIMENTS:
        tracks = {fov: fov_tracks(k) for fov, k in spec["fovs"].items()}
        make_experiment(root, spec["name"], tracks, spec["channel_names"], {m: c for c, m in spec["markers"].items()},
                        n_t=8, interval_minutes=spec["interval"], perturbation_wells=spec["wells"])
        for fov_path, df in tracks.items():
            well, fov = fov_path.rsplit("/", 1)
            df = pd.read_csv(root / f"{spec['name']}_tracks" / fov_path / "tracks.csv")  # as the builder reads it
            df["experiment"], df["store_path"] = spec["name"], str(root / f"{spec['name']}.zarr")
            df["tracks_path"], df["fov"], df["well"] = str(root / f"{spec['name']}_tracks"), fov, well
            df["perturbation"] = next(p for p, ws in spec["wells"].items() if well in ws)
            df["cell_id"] = [f"{spec['name']}_{fov_path}_{t}_{s}" for t, s in zip(df.track_id, df.t)]
            df["global_track_id"] = [f"{spec['name']}_{fov_path}_{t}" for t in df.track_id]
            df["hours_post_perturbation"] = spec["start_hpi"] + df.t * spec["interval"] / 60
            df["interval_minutes"], df["microscope"], df["z"] = spec["interval"], "", 0
            df["T_shape"], df["C_shape"], df["Z_shape"], df["Y_shape"], df["X_shape"] = (
                8, len(spec["channel_names"]), 3, 64, 64)
            for channel, marker in spec["markers"].items():  # explode: one copy per channel entry
                frames.append(df.assign(channel_name=channel, marker=marker))
    df = pd.concat(frames, ignore_index=True)
    df["lineage_id"] = df.global_track_id
    for _, g in df.groupby(["experiment", "well", "fov"]):
        df.loc[g.index, "lineage_id"] = reference_lineage(g)
    for col in SCHEMA_COLUMNS:
        if col not in df:
            df[col] = None
    table = pa.Table.from_pandas(df[SCHEMA_COLUMNS], schema=CELL_INDEX_SCHEMA, preserve_index=False)
    pq.write_table(table, out)
    return out


def run(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_schema_is_the_reference_one():
    assert CELL_INDEX_SCHEMA.names == SCHEMA_COLUMNS
    assert CELL_INDEX_SCHEMA.field("y").type == pa.float32() and CELL_INDEX_SCHEMA.field("z").type == pa.int16()
    assert CELL_INDEX_SCHEMA.field("parent_track_id").type == pa.int32()


def test_import_keeps_the_lineages(tmp_path, capsys):
    parquet = build_cell_index(tmp_path / "data", tmp_path / "cells.parquet")
    ref = pd.read_parquet(parquet)
    assert ref.lineage_id.nunique() < ref.global_track_id.nunique()  # divisions exist
    out = tmp_path / "out" / "migrated.yml"
    rc, text, err = run(["import-cell-index", parquet, out], capsys)
    assert rc == 0, err
    n_tracks = ref.drop_duplicates(["experiment", "fov", "well", "track_id"]).shape[0]
    assert f"lineage_id: all {n_tracks} tracks get the parquet's lineage_id" in text
    assert not (tmp_path / "out" / "migrated_lineage_differences.csv").exists()

    doc = yaml.safe_load(out.read_text())
    a, b = doc["experiments"]
    assert a["channels"] == {"Phase3D": "Phase3D", "SEC61": "GFP"}
    assert b["channels"] == {"G3BP1": "GFP", "Phase3D": "Phase3D", "pAL17": "mCherry"}
    assert (a["interval_minutes"], a["start_hpi"], b["interval_minutes"], b["start_hpi"]) == (30.0, 3.0, 15.0, 1.5)
    assert a["perturbation_wells"] == {"ctrl": ["A/1"], "treated": ["B/1"]}
    assert a["include_fovs"] == ["A/1/0", "B/1/0"] and a["tracks_path"] == "migrated_tracks/expA"
    csv = pd.read_csv(tmp_path / "out" / "migrated_tracks" / "expA" / "B" / "1" / "0" / "tracks.csv")
    assert list(csv.columns) == ["track_id", "t", "y", "x", "z", "parent_track_id"]
    assert len(csv) == len(fov_tracks(1))  # one row per cell and t, not per channel

    # our index over the imported collection: every row carries the parquet's lineage_id
    index = LineageIndex.build(ExperimentRegistry.from_yaml(out),
                               IndexConfig(patch_yx=(16, 16), channel_mode="bag"), progress=False)
    ours = index.tracks[["experiment", "fov_name", "track_id", "t", "lineage_id"]].astype(str).drop_duplicates()
    ref["fov_name"] = ref.well + "/" + ref.fov
    theirs = ref[["experiment", "fov_name", "track_id", "t", "lineage_id"]].astype(str).drop_duplicates()
    both = ours.merge(theirs, on=["experiment", "fov_name", "track_id", "t"], suffixes=("_ours", "_parquet"))
    assert len(both) == len(ours) > 0
    assert (both.lineage_id_ours == both.lineage_id_parquet).all()
    # refuses to replace without --overwrite
    rc, _, err = run(["import-cell-index", parquet, out], capsys)
    assert rc == 2 and err.count("\n") == 1 and "migrated.yml exists; pass --overwrite" in err
    assert run(["import-cell-index", parquet, out, "--overwrite"], capsys)[0] == 0


def test_lineage_differences_are_reported(tmp_path, capsys):
    parquet = build_cell_index(tmp_path / "data", tmp_path / "cells.parquet")
    ref = pd.read_parquet(parquet)
    # rows of a mother filtered out (as preprocessing drops rows): its daughters keep the mother's lineage_id
    pruned = ref[~((ref.experiment == "expA") & (ref.well == "A/1") & (ref.track_id == 2))]
    cut = tmp_path / "pruned.parquet"
    pq.write_table(pa.Table.from_pandas(pruned, schema=CELL_INDEX_SCHEMA, preserve_index=False), cut)
    out = tmp_path / "out.yml"
    rc, _, err = run(["import-cell-index", cut, out], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "our lineage_id differs from the parquet's for 2 of" in err and "nothing was installed" in err
    assert "experiment 'expA', FOV A/1/0, track 4: ours expA_A/1/0_4, parquet expA_A/1/0_1" in err
    assert not out.exists() and not (tmp_path / "out_tracks").exists()
    diff = pd.read_csv(tmp_path / "out_lineage_differences.csv")
    assert diff.track_id.tolist() == [4, 5] and set(diff.parquet) == {"expA_A/1/0_1"}
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary leftovers

    rc, text, _ = run(["import-cell-index", cut, out, "--allow-lineage-differences"], capsys)
    assert rc == 0 and "2 of" in text and "expA A/1/0 track 4: ours expA_A/1/0_4, parquet expA_A/1/0_1" in text
    assert out.exists() and (tmp_path / "out_tracks" / "expA" / "A" / "1" / "0" / "tracks.csv").exists()


def test_import_bad_input(tmp_path, capsys):
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    rc, _, err = run(["import-cell-index", junk, tmp_path / "o.yml"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "junk.parquet: not a readable parquet file" in err

    thin = tmp_path / "thin.parquet"
    pq.write_table(pa.table({"experiment": ["e"], "t": [0]}), thin)
    rc, _, err = run(["import-cell-index", thin, tmp_path / "o.yml"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "thin.parquet: missing columns ['store_path'" in err
    assert "CELL_INDEX_SCHEMA" in err

    parquet = build_cell_index(tmp_path / "data", tmp_path / "cells.parquet")
    ref = pd.read_parquet(parquet)
    ref.loc[5, "y"] = np.nan
    nan = tmp_path / "nan.parquet"
    pq.write_table(pa.Table.from_pandas(ref, schema=CELL_INDEX_SCHEMA, preserve_index=False), nan)
    rc, _, err = run(["import-cell-index", nan, tmp_path / "o.yml"], capsys)
    assert rc == 2 and "nan.parquet: column 'y' is missing or not finite at row 5 (experiment 'expA'" in err

    ref = pd.read_parquet(parquet)
    ref.loc[ref.experiment == "expB", "store_path"] = str(tmp_path / "moved.zarr")
    moved = tmp_path / "moved.parquet"
    pq.write_table(pa.Table.from_pandas(ref, schema=CELL_INDEX_SCHEMA, preserve_index=False), moved)
    rc, _, err = run(["import-cell-index", moved, tmp_path / "o.yml"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{moved}: imported as o.yml: experiments[1] (name 'expB').data_path: does not exist" in err
    assert not (tmp_path / "o.yml").exists()


# ---------------------------------------------------------------------- convert-ctc
def test_convert_ctc(tmp_path, capsys):
    from test_ctc import make_sequence

    seq = make_sequence(tmp_path)
    out = tmp_path / "converted"
    rc, text, err = run(["convert-ctc", seq, out, "--interval-minutes", 15, "--name", "tiny"], capsys)
    assert rc == 0, err
    assert "experiment tiny, 4 frames (40, 48) uint16, 4 tracks, 2 lineages, 1 divisions" in text
    doc = yaml.safe_load((out / "collection.yml").read_text())
    assert doc["experiments"][0]["interval_minutes"] == 15.0
    index = LineageIndex.build(ExperimentRegistry.from_yaml(out / "collection.yml"), IndexConfig(patch_yx=(16, 16)),
                               progress=False)
    assert index.summary().iloc[0].divisions == 1

    rc, _, err = run(["convert-ctc", seq, out, "--interval-minutes", 15], capsys)
    assert rc == 2 and err.count("\n") == 1 and "converted exists; pass --overwrite" in err
    rc, _, err = run(["convert-ctc", tmp_path / "nope", tmp_path / "o2", "--interval-minutes", 15], capsys)
    assert rc == 2 and err.count("\n") == 1 and "CTC sequence folder not found" in err
    with pytest.raises(SystemExit) as exit_info:  # refused by the flag's type, before anything runs
        run(["convert-ctc", seq, tmp_path / "o3", "--interval-minutes", 0], capsys)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "argument --interval-minutes: must be > 0, got 0" in err
