"""Tracking CSVs: one per FOV at {tracks_path}/{row}/{col}/{fov}/*.csv, read and validated."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv
import tensorstore as ts
from tqdm.auto import tqdm

from sampler.kvstore import is_local, join, local_path, to_url

REQUIRED = ("track_id", "t", "y", "x")
OPTIONAL_INT = ("z", "id", "parent_track_id", "parent_id")
#: integer columns and the value a missing entry takes
MISSING = {"z": 0, "id": -1, "parent_track_id": -1, "parent_id": -1}


def find_csv(tracks_path: str, fov_name: str) -> tuple[str, bytes]:
    """The one CSV of an FOV (its name and bytes); none or several is an error naming the folder."""
    url = join(to_url(tracks_path), fov_name)
    if is_local(url):
        folder = local_path(url)
        names = sorted(n for n in os.listdir(folder) if n.endswith(".csv")) if os.path.isdir(folder) else []
    else:
        kv = ts.KvStore.open(url).result()
        names = sorted(k.decode() for k in kv.list().result() if k.endswith(b".csv") and b"/" not in k)
    if not names:
        raise FileNotFoundError(f"No tracking CSV in {url}")
    if len(names) > 1:
        raise ValueError(f"Expected exactly one tracking CSV in {url}, found: {names}")
    if is_local(url):
        with open(os.path.join(local_path(url), names[0]), "rb") as f:
            return url + names[0], f.read()
    return url + names[0], bytes(ts.KvStore.open(url).result().read(names[0]).result().value)


def parse_tracks(source: str, raw: bytes) -> dict[str, np.ndarray]:
    """Validated columns of one tracking CSV: ints for ids and t, float64 for coordinates.

    A missing parent (empty, NaN or -1) becomes -1; duplicates of (track_id, t) are an error.
    """
    try:
        table = pacsv.read_csv(io.BytesIO(raw))
    except Exception as err:  # pyarrow raises several types for malformed CSV
        raise ValueError(f"{source}: not a readable CSV: {err}") from None
    df = table.to_pandas()
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing required columns {missing}; columns are {list(df.columns)}")
    out: dict[str, np.ndarray] = {}
    for col in REQUIRED + OPTIONAL_INT:
        if col not in df.columns:
            out[col] = np.full(len(df), MISSING[col], dtype=np.int64)
            continue
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.isnan(values) & df[col].notna().to_numpy()
        if col in REQUIRED:
            bad |= np.isnan(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{source}: column '{col}' has a missing or non-numeric value {df[col].iloc[row]!r} "
                f"at data row {row + 1}"
            )
        if col in ("y", "x"):
            out[col] = values
            continue
        values = np.where(np.isnan(values), MISSING.get(col, -1), values)
        if not np.all(values == np.round(values)):
            row = int(np.flatnonzero(values != np.round(values))[0])
            raise ValueError(f"{source}: column '{col}' must hold integers, got {values[row]} at data row {row + 1}")
        out[col] = values.astype(np.int64)
    if (out["t"] < 0).any():
        row = int(np.flatnonzero(out["t"] < 0)[0])
        raise ValueError(f"{source}: negative t {out['t'][row]} at data row {row + 1}")
    out["parent_track_id"] = np.where(out["parent_track_id"] < 0, -1, out["parent_track_id"])
    key = pd.MultiIndex.from_arrays([out["track_id"], out["t"]])
    dup = key.duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise ValueError(
            f"{source}: duplicate (track_id, t) = ({out['track_id'][row]}, {out['t'][row]}) at data row {row + 1}; "
            "a track has one observation per frame"
        )
    return out


def read_tracks(
    jobs: list[tuple[str, str]], threads: int = 8, progress: bool = True
) -> list[dict[str, np.ndarray]]:
    """Columns of each (tracks_path, fov_name) job, read concurrently with a progress bar."""

    def one(job: tuple[str, str]) -> dict[str, np.ndarray]:
        source, raw = find_csv(*job)
        return parse_tracks(source, raw)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = pool.map(one, jobs)
        return list(tqdm(results, total=len(jobs), desc="tracks", unit="fov", disable=not progress or len(jobs) < 2))
