"""Experiments of a collection: where data live, how channels map, time and Z per experiment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from sampler.kvstore import RemoteLimits, RemoteReadError, is_local, local_path, to_url
from sampler.plate import FovMeta, PlateMeta, read_fov, read_plate


@dataclass(frozen=True)
class ChannelSource:
    """Where a canonical channel label lives in one experiment: zarr channel name, optional wells."""

    zarr_name: str
    wells: tuple[str, ...] = ()

    def in_well(self, well: str) -> bool:
        return not self.wells or well in self.wells


@dataclass
class Experiment:
    """One experiment: a plate, its tracks, its channel map and its clock."""

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
    #: bounds on its remote reads (YAML `remote:`, collection level, then experiment level)
    remote: RemoteLimits = RemoteLimits()
    extra: dict[str, Any] = field(default_factory=dict)

    def perturbation_of(self, well: str) -> str:
        for label, wells in self.perturbation_wells.items():
            if well in wells:
                return label
        return "unknown"


_EXPERIMENT_KEYS = {
    "name", "data_path", "tracks_path", "channels", "perturbation_wells", "interval_minutes",
    "start_hpi", "include_wells", "exclude_wells", "include_fovs", "exclude_fovs", "pixel_size_xy_um",
    "pixel_size_z_um", "remote",
}


def _parse_channels(exp_name: str, raw: Any) -> dict[str, ChannelSource]:
    """Our mapping form {label: zarr_name | {name, wells}} or the reference's [{name, marker, wells}]."""
    out: dict[str, ChannelSource] = {}
    if isinstance(raw, dict):
        for label, src in raw.items():
            if isinstance(src, str):
                out[str(label)] = ChannelSource(src)
            elif isinstance(src, dict) and "name" in src:
                out[str(label)] = ChannelSource(str(src["name"]), tuple(src.get("wells") or ()))
            else:
                raise ValueError(
                    f"Experiment '{exp_name}': channel '{label}' must map to a zarr channel name "
                    f"or {{name, wells}}, got {src!r}"
                )
    elif isinstance(raw, list):
        for entry in raw:
            if not isinstance(entry, dict) or "name" not in entry:
                raise ValueError(
                    f"Experiment '{exp_name}': channel entries must look like {{name, marker, wells}}, got {entry!r}"
                )
            label = str(entry.get("marker") or entry["name"])
            if label in out:
                raise ValueError(f"Experiment '{exp_name}': channel label '{label}' is given twice")
            out[label] = ChannelSource(str(entry["name"]), tuple(entry.get("wells") or ()))
    else:
        raise ValueError(f"Experiment '{exp_name}': 'channels' must be a mapping or a list, got {raw!r}")
    if not out:
        raise ValueError(f"Experiment '{exp_name}': no channels given")
    return out


def experiment_from_dict(
    raw: dict[str, Any], base_dir: str | None = None, datasets_root: str | None = None,
    remote: RemoteLimits = RemoteLimits(),
) -> Experiment:
    """An Experiment from one YAML entry; relative paths are resolved against `base_dir`; its
    `remote:` keys replace those of `remote` (the collection's)."""
    if not isinstance(raw, dict) or "name" not in raw:
        raise ValueError(f"an experiment must be a mapping with a 'name', got {raw!r}")
    name = str(raw["name"])
    for key in ("data_path", "tracks_path", "channels", "perturbation_wells", "interval_minutes"):
        if key not in raw:
            raise ValueError(f"Experiment '{name}': missing required key '{key}'")

    def resolve(p: str) -> str:
        p = str(p)
        if datasets_root is not None:
            p = p.replace("${datasets_root}", datasets_root)
        if "://" in p or base_dir is None or os.path.isabs(p):
            return p
        return os.path.normpath(os.path.join(base_dir, p))

    perturbation_wells = raw["perturbation_wells"]
    if not isinstance(perturbation_wells, dict):
        raise ValueError(f"Experiment '{name}': perturbation_wells must map labels to lists of wells")
    try:
        interval = float(raw["interval_minutes"])
    except (TypeError, ValueError):
        raise ValueError(f"Experiment '{name}': interval_minutes must be a number, got {raw['interval_minutes']!r}") from None
    return Experiment(
        name=name,
        data_path=resolve(raw["data_path"]),
        tracks_path=resolve(raw["tracks_path"]),
        channels=_parse_channels(name, raw["channels"]),
        perturbation_wells={str(k): [str(w).strip("/") for w in (v or [])] for k, v in perturbation_wells.items()},
        interval_minutes=interval,
        start_hpi=float(raw.get("start_hpi", 0.0)),
        include_wells=[str(w).strip("/") for w in raw.get("include_wells") or []],
        exclude_wells=[str(w).strip("/") for w in raw.get("exclude_wells") or []],
        include_fovs=[str(f).strip("/") for f in raw.get("include_fovs") or []],
        exclude_fovs=[str(f).strip("/") for f in raw.get("exclude_fovs") or []],
        pixel_size_xy_um=_optional_positive(name, "pixel_size_xy_um", raw.get("pixel_size_xy_um")),
        pixel_size_z_um=_optional_positive(name, "pixel_size_z_um", raw.get("pixel_size_z_um")),
        remote=remote.updated(raw.get("remote"), f"Experiment '{name}'"),
        extra={k: v for k, v in raw.items() if k not in _EXPERIMENT_KEYS},
    )


def _optional_positive(exp_name: str, key: str, value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0:
        raise ValueError(f"Experiment '{exp_name}': {key} must be a positive number of microns, got {value!r}")
    return number


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
                raise ValueError(f"Duplicate experiment name '{exp.name}'. Each experiment must have a unique name.")
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
        """Read a collection YAML (safe loader); `settings` are the Z options of the constructor."""
        path = Path(path)
        with open(path) as f:
            doc = yaml.safe_load(f)
        if not isinstance(doc, dict) or not isinstance(doc.get("experiments"), list):
            raise ValueError(f"{path}: a collection needs an 'experiments:' list")
        base = str(path.resolve().parent)
        root = doc.get("datasets_root")
        remote = RemoteLimits().updated(doc.get("remote"), "collection")
        experiments = [experiment_from_dict(e, base, None if root is None else str(root), remote)
                       for e in doc["experiments"]]
        labels = doc.get("channels")
        if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            raise ValueError(f"{path}: top-level 'channels' must be a list of canonical channel labels")
        return cls(experiments, labels, **settings)

    def _validate(self, exp: Experiment) -> None:
        name = exp.name
        if not exp.interval_minutes > 0:
            raise ValueError(f"Experiment '{name}': interval_minutes must be positive, got {exp.interval_minutes}.")
        if not exp.perturbation_wells:
            raise ValueError(f"Experiment '{name}': perturbation_wells must not be empty.")
        for label, wells in exp.perturbation_wells.items():
            if not wells:
                raise ValueError(f"Experiment '{name}': perturbation '{label}' lists no wells.")
        unknown = [label for label in exp.channels if label not in self.labels]
        if unknown:
            raise ValueError(
                f"Experiment '{name}': channel labels {unknown} are not among the collection's labels {self.labels}."
            )
        try:
            url = to_url(exp.data_path)
        except ValueError as err:
            raise ValueError(f"Experiment '{name}': data_path {err}") from None
        if is_local(url) and not os.path.isdir(local_path(url)):
            raise ValueError(f"Experiment '{name}': data_path does not exist: {exp.data_path}")
        try:
            plate = read_plate(exp.data_path, exp.remote)
        except RemoteReadError as err:
            raise RemoteReadError(f"Experiment '{name}': {err}") from None
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"Experiment '{name}': {err}") from None
        wells = set(plate.wells)
        listed = [w for ws in exp.perturbation_wells.values() for w in ws] + exp.include_wells
        missing_wells = sorted(set(listed) - wells)
        if missing_wells:
            raise ValueError(
                f"Experiment '{name}': wells {missing_wells} are not in the plate {exp.data_path}. "
                f"Wells there: {sorted(wells)}."
            )
        first = next((f for f in plate.fov_names if f.rsplit("/", 1)[0] in listed), None)
        if first is None:
            raise ValueError(f"Experiment '{name}': the selected wells hold no FOVs in {exp.data_path}.")
        try:
            fov = read_fov(plate, first)
        except RemoteReadError as err:
            raise RemoteReadError(f"Experiment '{name}': {err}") from None
        zarr_channels = fov.channel_names
        missing = [src.zarr_name for src in exp.channels.values() if src.zarr_name not in zarr_channels]
        if missing:
            raise ValueError(
                f"Experiment '{name}': channels {missing} not found in zarr. Available: {zarr_channels}."
            )
        self.plates[name] = plate
        self.first_fovs[name] = fov
        self.zarr_channels[name] = zarr_channels
        self.channel_maps[name] = {
            i: zarr_channels.index(exp.channels[label].zarr_name)
            for i, label in enumerate(self.labels)
            if label in exp.channels
        }
        self.z_ranges[name] = self._z_range(exp, plate, fov.array.shape[2])

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
        exp = self[name]
        wells = {w for ws in exp.perturbation_wells.values() for w in ws}
        if exp.include_wells:
            wells &= set(exp.include_wells)
        wells -= set(exp.exclude_wells)
        fovs = [f for f in self.plates[name].fov_names if f.rsplit("/", 1)[0] in wells]
        if exp.include_fovs:
            fovs = [f for f in fovs if f in exp.include_fovs]
        return [f for f in fovs if f not in exp.exclude_fovs]

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
