"""OME-Zarr HCS plate metadata (NGFF 0.4 / zarr v2 and NGFF 0.5 / zarr v3), never pixels."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sampler.kvstore import RemoteLimits, join, read_json, to_url

_V2_DTYPES = {"|u1": "uint8", "|i1": "int8", "|b1": "bool"}


@dataclass(frozen=True)
class ArrayMeta:
    """Shape (TCZYX), dtype, chunk shape (inner chunks when sharded) and fill value of one array."""

    url: str
    zarr_format: int
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    fill_value: Any


@dataclass(frozen=True)
class FovMeta:
    """One field of view: its name ("A/1/0"), attributes (normalization, omero, ...) and array "0"."""

    name: str
    url: str
    attrs: dict[str, Any] = field(repr=False)
    array: ArrayMeta

    @property
    def well(self) -> str:
        return self.name.rsplit("/", 1)[0]

    @property
    def channel_names(self) -> list[str]:
        return [str(c.get("label", "")) for c in self.attrs.get("omero", {}).get("channels", [])]


@dataclass(frozen=True)
class PlateMeta:
    """A plate: NGFF version, attributes (focus_slice, ...), wells and their FOV names.

    `limits` bound its remote metadata reads (`read_fov` reads with them too).
    """

    url: str
    version: str
    attrs: dict[str, Any] = field(repr=False)
    fovs_by_well: dict[str, list[str]]
    limits: RemoteLimits = RemoteLimits()

    @property
    def wells(self) -> list[str]:
        return list(self.fovs_by_well)

    @property
    def fov_names(self) -> list[str]:
        return [f"{w}/{f}" for w, fovs in self.fovs_by_well.items() for f in fovs]


def _group_attrs(url: str, limits: RemoteLimits) -> tuple[dict[str, Any], int] | None:
    """Attributes of a group (OME keys merged with top-level keys) and its zarr format."""
    v3 = read_json(url, "zarr.json", limits)
    if v3 is not None:
        raw = dict(v3.get("attributes", {}))
        zarr_format = 3
    else:
        raw = read_json(url, ".zattrs", limits)
        if raw is None:
            if read_json(url, ".zgroup", limits) is None:
                return None
            raw = {}
        zarr_format = 2
    ome = raw.pop("ome", None)
    if isinstance(ome, dict):
        raw = {**raw, **ome}
    return raw, zarr_format


def read_plate(path: str, limits: RemoteLimits = RemoteLimits()) -> PlateMeta:
    """Plate, well and FOV listing from metadata (`plate.wells[].path`, `well.images[].path`).

    Remote reads are bounded by `limits` (RemoteReadError naming the URL when one fails).
    """
    url = to_url(path)
    found = _group_attrs(url, limits)
    if found is None:
        raise FileNotFoundError(f"{path}: no OME-Zarr group here (no zarr.json, .zattrs or .zgroup)")
    attrs, zarr_format = found
    plate = attrs.get("plate")
    if not isinstance(plate, dict) or not plate.get("wells"):
        raise ValueError(f"{path}: not an OME-Zarr HCS plate (no 'plate.wells' in its attributes)")
    version = str(plate.get("version", attrs.get("version", "0.5" if zarr_format == 3 else "0.4")))
    well_paths = [str(w["path"]).strip("/") for w in plate["wells"]]

    def well_images(well: str) -> list[str]:
        got = _group_attrs(join(url, well), limits)
        if got is None:
            raise FileNotFoundError(f"{path}: well {well} is listed in the plate but has no metadata")
        images = got[0].get("well", {}).get("images", [])
        return [str(im["path"]).strip("/") for im in images]

    with ThreadPoolExecutor(max_workers=16) as pool:
        images = list(pool.map(well_images, well_paths))
    return PlateMeta(url=url, version=version, attrs=attrs, fovs_by_well=dict(zip(well_paths, images)), limits=limits)


def _array_meta(url: str, limits: RemoteLimits) -> ArrayMeta:
    v3 = read_json(url, "zarr.json", limits)
    if v3 is not None:
        chunks = tuple(v3["chunk_grid"]["configuration"]["chunk_shape"])
        for codec in v3.get("codecs", []):
            if codec.get("name") == "sharding_indexed":
                chunks = tuple(codec["configuration"]["chunk_shape"])
        return ArrayMeta(url, 3, tuple(v3["shape"]), np.dtype(v3["data_type"]), chunks, v3.get("fill_value"))
    v2 = read_json(url, ".zarray", limits)
    if v2 is None:
        raise FileNotFoundError(f"{url}: no zarr array here (no zarr.json or .zarray)")
    dtype = np.dtype(_V2_DTYPES.get(v2["dtype"], v2["dtype"]))
    return ArrayMeta(url, 2, tuple(v2["shape"]), dtype, tuple(v2["chunks"]), v2.get("fill_value"))


def read_fov(plate: PlateMeta, name: str) -> FovMeta:
    """Attributes and full-resolution array metadata of one FOV of `plate`."""
    url = join(plate.url, name)
    found = _group_attrs(url, plate.limits)
    if found is None:
        raise FileNotFoundError(f"{plate.url}: FOV {name} is listed in its well but has no metadata")
    attrs = found[0]
    multiscales = attrs.get("multiscales") or [{}]
    datasets = multiscales[0].get("datasets") or [{"path": "0"}]
    array = _array_meta(join(url, str(datasets[0]["path"])), plate.limits)
    if len(array.shape) != 5:
        raise ValueError(f"{url}: expected a 5-D TCZYX array, got shape {array.shape}")
    return FovMeta(name=name, url=url, attrs=attrs, array=array)


def check_channel_count(experiment: str, fov: FovMeta) -> None:
    """Refuse an FOV whose OMERO channel list does not match its array's C axis.

    A channel name resolved to an index >= C would read outside the array (as zeros or the fill
    value), and a shorter list leaves channels unnamed: either way the names cannot be trusted.
    """
    names, c = fov.channel_names, fov.array.shape[1]
    if len(names) != c:
        beyond = [f"'{n}' (index {i})" for i, n in enumerate(names) if i >= c]
        detail = f"channels {', '.join(beyond)} are beyond the array" if beyond else "some channels have no name"
        raise ValueError(
            f"Experiment '{experiment}', FOV {fov.name}: the OMERO metadata names {len(names)} channels "
            f"{names} but the array {fov.array.url} has C={c}; {detail}. Fix omero.channels in the FOV's "
            "attributes (zarr.json or .zattrs) to list exactly the array's channels, in order"
        )


def read_fovs(plate: PlateMeta, names: list[str], threads: int = 16) -> list[FovMeta]:
    """`read_fov` for many FOVs, concurrently (remote stores answer slowly, one JSON at a time)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda n: read_fov(plate, n), names))
