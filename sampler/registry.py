"""Experiments of a collection: where data live, how channels map, time and Z per experiment."""

from __future__ import annotations


import difflib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sampler.collection import CollectionError, ExperimentEntry, RemoteEntry, read_collection
from sampler.kvstore import RemoteLimits, RemoteReadError, is_local, local_path, to_url
from sampler.plate import FovMeta, PlateMeta, check_channel_count, read_fov, read_plate


@dataclass(frozen=True)
class ChannelSource:
    """Where a canonical channel label lives in one experiment: zarr channel name, optional wells."""

    zarr_name: str
    wells: tuple[str, ...] = ()

    def in_well(self, well: str) -> bool:
        return not self.wells or well in self.wells


@dataclass
class Experiment:
    """One experiment: a plate, its tracks, its channel map and its clock.

    `origin` says where it was declared ("collection.yml: experiments[1] (name 'b')"), for errors.
    """

    name: str
    data_path: str
    tracks_path: str
    channels: dict[str, ChannelSource]
    perturbation_wells: dict[str, list[str]]
    interval_minutes: float
    start_hpi: float = 0.0
    include_wells: list[str] = field(default_factory=list)
    exclude_wells: list[str] = field(default_factory=list)
    include_fovs: list[str] = field(default_factory=list)
    exclude_fovs: list[str] = field(default_factory=list)
    pixel_size_xy_um: float | None = None
    pixel_size_z_um: float | None = None
    origin: str = ""
    #: bounds on its remote reads (YAML `remote:`, collection level, then experiment level)
    remote: RemoteLimits = RemoteLimits()

    def perturbation_of(self, well: str) -> str:
        for label, wells in self.perturbation_wells.items():
            if well in wells:
                return label
        return "unknown"

    def where(self, field_path: str) -> str:
        """Where a field of this experiment was declared, for error messages."""
        return f"{self.origin or f'experiment {self.name!r}'}.{field_path}"

    @classmethod
    def from_entry(cls, entry: ExperimentEntry, base_dir: str, datasets_root: str | None, origin: str,
                   remote: RemoteLimits = RemoteLimits()) -> "Experiment":
        """An Experiment from a validated YAML entry; relative paths are resolved against `base_dir`;
        its `remote:` keys replace those of `remote` (the collection's limits)."""

        def resolve(p: str) -> str:
            if datasets_root is not None:
                p = p.replace("${datasets_root}", datasets_root)
            return p if "://" in p or os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))

        return cls(
            name=entry.name, data_path=resolve(entry.data_path), tracks_path=resolve(entry.tracks_path),
            channels={label: ChannelSource(name, wells) for label, (name, wells) in entry.sources().items()},
            perturbation_wells={k: list(v) for k, v in entry.perturbation_wells.items()},
            interval_minutes=entry.interval_minutes, start_hpi=entry.start_hpi,
            include_wells=list(entry.include_wells or []), exclude_wells=list(entry.exclude_wells or []),
            include_fovs=list(entry.include_fovs or []), exclude_fovs=list(entry.exclude_fovs or []),
            pixel_size_xy_um=entry.pixel_size_xy_um, pixel_size_z_um=entry.pixel_size_z_um, origin=origin,
            remote=remote_limits(remote, entry.remote, f"{origin}.remote"),
        )


def remote_limits(limits: RemoteLimits, entry: RemoteEntry | None, where: str) -> RemoteLimits:
    """`limits` with the keys a YAML `remote:` entry sets; a contradiction (max delay < delay) names `where`."""
    if entry is None:
        return limits
    try:
        return replace(limits, **entry.model_dump(exclude_none=True))
    except ValueError as err:
        raise CollectionError(where, str(err), "set retry_max_delay_s >= retry_delay_s") from None


class ExperimentRegistry:
    """Validated experiments with their plate metadata, channel maps, tau ranges and Z windows.

    `labels` are the collection's canonical channel labels: the channel order of every batch.
    Z settings follow the reference: `z_extraction_window` (default `z_window`) slices are read per
    experiment around the plate focus (or the middle), `z_focus_offset` of them below focus.
    With `reference_pixel_size_xy_um` / `_z_um`, experiments imaged at other pixel sizes are read
    over a box scaled by `scale_factors[exp] = (z, y, x)` = reference / experiment pixel size and
    resampled to the common patch size (so a patch covers the same microns in every experiment).
    """

    def __init__(
        self,
        experiments: list[Experiment],
        labels: list[str] | None = None,
        *,
        z_window: int | None = None,
        z_extraction_window: int | None = None,
        z_focus_offset: float = 0.5,
        focus_channel: str | None = None,
        reference_pixel_size_xy_um: float | None = None,
        reference_pixel_size_z_um: float | None = None,
    ) -> None:
        if not experiments:
            raise ValueError("Empty experiments list: at least one experiment is required.")
        seen: set[str] = set()
        for exp in experiments:
            if exp.name in seen:
                raise CollectionError(exp.where("name"), f"duplicate experiment name '{exp.name}'",
                                      "give each experiment a unique name")
            seen.add(exp.name)
        if labels is None:
            labels = list(dict.fromkeys(label for exp in experiments for label in exp.channels))
        self.labels: list[str] = list(labels)
        self.experiments: list[Experiment] = list(experiments)
        self.z_window = z_window
        self.z_extraction_window = z_extraction_window
        self.z_focus_offset = z_focus_offset
        self.focus_channel = focus_channel
        self._by_name = {exp.name: exp for exp in experiments}
        self.plates: dict[str, PlateMeta] = {}
        self.first_fovs: dict[str, FovMeta] = {}
        self.zarr_channels: dict[str, list[str]] = {}
        self.channel_maps: dict[str, dict[int, int]] = {}
        self.z_ranges: dict[str, tuple[int, int]] = {}
        self.reference_pixel_size_xy_um = reference_pixel_size_xy_um
        self.reference_pixel_size_z_um = reference_pixel_size_z_um
        for axis, reference in (("xy", reference_pixel_size_xy_um), ("z", reference_pixel_size_z_um)):
            missing = [e.name for e in experiments if getattr(e, f"pixel_size_{axis}_um") is None]
            if reference is not None and missing:
                raise ValueError(
                    f"reference_pixel_size_{axis}_um set but experiments missing pixel_size_{axis}_um: {missing}"
                )
        self.scale_factors: dict[str, tuple[float, float, float]] = {
            e.name: (_scale(reference_pixel_size_z_um, e.pixel_size_z_um),
                     *(_scale(reference_pixel_size_xy_um, e.pixel_size_xy_um),) * 2)
            for e in experiments
        }
        for exp in experiments:
            self._validate(exp)
        depths = {name: stop - start for name, (start, stop) in self.z_ranges.items()}
        if len(set(depths.values())) > 1:
            raise ValueError(
                f"Experiments read different Z depths {depths}: set z_extraction_window (or z_window) "
                "so that every experiment reads the same number of slices."
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **settings: Any) -> "ExperimentRegistry":
        """Read and validate a collection YAML (`sampler.collection`); `settings` are the Z options of the constructor."""
        model = read_collection(path)
        base = str(Path(path).resolve().parent)
        remote = remote_limits(RemoteLimits(), model.remote, f"{os.fspath(path)}: remote")
        experiments = [Experiment.from_entry(e, base, model.datasets_root, f"{os.fspath(path)}: experiments[{i}] "
                                                                          f"(name {e.name!r})", remote)
                       for i, e in enumerate(model.experiments)]
        return cls(experiments, model.channels, **settings)

    def _validate(self, exp: Experiment) -> None:
        """Check an experiment against its plate: path, wells, FOVs, selection, channels; record its maps."""
        unknown = [label for label in exp.channels if label not in self.labels]
        if unknown:
            raise CollectionError(exp.where("channels"), f"labels {unknown} are not among the collection's labels "
                                  f"{self.labels}", "add them to the top-level 'channels' list or fix the labels")
        try:
            url = to_url(exp.data_path)
        except ValueError as err:
            raise CollectionError(exp.where("data_path"), str(err), "fix data_path") from None
        if is_local(url) and not os.path.isdir(local_path(url)):
            raise CollectionError(exp.where("data_path"), f"does not exist: {exp.data_path}",
                                  "fix data_path (a relative path is resolved against the YAML's folder)")
        try:
            plate = read_plate(exp.data_path, exp.remote)
        except RemoteReadError as err:
            raise RemoteReadError(f"Experiment '{exp.name}': {err}") from None
        except (FileNotFoundError, ValueError) as err:
            raise CollectionError(exp.where("data_path"), str(err),
                                  "data_path must be an OME-Zarr HCS plate: the folder holding the plate's zarr.json "
                                  "or .zattrs, not one of its wells or FOVs") from None
        named = [(f"perturbation_wells.{label}", wells, plate.wells) for label, wells in exp.perturbation_wells.items()]
        named += [("include_wells", exp.include_wells, plate.wells), ("exclude_wells", exp.exclude_wells, plate.wells),
                  ("include_fovs", exp.include_fovs, plate.fov_names), ("exclude_fovs", exp.exclude_fovs,
                                                                         plate.fov_names)]
        for field_path, listed, there in named:
            absent = [x for x in listed if x not in there]
            if absent:
                close = difflib.get_close_matches(absent[0], there, n=1)
                raise CollectionError(
                    exp.where(field_path), f"{absent} {'are' if len(absent) > 1 else 'is'} not in the plate "
                    f"{exp.data_path}", (f"did you mean '{close[0]}'? " if close else "") + f"there: {there[:24]}"
                    + (" ..." if len(there) > 24 else ""))
        for field_path, fovs in _selection(exp, plate.fov_names):
            if not fovs:
                raise CollectionError(exp.where(field_path), "leaves no FOV to read",
                                      "this experiment's perturbation_wells and include/exclude lists select nothing: "
                                      "widen them, or remove the experiment")
        try:
            fov = read_fov(plate, _selection(exp, plate.fov_names)[-1][1][0])
        except RemoteReadError as err:
            raise RemoteReadError(f"Experiment '{exp.name}': {err}") from None
        zarr_channels = fov.channel_names
        missing = [src.zarr_name for src in exp.channels.values() if src.zarr_name not in zarr_channels]
        if missing:
            raise CollectionError(exp.where("channels"), f"zarr channels {missing} not found in the plate "
                                  f"(FOV {fov.name}); available: {zarr_channels}",
                                  "map each label to one of the available zarr channel names")
        check_channel_count(exp.name, fov)
        self.plates[exp.name] = plate
        self.first_fovs[exp.name] = fov
        self.zarr_channels[exp.name] = zarr_channels
        self.channel_maps[exp.name] = {
            i: zarr_channels.index(exp.channels[label].zarr_name)
            for i, label in enumerate(self.labels)
            if label in exp.channels
        }
        self.z_ranges[exp.name] = self._z_range(exp, plate, fov.array.shape[2])

    def _z_range(self, exp: Experiment, plate: PlateMeta, z_total: int) -> tuple[int, int]:
        z_extract = self.z_extraction_window or self.z_window
        if z_extract is None:
            return (0, z_total)
        if self.z_window is not None and z_extract < self.z_window:
            raise ValueError(
                f"Experiment '{exp.name}': extraction range ({z_extract}) < z_window ({self.z_window}). "
                "Increase z_extraction_window or reduce z_window."
            )
        if z_extract > z_total:
            raise ValueError(
                f"Experiment '{exp.name}': its plate has {z_total} Z slices, fewer than the "
                f"{z_extract} to read (z_extraction_window / z_window)."
            )
        label = self.focus_channel if self.focus_channel in exp.channels else next(iter(exp.channels))
        focus_name = exp.channels[label].zarr_name
        focus = plate.attrs.get("focus_slice", {}).get(focus_name, {}).get("dataset_statistics", {})
        z_focus = focus.get("z_focus_mean")
        z_center = round(z_focus) if z_focus is not None else z_total // 2
        z_below = int(z_extract * self.z_focus_offset)
        z_start = max(0, z_center - z_below)
        z_end = min(z_total, z_start + z_extract)
        return (max(0, z_end - z_extract), z_end)

    # ------------------------------------------------------------------ queries
    def __getitem__(self, name: str) -> Experiment:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"Experiment '{name}' not found in registry. Available: {list(self._by_name)}") from None

    @property
    def names(self) -> list[str]:
        return [exp.name for exp in self.experiments]

    def tau_range_frames(self, name: str, hours: tuple[float, float]) -> tuple[int, int]:
        """Tau range in frames for an experiment: Python (banker's) rounding, as the reference."""
        interval = self[name].interval_minutes
        return (round(hours[0] * 60 / interval), round(hours[1] * 60 / interval))

    def selected_fovs(self, name: str) -> list[str]:
        """FOV names of an experiment after perturbation, include and exclude filters (plate order)."""
        return _selection(self[name], self.plates[name].fov_names)[-1][1]

    def read_box(self, name: str, patch_yx: tuple[int, int]) -> tuple[int, int, int, int]:
        """(z_start, z_count, y_size, x_size) of an experiment's read box for a common `patch_yx`.

        Sizes scale with the pixel size (round(size * scale)); the Z window keeps its centre and
        takes round(depth * scale_z) slices, as the reference.
        """
        sz, sy, sx = self.scale_factors[name]
        z0, z1 = self.z_ranges[name]
        count = max(1, round((z1 - z0) * sz))
        start = (z0 + z1) // 2 - count // 2 if count != z1 - z0 else z0
        return start, count, max(1, round(patch_yx[0] * sy)), max(1, round(patch_yx[1] * sx))

    def describe(self) -> pd.DataFrame:
        """One row per experiment: the resolved data_path and tracks_path, the URL the reader opens, FOVs.

        Paths are taken literally: relative ones are joined to the YAML's folder and `${datasets_root}`
        is replaced; nothing else is expanded (no `~`, no environment variables) and nothing is run.
        """
        return pd.DataFrame([
            dict(experiment=exp.name, data_path=exp.data_path, tracks_path=exp.tracks_path,
                 data_url=self.plates[exp.name].url, fovs=len(self.selected_fovs(exp.name)))
            for exp in self.experiments
        ])

    def storage_dtypes(self) -> dict[str, np.dtype]:
        return {name: fov.array.dtype for name, fov in self.first_fovs.items()}


def _scale(reference: float | None, pixel: float | None) -> float:
    """reference / experiment pixel size, 1 when either is unknown (as the reference)."""
    return 1.0 if reference is None or pixel is None else reference / pixel


def _selection(exp: Experiment, plate_fovs: list[str]) -> list[tuple[str, list[str]]]:
    """The FOVs left after each selection field, in order: (field, FOVs); the last is the selection."""
    steps = [("perturbation_wells", {w for ws in exp.perturbation_wells.values() for w in ws})]
    if exp.include_wells:
        steps.append(("include_wells", steps[-1][1] & set(exp.include_wells)))
    steps.append(("exclude_wells", steps[-1][1] - set(exp.exclude_wells)))
    out = [(field_path, [f for f in plate_fovs if f.rsplit("/", 1)[0] in wells]) for field_path, wells in steps]
    if exp.include_fovs:
        out.append(("include_fovs", [f for f in out[-1][1] if f in exp.include_fovs]))
    out.append(("exclude_fovs", [f for f in out[-1][1] if f not in exp.exclude_fovs]))
    return out
