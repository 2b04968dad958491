"""No silently wrong pixels: every storage dtype is read exactly (or refused at index build), NaN
propagates through every Z reduction and normalization like numpy's, and OMERO channel names that
do not match the array's C axis are refused. Expectations are numpy on the arrays written."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from builders import make_experiment, track_rows, tracks_table, write_collection

from dali_pipeline.cached_reader import CachedPatchReader, ChunkStore
from dali_pipeline.torch_dataset import MultiExperimentTripletDataset
from sampler import ExperimentRegistry, IndexConfig, LineageIndex, TripletSampler
from sampler.index import PIXEL_DTYPES, _batch_dtype

SHAPE = (5, 48, 48)  # Z, Y, X
N_T = 4
BATCH = 8
CHANNELS = ["Phase3D", "GFP"]
LABELS = {"phase": "Phase3D", "gfp": "GFP"}


def cells():
    return tracks_table(track_rows(1, range(N_T), y=24.0, x=24.0), track_rows(2, range(N_T), y=20.5, x=27.0),
                        track_rows(3, range(N_T), y=30.0, x=18.0))


def spanning(dtype: np.dtype, seed: int) -> np.ndarray:
    """TCZYX pixels over the dtype's range: both extremes of integers, signs, more precision than float32."""
    rng = np.random.default_rng(seed)
    shape = (N_T, len(CHANNELS), *SHAPE)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
        x[:, :, :, ::7, ::5] = info.max
        x[:, :, :, 3::7, ::5] = info.min
        return x
    scale = 1e3 if dtype == np.float16 else 1e30
    return (rng.standard_normal(shape) * scale).astype(dtype)


def cut(data: dict[str, np.ndarray], index: LineageIndex, boxes) -> np.ndarray:
    """The plan's read boxes cut with numpy from the written arrays, keyed by experiment name."""
    z, y, x = index.read_shape
    out = [data[index.fovs.experiment.iloc[f]][t][ch][:, z0:z0 + z, y0:y0 + y, x0:x0 + x]
           for f, t, z0, y0, x0, ch in zip(boxes.fov, boxes.t, boxes.z, boxes.y, boxes.x, boxes.channels)]
    return np.stack(out)


def reference(native: np.ndarray, norm: np.ndarray, z_reduction, center: np.ndarray | None = None) -> np.ndarray:
    """What the loader must give: numpy's Z reduction (NaN-propagating max), float32, normalization."""
    z = native.shape[2]
    if z_reduction == "max":
        native = native.max(axis=2, keepdims=True)
    elif z_reduction == "center":
        native = native[:, :, z // 2:z // 2 + 1]
    elif z_reduction == "channelwise":
        native = np.where(center[:, :, None, None, None], native[:, :, z // 2:z // 2 + 1],
                          native.max(axis=2, keepdims=True))
    with np.errstate(over="ignore"):
        x = native.astype(np.float32)
    if norm is None:
        return x
    sub, div = norm[..., 0][..., None, None, None], norm[..., 1][..., None, None, None]
    return (x - sub) / (div + np.float32(1e-8))


def build(root: Path, arrays: dict[str, np.ndarray], mode: str = "all") -> LineageIndex:
    exps = [make_experiment(root, name, {"A/1/0": cells()}, CHANNELS, LABELS, shape=SHAPE, n_t=N_T,
                            data={"A/1/0": a}, chunks=(1, 1, 2, 16, 16)) for name, a in arrays.items()]
    registry = ExperimentRegistry.from_yaml(write_collection(root, exps, labels=list(LABELS)), z_window=5)
    return LineageIndex.build(registry, IndexConfig(patch_yx=(32, 32), channel_mode=mode), progress=False)


def first_batch(index: LineageIndex, **options):
    from dali_pipeline.loader import TripletLoader

    sampler = TripletSampler(index, BATCH, seed=2)
    loader = TripletLoader(index, sampler, device="cpu", **options)
    try:
        return next(iter(loader)), sampler.plan(0, 0)
    finally:
        loader.close()


# ---------------------------------------------------------------------------------------- dtypes
def exact_in(values: np.ndarray, wide: np.dtype) -> bool:
    """Whether `values` survive a round trip through `wide` (Python ints for integers: no wrap hides)."""
    with np.errstate(over="ignore", invalid="ignore"):  # the casts that lose values are the point
        there = values.astype(wide)
        back = there.astype(values.dtype)
    if np.issubdtype(values.dtype, np.integer) and np.issubdtype(wide, np.integer):
        return [int(v) for v in there] == [int(v) for v in values]
    return bool(np.array_equal(back, values)) and bool(np.all(np.isfinite(there)))


def probes(dtype: np.dtype) -> np.ndarray:
    """Values of `dtype` that a narrower or differently signed type gets wrong."""
    if dtype == np.bool_:
        return np.array([False, True])
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.array([info.min, info.max, info.max - 1], dtype)
    info = np.finfo(dtype)
    return np.array([info.max, -info.max, 1 + info.eps, info.tiny], dtype)


@pytest.mark.parametrize("pair", list(itertools.combinations_with_replacement(PIXEL_DTYPES, 2)),
                         ids=lambda p: "+".join(d.name for d in p))
def test_batch_dtype_is_the_narrowest_exact_type_or_a_refusal(pair):
    holds_both = [w for w in PIXEL_DTYPES if all(exact_in(probes(d), w) for d in pair)]
    if not holds_both:
        with pytest.raises(ValueError, match=rf"'x' \({pair[0]}\), 'y' \({pair[1]}\): no dtype holds"):
            _batch_dtype(list(pair), ["x", "y"])
        return
    got = _batch_dtype(list(pair), ["x", "y"])
    assert got in holds_both
    assert got.itemsize == min(w.itemsize for w in holds_both)


@pytest.mark.parametrize("dtype", PIXEL_DTYPES, ids=lambda d: d.name)
def test_every_dtype_reads_exactly_through_every_path(tmp_path, dtype):
    """Loader (DALI CPU graph), torch reference and chunk cache equal numpy on pixels spanning the dtype."""
    pytest.importorskip("nvidia.dali")
    data = {"a": spanning(dtype, 1)}
    index = build(tmp_path, data)
    assert index.batch_dtype == dtype  # read in its stored type
    raw, plan = first_batch(index, normalize=False)
    native = cut(data, index, plan.anchor_boxes)
    np.testing.assert_array_equal(raw["anchor"].numpy(), reference(native, None, None))
    np.testing.assert_array_equal(raw["positive"].numpy(), reference(cut(data, index, plan.positive_boxes), None, None))

    torch_batch = MultiExperimentTripletDataset(index).__getitems__(plan)
    assert torch_batch["anchor"].numpy().dtype == dtype
    np.testing.assert_array_equal(torch_batch["anchor"].numpy(), native)
    cached = CachedPatchReader(index, store=ChunkStore(16 << 20)).read(plan)
    np.testing.assert_array_equal(cached.anchor, native)

    normalized, _ = first_batch(index, z_reduction="max")
    want = reference(native, plan.anchor_norm, "max")
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(normalized["anchor"].numpy(), want, rtol=2e-6, atol=1e-6)


def test_mixed_dtypes_promote_without_wrapping(tmp_path):
    """uint16 and int8 experiments read as int32: values over 32767 and below 0 arrive as stored."""
    pytest.importorskip("nvidia.dali")
    data = {"wide": spanning(np.dtype(np.uint16), 3), "signed": spanning(np.dtype(np.int8), 4)}
    index = build(tmp_path, data)
    assert index.batch_dtype == np.int32
    sampler = TripletSampler(index, BATCH, seed=2)
    plans = [sampler.plan(s, 0) for s in range(len(sampler))]
    cached = CachedPatchReader(index, store=ChunkStore(16 << 20))
    from dali_pipeline.loader import TripletLoader

    loader = TripletLoader(index, TripletSampler(index, BATCH, seed=2), device="cpu", normalize=False)
    seen = set()
    try:
        for plan, batch in zip(plans, loader):
            native = cut(data, index, plan.anchor_boxes)
            np.testing.assert_array_equal(batch["anchor"].numpy(), native.astype(np.float32))
            np.testing.assert_array_equal(cached.read(plan).anchor, native)
            seen.update(index.fovs.experiment.iloc[plan.anchor_boxes.fov].tolist())
            seen.update(name for name, hit in (("over", native.max() > 32767), ("negative", native.min() < 0)) if hit)
    finally:
        loader.close()
    assert {"wide", "signed", "over", "negative"} <= seen


def test_a_mix_no_dtype_holds_is_refused_at_index_build(tmp_path):
    data = {"counts": spanning(np.dtype(np.uint64), 5), "offsets": spanning(np.dtype(np.int8), 6)}
    with pytest.raises(ValueError, match=r"'counts' \(uint64\), 'offsets' \(int8\): no dtype holds .* float64"):
        build(tmp_path, data)


# ------------------------------------------------------------------------------------------- NaN
def with_nans(dtype: np.dtype, seed: int) -> np.ndarray:
    """Random pixels with ~3 % NaN voxels, whole NaN Z columns, and +-inf voxels."""
    rng = np.random.default_rng(seed)
    x = (rng.random((N_T, len(CHANNELS), *SHAPE)) * 100).astype(dtype)
    x[rng.random(x.shape) < 0.03] = np.nan
    x[:, :, :, 10:40:6, 12:40:5] = np.nan  # every Z of these columns
    x[:, :, 2, 14:40:9, 15:40:7] = np.inf  # in the centre slice too
    x[:, :, 3, 16:40:8, 13:40:6] = -np.inf
    return x


@pytest.mark.parametrize(
    "dtype, z_reduction, mode",
    [(np.float32, None, "all"), (np.float32, "max", "all"), (np.float32, "center", "all"),
     (np.float32, "channelwise", "all"), (np.float32, "channelwise", "bag"), (np.float16, "max", "all"),
     (np.float64, "max", "all")],
    ids=["f32-none", "f32-max", "f32-center", "f32-channelwise", "f32-channelwise-bag", "f16-max", "f64-max"],
)
def test_nan_propagates_like_numpy(tmp_path, dtype, z_reduction, mode):
    """NaN where numpy's reduction gives NaN, +-inf where it gives them, equal finite values elsewhere
    (DALI's max reduction alone skips NaN: a NaN column came out as -3.4e38, -2e36 normalized)."""
    pytest.importorskip("nvidia.dali")
    data = {"a": with_nans(np.dtype(dtype), 7)}
    index = build(tmp_path, data, mode)
    batch, plan = first_batch(index, z_reduction=z_reduction)
    for role, rows, boxes, norm in (("anchor", plan.anchor_rows, plan.anchor_boxes, plan.anchor_norm),
                                    ("positive", plan.positive_rows, plan.positive_boxes, plan.positive_norm)):
        native = cut(data, index, boxes)
        if mode == "all":  # label-free phase keeps its centre slice, gfp is max-projected
            center = np.tile([True, False], (len(rows), 1))
        else:
            center = (index.values("marker", rows) == "phase")[:, None]
        want = reference(native, norm, z_reduction, center)
        got = batch[role].numpy()
        assert np.isnan(want).any() and np.isfinite(want).any() and np.isinf(want).any()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=2e-6, atol=1e-6)
        if role == "anchor":  # the torch reference path returns the stored pixels, NaN included
            ref = MultiExperimentTripletDataset(index).__getitems__(plan)["anchor"].numpy()
            np.testing.assert_array_equal(ref, native)


# ---------------------------------------------------------------------------------- OMERO channels
def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_omero_channel_beyond_the_array_is_refused(tmp_path):
    exp = make_experiment(tmp_path, "short", {"A/1/0": cells()}, CHANNELS, {**LABELS, "extra": "Extra"},
                          shape=SHAPE, n_t=N_T)
    edit_json(Path(exp["data_path"]) / "A/1/0/zarr.json",
              lambda d: d["attributes"]["ome"]["omero"]["channels"].append({"label": "Extra"}))
    path = write_collection(tmp_path, [exp], labels=[*LABELS, "extra"])
    with pytest.raises(ValueError, match=r"Experiment 'short', FOV A/1/0: the OMERO metadata names 3 channels .* "
                                         r"has C=2; channels 'Extra' \(index 2\) are beyond the array"):
        ExperimentRegistry.from_yaml(path)


def test_omero_channel_count_differing_from_c_is_refused_in_every_fov(tmp_path):
    exp = make_experiment(tmp_path, "wide", {"A/1/0": cells(), "B/1/0": cells()}, CHANNELS, LABELS,
                          shape=SHAPE, n_t=N_T)
    edit_json(Path(exp["data_path"]) / "B/1/0/0/zarr.json", lambda d: d["shape"].__setitem__(1, 3))
    registry = ExperimentRegistry.from_yaml(write_collection(tmp_path, [exp], labels=list(LABELS)))
    with pytest.raises(ValueError, match=r"Experiment 'wide', FOV B/1/0: the OMERO metadata names 2 channels "
                                         r".* has C=3; some channels have no name"):
        LineageIndex.build(registry, IndexConfig(patch_yx=(32, 32)), progress=False)


@pytest.mark.parametrize("dtype", PIXEL_DTYPES, ids=lambda d: d.name)
def test_every_dtype_passes_the_resampling_graph(dtype):
    """With pixel-size resampling on, a box already at the common size comes out as its float32 values
    (tensor_resize takes few dtypes: the others are cast on the device first)."""
    pytest.importorskip("nvidia.dali")
    from dali_pipeline.feed import source_names
    from dali_pipeline.pipeline import GraphSpec, build_pipeline

    b, shape = 3, (4, 6, 7)
    x = spanning(dtype, 8)[:b, :, :shape[0], :shape[1], :shape[2]]
    ones = np.ones((b, len(CHANNELS), 1, 1, 1), np.float32)
    arrays = {"anchor": np.ascontiguousarray(x), "anchor_sub": 0 * ones, "anchor_div": ones,
              "ids": np.arange(b, dtype=np.int64)[:, None]}
    names = source_names(fit=False, params=(), center=False)
    spec = GraphSpec(fit=False, device="cpu", storage_dtype=dtype, read_shape=shape, resample=True, normalize=False)
    pipe = build_pipeline(lambda info: tuple(arrays[n] for n in names), names, spec, batch_size=b, device_id=None)
    pipe.build()
    got = np.stack([np.asarray(t) for t in pipe.run()[0]])
    np.testing.assert_array_equal(got, reference(x, None, None))
