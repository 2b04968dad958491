"""Seeded synthetic collections: HCS plates of moving, dividing cells with their tracks and metadata.

`write_synthetic(out_dir, spec)` writes, for each experiment of `spec`, an OME-Zarr plate, one
tracking CSV per FOV (`track_id, t, y, x, parent_track_id, id`) and per-FOV `normalization`
attributes in the reference's layout, then a collection YAML and a manifest JSON (sizes,
compression ratio, counts). The same spec and seed give the same bytes.

Cells are blobs on a textured background (smooth noise plus low shot noise), so the data compress
like microscopy. Each cell also carries a small flat *core* (a disk of radius `CORE_RADIUS` around
its rounded centroid, identical in every Z slice) holding `encode(track_id, t, channel)`, where
`channel` is the canonical label's position in the collection: reading the centre pixel of any
patch tells which cell, at which t and in which canonical channel it shows (`decode`,
`decode_channel`). Cores never overlap (cells keep `min_distance_px` apart) and are drawn last.
Codes hold t < MAX_T, track ids 1..MAX_TRACK_ID per FOV (the simulation stops creating tracks when
they run out, counted as `capacity_hits` in the manifest) and CODE_CHANNELS canonical channels.

Generation streams per FOV and per frame (vectorised numpy, bounded memory), so tens of GB can be
written; `demo_spec()` is a few MB, `benchmark_spec()` matches BENCHMARKS.md's production store.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from sampler.atomic import atomic_directory
from sampler.progress import tqdm

from dali_pipeline.datasets.omezarr import FovWriter, PlateWriter, summary_stats

# ---------------------------------------------------------------------- cell codes
MAX_T = 64  #: frames per FOV that codes can hold (t < MAX_T)
MAX_TRACK_ID = 255  #: track ids per FOV run 1..MAX_TRACK_ID (0 is never used)
CODE_CHANNELS = {"uint16": 4, "float32": 1024}  #: canonical channels whose codes fit the dtype exactly
CORE_RADIUS = 2  #: pixels (dy, dx) with dy^2 + dx^2 <= CORE_RADIUS^2 hold the code
STATS_GRID = 32  #: YX stride of the normalization samples, as the reference's preprocessing
_TRACK_SPAN = MAX_TRACK_ID + 1
_CHANNEL_SPAN = _TRACK_SPAN * MAX_T
COLLECTION_FILE = "collection.yml"
MANIFEST_FILE = "manifest.json"


def encode(track_id: Any, t: Any, channel: Any = 0) -> np.ndarray:
    """The core value of cell `track_id` at frame `t` in canonical channel `channel` (vectorised)."""
    track_id, t, channel = (np.asarray(v, dtype=np.int64) for v in (track_id, t, channel))
    if np.any((track_id < 0) | (track_id > MAX_TRACK_ID)) or np.any((t < 0) | (t >= MAX_T)) or np.any(channel < 0):
        raise ValueError(f"codes hold 0 <= track_id <= {MAX_TRACK_ID}, 0 <= t < {MAX_T}, channel >= 0")
    return (channel * _TRACK_SPAN + track_id) * MAX_T + t


def decode(value: Any) -> tuple[np.ndarray, np.ndarray]:
    """(track_id, t) of core values (any dtype the data were cast to; vectorised)."""
    code = np.rint(np.asarray(value, dtype=np.float64)).astype(np.int64) % _CHANNEL_SPAN
    return code // MAX_T, code % MAX_T


def decode_channel(value: Any) -> np.ndarray:
    """The canonical channel index of core values (vectorised)."""
    return np.rint(np.asarray(value, dtype=np.float64)).astype(np.int64) // _CHANNEL_SPAN


# ---------------------------------------------------------------------- spec
@dataclass(frozen=True)
class ExperimentSpec:
    """One experiment: a plate with `fovs_per_well` FOVs in each well of `perturbation_wells`.

    `channel_names` are the zarr channels in stored order; `channels` maps canonical labels to them
    (experiments may order channels differently). Cell dynamics are per frame: each track ends
    with `leave_prob`, divides with `division_prob` (the mother ends at t, two daughters with new
    ids start at t + 1 next to it), moves by `drift_px` plus a Gaussian step of `step_px`, and ends
    when its centroid leaves the image; `enter_rate` new root tracks appear per frame on average.
    """

    name: str
    channel_names: tuple[str, ...]
    channels: Mapping[str, str]
    perturbation_wells: Mapping[str, tuple[str, ...]]
    interval_minutes: float = 30.0
    start_hpi: float = 0.0
    fovs_per_well: int = 2
    t: int = 12
    zyx: tuple[int, int, int] = (4, 128, 128)
    dtype: str = "uint16"
    version: str = "0.5"
    chunks: tuple[int, int, int, int, int] | None = None
    shards: tuple[int, int, int, int, int] | None = None
    cells_per_fov: int = 8
    division_prob: float = 0.05
    leave_prob: float = 0.01
    enter_rate: float = 0.3
    radius_px: tuple[float, float] = (6.0, 12.0)
    step_px: float = 1.5
    drift_px: tuple[float, float] = (0.4, 0.3)
    min_distance_px: float = 8.0
    seed: int = 0

    def __post_init__(self) -> None:
        where = f"ExperimentSpec '{self.name}'"
        if self.dtype not in CODE_CHANNELS:
            raise ValueError(f"{where}: dtype must be one of {sorted(CODE_CHANNELS)}, got {self.dtype!r}")
        if self.version not in ("0.4", "0.5"):
            raise ValueError(f"{where}: version must be '0.4' or '0.5', got {self.version!r}")
        if self.shards is not None and self.version != "0.5":
            raise ValueError(f"{where}: shards need version '0.5' (zarr v3)")
        if not 1 <= self.t <= MAX_T:
            raise ValueError(f"{where}: t must be in [1, {MAX_T}] (cell codes hold t < {MAX_T}), got {self.t}")
        if len(self.zyx) != 3 or min(self.zyx) < 1:
            raise ValueError(f"{where}: zyx must be three positive sizes, got {self.zyx}")
        if len(set(self.channel_names)) != len(self.channel_names) or not self.channel_names:
            raise ValueError(f"{where}: channel_names must be unique and not empty, got {self.channel_names}")
        unknown = sorted(set(self.channels.values()) - set(self.channel_names))
        if unknown:
            raise ValueError(f"{where}: channels map to {unknown}, not among channel_names {list(self.channel_names)}")
        if not self.perturbation_wells or self.fovs_per_well < 1:
            raise ValueError(f"{where}: needs perturbation_wells and fovs_per_well >= 1")
        wells = [w for ws in self.perturbation_wells.values() for w in ws]
        if len(set(wells)) != len(wells) or any(len(w.split("/")) != 2 for w in wells):
            raise ValueError(f"{where}: wells must be unique 'row/column' names, got {wells}")
        lo, hi = self.radius_px
        if not 0 < lo <= hi:
            raise ValueError(f"{where}: radius_px must be (low, high) with 0 < low <= high, got {self.radius_px}")
        if self.min_distance_px <= 2 * CORE_RADIUS:
            raise ValueError(f"{where}: min_distance_px must exceed {2 * CORE_RADIUS} so that cores never overlap")

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """TCZYX shape of every FOV."""
        return (self.t, len(self.channel_names), *self.zyx)

    @property
    def fov_names(self) -> list[str]:
        """FOV names ("A/1/0") in write order."""
        wells = [w for ws in self.perturbation_wells.values() for w in ws]
        return [f"{w}/{k}" for w in wells for k in range(self.fovs_per_well)]


@dataclass(frozen=True)
class SyntheticSpec:
    """A collection: canonical channel labels (the batch channel order) and its experiments."""

    name: str
    labels: tuple[str, ...]
    experiments: tuple[ExperimentSpec, ...]

    def __post_init__(self) -> None:
        names = [e.name for e in self.experiments]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"SyntheticSpec '{self.name}': experiment names must be unique and not empty, got {names}")
        for exp in self.experiments:
            unknown = sorted(set(exp.channels) - set(self.labels))
            if unknown:
                raise ValueError(
                    f"Experiment '{exp.name}': labels {unknown} are not among the collection's {list(self.labels)}"
                )
            codes = channel_codes(exp, self.labels)
            if max(codes) >= CODE_CHANNELS[exp.dtype]:
                raise ValueError(
                    f"Experiment '{exp.name}': {exp.dtype} codes hold {CODE_CHANNELS[exp.dtype]} channels, "
                    f"this experiment needs {max(codes) + 1}"
                )


def channel_codes(exp: ExperimentSpec, labels: tuple[str, ...]) -> list[int]:
    """The code channel of each zarr channel: its canonical label's position, unmapped ones after all labels."""
    label_of = {zarr: label for label, zarr in exp.channels.items()}
    unmapped = [c for c in exp.channel_names if c not in label_of]
    return [labels.index(label_of[c]) if c in label_of else len(labels) + unmapped.index(c) for c in exp.channel_names]


def demo_spec() -> SyntheticSpec:
    """Two small experiments (30 and 15 min, different channel orders, NGFF 0.5 sharded and 0.4), ~13 MB."""
    common = dict(fovs_per_well=2, t=12, zyx=(4, 128, 128), dtype="uint16", cells_per_fov=8, division_prob=0.06)
    return SyntheticSpec(
        name="demo",
        labels=("phase", "reporter"),
        experiments=(
            ExperimentSpec(
                name="demo_30min", channel_names=("Phase3D", "GFP"), channels={"phase": "Phase3D", "reporter": "GFP"},
                perturbation_wells={"mock": ("A/1",), "infected": ("A/2",)}, interval_minutes=30.0, start_hpi=3.0,
                version="0.5", chunks=(1, 1, 4, 64, 64), shards=(1, 1, 4, 128, 128), seed=1, **common,
            ),
            ExperimentSpec(
                name="demo_15min", channel_names=("GFP EX488", "BF"), channels={"phase": "BF", "reporter": "GFP EX488"},
                perturbation_wells={"mock": ("B/1",), "infected": ("B/2",)}, interval_minutes=15.0, start_hpi=2.0,
                version="0.4", chunks=(1, 1, 1, 128, 128), seed=2, **common,
            ),
        ),
    )


def benchmark_spec(
    n_fovs: int = 32,
    t: int = 16,
    z: int = 16,
    yx: int = 512,
    dtype: str = "float32",
    chunks: tuple[int, int, int, int, int] | None = (1, 1, 16, 256, 256),
    shards: tuple[int, int, int, int, int] | None = (1, 1, 16, 512, 512),
    version: str = "0.5",
    n_experiments: int = 2,
    cells_per_fov: int = 48,
    seed: int = 0,
) -> SyntheticSpec:
    """BENCHMARKS.md's production-like store: `n_fovs` FOVs over `n_experiments` experiments.

    Experiments alternate 30 / 15 min frame intervals and two channel orders; each has a "mock" and
    an "infected" well. For the small-chunk configuration pass version="0.4",
    chunks=(1, 1, 1, 256, 256), shards=None.
    """
    per_well, rest = divmod(n_fovs, 2 * n_experiments)
    if rest or per_well < 1:
        raise ValueError(f"n_fovs={n_fovs} must be a positive multiple of 2 wells x {n_experiments} experiments")
    orders = ((("Phase3D", "GFP"), {"phase": "Phase3D", "reporter": "GFP"}),
              (("GFP EX488", "BF"), {"phase": "BF", "reporter": "GFP EX488"}))
    experiments = []
    for e in range(n_experiments):
        interval = 30.0 if e % 2 == 0 else 15.0
        names, channels = orders[e % 2]
        experiments.append(ExperimentSpec(
            name=f"bench{e}_{interval:g}min", channel_names=names, channels=channels,
            perturbation_wells={"mock": ("A/1",), "infected": ("A/2",)}, interval_minutes=interval,
            start_hpi=3.0, fovs_per_well=per_well, t=t, zyx=(z, yx, yx), dtype=dtype, version=version,
            chunks=chunks, shards=shards, cells_per_fov=cells_per_fov, division_prob=0.03,
            enter_rate=cells_per_fov / 40, seed=seed * 1000 + e,
        ))
    return SyntheticSpec(name="benchmark", labels=("phase", "reporter"), experiments=tuple(experiments))


# ---------------------------------------------------------------------- tracks
@dataclass
class _Cell:
    track_id: int
    parent: int
    y: float
    x: float
    radius: float
    brightness: float
    dz: float


def _snap(v: float) -> float:
    """Two decimals (as in the CSV), kept away from .5 so that every rounding convention agrees."""
    v = round(v, 2)
    return v + 0.02 if abs(v - np.floor(v) - 0.5) < 0.011 else v


class _Field:
    """Rounded centroids placed so far in one frame: new cells must keep `min_distance` from all of them."""

    def __init__(self, exp: ExperimentSpec) -> None:
        self.min_d2 = exp.min_distance_px ** 2
        self.limit = (exp.zyx[1] - 1, exp.zyx[2] - 1)
        self.points = np.empty((0, 2))

    def inside(self, y: float, x: float) -> bool:
        return 0 <= y <= self.limit[0] and 0 <= x <= self.limit[1]

    def free(self, *points: tuple[float, float]) -> bool:
        """Whether `points` lie inside and keep `min_distance` from each other and from those taken."""
        p = np.rint(np.array(points, dtype=np.float64))
        if not all(self.inside(*q) for q in p):
            return False
        d2 = ((p[:, None] - np.vstack([self.points, p])[None]) ** 2).sum(-1)  # (new, taken + new)
        d2[np.arange(len(p)), len(self.points) + np.arange(len(p))] = np.inf  # not from itself
        return bool((d2 >= self.min_d2).all())

    def take(self, *points: tuple[float, float]) -> None:
        self.points = np.vstack([self.points, np.rint(np.array(points))])


class _TrackSim:
    """Cells of one FOV frame by frame: moves, divisions, entries and exits (cheap: per cell, not per pixel)."""

    def __init__(self, exp: ExperimentSpec, rng: np.random.Generator) -> None:
        self.exp, self.rng = exp, rng
        self.next_id = 1
        self.capacity_hits = 0

    def new_id(self) -> int | None:
        if self.next_id > MAX_TRACK_ID:
            self.capacity_hits += 1
            return None
        self.next_id += 1
        return self.next_id - 1

    def random_cell(self, field_: _Field) -> _Cell | None:
        """A new root cell at a free random position (a few tries), or None."""
        _, h, w = self.exp.zyx
        for _ in range(10):
            y, x = _snap(self.rng.uniform(0, h - 1)), _snap(self.rng.uniform(0, w - 1))
            if field_.free((y, x)):
                tid = self.new_id()
                if tid is None:
                    return None
                field_.take((y, x))
                lo, hi = self.exp.radius_px
                return _Cell(tid, -1, y, x, self.rng.uniform(lo, hi), float(self.rng.lognormal(0, 0.3)),
                             self.rng.normal(0, 0.5))
        return None

    def divide(self, cell: _Cell, field_: _Field) -> list[_Cell]:
        """Two daughters on opposite sides of the mother's last position, or [] when there is no room."""
        half = max(0.6 * cell.radius, self.exp.min_distance_px / 2 + 1.0)
        for _ in range(4):
            a = self.rng.uniform(0, np.pi)
            dy, dx = half * np.sin(a), half * np.cos(a)
            spots = [(_snap(cell.y + dy), _snap(cell.x + dx)), (_snap(cell.y - dy), _snap(cell.x - dx))]
            if field_.free(*spots):
                if self.next_id + 1 > MAX_TRACK_ID:
                    self.capacity_hits += 1
                    return []
                field_.take(*spots)
                radius = max(self.exp.radius_px[0], 0.8 * cell.radius)
                return [_Cell(self.new_id(), cell.track_id, y, x, radius, cell.brightness, cell.dz) for y, x in spots]
        return []

    def step(self, cells: list[_Cell]) -> list[_Cell]:
        """The cells of the next frame."""
        exp, rng = self.exp, self.rng
        field_ = _Field(exp)
        out: list[_Cell] = []
        for cell in cells:
            u = rng.random()
            if u < exp.leave_prob:
                continue  # the track ends inside the image
            if u < exp.leave_prob + exp.division_prob:
                daughters = self.divide(cell, field_)
                if daughters:
                    out += daughters
                    continue
            y = _snap(cell.y + exp.drift_px[0] + exp.step_px * rng.standard_normal())
            x = _snap(cell.x + exp.drift_px[1] + exp.step_px * rng.standard_normal())
            if not field_.inside(y, x):
                continue  # moved out of the image: its rows stop
            if not field_.free((y, x)):
                y, x = cell.y, cell.x  # blocked: stay
                if not field_.free((y, x)):
                    continue  # crowded out: the tracker loses it
            field_.take((y, x))
            out.append(_Cell(cell.track_id, cell.parent, y, x, cell.radius, cell.brightness, cell.dz))
        for _ in range(rng.poisson(exp.enter_rate)):
            cell = self.random_cell(field_)
            if cell is not None:
                out.append(cell)
        return out

    def run(self) -> pd.DataFrame:
        field_ = _Field(self.exp)
        cells = [c for c in (self.random_cell(field_) for _ in range(self.exp.cells_per_fov)) if c is not None]
        frames = []
        for t in range(self.exp.t):
            if t > 0:
                cells = self.step(cells)
            frames += [(c.track_id, t, c.y, c.x, c.parent, c.radius, c.brightness, c.dz) for c in cells]
        columns = ["track_id", "t", "y", "x", "parent_track_id", "radius", "brightness", "dz"]
        table = pd.DataFrame(frames, columns=columns)
        table = table.sort_values(["track_id", "t"], kind="stable", ignore_index=True)
        table.insert(5, "id", np.arange(len(table), dtype=np.int64))
        table.attrs["capacity_hits"] = self.capacity_hits
        return table


CSV_COLUMNS = ["track_id", "t", "y", "x", "parent_track_id", "id"]


def simulate_tracks(exp: ExperimentSpec, fov_index: int) -> pd.DataFrame:
    """Observations of one FOV: the CSV columns plus each cell's radius, brightness and Z offset."""
    return _TrackSim(exp, np.random.default_rng([exp.seed, fov_index, 0])).run()


# ---------------------------------------------------------------------- pixels
@dataclass(frozen=True)
class _Look:
    """Per-channel appearance: even code channels look like phase, odd ones like fluorescence."""

    level: float
    texture: float
    noise: float
    cell_amp: float
    halo_amp: float

    @classmethod
    def of(cls, code: int) -> "_Look":
        if code % 2 == 0:
            return cls(level=1000.0, texture=120.0, noise=6.0, cell_amp=700.0, halo_amp=-250.0)
        return cls(level=200.0, texture=30.0, noise=4.0, cell_amp=1200.0, halo_amp=0.0)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-variance Gaussian-filtered white noise (periodic), via the FFT."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (fy ** 2 + fx ** 2))
    out = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * kernel, s=shape)
    return (out / (out.std() + 1e-12)).astype(np.float32)


def _backgrounds(exp: ExperimentSpec, looks: list[_Look], fov_index: int) -> np.ndarray:
    """(C, Y, X) static textured background of one FOV: two octaves of smooth noise per channel."""
    rng = np.random.default_rng([exp.seed, fov_index, 1])
    yx = exp.zyx[1:]
    return np.stack([
        look.level + look.texture * (_smooth_noise(rng, yx, 16.0) + 0.35 * _smooth_noise(rng, yx, 3.0))
        for look in looks
    ])


#: the cells of one frame: numpy columns track_id, y, x, radius, brightness, dz
Cells = Mapping[str, np.ndarray]


def _disk(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) offsets of the pixels within `radius` of a centre pixel."""
    dy, dx = np.mgrid[-radius:radius + 1, -radius:radius + 1].reshape(2, -1)
    inside = dy ** 2 + dx ** 2 <= radius ** 2
    return dy[inside], dx[inside]


_CORE_DY, _CORE_DX = _disk(CORE_RADIUS)


def _add_cells(frame: np.ndarray, cells: Cells, looks: list[_Look]) -> None:
    """Add each cell's blob (a Gaussian, with a dark halo in phase-like channels) to `frame` (C, Z, Y, X)."""
    _, n_z, h, w = frame.shape
    z = np.arange(n_z, dtype=np.float32)[:, None, None] - n_z // 2
    sigma_z = max(n_z / 4, 1.0)
    for y, x, r, b, dz in zip(*(cells[k].tolist() for k in ("y", "x", "radius", "brightness", "dz"))):
        reach = int(np.ceil(2.5 * r))
        y0, y1 = max(0, int(y) - reach), min(h, int(y) + reach + 1)
        x0, x1 = max(0, int(x) - reach), min(w, int(x) + reach + 1)
        d2 = ((np.arange(y0, y1, dtype=np.float32)[:, None] - y) ** 2
              + (np.arange(x0, x1, dtype=np.float32)[None, :] - x) ** 2) / np.float32(r * r)
        core, halo = np.exp(-d2), np.exp(-0.7 * d2)
        focus = np.exp(-0.5 * ((z - dz) / sigma_z) ** 2)
        for c, look in enumerate(looks):
            blob = b * (look.cell_amp * core + look.halo_amp * halo)
            frame[c, :, y0:y1, x0:x1] += focus * blob[None]


def _paint_cores(frame: np.ndarray, cells: Cells, t: int, codes: list[int]) -> None:
    """Write each cell's code into its core disk, in every Z slice, after everything else."""
    _, _, h, w = frame.shape
    yy = np.rint(cells["y"])[:, None].astype(np.int64) + _CORE_DY
    xx = np.rint(cells["x"])[:, None].astype(np.int64) + _CORE_DX
    ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    ids = np.broadcast_to(cells["track_id"][:, None], yy.shape)[ok]
    for c, code in enumerate(codes):
        frame[c][:, yy[ok], xx[ok]] = encode(ids, t, code)


def render_frame(
    exp: ExperimentSpec, background: np.ndarray, cells: Cells, t: int, codes: list[int], fov_index: int
) -> np.ndarray:
    """Frame t of one FOV, (C, Z, Y, X) in the experiment's dtype: background, shot noise, blobs, cores."""
    looks = [_Look.of(code) for code in codes]
    rng = np.random.default_rng([exp.seed, fov_index, 2, t])
    frame = _shot_noise(rng, (len(codes), *exp.zyx))
    gain = 1 + 0.02 * rng.standard_normal(len(codes))  # slow illumination changes between frames
    for c, look in enumerate(looks):
        frame[c] *= np.float32(look.noise)
        frame[c] += (background[c] * np.float32(gain[c]))[None]
    _add_cells(frame, cells, looks)
    if exp.dtype == "uint16":
        out = np.clip(np.rint(frame, out=frame), 0, 65535, out=frame).astype(np.uint16)
    else:
        out = _quantize(frame)
    _paint_cores(out, cells, t, codes)
    return out


def _shot_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean unit-variance float32 noise: the sum of two uniform bytes (triangular, near Gaussian).

    Three times cheaper than Gaussian draws, which would dominate the cost of a frame.
    """
    pair = rng.integers(0, 256, (2, *shape), dtype=np.uint8)
    out = pair[0].astype(np.float32)
    out += pair[1]
    out -= np.float32(255)
    out *= np.float32(1 / np.sqrt(2 * (256 ** 2 - 1) / 12))
    return out


def _quantize(frame: np.ndarray, steps: int = 16) -> np.ndarray:
    """Round float data to 1/`steps` in place, like a reconstruction stored at finite precision."""
    frame *= np.float32(steps)
    np.rint(frame, out=frame)
    frame /= np.float32(steps)
    return frame


# ---------------------------------------------------------------------- statistics
class _PlateSamples:
    """Normalization samples of a plate: per FOV kept in full, across FOVs thinned to a fixed size."""

    def __init__(self, channel_names: tuple[str, ...], n_t: int, keep_per_t: int = 1024) -> None:
        self.channel_names, self.n_t, self.keep = channel_names, n_t, keep_per_t
        self.per_t: dict[str, list[list[np.ndarray]]] = {c: [[] for _ in range(n_t)] for c in channel_names}

    def fov_attrs(self, samples: np.ndarray) -> dict[str, Any]:
        """`normalization` of one FOV from its samples (T, C, ...) (without dataset_statistics yet)."""
        out = {}
        for c, name in enumerate(self.channel_names):
            out[name] = {
                "fov_statistics": summary_stats(samples[:, c]),
                "timepoint_statistics": {str(t): summary_stats(samples[t, c]) for t in range(self.n_t)},
            }
            for t in range(self.n_t):
                flat = samples[t, c].ravel()
                step = max(1, -(-flat.size // self.keep))
                self.per_t[name][t].append(flat[::step])
        return out

    def plate_attrs(self) -> dict[str, Any]:
        """Plate-level `normalization`: dataset_statistics and timepoint_statistics over all FOVs."""
        out = {}
        for name, per_t in self.per_t.items():
            out[name] = {
                "dataset_statistics": summary_stats(np.concatenate([v for vs in per_t for v in vs])),
                "timepoint_statistics": {str(t): summary_stats(np.concatenate(vs)) for t, vs in enumerate(per_t)},
            }
        return out


# ---------------------------------------------------------------------- writing
def _write_fov(
    fov: FovWriter, exp: ExperimentSpec, tracks: pd.DataFrame, codes: list[int], fov_index: int
) -> np.ndarray:
    """Render and store every frame of one FOV; returns its normalization samples (T, C, Z, y, x)."""
    background = _backgrounds(exp, [_Look.of(c) for c in codes], fov_index)
    order = np.argsort(tracks["t"].to_numpy(), kind="stable")
    columns = {k: tracks[k].to_numpy()[order] for k in ("t", "track_id", "y", "x", "radius", "brightness", "dz")}
    bounds = np.searchsorted(columns["t"], np.arange(exp.t + 1))
    samples = []
    for t in range(exp.t):
        cells = {k: v[bounds[t]:bounds[t + 1]] for k, v in columns.items()}
        frame = render_frame(exp, background, cells, t, codes, fov_index)
        samples.append(frame[:, :, ::STATS_GRID, ::STATS_GRID].copy())
        fov.write(t, frame)
    return np.stack(samples)


def _write_csv(path: Path, tracks: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tracks[CSV_COLUMNS].to_csv(path, index=False, float_format="%.2f", lineterminator="\n")


def _folder_bytes(folder: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def _track_counts(tracks: pd.DataFrame, n_t: int) -> dict[str, int]:
    per_track = tracks.groupby("track_id").agg(
        first=("t", "min"), last=("t", "max"), parent=("parent_track_id", "first"))
    mothers = set(per_track.parent[per_track.parent >= 0])
    return dict(
        observations=len(tracks), tracks=len(per_track), divisions=len(mothers),
        entered=int(((per_track.parent < 0) & (per_track["first"] > 0)).sum()),
        ended=int(((per_track["last"] < n_t - 1) & ~per_track.index.isin(list(mothers))).sum()),
        capacity_hits=int(tracks.attrs.get("capacity_hits", 0)),
    )


def _write_experiment(root: Path, exp: ExperimentSpec, labels: tuple[str, ...], bar: tqdm) -> dict[str, Any]:
    """One plate and its tracks under `root`; returns the experiment's manifest entry."""
    start = time.perf_counter()
    codes = channel_codes(exp, labels)
    stats = _PlateSamples(exp.channel_names, exp.t)
    focus = {"dataset_statistics": {"z_focus_mean": float(exp.zyx[0] // 2)}}
    counts: dict[str, int] = {}
    plate_path = root / f"{exp.name}.zarr"
    with PlateWriter(plate_path, list(exp.channel_names), version=exp.version, chunks=exp.chunks,
                     shards=exp.shards, plate_attrs={"focus_slice": {c: focus for c in exp.channel_names}}) as plate:
        for i, name in enumerate(exp.fov_names):
            tracks = simulate_tracks(exp, i)
            _write_csv(root / f"{exp.name}_tracks" / name / "tracks.csv", tracks)
            for key, n in _track_counts(tracks, exp.t).items():
                counts[key] = counts.get(key, 0) + n
            fov = plate.add_fov(name, exp.shape, exp.dtype)
            fov.attrs["normalization"] = stats.fov_attrs(_write_fov(fov, exp, tracks, codes, i))
            bar.update(1)
        plate_norm = stats.plate_attrs()
        plate.plate_attrs["normalization"] = plate_norm
        for fov in plate.fovs.values():
            for ch, levels in fov.attrs["normalization"].items():
                levels["dataset_statistics"] = plate_norm[ch]["dataset_statistics"]
    seconds = time.perf_counter() - start
    decoded = len(exp.fov_names) * int(np.prod(exp.shape)) * np.dtype(exp.dtype).itemsize
    on_disk = _folder_bytes(plate_path)
    return dict(
        name=exp.name, fovs=len(exp.fov_names), shape=list(exp.shape), **counts,
        bytes_decoded=decoded, bytes_on_disk=on_disk, compression_ratio=decoded / on_disk,
        write_seconds=seconds, decoded_mb_per_s=decoded / 1e6 / seconds,
    )


def _collection_doc(spec: SyntheticSpec) -> dict[str, Any]:
    return dict(name=spec.name, channels=list(spec.labels), experiments=[
        dict(name=e.name, data_path=f"{e.name}.zarr", tracks_path=f"{e.name}_tracks",
             channels=dict(e.channels), perturbation_wells={k: list(v) for k, v in e.perturbation_wells.items()},
             interval_minutes=float(e.interval_minutes), start_hpi=float(e.start_hpi))
        for e in spec.experiments
    ])


def write_synthetic(
    out_dir: str | os.PathLike[str], spec: SyntheticSpec, overwrite: bool = False, progress: bool = False
) -> Path:
    """Write the collection `spec` to `out_dir` (atomically); returns the path of its collection YAML.

    Layout: `{exp}.zarr` plates, `{exp}_tracks/{row}/{col}/{fov}/tracks.csv`, `collection.yml`
    (paths relative to it) and `manifest.json` (spec, bytes, compression ratio, counts, timing).
    Refuses to overwrite an existing `out_dir` unless `overwrite`, and then replaces only a folder
    this project wrote (its marker `.dynaclr-dali.json`), never the current directory.
    """
    dest = Path(os.path.abspath(os.fspath(out_dir)))
    total = sum(len(e.fov_names) for e in spec.experiments)
    with atomic_directory(dest, overwrite, writer="synthetic") as tmp, tqdm(total=total, desc="fovs", disable=not progress) as bar:
        experiments = [_write_experiment(tmp, exp, spec.labels, bar) for exp in spec.experiments]
        with open(tmp / COLLECTION_FILE, "w") as f:
            yaml.safe_dump(_collection_doc(spec), f, sort_keys=False)
        decoded = sum(e["bytes_decoded"] for e in experiments)
        on_disk = sum(e["bytes_on_disk"] for e in experiments)
        seconds = sum(e["write_seconds"] for e in experiments)
        manifest = dict(
            spec=asdict(spec), experiments=experiments, bytes_decoded=decoded, bytes_on_disk=on_disk,
            compression_ratio=decoded / on_disk, write_seconds=seconds, decoded_mb_per_s=decoded / 1e6 / seconds,
            **{k: sum(e[k] for e in experiments) for k in ("fovs", "observations", "tracks", "divisions")},
        )
        with open(tmp / MANIFEST_FILE, "w") as f:
            json.dump(manifest, f, indent=1)
    return dest / COLLECTION_FILE
