"""LineageIndex: every observation kept after border handling, its lineage and a CSR lookup.

Built once from a registry (metadata and CSVs only), saved to one columnar file, loaded by every
rank. It owns the data-level parameters (read box, tau range, positive policy, channel mode,
normalization statistics); everything downstream reads them from here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
import pandas as pd

from sampler.atomic import INDEX_NPZ, atomic_output, check_target
from sampler.kvstore import RemoteReadError
from sampler.lineage import LineageCycleError, build_forest
from sampler.norm import fov_norm_table
from sampler.plate import check_channel_count, read_fovs
from sampler.registry import ExperimentRegistry
from sampler.tau import tau_weight_table
from sampler.tracks import read_tracks

FORMAT_VERSION = 2
#: the per-row fields plans read, stored row-major (`LineageIndex.hot_rows`)
HOT = ("t", "group", "exp", "fov", "y_clamp", "x_clamp", "channel")
T, GROUP, EXP, FOV, Y_CLAMP, X_CLAMP, CHANNEL = range(len(HOT))


@dataclass(frozen=True)
class IndexConfig:
    """Data-level parameters: what is read and which positives count.

    `max_border_shift=None` means a quarter patch (the reference's default); 0 keeps only cells whose
    patch lies fully inside the image. `norm_level=None` skips normalization statistics.
    """

    patch_yx: tuple[int, int] = (256, 256)
    max_border_shift: int | None = None
    tau_range_hours: tuple[float, float] = (0.5, 2.0)
    tau_decay: float = 2.0
    positive_policy: Literal["lineage", "ancestry"] = "lineage"
    channel_mode: Literal["all", "bag"] = "all"
    norm_level: str | None = "timepoint_statistics"
    norm_subtrahend: str = "mean"
    norm_divisor: str = "std"

    def __post_init__(self) -> None:
        if self.positive_policy not in ("lineage", "ancestry"):
            raise ValueError(f"positive_policy must be 'lineage' or 'ancestry', got {self.positive_policy!r}")
        if self.channel_mode not in ("all", "bag"):
            raise ValueError(f"channel_mode must be 'all' or 'bag', got {self.channel_mode!r}")
        if len(self.patch_yx) != 2 or min(self.patch_yx) <= 0:
            raise ValueError(f"patch_yx must be two positive sizes, got {self.patch_yx}")
        if self.tau_range_hours[0] > self.tau_range_hours[1]:
            raise ValueError(f"tau_range_hours must be (low, high), got {self.tau_range_hours}")
        if self.tau_decay < 0:
            raise ValueError(f"tau_decay must be >= 0, got {self.tau_decay}")

    @property
    def border_shift(self) -> int:
        if self.max_border_shift is None:
            return max(self.patch_yx[0] // 4, self.patch_yx[1] // 4)
        return self.max_border_shift


#: storage dtypes a plate may have: bool and every numeric type (complex is not a pixel type)
PIXEL_DTYPES = tuple(np.dtype(d) for d in (
    np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
    np.float16, np.float32, np.float64))


def _holds_exactly(wide: np.dtype, narrow: np.dtype) -> bool:
    """Whether every value of `narrow` is a value of `wide` (no wrap, no rounding)."""
    if narrow == wide or narrow == np.bool_:
        return True
    if np.issubdtype(wide, np.integer):
        if not np.issubdtype(narrow, np.integer):
            return False
        a, b = np.iinfo(wide), np.iinfo(narrow)
        return a.min <= b.min and b.max <= a.max
    if np.issubdtype(narrow, np.floating):
        return np.finfo(narrow).nmant <= np.finfo(wide).nmant and np.finfo(narrow).maxexp <= np.finfo(wide).maxexp
    info = np.iinfo(narrow)  # an integer type in a float: its magnitude bits within the significand
    return info.bits - (info.min < 0) <= np.finfo(wide).nmant + 1


def _batch_dtype(dtypes: list[np.dtype], names: list[str] | None = None) -> np.dtype:
    """The one dtype every batch is read in: the narrowest that holds each storage dtype exactly.

    numpy's promotion (uint16 + int8 -> int32, int16 + float16 -> float32, int32 + float32 ->
    float64, bool + anything -> the other); a mix no type holds exactly (uint64 with a signed
    type, 64-bit integers with floats) is refused, naming the experiments (`names`) and dtypes.
    """
    names = names or [f"#{i}" for i in range(len(dtypes))]
    for name, d in zip(names, dtypes):
        if d not in PIXEL_DTYPES:
            raise ValueError(f"Experiment '{name}': storage dtype {d} is not a pixel type; supported: "
                             f"{', '.join(t.name for t in PIXEL_DTYPES)}")
    wide = np.result_type(*dtypes)
    lossy = [f"'{n}' ({d})" for n, d in zip(names, dtypes) if not _holds_exactly(wide, d)]
    if lossy:
        stored = ", ".join(f"'{n}' ({d})" for n, d in zip(names, dtypes))
        raise ValueError(
            f"Experiments {stored}: no dtype holds all of their pixels exactly ({', '.join(lossy)} would "
            f"be rounded or wrapped in {wide}); index them in separate collections or rewrite them "
            "in a common dtype"
        )
    return wide


class LineageIndex:
    """Observations (`tracks`), per-row normalization (`norm`, (N, C, 2)), valid anchors (`valid`).

    Rows are sorted by (lineage group, t, Euler-tour position), so all rows of one
    (experiment, lineage[, channel label], t) are contiguous: `rows_at` finds them in O(1).
    """

    def __init__(
        self,
        config: IndexConfig,
        labels: list[str],
        experiments: pd.DataFrame,
        exp_channels: np.ndarray,
        fovs: pd.DataFrame,
        tracks: pd.DataFrame,
        norm: np.ndarray,
        forest: dict[str, np.ndarray],
        valid: np.ndarray | None = None,
    ) -> None:
        self.config = config
        self.labels = labels
        self.experiments = experiments
        self.exp_channels = exp_channels
        self.fovs = fovs
        self.tracks = tracks
        self.forest = forest
        # the fields every plan reads, row-major so that one gather brings all of a row's fields:
        # the HOT columns, then the (C, 2) normalization statistics as float32 bits
        n, n_norm = len(tracks), norm.shape[1] * 2
        self._hot = np.empty((n, len(HOT) + n_norm), dtype=np.int32)
        for k, name in enumerate(HOT):
            if name in tracks:
                self._hot[:, k] = tracks[name].to_numpy()
            else:  # "channel" exists in bag-of-channels mode only
                self._hot[:, k] = 0
        self._hot[:, len(HOT):] = np.ascontiguousarray(norm, dtype=np.float32).reshape(n, n_norm).view(np.int32)
        #: (N, C, 2) float32 (subtrahend, divisor) per row and channel: a view into the row-major block
        self.norm = self._hot[:, len(HOT):].view(np.float32).reshape(n, -1, 2)
        self._columns = {name: self._hot[:, k] for k, name in enumerate(HOT)}
        self._columns["track"] = tracks["track"].to_numpy()
        self._value_cache: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}
        self.exp_tau_min = experiments.tau_min.to_numpy().astype(np.int64)
        self.exp_tau_max = experiments.tau_max.to_numpy().astype(np.int64)
        self.exp_z_start = experiments.z_start.to_numpy().astype(np.int32)
        #: (E, 3) read box (Z, Y, X) per experiment: the common read shape scaled by its pixel size
        self.exp_box = np.stack([experiments.box_z, experiments.box_y, experiments.box_x], axis=1).astype(np.int32)
        #: (E, K) tau weights per experiment, column k for tau_min + k; 0 outside the range and at tau = 0
        self.tau_table = tau_weight_table(self.exp_tau_min, self.exp_tau_max, config.tau_decay)
        self._build_lookup()
        self.valid = np.flatnonzero(self.valid_mask(config.positive_policy)) if valid is None else valid

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls, registry: ExperimentRegistry, config: IndexConfig | None = None, threads: int = 8, progress: bool = True
    ) -> "LineageIndex":
        """Read FOV metadata and tracks of every selected FOV and build the index."""
        config = config or IndexConfig()
        labels = list(registry.labels)
        n_labels = len(labels)
        exp_rows, fov_rows, fov_attrs = [], [], []
        exp_channels = np.full((len(registry.experiments), n_labels), -1, dtype=np.int32)
        fov_label_ok: list[np.ndarray] = []
        for e, exp in enumerate(registry.experiments):
            tau_min, tau_max = registry.tau_range_frames(exp.name, config.tau_range_hours)
            z0, z1 = registry.z_ranges[exp.name]
            box_z0, box_z, box_y, box_x = registry.read_box(exp.name, config.patch_yx)
            scale_z, scale_y, scale_x = registry.scale_factors[exp.name]
            dtype = registry.first_fovs[exp.name].array.dtype
            if config.channel_mode == "all":
                missing = [label for label in labels if label not in exp.channels]
                if missing:
                    raise ValueError(
                        f"Experiment '{exp.name}' maps no zarr channel to labels {missing}; "
                        "channel_mode='all' needs every label (use channel_mode='bag' for subsets)."
                    )
            for pos, zarr_index in registry.channel_maps[exp.name].items():
                exp_channels[e, pos] = zarr_index
            exp_rows.append(
                dict(name=exp.name, data_path=exp.data_path, tracks_path=exp.tracks_path,
                     interval_minutes=exp.interval_minutes, start_hpi=exp.start_hpi,
                     tau_min=tau_min, tau_max=tau_max, depth=z1 - z0, z_start=box_z0, box_z=box_z,
                     box_y=box_y, box_x=box_x, scale_z=scale_z, scale_y=scale_y, scale_x=scale_x,
                     storage_dtype=dtype.str,
                     **{f"remote_{k}": v for k, v in asdict(exp.remote).items()})
            )
            names = registry.selected_fovs(exp.name)
            plate = registry.plates[exp.name]
            try:
                fov_metas = read_fovs(plate, names, threads=threads)
            except RemoteReadError as err:
                raise RemoteReadError(f"Experiment '{exp.name}': {err}") from None
            for fov in fov_metas:
                if fov.channel_names != registry.zarr_channels[exp.name]:
                    raise ValueError(
                        f"Experiment '{exp.name}', FOV {fov.name}: channel names {fov.channel_names} differ "
                        f"from the plate's first FOV {registry.zarr_channels[exp.name]}"
                    )
                check_channel_count(exp.name, fov)
                T, C, Z, Y, X = fov.array.shape
                if box_z0 < 0 or Z < box_z0 + box_z:
                    raise ValueError(
                        f"Experiment '{exp.name}', FOV {fov.name}: {Z} Z slices, but the Z window "
                        f"(scaled by the pixel size) is [{box_z0}, {box_z0 + box_z})"
                    )
                if Y < box_y or X < box_x:
                    raise ValueError(
                        f"Experiment '{exp.name}', FOV {fov.name}: image {Y}x{X} is smaller than the read box "
                        f"{box_y}x{box_x} (patch_yx {config.patch_yx} at this experiment's pixel size); "
                        f"choose a smaller patch"
                    )
                if fov.array.dtype != dtype:
                    raise ValueError(
                        f"Experiment '{exp.name}', FOV {fov.name}: dtype {fov.array.dtype} differs from the plate's {dtype}"
                    )
                ok = np.array([
                    label in exp.channels and exp.channels[label].in_well(fov.well) for label in labels
                ])
                if config.channel_mode == "all" and not ok.all():
                    raise ValueError(
                        f"Experiment '{exp.name}', FOV {fov.name}: labels {[l for l, k in zip(labels, ok) if not k]} "
                        "are limited to other wells; channel_mode='all' needs every label in every FOV"
                    )
                fov_rows.append(
                    dict(exp=e, experiment=exp.name, fov_name=fov.name, well=fov.well,
                         perturbation=exp.perturbation_of(fov.well), url=fov.array.url,
                         T=T, C=C, Z=Z, Y=Y, X=X, zarr_format=fov.array.zarr_format,
                         **{f"chunk_{a}": n for a, n in zip("tczyx", fov.array.chunks)},
                         tracks_path=exp.tracks_path)
                )
                fov_attrs.append(fov.attrs)
                fov_label_ok.append(ok)
        experiments = pd.DataFrame(exp_rows)
        _batch_dtype([np.dtype(d) for d in experiments.storage_dtype], experiments.name.tolist())  # refuse early
        fovs = pd.DataFrame(fov_rows)
        if fovs.empty:
            raise ValueError("No FOVs selected in any experiment: check perturbation_wells and include/exclude lists")

        limits = [registry[name].remote for name in fovs.experiment]
        columns = read_tracks(list(zip(fovs.tracks_path, fovs.fov_name, limits, fovs.experiment)), threads=threads,
                              progress=progress)
        fovs = fovs.drop(columns="tracks_path")
        counts = np.array([len(c["t"]) for c in columns])
        raw = {k: np.concatenate([c[k] for c in columns]) for k in columns[0]}
        raw["fov"] = np.repeat(np.arange(len(fovs), dtype=np.int32), counts)

        forest, raw["track"] = _lineage(raw, fovs)
        keep = _borders(raw, fovs, pd.DataFrame(exp_rows), config)

        label_ok = np.stack(fov_label_ok)
        zarr_names = [
            [registry.zarr_channels[fovs.experiment[f]][exp_channels[fovs.exp[f], c]] if label_ok[f, c] else None
             for c in range(n_labels)]
            for f in range(len(fovs))
        ]
        norm_tables = [
            fov_norm_table(attrs, names, int(fovs["T"][f]), config.norm_level, config.norm_subtrahend,
                           config.norm_divisor)
            for f, (attrs, names) in enumerate(zip(fov_attrs, zarr_names))
        ]
        rows = np.flatnonzero(keep)
        if config.channel_mode == "bag":
            ok = label_ok[raw["fov"][rows]]
            pair_row, pair_label = np.nonzero(ok)
            rows = rows[pair_row]
            label = pair_label.astype(np.int16)
        else:
            label = None
        cols = {k: v[rows] for k, v in raw.items()}
        cols["exp"] = fovs.exp.to_numpy()[cols["fov"]].astype(np.int16)
        norm = _gather_norm(norm_tables, cols, label, fovs, labels, zarr_names, config)

        lineage = forest["root"][cols["track"]]
        if label is None:
            group_key = lineage.astype(np.int64)
        else:
            group_key = lineage.astype(np.int64) * n_labels + label
            cols["label"] = label
            cols["channel"] = exp_channels[cols["exp"], label].astype(np.int16)
        _, cols["group"] = np.unique(group_key, return_inverse=True)
        order = np.lexsort((forest["tin"][cols["track"]], cols["t"], cols["group"]))
        cols = {k: v[order] for k, v in cols.items()}
        norm = norm[order]

        tracks = _tracks_frame(cols, fovs, experiments, forest, labels)
        forest_arrays = {k: forest[k] for k in ("parent", "root", "tin", "tout", "fov", "track_id")}
        return cls(config, labels, experiments, exp_channels, fovs, tracks, norm.astype(np.float32), forest_arrays)

    # ------------------------------------------------------------------ lookup
    def _build_lookup(self) -> None:
        group, t = self._columns["group"], self._columns["t"]
        n_groups = int(group.max()) + 1 if len(group) else 0
        first = np.searchsorted(group, np.arange(n_groups + 1))
        tmin = t[first[:-1]].astype(np.int64)
        span = t[first[1:] - 1].astype(np.int64) - tmin + 1
        base = np.concatenate([[0], np.cumsum(span)]).astype(np.int64)
        #: per group: first t, number of t slots, first slot
        self._groups = np.stack([tmin, span, base[:-1]], axis=1)
        slot = base[group] + (t - tmin[group])
        self._row_slot = slot
        # one extra, empty slot at the end answers every lookup outside a group's time span
        self._empty_slot = int(base[-1])
        self._slot_start = np.searchsorted(slot, np.arange(self._empty_slot + 2)).astype(np.int64)
        tin = self.forest["tin"][self._columns["track"]]
        tout = self.forest["tout"][self._columns["track"]]
        self._row_tin, self._row_tout = tin, tout
        self._tin_scale = int(self.forest["tin"].max(initial=0)) + 2
        self._slot_tin_key = slot * self._tin_scale + tin
        running = np.maximum.accumulate(slot * self._tin_scale + tout) if len(slot) else slot
        self._slot_tout_max = running - slot * self._tin_scale

    def rows_at(self, group: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[start, stop) row ranges of (group, t) pairs (broadcast); empty where the group has no row at t."""
        g = self._groups[group]
        offset = t - g[..., 0]
        slot = np.where((offset >= 0) & (offset < g[..., 1]), g[..., 2] + offset, self._empty_slot)
        return self._slot_start[slot], self._slot_start[slot + 1]

    def hot_rows(self, rows: np.ndarray) -> np.ndarray:
        """(B, len(HOT) + 2C) int32: the fields of `rows` that plans read, in one gather (see `hot_norm`)."""
        return self._hot[rows]

    @staticmethod
    def hot_norm(hot: np.ndarray) -> np.ndarray:
        """(B, C, 2) float32 normalization statistics of gathered hot rows."""
        return np.ascontiguousarray(hot[:, len(HOT):]).view(np.float32).reshape(len(hot), -1, 2)

    def tau_grid(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, K) candidate taus of each row's experiment and a mask of those in range and != 0."""
        exp = self._columns["exp"][rows]
        taus = self.exp_tau_min[exp][:, None] + np.arange(self.tau_table.shape[1])
        return taus, self.tau_table[exp] > 0

    def valid_mask(self, policy: str) -> np.ndarray:
        """Rows with at least one positive under `policy` ("lineage" or "ancestry") at some tau != 0."""
        n = len(self.tracks)
        valid = np.zeros(n, dtype=bool)
        group, t = self._columns["group"], self._columns["t"].astype(np.int64)
        for lo in range(0, n, 1 << 20):
            rows = np.arange(lo, min(n, lo + (1 << 20)))
            taus, ok = self.tau_grid(rows)
            for k in range(taus.shape[1]):
                start, stop = self.rows_at(group[rows], t[rows] + taus[:, k])
                has = ok[:, k] & (stop > start)
                if policy == "ancestry":
                    has &= self._has_related(rows, start, stop)
                elif policy != "lineage":
                    raise ValueError(f"unknown positive policy {policy!r}")
                valid[rows] |= has
        return valid

    def _has_related(self, rows: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
        """Whether rows [start, stop) of one slot hold an ancestor-or-descendant of each row's track."""
        nonempty = stop > start
        slot = self._row_slot[np.where(nonempty, start, 0)]
        tin, tout = self._row_tin[rows], self._row_tout[rows]
        base = slot * self._tin_scale
        lo = np.searchsorted(self._slot_tin_key, base + tin, "left")
        hi = np.searchsorted(self._slot_tin_key, base + tout, "right")
        descendant = hi > lo
        before = lo - 1
        ancestor = (before >= start) & (self._slot_tout_max[np.maximum(before, 0)] >= tin)
        return nonempty & (descendant | ancestor)

    def related(self, rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
        """Whether the tracks of rows_a and rows_b are one the ancestor-or-self of the other."""
        ta, tb = self._row_tin[rows_a], self._row_tin[rows_b]
        oa, ob = self._row_tout[rows_a], self._row_tout[rows_b]
        return ((ta <= tb) & (tb <= oa)) | ((tb <= ta) & (ta <= ob))

    def values(self, column: str, rows: np.ndarray) -> np.ndarray:
        """Values of a `tracks` column at `rows` in O(len(rows)) (categoricals decoded via their codes)."""
        cached = self._value_cache.get(column)
        if cached is None:
            series = self.tracks[column]
            if isinstance(series.dtype, pd.CategoricalDtype):
                cached = (series.cat.categories.to_numpy(dtype=object), series.cat.codes.to_numpy())
            else:
                cached = (None, series.to_numpy())
            self._value_cache[column] = cached
        categories, data = cached
        return data[rows] if categories is None else categories[data[rows]]

    def column(self, name: str) -> np.ndarray:
        """A hot numpy column: exp, fov, t, group, track, channel, y_clamp, x_clamp."""
        return self._columns[name]

    # ------------------------------------------------------------------ reading geometry
    @property
    def n_channels(self) -> int:
        return 1 if self.config.channel_mode == "bag" else len(self.labels)

    @property
    def read_shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) of every patch delivered: read boxes are resampled to it (see `exp_box`)."""
        return (int(self.experiments.depth.iloc[0]), *self.config.patch_yx)

    @property
    def resampled(self) -> bool:
        """Whether some experiment's read box differs from `read_shape` (pixel-size normalization)."""
        return bool((self.exp_box != np.array(self.read_shape)).any())

    @property
    def batch_dtype(self) -> np.dtype:
        """The dtype patches are read in: each experiment's storage dtype promoted exactly (see `_batch_dtype`)."""
        return _batch_dtype([np.dtype(d) for d in self.experiments.storage_dtype], self.experiments.name.tolist())

    def channel_indices(self, rows: np.ndarray) -> np.ndarray:
        """(B, C) zarr channel indices of rows, in canonical order."""
        if self.config.channel_mode == "bag":
            return self._columns["channel"][rows].astype(np.int32)[:, None]
        return self.exp_channels[self._columns["exp"][rows]]

    def __len__(self) -> int:
        return len(self.tracks)

    # ------------------------------------------------------------------ report
    def summary(self) -> pd.DataFrame:
        """One row per experiment: FOVs, tracks, lineages, divisions, observations, anchors, drops, tau."""
        out = []
        track_exp = self.fovs.exp.to_numpy()[self.forest["fov"]]
        parent = self.forest["parent"]
        row_exp = self._columns["exp"]
        valid_by_policy = {p: self.valid_mask(p) if p != self.config.positive_policy else None
                           for p in ("lineage", "ancestry")}
        valid_by_policy[self.config.positive_policy] = np.isin(np.arange(len(self)), self.valid)
        for e, exp in self.experiments.iterrows():
            in_exp = track_exp == e
            children = np.bincount(parent[in_exp & (parent >= 0)], minlength=len(parent))
            rows = row_exp == e
            fov = self.fovs[self.fovs.exp == e]
            out.append(dict(
                experiment=exp["name"], fovs=len(fov), tracks=int(in_exp.sum()),
                lineages=int((in_exp & (parent < 0)).sum()), divisions=int((children >= 2).sum()),
                single_daughter=int((children == 1).sum()), observations=int(rows.sum()),
                valid_lineage=int(valid_by_policy["lineage"][rows].sum()),
                valid_ancestry=int(valid_by_policy["ancestry"][rows].sum()),
                dropped_outside=int(fov.dropped_outside.sum()), dropped_border=int(fov.dropped_border.sum()),
                tau_frames=f"{exp.tau_min}..{exp.tau_max}",
            ))
        return pd.DataFrame(out)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> None:
        """Write the index to one uncompressed .npz (columnar); atomic.

        Refuses an existing `path` unless `overwrite`, and even then anything but an index saved here.
        """
        path = os.fspath(path)
        check_target(path, overwrite, INDEX_NPZ)  # before the work; atomic_output checks again at the move
        arrays: dict[str, np.ndarray] = {"norm": self.norm, "exp_channels": self.exp_channels, "valid": self.valid}
        for k, v in self.forest.items():
            arrays[f"forest.{k}"] = v
        for name, frame in (("tracks", self.tracks), ("fovs", self.fovs), ("experiments", self.experiments)):
            for col in frame.columns:
                series = frame[col]
                if isinstance(series.dtype, pd.CategoricalDtype):
                    arrays[f"{name}.{col}.codes"] = series.cat.codes.to_numpy()
                    arrays[f"{name}.{col}.categories"] = series.cat.categories.to_numpy().astype(str)
                elif pd.api.types.is_numeric_dtype(series.dtype):
                    arrays[f"{name}.{col}"] = series.to_numpy()
                else:
                    arrays[f"{name}.{col}.str"] = series.to_numpy().astype(str)
        meta = dict(format=FORMAT_VERSION, config=asdict(self.config), labels=self.labels,
                    frames={n: list(f.columns) for n, f in
                            (("tracks", self.tracks), ("fovs", self.fovs), ("experiments", self.experiments))})
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with atomic_output(path, overwrite, kind=INDEX_NPZ) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "LineageIndex":
        """Read an index written by `save` (no store or CSV is touched)."""
        with np.load(os.fspath(path), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(arrays["meta"].tobytes())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: index format {meta.get('format')}, this version reads {FORMAT_VERSION}; rebuild it")
        config = IndexConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
        frames = {}
        for name, columns in meta["frames"].items():
            data = {}
            for col in columns:
                key = f"{name}.{col}"
                if key + ".codes" in arrays:
                    data[col] = pd.Categorical.from_codes(arrays[key + ".codes"], arrays[key + ".categories"])
                elif key + ".str" in arrays:
                    data[col] = arrays[key + ".str"].tolist()
                else:
                    data[col] = arrays[key]
            frames[name] = pd.DataFrame(data)
        forest = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("forest.")}
        return cls(config, meta["labels"], frames["experiments"], arrays["exp_channels"], frames["fovs"],
                   frames["tracks"], arrays["norm"], forest, valid=arrays["valid"])

    def with_policy(self, policy: str) -> "LineageIndex":
        """The same index under another positive policy (shares all arrays)."""
        return LineageIndex(replace(self.config, positive_policy=policy), self.labels, self.experiments,
                            self.exp_channels, self.fovs, self.tracks, self.norm, self.forest)


# ---------------------------------------------------------------------- build helpers
def _lineage(raw: dict[str, np.ndarray], fovs: pd.DataFrame) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-track forest (tracks are unique (fov, track_id)) and each row's track code."""
    fov, tid, t = raw["fov"], raw["track_id"], raw["t"]
    order = np.lexsort((t, tid, fov))
    new = np.r_[True, (fov[order][1:] != fov[order][:-1]) | (tid[order][1:] != tid[order][:-1])]
    track_of_sorted = np.cumsum(new) - 1
    track = np.empty(len(fov), dtype=np.int64)
    track[order] = track_of_sorted
    first = order[new]
    t_fov, t_tid, t_parent = fov[first], tid[first], raw["parent_track_id"][first]
    conflict = raw["parent_track_id"] != t_parent[track]
    if conflict.any():
        r = int(np.flatnonzero(conflict)[0])
        raise ValueError(
            f"Experiment '{fovs.experiment[fov[r]]}', FOV {fovs.fov_name[fov[r]]}: track {tid[r]} has "
            f"different parent_track_id values ({t_parent[track[r]]} and {raw['parent_track_id'][r]})"
        )
    keys = pd.MultiIndex.from_arrays([t_fov, t_tid])
    parent = keys.get_indexer(pd.MultiIndex.from_arrays([t_fov, t_parent]))
    parent = np.where(t_parent >= 0, parent, -1).astype(np.int64)
    try:
        forest = build_forest(parent)
    except LineageCycleError as err:
        bad = err.tracks  # type: ignore[attr-defined]
        f = int(t_fov[bad[0]])
        ids = sorted(int(x) for x in t_tid[bad][t_fov[bad] == f])
        raise ValueError(
            f"Experiment '{fovs.experiment[f]}', FOV {fovs.fov_name[f]}: parent_track_id links form a cycle "
            f"through tracks {ids[:20]}; fix their parent_track_id (a root has -1 or an empty parent)"
        ) from None
    arrays = dict(parent=forest.parent, root=forest.root, tin=forest.tin, tout=forest.tout,
                  fov=t_fov.astype(np.int32), track_id=t_tid)
    return arrays, track


def _borders(raw: dict[str, np.ndarray], fovs: pd.DataFrame, experiments: pd.DataFrame,
             config: IndexConfig) -> np.ndarray:
    """Clamp patch centres into the image; drop rows outside it or shifted too far (counted per FOV).

    The read box and the maximum shift are those of the row's experiment (scaled by its pixel size).
    """
    fov = raw["fov"]
    H, W, T = (fovs[k].to_numpy()[fov] for k in ("Y", "X", "T"))
    exp = fovs.exp.to_numpy()[fov]
    y, x = raw["y"], raw["x"]
    by, bx = experiments.box_y.to_numpy()[exp], experiments.box_x.to_numpy()[exp]
    hy, hx = by // 2, bx // 2
    inside = (y >= 0) & (y < H) & (x >= 0) & (x < W) & (raw["t"] < T)
    shift = config.border_shift
    if shift > 0:  # a box starts at centre - size // 2 and must end inside the image
        yc, xc = np.clip(y, hy, H - (by - hy)), np.clip(x, hx, W - (bx - hx))
        shift_y = np.round(shift * experiments.scale_y.to_numpy()[exp])
        shift_x = np.round(shift * experiments.scale_x.to_numpy()[exp])
        near = (np.abs(yc - y) <= shift_y) & (np.abs(xc - x) <= shift_x)
    else:
        yc, xc = y, x
        near = (y >= hy) & (y <= H - (by - hy)) & (x >= hx) & (x <= W - (bx - hx))
    raw["y_clamp"] = np.where(inside, yc, 0).astype(np.int32)
    raw["x_clamp"] = np.where(inside, xc, 0).astype(np.int32)
    n = len(fovs)
    rows_per_fov = np.bincount(fov, minlength=n)
    lost = np.flatnonzero((rows_per_fov > 0) & (np.bincount(fov[inside], minlength=n) == 0))
    if len(lost):
        f = int(lost[0])
        r = int(np.flatnonzero(fov == f)[0])
        T_, H_, W_ = (int(fovs[k].iloc[f]) for k in ("T", "Y", "X"))
        raise ValueError(
            f"Experiment '{fovs.experiment.iloc[f]}', FOV {fovs.fov_name.iloc[f]}: all {int(rows_per_fov[f])} rows of "
            f"its tracks CSV lie outside the image ({T_} frames of {H_}x{W_} px; e.g. t={int(raw['t'][r])}, "
            f"y={y[r]:g}, x={x[r]:g}); give y, x in pixels of this image (not microns, not swapped) and t < {T_}, "
            "or list the FOV in exclude_fovs"
        )
    fovs["dropped_outside"] = np.bincount(fov[~inside], minlength=n)
    fovs["dropped_border"] = np.bincount(fov[inside & ~near], minlength=n)
    return inside & near


def _gather_norm(tables, cols, label, fovs, labels, zarr_names, config) -> np.ndarray:
    """(N, C, 2) (subtrahend, divisor) per row and output channel; a missing statistic is an error."""
    n_labels = len(labels)
    sizes = np.array([t.shape[0] * n_labels for t in tables])
    offsets = np.concatenate([[0], np.cumsum(sizes)])[:-1]
    flat = np.concatenate([t.reshape(-1, 2) for t in tables])
    base = offsets[cols["fov"]] + cols["t"].astype(np.int64) * n_labels
    idx = base[:, None] + (label[:, None] if label is not None else np.arange(n_labels)[None, :])
    norm = flat[idx]
    bad = np.isnan(norm).any(axis=2)
    if bad.any():
        r, c = (int(v[0]) for v in np.nonzero(bad))
        f = int(cols["fov"][r])
        c = int(label[r]) if label is not None else c
        raise ValueError(
            f"Experiment '{fovs.experiment[f]}', FOV {fovs.fov_name[f]}: normalization statistics "
            f"{config.norm_level}/{config.norm_subtrahend},{config.norm_divisor} missing for channel "
            f"'{labels[c]}' (zarr channel '{zarr_names[f][c]}') at t={cols['t'][r]}. Run the preprocessing that writes 'normalization' "
            "attributes, or choose another norm_level (None for no normalization)."
        )
    return norm


def _tracks_frame(cols, fovs, experiments, forest, labels) -> pd.DataFrame:
    """The public observation table: categorical strings plus numeric columns."""
    prefix = [f"{e}_{f}_" for e, f in zip(experiments.name.to_numpy()[fovs.exp.to_numpy()], fovs.fov_name.tolist())]
    track_strings = np.array(
        [prefix[f] + str(tid) for f, tid in zip(forest["fov"].tolist(), forest["track_id"].tolist())], dtype=object
    )
    roots, lineage_code = np.unique(forest["root"][cols["track"]], return_inverse=True)
    exp_code = cols["exp"]
    fov = cols["fov"]
    hpi = experiments.start_hpi.to_numpy()[exp_code] + cols["t"] * experiments.interval_minutes.to_numpy()[exp_code] / 60.0
    used_tracks, track_code = np.unique(cols["track"], return_inverse=True)
    frame = {
        "experiment": pd.Categorical.from_codes(exp_code, experiments.name.to_numpy().astype(str)),
        "fov_name": _per_fov_categorical(fovs.fov_name, fov),
        "well": _per_fov_categorical(fovs.well, fov),
        "perturbation": _per_fov_categorical(fovs.perturbation, fov),
        "track_id": cols["track_id"],
        "t": cols["t"].astype(np.int32),
        "y": cols["y"],
        "x": cols["x"],
        "z": cols["z"].astype(np.int32),
        "id": cols["id"],
        "parent_track_id": cols["parent_track_id"],
        "parent_id": cols["parent_id"],
        "global_track_id": pd.Categorical.from_codes(track_code, track_strings[used_tracks]),
        "lineage_id": pd.Categorical.from_codes(lineage_code, track_strings[roots]),
        "hours_post_perturbation": hpi.astype(np.float32),
        "y_clamp": cols["y_clamp"],
        "x_clamp": cols["x_clamp"],
        "exp": exp_code.astype(np.int16),
        "fov": fov.astype(np.int32),
        "track": cols["track"].astype(np.int32),
        "group": cols["group"].astype(np.int32),
    }
    if "label" in cols:
        frame["marker"] = pd.Categorical.from_codes(cols["label"], labels)
        frame["channel"] = cols["channel"]
    return pd.DataFrame(frame)


def _per_fov_categorical(per_fov: pd.Series, fov: np.ndarray) -> pd.Categorical:
    """A categorical row column from a per-FOV string column, without per-row string work."""
    categories, codes = np.unique(per_fov.to_numpy().astype(str), return_inverse=True)
    return pd.Categorical.from_codes(codes[fov], categories)
