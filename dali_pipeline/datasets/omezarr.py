"""A minimal OME-Zarr HCS plate writer (NGFF 0.4 / zarr v2 and NGFF 0.5 / zarr v3, sharded or not).

`PlateWriter` streams FOVs one t-slice at a time, so plates larger than memory can be written;
`write_plate` is a convenience for in-memory arrays. Both write into a temporary folder beside the
destination and rename it into place, so a writer that dies halfway leaves nothing at the
destination; both refuse to overwrite unless asked, and then replace only a folder this project wrote.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from sampler.atomic import atomic_directory

AXES = [
    {"name": "t", "type": "time"},
    {"name": "c", "type": "channel"},
    {"name": "z", "type": "space"},
    {"name": "y", "type": "space"},
    {"name": "x", "type": "space"},
]
#: statistic names of one level of the reference's `normalization` attributes
STAT_NAMES = ("mean", "std", "median", "iqr", "min", "max", "p1", "p5", "p95", "p99", "p95_p5", "p99_p1")


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


# ---------------------------------------------------------------------- metadata
def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def _group(folder: Path, version: str, ome: dict[str, Any], extra: Mapping[str, Any] | None = None) -> None:
    """A zarr group with OME metadata `ome` and extra top-level attributes (normalization, focus)."""
    extra = dict(extra or {})
    if version == "0.4":
        _write_json(folder / ".zgroup", {"zarr_format": 2})
        _write_json(folder / ".zattrs", {**ome, **extra})
    else:
        attrs = {"ome": {"version": "0.5", **ome}, **extra} if ome else extra
        _write_json(folder / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})


def _array_spec(
    folder: Path, version: str, shape: tuple[int, ...], dtype: np.dtype,
    chunks: tuple[int, ...], shards: tuple[int, ...] | None,
) -> dict[str, Any]:
    """A tensorstore spec creating a TCZYX array compressed with blosc-zstd (level 1, bit/byte shuffle)."""
    # no fsync per chunk: atomicity comes from the final rename, and syncing every small chunk is slow
    url = {"driver": "file", "path": str(folder), "file_io_sync": False}
    blosc = {"cname": "zstd", "clevel": 1}
    fill: bool | int = False if dtype == np.bool_ else 0  # zarr's JSON fill value has the array's type
    if version == "0.4":
        return {
            "driver": "zarr",
            "kvstore": url,
            "metadata": {
                "shape": list(shape), "chunks": list(chunks), "dtype": dtype.str,
                "compressor": {"id": "blosc", "shuffle": 2, **blosc}, "dimension_separator": "/",
                "fill_value": fill, "order": "C",
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
            "shape": list(shape), "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(grid)}},
            "chunk_key_encoding": {"name": "default"}, "codecs": codecs, "fill_value": fill,
            "dimension_names": [a["name"] for a in AXES],
        },
        "create": True,
    }


def _fov_ome(name: str, version: str, channel_names: list[str]) -> dict[str, Any]:
    return {
        "multiscales": [{
            "version": version, "axes": AXES, "name": name,
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * 5}]}],
        }],
        "omero": {"version": version, "channels": [{"label": c, "active": True} for c in channel_names]},
    }


# ---------------------------------------------------------------------- streaming writer
class FovWriter:
    """One FOV of a plate being written: `write(t, frame)` stores t-slices; `attrs` are saved on close.

    `attrs` (top-level FOV attributes such as `normalization`) may be changed until the plate closes.
    """

    def __init__(self, name: str, array: ts.TensorStore, attrs: dict[str, Any], pending: deque, max_pending: int):
        self.name = name
        self.array = array
        self.attrs = attrs
        self._pending = pending
        self._max_pending = max_pending

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype.numpy_dtype

    def write(self, t: int, frame: np.ndarray) -> None:
        """Store `frame` (C, Z, Y, X) at time `t`; asynchronous, with a bounded number of writes in flight."""
        if tuple(frame.shape) != self.shape[1:]:
            raise ValueError(f"FOV {self.name}: a frame must be (C, Z, Y, X) = {self.shape[1:]}, got {frame.shape}")
        if not 0 <= t < self.shape[0]:
            raise IndexError(f"FOV {self.name}: t={t} outside [0, {self.shape[0]})")
        self._pending.append(self.array[t].write(np.asarray(frame, dtype=self.dtype)))
        while len(self._pending) > self._max_pending:
            self._pending.popleft().result()


class PlateWriter:
    """Write an HCS plate FOV by FOV without holding it in memory (a context manager).

    ```
    with PlateWriter(path, ["Phase3D", "GFP"], version="0.5", shards=...) as plate:
        fov = plate.add_fov("A/1/0", (T, C, Z, Y, X), "uint16")
        for t in range(T):
            fov.write(t, frame_t)
    ```
    Data go to a temporary folder beside `path`; on clean exit the well, row and plate metadata are
    written and the folder is renamed to `path`; on error it is removed. `chunks` default to one
    (1, 1, Z, Y, X) block per t and channel; `shards` (zarr v3 only) group chunks into shard files.
    `plate_attrs` and each FOV's `attrs` go to the top level of the attributes, where the
    reference's tools put `focus_slice` and `normalization`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        channel_names: list[str],
        *,
        version: str = "0.5",
        chunks: tuple[int, ...] | None = None,
        shards: tuple[int, ...] | None = None,
        plate_attrs: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        max_pending: int = 4,
    ) -> None:
        if version not in ("0.4", "0.5"):
            raise ValueError(f"version must be '0.4' or '0.5', got {version!r}")
        if shards is not None and version == "0.4":
            raise ValueError("sharding needs NGFF 0.5 (zarr v3)")
        self.path = Path(os.path.abspath(os.fspath(path)))
        self.channel_names = list(channel_names)
        self.version = version
        self.chunks = None if chunks is None else tuple(chunks)
        self.shards = None if shards is None else tuple(shards)
        self.plate_attrs: dict[str, Any] = dict(plate_attrs or {})
        self.overwrite = overwrite
        self.fovs: dict[str, FovWriter] = {}
        self._max_pending = max_pending
        self._pending: deque = deque()
        self._stack: ExitStack | None = None
        self._tmp: Path | None = None

    def __enter__(self) -> "PlateWriter":
        self._stack = ExitStack()
        self._tmp = self._stack.enter_context(atomic_directory(self.path, self.overwrite, writer="plate"))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        stack, self._stack = self._stack, None
        if exc_type is not None:
            self._drain(raise_errors=False)  # no write may land in the folder being removed
            stack.__exit__(exc_type, exc, tb)
            return
        with stack:  # an error while finishing removes the temporary folder too
            self._drain(raise_errors=True)
            self._write_metadata()

    def add_fov(
        self, name: str, shape: tuple[int, ...], dtype: str | np.dtype = "uint16",
        attrs: Mapping[str, Any] | None = None,
    ) -> FovWriter:
        """Create FOV `name` ("A/1/0") as a TCZYX array (unwritten chunks read as 0)."""
        if self._tmp is None:
            raise RuntimeError("PlateWriter.add_fov needs an open writer: use `with PlateWriter(...) as plate:`")
        shape = tuple(int(s) for s in shape)
        if len(shape) != 5 or shape[1] != len(self.channel_names):
            raise ValueError(f"FOV {name}: expected TCZYX with C={len(self.channel_names)}, got shape {shape}")
        name = name.strip("/")
        if len(name.split("/")) != 3:
            raise ValueError(f"FOV name must look like 'A/1/0' (row/column/fov), got {name!r}")
        if name in self.fovs:
            raise ValueError(f"FOV {name} was already added")
        folder = self._tmp / name / "0"
        spec = _array_spec(folder, self.version, shape, np.dtype(dtype), self.chunks or (1, 1, *shape[2:]), self.shards)
        fov = FovWriter(name, ts.open(spec).result(), dict(attrs or {}), self._pending, self._max_pending)
        self.fovs[name] = fov
        return fov

    def _drain(self, raise_errors: bool) -> None:
        while self._pending:
            future = self._pending.popleft()
            try:
                future.result()
            except Exception:
                if raise_errors:
                    raise

    def _write_metadata(self) -> None:
        assert self._tmp is not None
        wells: dict[str, list[str]] = {}
        for name, fov in self.fovs.items():
            row, col, image = name.split("/")
            wells.setdefault(f"{row}/{col}", []).append(image)
            _group(self._tmp / name, self.version, _fov_ome(image, self.version, self.channel_names), fov.attrs)
        rows = sorted({w.split("/")[0] for w in wells})
        cols = sorted({w.split("/")[1] for w in wells}, key=lambda c: (len(c), c))
        for well, images in wells.items():
            _group(self._tmp / well, self.version,
                   {"well": {"images": [{"path": p} for p in images], "version": self.version}})
        for row in rows:
            _group(self._tmp / row, self.version, {})
        plate = {
            "plate": {
                "version": self.version, "name": self.path.name,
                "rows": [{"name": r} for r in rows], "columns": [{"name": c} for c in cols],
                "wells": [{"path": w, "rowIndex": rows.index(w.split("/")[0]),
                           "columnIndex": cols.index(w.split("/")[1])} for w in wells],
            }
        }
        _group(self._tmp, self.version, plate, self.plate_attrs)


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
    """Write in-memory TCZYX arrays `fovs` ({"A/1/0": array}) as an HCS plate at `path`; returns the path.

    A convenience over `PlateWriter` (see there for chunks, shards and attributes); an `EmptyArray`
    writes metadata only.
    """
    with PlateWriter(path, channel_names, version=version, chunks=chunks, shards=shards,
                     plate_attrs=plate_attrs, overwrite=overwrite) as plate:
        for name, data in fovs.items():
            fov = plate.add_fov(name, data.shape, data.dtype, (fov_attrs or {}).get(name))
            if isinstance(data, np.ndarray):
                for t in range(data.shape[0]):
                    fov.write(t, data[t])
    return str(plate.path)


# ---------------------------------------------------------------------- normalization statistics
def summary_stats(values: np.ndarray) -> dict[str, float]:
    """One level of the reference's statistics (NaN-aware: non-finite values are ignored)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    p1, p5, p25, p50, p75, p95, p99 = np.percentile(v, [1, 5, 25, 50, 75, 95, 99])
    return dict(mean=float(v.mean()), std=float(v.std()), median=float(p50), iqr=float(p75 - p25),
                min=float(v.min()), max=float(v.max()), p1=float(p1), p5=float(p5), p95=float(p95),
                p99=float(p99), p95_p5=float(p95 - p5), p99_p1=float(p99 - p1))


def normalization_attrs(
    fovs: Mapping[str, np.ndarray], channel_names: list[str], grid: int = 32
) -> dict[str, dict[str, Any]]:
    """Per-FOV `normalization` attributes in the reference's layout, sampled on a YX grid.

    dataset_statistics (all FOVs), fov_statistics (this FOV, all t) and timepoint_statistics (this
    FOV at t, keyed by the string "t").
    """
    samples = {name: a[:, :, :, ::grid, ::grid] for name, a in fovs.items()}
    dataset = {ch: summary_stats(np.concatenate([s[:, c].ravel() for s in samples.values()]))
               for c, ch in enumerate(channel_names)}
    out = {}
    for name, s in samples.items():
        out[name] = {"normalization": {
            ch: {
                "dataset_statistics": dataset[ch],
                "fov_statistics": summary_stats(s[:, c]),
                "timepoint_statistics": {str(t): summary_stats(s[t, c]) for t in range(s.shape[0])},
            }
            for c, ch in enumerate(channel_names)
        }}
    return out
