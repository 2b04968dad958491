"""Pixel-size normalization: experiments at different pixel sizes read over scaled boxes and resampled."""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

from builders import norm_attrs, track_rows, tracks_table
from dali_pipeline.datasets.omezarr import write_plate
from dali_pipeline.loader import TripletLoader
from dali_pipeline.torch_dataset import MultiExperimentTripletDataset
from sampler import ExperimentRegistry, IndexConfig, LineageIndex, TripletSampler

N_T, SIZE = 6, 128


def ramp_experiment(root, name: str, pixel_um: float) -> dict:
    """A plate whose pixels hold 10 x the physical x position in microns: a known pattern."""
    x_um = (np.arange(SIZE) + 0.5) * pixel_um
    frame = np.broadcast_to(10.0 * x_um, (SIZE, SIZE)).astype(np.float32)
    data = np.broadcast_to(frame, (N_T, 1, 1, SIZE, SIZE)).copy()
    write_plate(root / f"{name}.zarr", {"A/1/0": data}, ["ramp"], fov_attrs={"A/1/0": norm_attrs(["ramp"], N_T)})
    os.makedirs(root / f"{name}_tracks" / "A/1/0")
    tracks = tracks_table(track_rows(1, range(N_T), y=64.0, x=64.0), track_rows(2, range(N_T), y=60.0, x=70.0))
    tracks.to_csv(root / f"{name}_tracks" / "A/1/0" / "tracks.csv", index=False)
    return dict(name=name, data_path=f"{name}.zarr", tracks_path=f"{name}_tracks", channels={"ramp": "ramp"},
                perturbation_wells={"mock": ["A/1"]}, interval_minutes=30, pixel_size_xy_um=pixel_um)


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> LineageIndex:
    root = tmp_path_factory.mktemp("pixels")
    doc = {"experiments": [ramp_experiment(root, "coarse", 0.2), ramp_experiment(root, "fine", 0.1)]}
    (root / "c.yml").write_text(yaml.safe_dump(doc))
    registry = ExperimentRegistry.from_yaml(root / "c.yml", reference_pixel_size_xy_um=0.2)
    assert registry.scale_factors == {"coarse": (1.0, 1.0, 1.0), "fine": (1.0, 2.0, 2.0)}
    return LineageIndex.build(registry, IndexConfig(patch_yx=(32, 32)), progress=False)


def test_read_boxes_scale_with_the_pixel_size(index):
    assert index.exp_box.tolist() == [[1, 32, 32], [1, 64, 64]] and index.resampled
    assert index.read_shape == (1, 32, 32)


def test_resampled_patches_show_the_same_microns_in_both_experiments(index):
    sampler = TripletSampler(index, 8, seed=0)
    loader = TripletLoader(index, sampler, device="cpu", normalize=False)
    batch = next(iter(loader))
    plan = sampler.plan(0, 0)
    experiments = index.values("experiment", plan.anchor_rows)
    assert set(experiments) == {"coarse", "fine"}
    patches = batch["anchor"].numpy()[:, 0, 0]  # (B, Y, X)
    # every output pixel spans 0.2 um in both: the ramp rises 10 * 0.2 = 2 per pixel along x
    np.testing.assert_allclose(np.diff(patches[:, 8:24, 4:28], axis=2), 2.0, atol=1e-3)
    # and starts where the box starts, in microns (box x start * pixel size)
    pixel = np.where(experiments == "fine", 0.1, 0.2)
    start_um = plan.anchor_boxes.x * pixel
    np.testing.assert_allclose(patches[:, 16, 10], 10 * (start_um + 10.5 * 0.2), atol=1e-3)
    # the torch path resamples the same way (trilinear, float32)
    reference = MultiExperimentTripletDataset(index).__getitems__(plan)
    np.testing.assert_allclose(batch["anchor"].numpy(), reference["anchor"].numpy(), rtol=1e-5, atol=1e-4)


def test_missing_pixel_sizes_are_an_error(tmp_path):
    doc = {"experiments": [ramp_experiment(tmp_path, "coarse", 0.2)]}
    del doc["experiments"][0]["pixel_size_xy_um"]
    (tmp_path / "c.yml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=r"reference_pixel_size_xy_um set but experiments missing "
                                         r"pixel_size_xy_um: \['coarse'\]"):
        ExperimentRegistry.from_yaml(tmp_path / "c.yml", reference_pixel_size_xy_um=0.2)


def test_the_chunk_cache_reads_boxes_of_several_sizes_like_the_uncached_loader(index):
    def anchors(**options):
        loader = TripletLoader(index, TripletSampler(index, 8, seed=4), device="cpu", normalize=False, **options)
        return [b["anchor"].numpy().copy() for epoch in range(2) for b in loader], loader

    plain, _ = anchors()
    cached, loader = anchors(cache_bytes=16 << 20)
    assert len(plain) == len(cached) > 0
    for a, b in zip(plain, cached):
        np.testing.assert_array_equal(a, b)
    assert loader.reader.cache.stats.hits > 0


def test_the_gpu_cache_assembles_boxes_of_several_sizes_in_one_launch(index, monkeypatch):
    """Resampled experiments read boxes of two sizes: two destination buffers, still one kernel per step
    (the numpy-backed stand-in for cupy runs the kernel's address table)."""
    import sys

    from fake_cupy import FakeCupy

    from dali_pipeline import PatchReader
    from dali_pipeline.cached_reader import CachedPatchReader, ChunkStore

    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    sampler = TripletSampler(index, 8, seed=4)
    reader = CachedPatchReader(index, store=ChunkStore(16 << 20, "gpu", 1))
    plain = PatchReader(index)
    for step in range(len(sampler)):
        plan = sampler.plan(step, 0)
        got, want = reader.read(plan), plain.read(plan)
        assert isinstance(got.anchor, list) and {a.shape[1:] for a in got.anchor} == {(1, 32, 32), (1, 64, 64)}
        for g, w in zip(got.anchor + got.positive, want.anchor + want.positive):
            assert g.device.id == 1
            np.testing.assert_array_equal(g.get(), w)
    assert len(fake.launches) == reader.arrays.counts["launches"] == len(sampler)
