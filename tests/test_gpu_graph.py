"""The device="gpu" DALI graph of every variant, traced (not run) on a CPU-only machine.

A GPU graph only runs where there is a GPU, so a variant that no GPU run exercised could carry an
op without a GPU kernel, or pixel work left on the CPU, unnoticed. Each variant's graph is built
and serialized here (DALI checks arguments and input devices), then walked: every op placed on
the GPU must have a GPU kernel in this DALI build (serializing does not check that), and every op
that consumes pixels must run on the GPU; the patches' only CPU stage is their source.
Argument inputs (normalization terms, ids, augmentation parameters) are CPU nodes by design.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import numpy as np
import pytest

from dali_pipeline.augment_graph import used_params
from dali_pipeline.feed import SplitSource, source_names
from dali_pipeline.pipeline import GraphSpec, build_pipeline
from sampler.augment import (
    Affine,
    AugmentConfig,
    ChannelDropout,
    Flip,
    Gamma,
    IntensityScale,
    Noise,
    Smooth,
)
from sampler.index import PIXEL_DTYPES

dali = pytest.importorskip("nvidia.dali")
GPU_KERNELS = frozenset(dali.backend.RegisteredGPUOps())
PIXELS = ("anchor", "positive")

#: one config per AugmentConfig field, enabling that transform alone
AUGMENTATIONS = {
    "affine": AugmentConfig(affine=Affine(prob=0.5, shear=0.05, translate=(0.0, 2.0, 2.0))),
    "flip": AugmentConfig(flip=Flip(0.5)),
    "gamma": AugmentConfig(gamma=Gamma(0.5)),
    "intensity": AugmentConfig(intensity=IntensityScale(0.5)),
    "smooth": AugmentConfig(smooth=Smooth(0.5, sigma_z=(0.0, 0.2))),
    "noise": AugmentConfig(noise=Noise(0.5)),
    "crop": AugmentConfig(crop=(2, 24, 24)),
    "channel_dropout": AugmentConfig(channel_dropout=ChannelDropout(0.5)),
}

BASE = GraphSpec(fit=True, device="gpu", storage_dtype=np.dtype(np.uint16), read_shape=(4, 32, 32))
PRESET_2D = dict(augment=AugmentConfig.preset("2d"), read_shape=(10, 200, 200), final_patch=(160, 160))
PRESET_3D = dict(augment=AugmentConfig.preset("3d"), read_shape=(40, 240, 240))

#: id -> GraphSpec fields over BASE
VARIANTS = {
    "plain": {},
    "predict": dict(fit=False),
    "final_patch": dict(final_patch=(24, 20)),
    "zmax": dict(z_reduction="max"),
    "zcenter": dict(z_reduction="center"),
    "channelwise-all-max": dict(z_reduction="channelwise", channel_modes=("max", "max")),
    "channelwise-all-center": dict(z_reduction="channelwise", channel_modes=("center", "center")),
    "channelwise-mixed": dict(z_reduction="channelwise", channel_modes=("center", "max", "max", "center")),
    "channelwise-bag": dict(z_reduction="channelwise"),
    "predict-crop-zmax": dict(fit=False, final_patch=(24, 24), z_reduction="max"),
    "raw": dict(normalize=False),
    "raw-crop-zmax": dict(normalize=False, final_patch=(24, 24), z_reduction="max"),
    "resample": dict(resample=True),
    "resample-raw-zcenter": dict(resample=True, normalize=False, z_reduction="center"),
    "pixels-cpu": dict(pixel_source="cpu"),
    "pixels-gpu": dict(pixel_source="gpu"),
    "pixels-gpu-predict-raw": dict(pixel_source="gpu", fit=False, normalize=False),
    "pixels-gpu-channelwise-bag": dict(pixel_source="gpu", z_reduction="channelwise", final_patch=(24, 24)),
    **{f"aug-{name}": dict(augment=config, final_patch=(16, 16), z_reduction="max")
       for name, config in AUGMENTATIONS.items()},
    "aug-all-raw": dict(augment=AugmentConfig(
        affine=Affine(0.5), flip=Flip(0.5), gamma=Gamma(0.5), intensity=IntensityScale(0.5), smooth=Smooth(0.5),
        noise=Noise(0.5), crop=(2, 24, 24), channel_dropout=ChannelDropout(0.5)), normalize=False),
    # production: preset "2d", bag of channels with the channelwise Z reduction, 160 x 160 out
    "preset-2d": dict(PRESET_2D, z_reduction="channelwise"),
    "preset-2d-all-channels": dict(PRESET_2D, z_reduction="channelwise", channel_modes=("center", "max")),
    "preset-2d-zmax-predict": dict(PRESET_2D, z_reduction="max", fit=False),
    "preset-2d-cached-resampled": dict(PRESET_2D, z_reduction="channelwise", pixel_source="gpu", resample=True),
    "preset-3d": PRESET_3D,
    "preset-3d-pixels-cpu-raw": dict(PRESET_3D, pixel_source="cpu", normalize=False),
}

DTYPES = PIXEL_DTYPES  # every storage dtype an index accepts


def build(spec: GraphSpec) -> tuple[Any, dict[Any, str]]:
    """Build and serialize the graph of `spec`; return (pipeline, name of each ExternalSource op)."""
    picks = spec.z_reduction == "channelwise" and spec.channel_modes is None
    names = source_names(spec.fit, used_params(spec.augment), picks)

    def source(info):  # a graph that is only built never calls it
        raise AssertionError("the source was called")

    pipe = build_pipeline(source, names, spec, batch_size=4, device_id=None)
    pipe.serialize()  # traces the whole graph: unknown arguments or GPU named inputs fail here
    return pipe, {op: _source_output(op, names, source) for op in pipe._ops if op._op.schema.Name() == "ExternalSource"}


def _source_output(op: Any, names: list[str], source: Any) -> str:
    """Which source output an ExternalSource op carries (DALI internals: its callback and output index)."""
    callback, index = op._callback, op._output_index
    if callback is source:
        return names[index]
    split = callback.__self__
    assert isinstance(split, SplitSource), f"unexpected source callback {callback!r}"
    return (split.pixel_names if callback.__func__ is SplitSource.pixels else split.term_names)[index]


def gpu_problems(pipe: Any, pixel_sources: set, n_pixel_outputs: int) -> list[str]:
    """What in a built graph breaks "GPU kernels only, pixels on the GPU after their source".

    `pixel_sources`: the ExternalSource ops of the patches; the first `n_pixel_outputs` pipeline
    outputs are patches. Walks DALI's op list (internals: `pipe._ops`, `op.inputs`, whose first
    NumRegularInput() entries are the positional inputs, the rest argument inputs).
    """
    problems = []
    pixel_ops = set(pixel_sources)
    for op in sorted(pipe._ops, key=lambda o: o.id):  # ids follow creation: inputs before their consumers
        name, device = op._op.schema.Name(), op._op.device
        if device != "cpu" and name not in GPU_KERNELS:
            problems.append(f"{name} ({op.name}) is placed on '{device}' but DALI has no GPU kernel for it")
        regular = op.inputs[: op._spec.NumRegularInput()]
        arguments = op.inputs[op._spec.NumRegularInput():]
        for node in arguments:
            if node.source in pixel_ops:
                problems.append(f"pixels ({node.name}) feed a CPU argument input of {name} ({op.name})")
        if any(node.source in pixel_ops for node in regular):
            pixel_ops.add(op)
            if device != "gpu":
                problems.append(f"pixel op {name} ({op.name}) runs on '{device}'")
            for node in regular:
                if node.source in pixel_ops and node.device != "gpu":
                    problems.append(f"{name} ({op.name}) takes pixels ({node.name}) on the CPU")
    for node in pipe._graph_outputs[:n_pixel_outputs]:
        if node.source not in pixel_ops:
            problems.append(f"output {node.name} does not come from the patches")
        elif node.device != "gpu":
            problems.append(f"output {node.name} leaves the graph on '{node.device}'")
    return problems


def assert_gpu_graph(spec: GraphSpec) -> None:
    """The graph of `spec` reads its patches from the right device and keeps them on GPU kernels."""
    pipe, sources = build(spec)
    roles = PIXELS if spec.fit else PIXELS[:1]
    pixel_sources = {op for op, output in sources.items() if output in PIXELS}
    assert sorted(sources[op] for op in pixel_sources) == sorted(roles)
    for op in pixel_sources:  # patches arrive where pixel_source says (with the other outputs: the CPU)
        assert op._op.device == (spec.pixel_source or "cpu")
    problems = gpu_problems(pipe, pixel_sources, len(roles))
    assert not problems, problems
    assert {op._op.device for op in pipe._ops} <= {"cpu", "gpu"}


def test_every_augmentation_has_a_graph_variant():
    """A new AugmentConfig transform without a variant here fails, instead of going untraced."""
    default = AugmentConfig()
    assert set(AUGMENTATIONS) == {f.name for f in fields(AugmentConfig)}
    for name, config in AUGMENTATIONS.items():
        changed = [f.name for f in fields(AugmentConfig) if getattr(config, f.name) != getattr(default, f.name)]
        assert changed == [name] and used_params(config), name


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_gpu_graph_variant_runs_pixels_on_gpu_kernels_only(options):
    assert_gpu_graph(replace(BASE, **options))


@pytest.mark.parametrize("resample", [False, True], ids=["", "resampled"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=[np.dtype(d).name for d in DTYPES])
def test_gpu_graph_storage_dtype(dtype, normalize, resample):
    assert_gpu_graph(replace(BASE, storage_dtype=np.dtype(dtype), normalize=normalize, z_reduction="max",
                             resample=resample, final_patch=(24, 24)))


@pytest.mark.parametrize("pixel_source", ["gpu", "cpu", None])
def test_patches_in_gpu_memory_are_ordered_after_the_cache_stream(pixel_source):
    """The chunk cache assembles patches on a stream of its own: DALI's GPU source must be given it
    (and only that source: CPU sources have no stream)."""
    spec = replace(BASE, pixel_source=pixel_source)
    names = source_names(spec.fit, used_params(spec.augment))
    pipe = build_pipeline(lambda info: None, names, spec, batch_size=4, device_id=None, cuda_stream=12345)
    pipe.serialize()  # traces the graph
    streams = {op._op.device: op._group._cuda_stream  # DALI internals: the stream its feed uses
               for op in pipe._ops if op._op.schema.Name() == "ExternalSource"}
    assert streams == ({"gpu": 12345, "cpu": None} if pixel_source == "gpu" else {"cpu": None})


# The checks above must be able to fail: graphs known to break them.

def test_the_check_flags_pixel_ops_on_the_cpu():
    spec = replace(BASE, device="cpu", z_reduction="max", final_patch=(24, 24))
    pipe, sources = build(spec)
    problems = gpu_problems(pipe, {op for op, output in sources.items() if output in PIXELS}, 2)
    cpu_ops = {"_TensorSubscript", "reductions__Max", "Normalize"}  # crop, Z max, normalize per role
    assert {p.split()[2] for p in problems if p.startswith("pixel op")} == cpu_ops
    assert sum(p.startswith("output") for p in problems) == 2


def test_the_check_flags_a_gpu_op_without_a_gpu_kernel(monkeypatch):
    """ZerosLike has only a CPU kernel; DALI still serializes it placed on the GPU."""
    import dali_pipeline.pipeline as pipeline

    assert "ZerosLike" not in GPU_KERNELS
    monkeypatch.setattr(pipeline, "_reduce_z", lambda x, mode, z, is_float: dali.fn.zeros_like(x, device="gpu"))
    pipe, sources = build(replace(BASE, z_reduction="max"))
    problems = gpu_problems(pipe, {op for op, output in sources.items() if output in PIXELS}, 2)
    assert len(problems) == 2 and all(p.startswith("ZerosLike") and "no GPU kernel" in p for p in problems)


def test_the_check_flags_pixels_taken_back_to_the_cpu(monkeypatch):
    import dali_pipeline.pipeline as pipeline

    normalize = pipeline._normalize
    monkeypatch.setattr(pipeline, "_normalize", lambda x, *args: normalize(x.cpu(), *args).gpu())
    pipe, sources = build(BASE)
    problems = gpu_problems(pipe, {op for op, output in sources.items() if output in PIXELS}, 2)
    assert sorted(p.split(" (")[0] for p in problems) == ["Normalize", "Normalize", "pixel op Normalize",
                                                           "pixel op Normalize"]
