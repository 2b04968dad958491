"""Migration from the reference's flat cell-index parquet (`CELL_INDEX_SCHEMA`) to a collection.

`import_cell_index(parquet, out_yaml)` reads the parquet with pyarrow and writes what our index
reads: one tracks CSV per FOV (`track_id, t, y, x, z, parent_track_id`, one row per cell and t:
the parquet's one-row-per-channel copies are merged) under `{stem}_tracks/{experiment}/` beside the
YAML, and the collection YAML (per experiment: the store, its channel map {marker: channel_name}
(limited to the wells that have it), perturbation wells, frame interval, start_hpi recovered from
hours_post_perturbation, and the parquet's FOVs as include_fovs). It then rebuilds our lineage
index from those files and compares our lineage ids (recomputed from parent_track_id, as in the
reference's section 3.2.3) with the parquet's `lineage_id`, track by track. Nothing is put in
place unless they agree (or the caller accepts the differences); the differences are written to
`{stem}_lineage_differences.csv` (a report, replaced on every run).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from sampler.atomic import CSV_LINEAGE_DIFFERENCES, IMPORTED_YAML, check_target, write_marker
from sampler.collection import CollectionError

#: the reference's `viscy_data.cell_index.CELL_INDEX_SCHEMA`, columns in order
CELL_INDEX_SCHEMA = pa.schema([
    ("cell_id", pa.string()), ("experiment", pa.string()), ("store_path", pa.string()),
    ("tracks_path", pa.string()), ("fov", pa.string()), ("well", pa.string()),
    ("y", pa.float32()), ("x", pa.float32()), ("z", pa.int16()),
    ("perturbation", pa.string()), ("channel_name", pa.string()), ("t", pa.int32()), ("track_id", pa.int32()),
    ("global_track_id", pa.string()), ("lineage_id", pa.string()), ("parent_track_id", pa.int32()),
    ("hours_post_perturbation", pa.float32()), ("interval_minutes", pa.float32()),
    ("gene_name", pa.string()), ("reporter", pa.string()), ("sgRNA", pa.string()),
    ("microscope", pa.string()), ("marker", pa.string()), ("organelle", pa.string()),
    ("pixel_size_xy_um", pa.float32()), ("pixel_size_z_um", pa.float32()),
    ("T_shape", pa.int32()), ("C_shape", pa.int32()), ("Z_shape", pa.int32()), ("Y_shape", pa.int32()),
    ("X_shape", pa.int32()), ("z_focus_mean", pa.float32()),
    ("norm_mean", pa.float32()), ("norm_std", pa.float32()), ("norm_median", pa.float32()),
    ("norm_iqr", pa.float32()), ("norm_max", pa.float32()), ("norm_min", pa.float32()),
])
#: what the import needs; the rest of the schema is optional
REQUIRED = ("experiment", "store_path", "fov", "well", "y", "x", "t", "track_id", "channel_name", "interval_minutes")
OPTIONAL = ("z", "perturbation", "marker", "parent_track_id", "lineage_id", "global_track_id", "hours_post_perturbation")
CSV_COLUMNS = ["track_id", "t", "y", "x", "z", "parent_track_id"]


@dataclass
class ImportReport:
    """What the import wrote and how the lineages compare."""

    yaml_path: Path
    tracks_dir: Path
    experiments: list[dict[str, Any]]
    rows: int  # parquet rows (one per cell, t and channel)
    observations: int  # one per cell and t
    tracks: int
    compared: int  # tracks whose lineage_id was compared
    differences: pd.DataFrame = field(repr=False)
    differences_path: Path | None = None
    installed: bool = True

    @property
    def same_lineages(self) -> bool:
        return len(self.differences) == 0

    def lines(self) -> list[str]:
        out = [f"{e['name']}: {e['fovs']} FOV{'' if e['fovs'] == 1 else 's'}, {e['tracks']} tracks, {e['observations']} observations, "
               f"channels {e['channels']}, interval {e['interval_minutes']:g} min" for e in self.experiments]
        out.append(f"{self.rows} parquet rows -> {self.observations} observations (one per cell and t), "
                   f"{self.tracks} tracks")
        if self.compared == 0:
            out.append("lineage_id: the parquet has no lineage_id column; nothing to compare")
        elif self.same_lineages:
            out.append(f"lineage_id: all {self.compared} tracks get the parquet's lineage_id")
        else:
            out.append(f"lineage_id: {len(self.differences)} of {self.compared} tracks differ "
                       f"(all in {self.differences_path}):")
            for row in self.differences.head(5).itertuples():
                out.append(f"  {row.experiment} {row.fov_name} track {row.track_id}: ours {row.ours}, "
                           f"parquet {row.parquet}")
        return out


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "experiment"


def read_cell_index(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The columns of a cell-index parquet that the import uses, validated (errors name column and row)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such parquet file")
    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for non-parquet files
        raise ValueError(f"{path}: not a readable parquet file ({' '.join(str(err).split())}); pass the cell-index "
                         "parquet written by the reference's `dynaclr build-cell-index`") from None
    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} of the reference's CELL_INDEX_SCHEMA (has "
                         f"{schema.names[:12]}{'...' if len(schema.names) > 12 else ''}); rebuild it with "
                         "`dynaclr build-cell-index`")
    columns = list(REQUIRED) + [c for c in OPTIONAL if c in schema.names]
    df = pq.read_table(path, columns=columns).to_pandas()
    if df.empty:
        raise ValueError(f"Cell index is empty: {path}; there is nothing to import")
    for col in REQUIRED:
        bad = df[col].isna().to_numpy()
        if col in ("y", "x"):
            bad = bad | ~np.isfinite(pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64))
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path}: column '{col}' is missing or not finite at row {r} "
                             f"(experiment {df.experiment.iloc[r]!r}, {int(bad.sum())} such rows); fix or drop those rows")
    for col in ("t", "track_id"):
        if not pd.api.types.is_integer_dtype(df[col]):
            raise ValueError(f"{path}: column '{col}' must hold integers, got {df[col].dtype}")
    if (df.t < 0).any():
        r = int(np.flatnonzero(df.t.to_numpy() < 0)[0])
        raise ValueError(f"{path}: negative t {df.t.iloc[r]} at row {r}; frames count from 0")
    fov = df.fov.astype(str)
    well = df.well.astype(str).str.strip("/")
    df["fov_name"] = np.where(fov.str.contains("/"), fov.str.strip("/"), well + "/" + fov)
    df["well"] = well
    df["parent_track_id"] = (df.parent_track_id.fillna(-1).astype(np.int64) if "parent_track_id" in df
                             else np.int64(-1))
    df["parent_track_id"] = df.parent_track_id.where(df.parent_track_id >= 0, -1)
    df["z"] = df.z.fillna(0).astype(np.int64) if "z" in df else np.int64(0)
    df["perturbation"] = df.perturbation.fillna("unknown").astype(str) if "perturbation" in df else "unknown"
    marker = df.marker.astype(object) if "marker" in df else pd.Series(None, index=df.index, dtype=object)
    df["label"] = marker.where(marker.notna() & (marker.astype(str) != ""), df.channel_name).astype(str)
    return df


def _experiment_entry(path: Path, name: str, g: pd.DataFrame, tracks_rel: str) -> tuple[dict[str, Any], list[str]]:
    """The YAML entry of one experiment and its canonical labels."""
    where = f"{path}: experiment '{name}'"
    stores = g.store_path.astype(str).unique()
    if len(stores) != 1:
        raise ValueError(f"{where} lists {len(stores)} store_paths {list(stores)[:3]}; one experiment is one "
                         "plate: split it into one experiment per store")
    store = stores[0]
    if "://" not in store and not os.path.isabs(store):
        store = os.path.normpath(os.path.join(path.resolve().parent, store))
    intervals = g.interval_minutes.astype(np.float64).unique()
    if len(intervals) != 1 or not intervals[0] > 0:
        raise ValueError(f"{where}: interval_minutes must be one positive value, got {sorted(intervals)[:5]}; "
                         "fix the parquet's interval_minutes")
    interval = float(intervals[0])
    start_hpi = 0.0
    if "hours_post_perturbation" in g and g.hours_post_perturbation.notna().any():
        hpi = g.hours_post_perturbation.astype(np.float64) - g.t.to_numpy() * interval / 60.0
        hpi = hpi[np.isfinite(hpi)]
        start_hpi = float(np.round(np.median(hpi), 4))
        if np.abs(hpi - start_hpi).max() > 0.01:
            raise ValueError(f"{where}: hours_post_perturbation is not start_hpi + t * interval_minutes / 60 for one "
                             f"start_hpi (spread {hpi.min():.3f}..{hpi.max():.3f} h); fix interval_minutes or the hours")
    wells = sorted(g.well.unique())
    pert = g.drop_duplicates(["well", "perturbation"])
    twice = pert.well[pert.well.duplicated()]
    if len(twice):
        raise ValueError(f"{where}: well {twice.iloc[0]} has several perturbations "
                         f"{sorted(pert.perturbation[pert.well == twice.iloc[0]])}; a well has one perturbation")
    perturbation_wells = {p: sorted(w.well) for p, w in pert.groupby("perturbation", sort=True)}
    pairs = g.drop_duplicates(["label", "channel_name"])
    labels = list(dict.fromkeys(pairs.sort_values(["label", "channel_name"]).label))
    channels: dict[str, Any] = {}
    for label in labels:
        names = pairs.channel_name[pairs.label == label].astype(str).tolist()
        if len(names) > 1:
            raise ValueError(f"{where}: marker '{label}' names several zarr channels {names}; give each channel "
                             "its own marker")
        in_wells = sorted(g.well[g.label == label].unique())
        channels[label] = names[0] if in_wells == wells else {"name": names[0], "wells": in_wells}
    entry = dict(
        name=name, data_path=store, tracks_path=tracks_rel, channels=channels, perturbation_wells=perturbation_wells,
        interval_minutes=interval, start_hpi=start_hpi, include_fovs=sorted(g.fov_name.unique()),
    )
    return entry, labels


def _write_csvs(folder: Path, obs: pd.DataFrame) -> None:
    for fov_name, rows in obs.groupby("fov_name", sort=True):
        target = folder / fov_name
        target.mkdir(parents=True, exist_ok=True)
        rows[CSV_COLUMNS].to_csv(target / "tracks.csv", index=False, lineterminator="\n")


def _our_lineages(yaml_path: Path, threads: int) -> pd.DataFrame:
    """Per track of the written collection: experiment, fov_name, track_id and our lineage_id."""
    from sampler import ExperimentRegistry, IndexConfig, LineageIndex

    registry = ExperimentRegistry.from_yaml(yaml_path)
    # lineages come from every CSV row (before border handling): keep geometry out of the way
    config = IndexConfig(patch_yx=(1, 1), max_border_shift=1 << 30, channel_mode="bag", norm_level=None)
    index = LineageIndex.build(registry, config, threads=threads, progress=False)
    forest, fovs = index.forest, index.fovs
    for exp in registry.experiments:
        found = set(fovs.fov_name[fovs.experiment == exp.name])
        lost = [f for f in exp.include_fovs if f not in found]
        if lost:
            raise ValueError(f"Experiment '{exp.name}': FOVs {lost[:5]} of the parquet are not in the plate "
                             f"{exp.data_path}; check store_path, or drop those rows")
    exp_names = fovs.experiment.to_numpy()[forest["fov"]]
    fov_names = fovs.fov_name.to_numpy()[forest["fov"]]
    gtid = np.array([f"{e}_{f}_{t}" for e, f, t in zip(exp_names, fov_names, forest["track_id"].tolist())],
                    dtype=object)
    return pd.DataFrame({"experiment": exp_names, "fov_name": fov_names,
                         "track_id": forest["track_id"].astype(np.int64), "ours": gtid[forest["root"]]})


def import_cell_index(
    parquet: str | os.PathLike[str],
    out_yaml: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    allow_differences: bool = False,
    threads: int = 8,
) -> ImportReport:
    """Write a collection YAML and tracks CSVs from a reference cell-index parquet; compare lineages.

    Refuses existing outputs unless `overwrite`, and then replaces only a YAML and a tracks folder
    that this command wrote (its header line; the folder's marker). When our recomputed lineage ids differ from the
    parquet's, raises ValueError (nothing installed, differences CSV written) unless
    `allow_differences`.
    """
    parquet, out_yaml = Path(parquet), Path(os.path.abspath(out_yaml))
    if out_yaml.suffix not in (".yml", ".yaml"):
        raise ValueError(f"{out_yaml}: the output must be a .yml or .yaml file")
    stem = out_yaml.stem
    tracks_dir = out_yaml.with_name(f"{stem}_tracks")
    diff_path = out_yaml.with_name(f"{stem}_lineage_differences.csv")
    check_target(out_yaml, overwrite, IMPORTED_YAML, flag="--overwrite")
    check_target(tracks_dir, overwrite, None, flag="--overwrite")
    check_target(diff_path, True, CSV_LINEAGE_DIFFERENCES, flag="a rerun")  # an earlier report is replaced
    df = read_cell_index(parquet)

    obs = df.drop_duplicates(["experiment", "fov_name", "track_id", "t"], keep="first")
    out_yaml.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.import-", dir=out_yaml.parent))
    try:
        experiments, summaries, all_labels = [], [], []
        folders: set[str] = set()
        for name, g in df.groupby("experiment", sort=False, observed=True):
            name = str(name)
            folder = _safe_name(name)
            while folder in folders:
                folder += "_"
            folders.add(folder)
            entry, labels = _experiment_entry(parquet, name, g, f"{tracks_dir.name}/{folder}")
            experiments.append(entry)
            all_labels += [label for label in labels if label not in all_labels]
            e_obs = obs[obs.experiment == name]
            _write_csvs(tmp / tracks_dir.name / folder, e_obs)
            summaries.append(dict(name=name, fovs=len(entry["include_fovs"]),
                                  tracks=int(e_obs.drop_duplicates(["fov_name", "track_id"]).shape[0]),
                                  observations=len(e_obs), channels=entry["channels"],
                                  interval_minutes=entry["interval_minutes"]))
        (tmp / tracks_dir.name).mkdir(exist_ok=True)
        write_marker(tmp / tracks_dir.name, "import-cell-index")  # a later --overwrite may replace it
        doc = dict(name=stem, channels=all_labels, experiments=experiments)
        tmp_yaml = tmp / out_yaml.name
        with open(tmp_yaml, "w") as f:
            f.write(f"# imported from {parquet.resolve()} by dynaclr-dali import-cell-index\n")
            yaml.safe_dump(doc, f, sort_keys=False)

        try:
            ours = _our_lineages(tmp_yaml, threads)
        except CollectionError as err:  # name the parquet and the YAML to be, not the temporary file
            where = err.where.removeprefix(f"{tmp_yaml}: ")
            raise CollectionError(f"{parquet}: imported as {out_yaml.name}: {where}", err.problem, err.hint) from None
        compared, differences = 0, pd.DataFrame(columns=["experiment", "fov_name", "track_id", "ours", "parquet"])
        if "lineage_id" in df:
            theirs = (df.groupby(["experiment", "fov_name", "track_id"], observed=True, sort=False)
                      .lineage_id.agg(lambda s: "|".join(sorted(set(s.astype(str))))).rename("parquet").reset_index())
            theirs["experiment"] = theirs.experiment.astype(str)
            both = theirs.merge(ours, on=["experiment", "fov_name", "track_id"], how="left")
            compared = len(both)
            differences = both[both.ours.astype(str) != both.parquet][["experiment", "fov_name", "track_id", "ours",
                                                                        "parquet"]].reset_index(drop=True)
        report = ImportReport(out_yaml, tracks_dir, summaries, len(df), len(obs),
                              int(obs.drop_duplicates(["experiment", "fov_name", "track_id"]).shape[0]),
                              compared, differences, diff_path if len(differences) else None)
        if len(differences):
            tmp_diff = tmp / diff_path.name
            differences.to_csv(tmp_diff, index=False, lineterminator="\n")
            check_target(diff_path, True, CSV_LINEAGE_DIFFERENCES, flag="a rerun")
            os.replace(tmp_diff, diff_path)
            if not allow_differences:
                first = differences.iloc[0]
                report.installed = False
                raise ValueError(
                    f"{parquet}: our lineage_id differs from the parquet's for {len(differences)} of {compared} tracks "
                    f"(first: experiment '{first.experiment}', FOV {first.fov_name}, track {first.track_id}: ours "
                    f"{first.ours}, parquet {first.parquet}; all in {diff_path}); nothing was installed. Check "
                    "parent_track_id in the parquet (a parent filtered out makes its daughters roots), or pass "
                    "--allow-lineage-differences to keep the collection anyway"
                )
        elif os.path.lexists(diff_path):
            check_target(diff_path, True, CSV_LINEAGE_DIFFERENCES, flag="a rerun")
            diff_path.unlink()  # a report of an earlier run: no longer true
        # install: the tracks folder, then the YAML that points at it (checked again: they may have changed)
        check_target(out_yaml, overwrite, IMPORTED_YAML, flag="--overwrite")
        check_target(tracks_dir, overwrite, None, flag="--overwrite")
        if os.path.lexists(tracks_dir):
            os.rename(tracks_dir, tmp / ".old_tracks")  # removed with the temporary folder
        os.rename(tmp / tracks_dir.name, tracks_dir)
        os.chmod(tmp_yaml, 0o644)
        os.replace(tmp_yaml, out_yaml)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
