"""Cell Tracking Challenge (CTC) ground truth as a tracks table.

A CTC `*_GT/TRA` folder holds `man_track.txt` (one line per track, `L B E P`: label, first frame,
last frame inclusive, parent label or 0) and label masks `man_trackNNN.tif` whose pixel values are
track labels. This module turns them into the per-observation table the sampler reads
(`track_id`, `t`, `parent_track_id` = -1 for none, and optionally centroid `y`, `x`), so public CTC
sequences can serve as real test and benchmark data.

`import_ctc` turns one whole CTC sequence (raw frames `<seq>/tNNN.tif` and the sibling `<seq>_GT`)
into a collection the sampler reads: an HCS plate with one FOV, its tracks CSV, normalization
attributes, a collection YAML and a manifest, streamed frame by frame and written atomically.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from sampler.atomic import atomic_directory, check_target
from sampler.progress import tqdm

from dali_pipeline.datasets.omezarr import STAT_NAMES, PlateWriter, summary_stats


def _parse_lines(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The `L B E P` records of a man_track.txt as an (n, 4) int64 array, with each record's 1-based line."""
    records: list[list[int]] = []
    line_numbers: list[int] = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue  # blank lines (e.g. a trailing one) carry no track
            try:
                values = [int(v) for v in fields]
            except ValueError:
                values = []
            if len(values) != 4:
                raise ValueError(
                    f"{path}, line {number}: expected exactly 4 integers 'L B E P' (label, first frame, "
                    f"last frame, parent label or 0), got {line.strip()!r}; fix or remove that line"
                )
            records.append(values)
            line_numbers.append(number)
    return np.array(records, dtype=np.int64).reshape(-1, 4), np.array(line_numbers, dtype=np.int64)


def read_man_track(path: str | os.PathLike[str]) -> pd.DataFrame:
    """One row per (track, frame) of a CTC `man_track.txt`, sorted by (track_id, t).

    Columns `track_id`, `t`, `parent_track_id` (int64; -1 where the parent label is 0). The file is
    validated first (4 integers per line, label >= 1, 0 <= B <= E, unique labels, parents that exist)
    and any violation is a ValueError naming the file and 1-based line.
    """
    path = Path(path)
    rec, line_no = _parse_lines(path)
    label, first, last, parent = rec.T

    def fail(i: int, problem: str, fix: str) -> None:
        raise ValueError(f"{path}, line {line_no[i]}: {problem}; {fix}")

    bad = np.flatnonzero((label < 1) | (first < 0) | (parent < 0))
    if bad.size:
        fail(bad[0], f"label must be >= 1 and frames, parent >= 0, got {rec[bad[0]].tolist()}",
             "correct that line (0 is the background label; a parent of 0 means no parent)")
    bad = np.flatnonzero(first > last)
    if bad.size:
        i = bad[0]
        fail(i, f"track {label[i]} starts at frame {first[i]} after it ends at frame {last[i]} (B > E)",
             "swap or correct B and E on that line")
    order = np.argsort(label, kind="stable")
    dup = np.flatnonzero(label[order][1:] == label[order][:-1])
    if dup.size:
        i, j = order[dup[0]], order[dup[0] + 1]  # first occurrence, its duplicate
        fail(j, f"label {label[j]} already defined on line {line_no[i]}",
             "give every track a unique label L")
    orphan = np.flatnonzero((parent != 0) & ~np.isin(parent, label))
    if orphan.size:
        i = orphan[0]
        fail(i, f"parent label {parent[i]} of track {label[i]} is not a track in this file",
             "set P to an existing label, or to 0 for no parent")

    label, first, parent = label[order], first[order], parent[order]
    n_frames = last[order] - first + 1
    starts = np.cumsum(n_frames) - n_frames  # each track's first row
    offset = np.arange(n_frames.sum(), dtype=np.int64) - np.repeat(starts, n_frames)
    return pd.DataFrame({
        "track_id": np.repeat(label, n_frames),
        "t": np.repeat(first, n_frames) + offset,
        "parent_track_id": np.repeat(np.where(parent == 0, -1, parent), n_frames),
    })


def _mask_path(tra_dir: Path, frame: int) -> Path:
    """`man_track{frame:03d}.tif`, or the 4-digit name that sequences of 1000+ frames use."""
    path = tra_dir / f"man_track{frame:03d}.tif"
    if not path.is_file():
        longer = tra_dir / f"man_track{frame:04d}.tif"
        if longer.is_file():
            return longer
    return path


def _tifffile() -> Any:
    try:
        import tifffile
    except ImportError as e:
        raise ImportError("reading CTC frames and masks needs tifffile: pip install tifffile imagecodecs") from e
    return tifffile


def centroids_from_masks(
    tra_dir: str | os.PathLike[str], tracks: pd.DataFrame, shape: tuple[int, int] | None = None
) -> pd.DataFrame:
    """`tracks` with float `y`, `x` = the centroid of label `track_id` in mask `man_track{t:03d}.tif`.

    Only the frames present in `tracks` are read (pass a subset for speed). Rows whose label has no
    pixel in that frame (CTC allows gaps) are dropped; their count is in `attrs["dropped_no_pixels"]`.
    With `shape` (Y, X), a mask of another shape is a ValueError naming it.
    """
    tifffile = _tifffile()

    tra_dir = Path(tra_dir)
    track_id = tracks["track_id"].to_numpy(np.int64)
    t = tracks["t"].to_numpy(np.int64)
    y = np.full(len(tracks), np.nan)
    x = np.full(len(tracks), np.nan)

    order = np.argsort(t, kind="stable")
    frames, starts = np.unique(t[order], return_index=True)
    for frame, rows in zip(frames, np.split(order, starts[1:])):
        mask_path = _mask_path(tra_dir, int(frame))
        if not mask_path.is_file():
            raise FileNotFoundError(f"{mask_path}: mask for frame {frame} not found; tracks refer to it")
        mask = tifffile.imread(mask_path)
        if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
            raise ValueError(f"{mask_path}: expected a 2-D integer label mask, got {mask.dtype} {mask.shape}")
        if shape is not None and mask.shape != tuple(shape):
            raise ValueError(
                f"{mask_path}: mask shape {mask.shape} differs from the frames' shape {tuple(shape)}; "
                "masks and raw frames of a sequence must have the same (Y, X)"
            )
        flat = np.flatnonzero(mask)  # foreground only: cells are sparse
        labels = mask.ravel()[flat].astype(np.intp)
        row, col = np.divmod(flat, mask.shape[1])
        count = np.bincount(labels)
        sum_y = np.bincount(labels, weights=row, minlength=count.size)
        sum_x = np.bincount(labels, weights=col, minlength=count.size)
        ids = track_id[rows]
        present = (ids >= 0) & (ids < count.size)
        n = np.zeros(rows.size)
        n[present] = count[ids[present]]
        hit = rows[n > 0]
        y[hit] = sum_y[track_id[hit]] / n[n > 0]
        x[hit] = sum_x[track_id[hit]] / n[n > 0]

    keep = ~np.isnan(y)
    out = tracks.assign(y=y, x=x)[keep].reset_index(drop=True)
    out.attrs["dropped_no_pixels"] = int((~keep).sum())
    return out


def ctc_tracks(sequence_gt_dir: str | os.PathLike[str], with_centroids: bool = False) -> pd.DataFrame:
    """Tracks of a CTC `*_GT` folder from `TRA/man_track.txt`, with mask centroids if `with_centroids`."""
    tra_dir = Path(sequence_gt_dir) / "TRA"
    track_file = tra_dir / "man_track.txt"
    if not track_file.is_file():
        raise FileNotFoundError(f"{track_file} not found; pass a CTC '*_GT' folder that contains TRA/man_track.txt")
    tracks = read_man_track(track_file)
    return centroids_from_masks(tra_dir, tracks) if with_centroids else tracks


# ---------------------------------------------------------------------- import a whole sequence
STATS_GRID = 32  #: YX stride of the normalization samples, as the reference's preprocessing
FOV = "A/1/0"  #: the one FOV of an imported sequence
COLLECTION_FILE = "collection.yml"
MANIFEST_FILE = "manifest.json"
CSV_COLUMNS = ["track_id", "t", "y", "x", "parent_track_id", "id"]
_FRAME_NAME = re.compile(r"^t(\d+)\.tiff?$")


def _frame_files(sequence_dir: Path) -> tuple[dict[int, Path], int]:
    """Raw frames `tNNN.tif` of a sequence by frame number, and the digits their names use."""
    found: dict[int, Path] = {}
    digits = 3
    for path in sorted(sequence_dir.iterdir()):
        m = _FRAME_NAME.match(path.name)
        if m is None or not path.is_file():
            continue
        t = int(m.group(1))
        if t in found:
            raise ValueError(f"{sequence_dir}: frame {t} is given twice ({found[t].name} and {path.name}); keep one")
        found[t] = path
        digits = len(m.group(1))
    if not found:
        raise FileNotFoundError(
            f"{sequence_dir}: no raw frames 'tNNN.tif' found; pass a CTC sequence folder such as "
            "'Fluo-N2DH-SIM+_02' (its ground truth in the sibling '<sequence>_GT')"
        )
    return found, digits


def _check_frame_numbers(sequence_dir: Path, found: dict[int, Path], digits: int, last_tracked: int) -> int:
    """The frame count T: frames 0..T-1 must all exist and cover man_track.txt's last frame."""
    n_t = max(max(found), last_tracked) + 1
    missing = [t for t in range(n_t) if t not in found]
    if missing:
        names = ", ".join(f"t{t:0{digits}d}.tif" for t in missing[:8]) + (", ..." if len(missing) > 8 else "")
        raise FileNotFoundError(
            f"{sequence_dir}: {len(missing)} raw frame(s) missing: {names} (frames must run 0..{n_t - 1} "
            f"without gaps; the folder holds {len(found)} frames up to t{max(found):0{digits}d}.tif and "
            f"man_track.txt tracks cells up to frame {last_tracked})"
        )
    return n_t


def _frame_layout(tifffile: Any, paths: list[Path]) -> tuple[tuple[int, int], np.dtype]:
    """(Y, X) and dtype shared by all frames, from the TIFF headers (no pixels decoded)."""
    shape: tuple[int, ...] | None = None
    dtype: np.dtype | None = None
    first: Path | None = None
    for path in paths:
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                this_shape, this_dtype = tuple(series.shape), np.dtype(series.dtype)
        except Exception as e:  # a truncated or foreign file: name it
            raise ValueError(f"{path}: cannot read as a TIFF frame ({type(e).__name__}: {e})") from e
        _check_frame(path, this_shape, this_dtype, shape, dtype, first)
        if shape is None:
            shape, dtype, first = this_shape, this_dtype, path
    assert shape is not None and dtype is not None
    return (int(shape[0]), int(shape[1])), dtype


def _check_frame(
    path: Path, shape: tuple[int, ...], dtype: np.dtype,
    want_shape: tuple[int, ...] | None, want_dtype: np.dtype | None, first: Path | None,
) -> None:
    if len(shape) != 2:
        raise ValueError(f"{path}: expected a 2-D frame (Y, X), got shape {shape}; import 2-D CTC sequences only")
    if want_shape is not None and tuple(shape) != tuple(want_shape):
        raise ValueError(f"{path}: frame shape {tuple(shape)} differs from {tuple(want_shape)} of {first}")
    if want_dtype is not None and dtype != want_dtype:
        raise ValueError(f"{path}: frame dtype {dtype} differs from {want_dtype} of {first}")


def _folder_bytes(folder: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def _track_counts(tracks: pd.DataFrame) -> dict[str, int]:
    """Tracks, lineages (roots), divisions (mothers of >= 2 daughters) and single-daughter mothers."""
    per_track = tracks.groupby("track_id").parent_track_id.first()
    daughters = per_track[per_track.isin(per_track.index)].value_counts()
    return dict(
        tracks=len(per_track), lineages=int((~per_track.isin(per_track.index)).sum()),
        divisions=int((daughters >= 2).sum()), single_daughter_mothers=int((daughters == 1).sum()),
    )


def import_ctc(
    sequence_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    interval_minutes: float,
    name: str | None = None,
    channel: str = "nuclei",
    start_hpi: float = 0.0,
    version: str = "0.5",
    chunks: tuple[int, int, int, int, int] | None = None,
    shards: tuple[int, int, int, int, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Import one CTC sequence into `out_dir` as a collection; returns the path of its collection YAML.

    Reads the raw frames `<sequence_dir>/tNNN.tif` and the ground truth of the sibling folder
    `<sequence_dir>_GT/TRA` (man_track.txt and the label masks), and writes, atomically (a
    temporary folder renamed into place; nothing at `out_dir` if it fails; refuses to replace an
    existing `out_dir` unless `overwrite`, and then only a folder this project wrote):

    - `<name>.zarr`: an HCS plate with one well `A/1` and one FOV `A/1/0`, array (T, 1, 1, Y, X) in
      the frames' dtype, channel `channel`, streamed frame by frame (`chunks`/`shards` as in
      `PlateWriter`; default one chunk per frame). The FOV's `normalization` attributes follow the
      reference's layout (dataset, FOV and per-t statistics of a stride-32 YX grid);
    - `tracks/A/1/0/tracks.csv`: track_id, t, y, x (label centroids), parent_track_id (-1: none), id;
    - `collection.yml`: the collection (label `channel`, perturbation "none" = well A/1), paths
      relative to it; `manifest.json`: sources, counts, dropped rows, sizes and compression ratio.

    `name` (experiment, collection and plate name) defaults to the sequence folder's name. CTC
    files do not record the frame interval: pass the sequence's real `interval_minutes`.
    """
    tifffile = _tifffile()
    start = time.perf_counter()
    sequence_dir = Path(os.path.abspath(os.fspath(sequence_dir)))
    if not sequence_dir.is_dir():
        raise FileNotFoundError(f"{sequence_dir}: CTC sequence folder not found (expects raw frames tNNN.tif)")
    gt_dir = sequence_dir.with_name(f"{sequence_dir.name}_GT")
    track_file = gt_dir / "TRA" / "man_track.txt"
    if not gt_dir.is_dir():
        raise FileNotFoundError(
            f"{gt_dir}: ground-truth folder not found; import_ctc expects the CTC layout with "
            f"'{sequence_dir.name}_GT/TRA/man_track.txt' beside '{sequence_dir.name}'"
        )
    if not track_file.is_file():
        raise FileNotFoundError(
            f"{track_file} not found; the ground truth of {sequence_dir.name} needs TRA/man_track.txt")
    name = sequence_dir.name if name is None else str(name)
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"name must be a plain file name (it names the plate and the experiment), got {name!r}")
    if not interval_minutes > 0:
        raise ValueError(f"interval_minutes must be positive, got {interval_minutes}")
    if version not in ("0.4", "0.5"):
        raise ValueError(f"version must be '0.4' or '0.5', got {version!r}")
    if shards is not None and version != "0.5":
        raise ValueError("shards need version '0.5' (zarr v3)")
    dest = Path(os.path.abspath(os.fspath(out_dir)))
    check_target(dest, overwrite, None)  # early; atomic_directory checks again

    # validate everything cheap before writing anything: frame names, headers, tracks, masks
    tracks = read_man_track(track_file)
    if tracks.empty:
        raise ValueError(f"{track_file}: no tracks; there is nothing to import")
    found, digits = _frame_files(sequence_dir)
    n_t = _check_frame_numbers(sequence_dir, found, digits, int(tracks.t.max()))
    paths = [found[t] for t in range(n_t)]
    (n_y, n_x), dtype = _frame_layout(tifffile, paths)
    in_man_track = len(tracks)
    tracks = centroids_from_masks(gt_dir / "TRA", tracks, shape=(n_y, n_x))
    dropped = int(tracks.attrs["dropped_no_pixels"])
    tracks = tracks.sort_values(["track_id", "t"], kind="stable", ignore_index=True)
    tracks["id"] = np.arange(len(tracks), dtype=np.int64)

    shape = (n_t, 1, 1, n_y, n_x)
    with atomic_directory(dest, overwrite, writer="convert-ctc") as tmp, \
            tqdm(total=n_t, desc=f"import {name}", unit="frame", disable=not progress) as bar:
        plate_path = tmp / f"{name}.zarr"
        samples = np.empty((n_t, len(range(0, n_y, STATS_GRID)), len(range(0, n_x, STATS_GRID))), dtype)
        per_t: dict[str, dict[str, float]] = {}
        with PlateWriter(plate_path, [channel], version=version, chunks=chunks, shards=shards) as plate:
            fov = plate.add_fov(FOV, shape, dtype)
            for t, path in enumerate(paths):
                frame = tifffile.imread(path)
                _check_frame(path, frame.shape, frame.dtype, (n_y, n_x), dtype, paths[0])
                samples[t] = frame[::STATS_GRID, ::STATS_GRID]
                per_t[str(t)] = summary_stats(samples[t])
                fov.write(t, frame[None, None])
                bar.update(1)
            whole = summary_stats(samples)  # one FOV: its statistics are the dataset's
            fov.attrs["normalization"] = {channel: {
                "dataset_statistics": whole, "fov_statistics": whole, "timepoint_statistics": per_t}}
            plate.plate_attrs["normalization"] = {channel: {
                "dataset_statistics": whole, "timepoint_statistics": per_t}}

        csv_path = tmp / "tracks" / FOV / "tracks.csv"
        csv_path.parent.mkdir(parents=True)
        tracks[CSV_COLUMNS].to_csv(csv_path, index=False, float_format="%.3f", lineterminator="\n")
        collection = dict(name=name, channels=[channel], experiments=[dict(
            name=name, data_path=plate_path.name, tracks_path="tracks", channels={channel: channel},
            perturbation_wells={"none": [FOV.rsplit("/", 1)[0]]}, interval_minutes=float(interval_minutes),
            start_hpi=float(start_hpi),
        )])
        with open(tmp / COLLECTION_FILE, "w") as f:
            yaml.safe_dump(collection, f, sort_keys=False)

        decoded = int(np.prod(shape)) * dtype.itemsize
        on_disk = _folder_bytes(plate_path)
        seconds = time.perf_counter() - start
        manifest = dict(
            name=name,
            source=dict(sequence_dir=str(sequence_dir), gt_dir=str(gt_dir), man_track=str(track_file),
                        frames=f"{paths[0].name}..{paths[-1].name}"),
            plate=plate_path.name, fov=FOV, channel=channel, shape=list(shape), dtype=dtype.name,
            version=version, chunks=None if chunks is None else list(chunks),
            shards=None if shards is None else list(shards), interval_minutes=float(interval_minutes),
            frames=n_t, **_track_counts(tracks), observations=len(tracks),
            observations_in_man_track=in_man_track, dropped_no_pixels=dropped,
            stats_grid=STATS_GRID, stat_names=list(STAT_NAMES),
            bytes_decoded=decoded, bytes_on_disk=on_disk, compression_ratio=decoded / on_disk,
            import_seconds=seconds, decoded_mb_per_s=decoded / 1e6 / seconds,
        )
        with open(tmp / MANIFEST_FILE, "w") as f:
            json.dump(manifest, f, indent=1)
    return dest / COLLECTION_FILE
