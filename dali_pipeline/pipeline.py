"""The DALI graph: plans' patches in, cropped, Z-reduced, cast and normalized float32 out.

One definition for both devices: on "gpu" the patches go `.gpu()` once, right after the source
(then, when experiments have different pixel sizes, each read box is resampled to the common size);
argument inputs (normalization terms, ids) stay CPU nodes. The deterministic reshaping ops come
first (centre crop, Z reduction: both commute with a positive-divisor normalization and shrink
the work), then cast and `(x - sub) / (div + 1e-8)`. Patches arrive in the batch dtype; bool,
64-bit and float16/64 ones are cast to float32 on the device first (`OPS_DTYPES`). NaN propagates
through every reduction and normalization as in numpy (`_max_z`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Literal

import numpy as np

from dali_pipeline._dali import require_dali
from dali_pipeline.augment_graph import augment, param_kinds, used_params
from dali_pipeline.feed import SplitSource
from sampler.augment import AugmentConfig

EPSILON = 1e-8


@dataclass(frozen=True)
class GraphSpec:
    """What the graph does; everything data-level comes from the index."""

    fit: bool
    device: Literal["cpu", "gpu"]
    storage_dtype: np.dtype
    read_shape: tuple[int, int, int]  # (Z, Y, X) of every read box
    final_patch: tuple[int, int] | None = None  # centre crop (Y, X)
    #: "channelwise": per channel, the centre slice or the max: as `channel_modes` says (all channels),
    #: else as the source's per-sample `*_zcenter` pick (bag of channels)
    z_reduction: Literal["max", "center", "channelwise"] | None = None
    channel_modes: tuple[str, ...] | None = None  # "max" | "center" per canonical channel
    normalize: bool = True
    augment: AugmentConfig | None = None
    resample: bool = False  # read boxes differ by experiment (pixel sizes): resize each to read_shape
    #: where the patches arrive: None with the other outputs (one CPU source), else from a source of
    #: their own on this device (a SplitSource; "gpu" when a chunk cache assembles them in GPU memory)
    pixel_source: Literal["cpu", "gpu"] | None = None

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {self.device!r}")
        if self.pixel_source not in (None, "cpu", "gpu"):
            raise ValueError(f"pixel_source must be None, 'cpu' or 'gpu', got {self.pixel_source!r}")
        if self.pixel_source == "gpu" and self.device != "gpu":
            raise ValueError("patches in GPU memory need the GPU pipeline (device='gpu')")
        if self.z_reduction not in (None, "max", "center", "channelwise"):
            raise ValueError(f"z_reduction must be None, 'max', 'center' or 'channelwise', got {self.z_reduction!r}")
        if self.channel_modes is not None and (self.z_reduction != "channelwise"
                                               or not set(self.channel_modes) <= {"max", "center"}):
            raise ValueError(f"channel_modes {self.channel_modes} need z_reduction='channelwise' and modes "
                             "'max' or 'center'")
        if self.final_patch is not None:
            _, y, x = self.augmented_shape
            fy, fx = self.final_patch
            if not (0 < fy <= y and 0 < fx <= x):
                raise ValueError(f"final_patch {self.final_patch} must fit inside the patch {(y, x)} before it")

    @property
    def augmented_shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) after the augmentations' random crop (the read shape without one)."""
        if self.augment is not None and self.augment.crop is not None:
            return tuple(self.augment.crop)
        return self.read_shape

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) of every output sample."""
        z, y, x = self.augmented_shape
        if self.z_reduction is not None:
            z = 1
        if self.final_patch is not None:
            y, x = self.final_patch
        return (z, y, x)


#: storage dtypes the graph's pixel ops (slice, cat, max reduction, normalize) take as they are;
#: the others (bool, 64-bit integers, float16, float64) travel to the device as stored and are cast
#: to float32 there first (DALI's reductions and normalize do not take them)
OPS_DTYPES = frozenset(np.dtype(d) for d in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32,
                                             np.float32))
#: storage dtypes fn.tensor_resize (pixel-size resampling) takes as they are
RESIZE_DTYPES = frozenset(np.dtype(d) for d in (np.uint8, np.uint16, np.int16, np.float32))


def _dali_dtype(dtype: np.dtype):
    """The DALI type of a batch dtype (every dtype `sampler.index.PIXEL_DTYPES` lists)."""
    types = require_dali().types
    table = {np.bool_: types.BOOL, np.int8: types.INT8, np.uint8: types.UINT8, np.int16: types.INT16,
             np.uint16: types.UINT16, np.int32: types.INT32, np.uint32: types.UINT32, np.int64: types.INT64,
             np.uint64: types.UINT64, np.float16: types.FLOAT16, np.float32: types.FLOAT,
             np.float64: types.FLOAT64}
    try:
        return table[np.dtype(dtype).type]
    except KeyError:
        raise ValueError(f"no DALI type for the batch dtype {dtype}; supported: bool and every integer "
                         "and float type up to 64 bits") from None


def _max_z(x, is_float: bool):
    """Max projection over Z that propagates NaN like `np.max`.

    DALI's max reduction skips NaN (a Z column of NaN gives the lowest float): for float input a
    per-column NaN flag (a uint8 max of `x != x`) puts it back, `max + sqrt(-flag)` being the max
    where the flag is 0 and NaN where it is 1.
    """
    dali = require_dali()
    fn, types = dali.fn, dali.types
    top = fn.reductions.max(x, axes=[1], keep_dims=True)
    if not is_float:
        return top
    flag = fn.reductions.max(fn.cast(x != x, dtype=types.UINT8), axes=[1], keep_dims=True)
    return top + dali.math.sqrt(-fn.cast(flag, dtype=types.FLOAT))


def _reduce_z(x, mode: str, z: int, is_float: bool):
    return _max_z(x, is_float) if mode == "max" else x[:, z // 2 : z // 2 + 1]


def _channelwise(x, spec: GraphSpec, zcenter, z: int, is_float: bool):
    """Per channel the centre slice or the max projection, each output value computed by one of them."""
    fn = require_dali().fn
    if spec.channel_modes is None:  # bag of channels: the sample's label picks from [max, centre]
        both = fn.cat(_reduce_z(x, "max", z, is_float), _reduce_z(x, "center", z, is_float), axis=1)
        return both[:, zcenter : zcenter + 1]
    if len(set(spec.channel_modes)) == 1:
        return _reduce_z(x, spec.channel_modes[0], z, is_float)
    parts, start = [], 0
    for mode, run in groupby(spec.channel_modes):  # consecutive channels of one mode reduce together
        n = len(list(run))
        parts.append(_reduce_z(x[start : start + n], mode, z, is_float))
        start += n
    return fn.cat(*parts, axis=0)


def _reshape(x, spec: GraphSpec, is_float: bool, zcenter=None):
    """Centre crop and Z reduction of a (C, Z, Y, X) node (`is_float`: its dtype is a float one;
    `zcenter`: bag mode's per-sample channelwise pick)."""
    z, y, x_size = spec.augmented_shape
    if spec.final_patch is not None:
        fy, fx = spec.final_patch
        y0, x0 = (y - fy) // 2, (x_size - fx) // 2
        x = x[:, :, y0 : y0 + fy, x0 : x0 + fx]
    if spec.z_reduction in ("max", "center"):
        x = _reduce_z(x, spec.z_reduction, z, is_float)
    elif spec.z_reduction == "channelwise":
        x = _channelwise(x, spec, zcenter, z, is_float)
    return x


def _normalize(x, sub, div, spec: GraphSpec, is_float: bool):
    """float32 `(x - sub) / (div + 1e-8)` per sample and channel, integer patches cast on the way.

    `fn.normalize` with the (C, 1, 1, 1) terms as its mean and standard deviation is one pass over
    the patches, about 4x faster on the CPU than the same expression in DALI arithmetic.
    """
    dali = require_dali()
    if spec.normalize:
        return dali.fn.normalize(x, mean=sub, stddev=div + EPSILON, axis_names="DHW", dtype=dali.types.FLOAT)
    return x if is_float else dali.fn.cast(x, dtype=dali.types.FLOAT)


def build_pipeline(source, names: list[str], spec: GraphSpec, *, batch_size: int, device_id: int | None,
                   num_threads: int = 2, prefetch: int = 2, seed: int = 0, workers: int = 0,
                   batch_bytes: int = 0, checkpointing: bool = False, checkpoint: bytes | None = None,
                   no_copy: bool = False, cuda_stream: int | None = None):
    """The DALI Pipeline for a PlanFeed-like batch source returning the outputs `names`.

    Outputs: anchor[, positive] (float32 CDHW), ids (int64), and anchor_norm[, positive_norm]
    ((C, 2) float32) when not normalizing, so the statistics travel with the batch. `workers` > 0
    runs a picklable, stateless source in that many spawned processes (DALI's parallel external
    source); `batch_bytes` sizes their shared-memory chunks. `checkpointing` lets the pipeline's
    state (source position, random streams) be saved; `checkpoint` restores one. `no_copy` lets
    DALI use the source's arrays in place: the source must keep them alive and unchanged while
    they are queued (a PlanFeed keeps its last outputs). `cuda_stream`: the stream patches in GPU
    memory are produced on (`pixel_source="gpu"`); DALI orders its use of them after that stream.
    """
    dali = require_dali()
    fn, types = dali.fn, dali.types
    patch = _dali_dtype(spec.storage_dtype)
    kinds = {"anchor": (patch, 4, "CDHW"), "positive": (patch, 4, "CDHW"), "ids": (types.INT64, 1, None)}
    for key in ("anchor_sub", "anchor_div", "positive_sub", "positive_div"):
        kinds[key] = (types.FLOAT, 4, "CDHW")
    for key in ("anchor_zcenter", "positive_zcenter"):
        kinds[key] = (types.INT32, 0, None)
    for role in ("anchor", "positive"):
        for key, (dtype, ndim) in param_kinds().items():
            kinds[f"{role}_{key}"] = (dtype, ndim, None)

    parallel = dict(py_num_workers=workers, py_start_method="spawn") if workers else {}

    def external(callable_, outputs: list[str], **options):
        if not workers:  # parallel sources pass shared memory, never copied
            options = dict(options, no_copy=no_copy)
        return dict(zip(outputs, fn.external_source(
            source=callable_, num_outputs=len(outputs), batch=True, batch_info=True,
            dtype=[kinds[n][0] for n in outputs], ndim=[kinds[n][1] for n in outputs],
            layout=[kinds[n][2] for n in outputs], **options,
        )))

    @dali.pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                       prefetch_queue_depth=prefetch, seed=seed, enable_checkpointing=checkpointing, **parallel)
    def graph():
        if spec.pixel_source is None:
            by_name = external(source, names, **(
                dict(parallel=True, bytes_per_sample_hint=int(1.2 * batch_bytes) + (1 << 20)) if workers else {}))
        else:  # the patches on their device, the rest on the CPU (argument inputs must be CPU nodes)
            split = SplitSource(source, names)
            on_gpu = {} if spec.pixel_source == "cpu" or cuda_stream is None else dict(cuda_stream=cuda_stream)
            by_name = {**external(split.pixels, split.pixel_names, device=spec.pixel_source, **on_gpu),
                       **external(split.terms, split.term_names)}
        outputs = []
        for role in ("anchor", "positive") if spec.fit else ("anchor",):
            x = by_name[role]
            if spec.device == "gpu" and spec.pixel_source != "gpu":
                x = x.gpu()
            x_dtype = np.dtype(spec.storage_dtype)  # of the node x, as the ops below change it
            if x_dtype not in OPS_DTYPES or (spec.resample and x_dtype not in RESIZE_DTYPES):
                x = fn.cast(x, dtype=types.FLOAT)  # on the device: the ops after take float32
                x_dtype = np.dtype(np.float32)
            if spec.resample:  # linear, per sample; an unscaled box passes unchanged
                x = fn.tensor_resize(x, sizes=list(spec.read_shape), axes=[1, 2, 3], interp_type=types.INTERP_LINEAR,
                                     antialias=False, dtype=types.FLOAT)
                x_dtype = np.dtype(np.float32)
            sub, div = by_name[f"{role}_sub"], by_name[f"{role}_div"]
            zcenter = by_name.get(f"{role}_zcenter")
            is_float = x_dtype == np.float32
            if spec.augment is None:  # reshaping first: it commutes with normalization and shrinks the work
                outputs.append(_normalize(_reshape(x, spec, is_float, zcenter), sub, div, spec, is_float))
            else:  # augmentations see the whole normalized read box, as the reference's
                params = {key: by_name[f"{role}_{key}"] for key in used_params(spec.augment)}
                x = augment(_normalize(x, sub, div, spec, is_float), params, spec.augment)
                outputs.append(_reshape(x, spec, True, zcenter))
        outputs.append(by_name["ids"])
        if not spec.normalize:
            for role in ("anchor", "positive") if spec.fit else ("anchor",):
                terms = fn.cat(by_name[f"{role}_sub"], by_name[f"{role}_div"], axis=1)  # (C, 2, 1, 1)
                outputs.append(fn.reshape(terms, shape=[-1, 2]))
        return tuple(outputs)

    return graph(checkpoint=checkpoint) if checkpoint is not None else graph()


def output_names(spec: GraphSpec) -> list[str]:
    """Names of the pipeline's outputs, in order (for DALIGenericIterator's output_map)."""
    roles = ["anchor", "positive"] if spec.fit else ["anchor"]
    names = roles + ["ids"]
    if not spec.normalize:
        names += [f"{r}_norm" for r in roles]
    return names
