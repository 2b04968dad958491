"""Cell Tracking Challenge (CTC) ground truth as a tracks table.

A CTC `*_GT/TRA` folder holds `man_track.txt` (one line per track, `L B E P`: label, first frame,
last frame inclusive, parent label or 0) and label masks `man_trackNNN.tif` whose pixel values are
track labels. This module turns them into the per-observation table the sampler reads
(`track_id`, `t`, `parent_track_id` = -1 for none, and optionally centroid `y`, `x`), so public CTC
sequences can serve as real test and benchmark data.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd


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


def centroids_from_masks(tra_dir: str | os.PathLike[str], tracks: pd.DataFrame) -> pd.DataFrame:
    """`tracks` with float `y`, `x` = the centroid of label `track_id` in mask `man_track{t:03d}.tif`.

    Only the frames present in `tracks` are read (pass a subset for speed). Rows whose label has no
    pixel in that frame (CTC allows gaps) are dropped; their count is in `attrs["dropped_no_pixels"]`.
    """
    try:
        import tifffile
    except ImportError as e:
        raise ImportError("reading CTC masks needs tifffile: pip install tifffile imagecodecs") from e

    tra_dir = Path(tra_dir)
    track_id = tracks["track_id"].to_numpy(np.int64)
    t = tracks["t"].to_numpy(np.int64)
    y = np.full(len(tracks), np.nan)
    x = np.full(len(tracks), np.nan)

    order = np.argsort(t, kind="stable")
    frames, starts = np.unique(t[order], return_index=True)
    for frame, rows in zip(frames, np.split(order, starts[1:])):
        mask_path = tra_dir / f"man_track{frame:03d}.tif"
        if not mask_path.is_file():
            raise FileNotFoundError(f"{mask_path}: mask for frame {frame} not found; tracks refer to it")
        mask = tifffile.imread(mask_path)
        if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
            raise ValueError(f"{mask_path}: expected a 2-D integer label mask, got {mask.dtype} {mask.shape}")
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
