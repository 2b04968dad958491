"""Tracking CSVs: one per FOV at {tracks_path}/{row}/{col}/{fov}/*.csv, read and validated."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from sampler.progress import tqdm

from sampler.kvstore import RemoteLimits, RemoteReadError, is_local, join, list_remote, local_path, read_remote, to_url

REQUIRED = ("track_id", "t", "y", "x")
OPTIONAL_INT = ("z", "id", "parent_track_id", "parent_id")
#: integer columns and the value a missing entry takes
MISSING = {"z": 0, "id": -1, "parent_track_id": -1, "parent_id": -1}


def find_csv(tracks_path: str, fov_name: str, limits: RemoteLimits = RemoteLimits()) -> tuple[str, bytes]:
    """The one CSV of an FOV (its name and bytes); none or several is an error naming the folder.

    Remote listings and reads are bounded by `limits`."""
    url = join(to_url(tracks_path), fov_name)
    if is_local(url):
        folder = local_path(url)
        names = sorted(n for n in os.listdir(folder) if n.endswith(".csv")) if os.path.isdir(folder) else []
    else:
        names = sorted(k for k in list_remote(url, limits) if k.endswith(".csv"))
    if not names:
        raise FileNotFoundError(
            f"No tracking CSV in {url} (FOV {fov_name}); put its tracks CSV there or list the FOV in the "
            "experiment's exclude_fovs"
        )
    if len(names) > 1:
        raise ValueError(
            f"Expected exactly one tracking CSV in {url}, found: {names} (FOV {fov_name}); keep one of them"
        )
    if is_local(url):
        with open(os.path.join(local_path(url), names[0]), "rb") as f:
            return url + names[0], f.read()
    raw = read_remote(url, names[0], limits)
    if raw is None:
        raise FileNotFoundError(f"{url}{names[0]} was listed but cannot be read (FOV {fov_name})")
    return url + names[0], raw


def parse_tracks(source: str, raw: bytes) -> dict[str, np.ndarray]:
    """Validated columns of one tracking CSV: int64 ids and t, float64 coordinates.

    A missing parent (empty, NaN or -1) becomes -1; duplicates of (track_id, t) are an error.
    """
    try:
        table = pacsv.read_csv(io.BytesIO(raw))
    except Exception as err:  # pyarrow raises several types for malformed CSV
        raise ValueError(f"{source}: not a readable CSV: {err}") from None
    names = table.column_names
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise ValueError(f"{source}: columns {repeated} appear more than once in the header {names}; keep one of "
                         "each (rename or remove the others)")
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{source}: missing required columns {missing}; columns are {table.column_names} "
            f"(a tracks CSV needs {', '.join(REQUIRED)})"
        )
    out = {}
    for col in REQUIRED + OPTIONAL_INT:
        if col not in table.column_names:
            out[col] = np.full(table.num_rows, MISSING[col], dtype=np.int64)
            continue
        column = table.column(col)
        clean = column.null_count == 0 and (
            pa.types.is_integer(column.type) or (col in ("y", "x") and pa.types.is_floating(column.type))
        )
        if clean:
            out[col] = column.to_numpy().astype(np.float64 if col in ("y", "x") else np.int64)
        else:
            out[col] = _parse_slow(source, col, column.to_pandas())
    if (out["t"] < 0).any():
        row = int(np.flatnonzero(out["t"] < 0)[0])
        raise ValueError(f"{source}: negative t {out['t'][row]} at data row {row + 1}; frames count from 0")
    for col in ("y", "x"):
        bad = ~np.isfinite(out[col])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{source}: column '{col}' has a NaN or infinite coordinate ({out[col][row]}) at data row {row + 1} "
                f"({int(bad.sum())} such rows); fix or remove those rows"
            )
    out["parent_track_id"] = np.where(out["parent_track_id"] < 0, -1, out["parent_track_id"])
    order = np.lexsort((out["t"], out["track_id"]))
    tid, t = out["track_id"][order], out["t"][order]
    dup = np.flatnonzero((tid[1:] == tid[:-1]) & (t[1:] == t[:-1]))
    if len(dup):
        row = int(max(order[dup[0]], order[dup[0] + 1]))
        raise ValueError(
            f"{source}: duplicate (track_id, t) = ({out['track_id'][row]}, {out['t'][row]}) at data row {row + 1}; "
            "a track has one observation per frame; remove the duplicate or give it its own track_id"
        )
    return out


def _parse_slow(source: str, col: str, values: pd.Series) -> np.ndarray:
    """One column that is not plainly numeric: NaN-aware conversion with an error naming the row."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(numbers) & values.notna().to_numpy()
    if col in REQUIRED:
        bad |= np.isnan(numbers)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        value = values.iloc[row]
        if pd.isna(value):  # pyarrow reads empty, NaN, NA and null as missing
            what = "a missing (empty or NaN) " + ("coordinate" if col in ("y", "x") else "value")
        else:
            what = f"a missing or non-numeric value {value!r}"
        raise ValueError(f"{source}: column '{col}' has {what} at data row {row + 1}; fix or remove that row")
    if col in ("y", "x"):
        return numbers
    numbers = np.where(np.isnan(numbers), MISSING.get(col, -1), numbers)
    # pyarrow reads an integer column as float64 when one value is outside int64 or one entry is missing:
    # refuse what float64 cannot hold exactly rather than wrap (2^63 -> -2^63) or merge ids
    too_big = np.abs(numbers) >= 2.0**53
    if too_big.any():
        row = int(np.flatnonzero(too_big)[0])
        beyond = not -(2.0**63) < numbers[row] < 2.0**63
        raise ValueError(
            f"{source}: column '{col}' has {values.iloc[row]} at data row {row + 1}, "
            + ("beyond int64 (-2^63 .. 2^63-1); renumber that column's values" if beyond else
               "too large to read exactly (2^53 or more) in a column with missing or non-numeric entries; renumber "
               "that column's values or fill its missing entries")
        )
    if not np.all(numbers == np.round(numbers)):
        row = int(np.flatnonzero(numbers != np.round(numbers))[0])
        raise ValueError(
            f"{source}: column '{col}' must hold integers, got {numbers[row]} at data row {row + 1}; fix that row"
        )
    return numbers.astype(np.int64)


def read_tracks(
    jobs: list[tuple[str, str, RemoteLimits, str]], threads: int = 8, progress: bool = True
) -> list[dict[str, np.ndarray]]:
    """Columns of each (tracks_path, fov_name, remote limits, experiment) job, read concurrently with a
    progress bar; a remote failure names the experiment."""

    def one(job: tuple[str, str, RemoteLimits, str]) -> dict[str, np.ndarray]:
        tracks_path, fov_name, limits, experiment = job
        try:
            source, raw = find_csv(tracks_path, fov_name, limits)
        except RemoteReadError as err:
            raise RemoteReadError(f"Experiment '{experiment}', tracks of FOV {fov_name}: {err}") from None
        return parse_tracks(source, raw)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = pool.map(one, jobs)
        return list(tqdm(results, total=len(jobs), desc="tracks", unit="fov", disable=not progress or len(jobs) < 2))
