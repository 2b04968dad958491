"""Tiny collections for tests: plates written by our writer, hand-made CSVs, a collection YAML."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from dali_pipeline.datasets.omezarr import write_plate


def pixels(experiment: str, fov: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The deterministic pixels written for an FOV: the independent expectation for patch reads."""
    rng = np.random.default_rng(zlib.crc32(f"{experiment}/{fov}".encode()))
    return rng.integers(0, 1000, size=shape).astype(dtype)


def expected_patches(index, boxes) -> np.ndarray:
    """The boxes cut with plain numpy from the arrays `make_experiment` wrote (shapes from `index.fovs`)."""
    z, y, x = index.read_shape
    out = []
    for f, t, z0, y0, x0, ch in zip(boxes.fov, boxes.t, boxes.z, boxes.y, boxes.x, boxes.channels):
        fov = index.fovs.iloc[f]
        shape = tuple(int(fov[a]) for a in "TCZYX")
        full = pixels(fov.experiment, fov.fov_name, shape, index.experiments.storage_dtype[fov.exp])
        out.append(full[t][ch][:, z0:z0 + z, y0:y0 + y, x0:x0 + x])
    return np.stack(out).astype(index.batch_dtype)


def known_norm(zarr_name: str, t: int) -> tuple[float, float]:
    """The (mean, std) written for a channel at t: an independent expectation for the index."""
    return 100.0 + 7.0 * t + len(zarr_name), 2.0 + 0.5 * t


def norm_attrs(channel_names: list[str], n_t: int) -> dict[str, Any]:
    out = {}
    for ch in channel_names:
        per_t = {}
        for t in range(n_t):
            mean, std = known_norm(ch, t)
            per_t[str(t)] = {"mean": mean, "std": std, "median": mean, "iqr": 1.0}
        out[ch] = {
            "timepoint_statistics": per_t,
            "fov_statistics": {"mean": 50.0, "std": 5.0, "median": 49.0, "iqr": 3.0},
            "dataset_statistics": {"mean": 40.0, "std": 4.0, "median": 39.0, "iqr": 2.0},
        }
    return {"normalization": out}


def make_experiment(
    root: Path,
    name: str,
    tracks: dict[str, pd.DataFrame],
    channel_names: list[str],
    channels: dict[str, str] | list[dict[str, Any]],
    *,
    shape: tuple[int, int, int] = (3, 64, 64),
    n_t: int = 10,
    version: str = "0.5",
    dtype: str = "uint16",
    interval_minutes: float = 30.0,
    perturbation_wells: dict[str, list[str]] | None = None,
    with_norm: bool = True,
    plate_attrs: dict[str, Any] | None = None,
    chunks: tuple[int, ...] | None = None,
    shards: tuple[int, ...] | None = None,
    data: dict[str, np.ndarray] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write a plate with one FOV per key of `tracks` and its CSVs; return the YAML entry.

    `data` gives FOVs' TCZYX arrays to write instead of `pixels(...)` (their shape and dtype win).
    """
    fovs = {f: pixels(name, f, (n_t, len(channel_names), *shape), dtype) if data is None or f not in data
            else data[f] for f in tracks}
    attrs = {f: norm_attrs(channel_names, a.shape[0]) for f, a in fovs.items()} if with_norm else None
    data_path = root / f"{name}.zarr"
    write_plate(data_path, fovs, channel_names, version=version, fov_attrs=attrs, plate_attrs=plate_attrs,
                chunks=chunks, shards=shards)
    tracks_path = root / f"{name}_tracks"
    for fov, df in tracks.items():
        folder = tracks_path / fov
        os.makedirs(folder, exist_ok=True)
        df.to_csv(folder / "tracks.csv", index=False)
    wells = sorted({f.rsplit("/", 1)[0] for f in tracks})
    return dict(
        name=name, data_path=str(data_path), tracks_path=str(tracks_path), channels=channels,
        perturbation_wells=perturbation_wells or {"mock": wells}, interval_minutes=interval_minutes, **extra,
    )


def write_collection(root: Path, experiments: list[dict[str, Any]], labels: list[str] | None = None) -> Path:
    doc: dict[str, Any] = {"name": "test", "experiments": experiments}
    if labels is not None:
        doc["channels"] = labels
    path = root / "collection.yml"
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return path


def track_rows(track_id: int, ts: range, y: float = 32.0, x: float = 32.0, parent: int = -1) -> pd.DataFrame:
    """Rows of one track present at every t of `ts`."""
    return pd.DataFrame({"track_id": track_id, "t": list(ts), "y": y, "x": x, "parent_track_id": parent})


def tracks_table(*parts: pd.DataFrame) -> pd.DataFrame:
    df = pd.concat(parts, ignore_index=True)
    df["id"] = np.arange(len(df))
    return df
