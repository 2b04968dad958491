"""A minimal OME-Zarr HCS plate writer (NGFF 0.4 / zarr v2 and NGFF 0.5 / zarr v3, sharded or not).

Writes into a temporary folder beside the destination and renames it into place, so a writer that
dies halfway leaves nothing at the destination; refuses to overwrite unless asked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorstore as ts

AXES = [
    {"name": "t", "type": "time"},
    {"name": "c", "type": "channel"},
    {"name": "z", "type": "space"},
    {"name": "y", "type": "space"},
    {"name": "x", "type": "space"},
]


@dataclass(frozen=True)
class EmptyArray:
    """An array written as metadata only: every chunk is missing and reads as the fill value (0).

    For metadata-only collections (index benchmarks, tests) where pixels are never read.
    """

    shape: tuple[int, int, int, int, int]
    dtype: str = "uint16"

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _write_json(path: str, doc: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def _group(folder: str, version: str, ome: dict[str, Any], extra: Mapping[str, Any] | None = None) -> None:
    """A zarr group with OME metadata `ome` and extra top-level attributes (normalization, focus)."""
    extra = dict(extra or {})
    if version == "0.4":
        _write_json(os.path.join(folder, ".zgroup"), {"zarr_format": 2})
        _write_json(os.path.join(folder, ".zattrs"), {**ome, **extra})
    else:
        attrs = {"ome": {"version": "0.5", **ome}, **extra} if ome else extra
        _write_json(os.path.join(folder, "zarr.json"), {"zarr_format": 3, "node_type": "group", "attributes": attrs})


def _array_spec(folder: str, version: str, data: np.ndarray | EmptyArray, chunks, shards) -> dict[str, Any]:
    url = "file://" + folder
    blosc = {"cname": "zstd", "clevel": 1}
    if version == "0.4":
        return {
            "driver": "zarr",
            "kvstore": url,
            "metadata": {
                "shape": list(data.shape), "chunks": list(chunks), "dtype": np.dtype(data.dtype).str,
                "compressor": {"id": "blosc", "shuffle": 2, **blosc}, "dimension_separator": "/",
                "fill_value": 0, "order": "C",
            },
            "create": True,
        }
    inner = [{"name": "bytes", "configuration": {"endian": "little"}},
             {"name": "blosc", "configuration": {"shuffle": "bitshuffle", **blosc}}]
    if shards is None:
        grid, codecs = chunks, inner
    else:
        grid = shards
        codecs = [{
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": list(chunks), "codecs": inner,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            },
        }]
    return {
        "driver": "zarr3",
        "kvstore": url,
        "metadata": {
            "shape": list(data.shape), "data_type": np.dtype(data.dtype).name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(grid)}},
            "chunk_key_encoding": {"name": "default"}, "codecs": codecs, "fill_value": 0,
            "dimension_names": [a["name"] for a in AXES],
        },
        "create": True,
    }


def write_plate(
    path: str | os.PathLike[str],
    fovs: Mapping[str, np.ndarray | EmptyArray],
    channel_names: list[str],
    *,
    version: str = "0.5",
    chunks: tuple[int, ...] | None = None,
    shards: tuple[int, ...] | None = None,
    fov_attrs: Mapping[str, Mapping[str, Any]] | None = None,
    plate_attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Write TCZYX arrays `fovs` ({"A/1/0": array}) as an HCS plate at `path`; returns the path.

    `chunks` default to one (1, 1, Z, Y, X) block per t and channel; `shards` (zarr v3 only) group
    chunks into shard files. `fov_attrs`/`plate_attrs` are written at the top level of the
    attributes, where the reference's tools put `normalization` and `focus_slice`.
    """
    if version not in ("0.4", "0.5"):
        raise ValueError(f"version must be '0.4' or '0.5', got {version!r}")
    if shards is not None and version == "0.4":
        raise ValueError("sharding needs NGFF 0.5 (zarr v3)")
    dest = os.path.abspath(os.fspath(path))
    if os.path.exists(dest) and not overwrite:
        raise FileExistsError(f"{dest} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.tmp-", dir=parent)
    try:
        wells: dict[str, list[str]] = {}
        for name, data in fovs.items():
            if data.ndim != 5 or data.shape[1] != len(channel_names):
                raise ValueError(f"FOV {name}: expected TCZYX with C={len(channel_names)}, got shape {data.shape}")
            row, col, fov = name.strip("/").split("/")
            wells.setdefault(f"{row}/{col}", []).append(fov)
            folder = os.path.join(tmp, row, col, fov)
            ome = {
                "multiscales": [{
                    "version": version, "axes": AXES, "name": fov,
                    "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * 5}]}],
                }],
                "omero": {"version": version, "channels": [{"label": c, "active": True} for c in channel_names]},
            }
            _group(folder, version, ome, (fov_attrs or {}).get(name))
            chunk = chunks or (1, 1, *data.shape[2:])
            store = ts.open(_array_spec(os.path.join(folder, "0"), version, data, chunk, shards)).result()
            if isinstance(data, np.ndarray):
                store.write(data).result()
        rows = sorted({w.split("/")[0] for w in wells})
        cols = sorted({w.split("/")[1] for w in wells}, key=lambda c: (len(c), c))
        for well, images in wells.items():
            _group(os.path.join(tmp, well), version, {"well": {"images": [{"path": p} for p in images], "version": version}})
        for row in rows:
            _group(os.path.join(tmp, row), version, {})
        plate = {
            "plate": {
                "version": version, "name": os.path.basename(dest),
                "rows": [{"name": r} for r in rows], "columns": [{"name": c} for c in cols],
                "wells": [{"path": w, "rowIndex": rows.index(w.split("/")[0]), "columnIndex": cols.index(w.split("/")[1])}
                          for w in wells],
            }
        }
        _group(tmp, version, plate, plate_attrs)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _stats(values: np.ndarray) -> dict[str, float]:
    v = values[np.isfinite(values)].astype(np.float64)
    p = np.percentile(v, [1, 5, 25, 50, 75, 95, 99])
    return dict(mean=float(v.mean()), std=float(v.std()), median=float(p[3]), iqr=float(p[4] - p[2]),
                min=float(v.min()), max=float(v.max()), p1=float(p[0]), p5=float(p[1]), p95=float(p[5]), p99=float(p[6]))


def normalization_attrs(
    fovs: Mapping[str, np.ndarray], channel_names: list[str], grid: int = 32
) -> dict[str, dict[str, Any]]:
    """Per-FOV `normalization` attributes in the reference's layout, sampled on a YX grid.

    dataset_statistics (all FOVs), fov_statistics (this FOV, all t) and timepoint_statistics (this
    FOV at t, keyed by the string "t").
    """
    samples = {name: a[:, :, :, ::grid, ::grid] for name, a in fovs.items()}
    dataset = {ch: _stats(np.concatenate([s[:, c].ravel() for s in samples.values()]))
               for c, ch in enumerate(channel_names)}
    out = {}
    for name, s in samples.items():
        out[name] = {"normalization": {
            ch: {
                "dataset_statistics": dataset[ch],
                "fov_statistics": _stats(s[:, c]),
                "timepoint_statistics": {str(t): _stats(s[t, c]) for t in range(s.shape[0])},
            }
            for c, ch in enumerate(channel_names)
        }}
    return out
