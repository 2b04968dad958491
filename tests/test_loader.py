"""TripletLoader on the real DALI CPU pipeline: contract, parity with the torch path, epochs, resume."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dali_pipeline._dali import gpu_count
from dali_pipeline.datasets.synthetic import decode, decode_channel, demo_spec, write_synthetic
from dali_pipeline.loader import TripletLoader
from dali_pipeline.torch_dataset import MultiExperimentTripletDataset
from sampler import ExperimentRegistry, IndexConfig, LineageIndex, TripletSampler

BATCH = 16


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> LineageIndex:
    yaml_path = write_synthetic(tmp_path_factory.mktemp("demo") / "demo", demo_spec())
    return LineageIndex.build(ExperimentRegistry.from_yaml(yaml_path), IndexConfig(patch_yx=(32, 32)), progress=False)


def loader(index, device="cpu", predict=False, drop_last=True, seed=0, **options) -> TripletLoader:
    sampler = TripletSampler(index, BATCH, seed=seed, predict=predict, drop_last=drop_last)
    return TripletLoader(index, sampler, device=device, device_id=0 if device == "gpu" else None, **options)


def numpy_reference(x: np.ndarray, norm: np.ndarray, final_patch=None, z_reduction=None, normalize=True):
    """What the graph must compute, in numpy, from native patches and (B, C, 2) statistics."""
    _, _, z, y, x_size = x.shape
    if final_patch is not None:
        y0, x0 = (y - final_patch[0]) // 2, (x_size - final_patch[1]) // 2
        x = x[..., y0:y0 + final_patch[0], x0:x0 + final_patch[1]]
    if z_reduction == "max":
        x = x.max(axis=2, keepdims=True)
    elif z_reduction == "center":
        x = x[:, :, z // 2:z // 2 + 1]
    x = x.astype(np.float32)
    if normalize:
        sub, div = norm[..., 0][..., None, None, None], norm[..., 1][..., None, None, None]
        x = (x - sub) / (div + np.float32(1e-8))
    return x


@pytest.mark.parametrize(
    "options",
    [dict(), dict(final_patch=(24, 24)), dict(z_reduction="max"), dict(final_patch=(20, 16), z_reduction="center"),
     dict(normalize=False, z_reduction="max")],
    ids=["plain", "crop", "zmax", "crop-zcenter", "raw-zmax"],
)
def test_parity_with_the_torch_dataset_and_numpy(index, options):
    dali = loader(index, **options)
    dataset = MultiExperimentTripletDataset(index)
    for step, batch in enumerate(dali):
        plan = dali.sampler.plan(step, 0)
        ref = dataset.__getitems__(plan)
        for role, norm in (("anchor", plan.anchor_norm), ("positive", plan.positive_norm)):
            want = numpy_reference(ref[role].numpy(), norm, **options)
            assert batch[role].dtype == torch.float32 and batch[role].device.type == "cpu"
            np.testing.assert_allclose(batch[role].numpy(), want, rtol=1e-6, atol=1e-6)
        assert list(batch["anchor_meta"]["track_id"]) == [m["track_id"] for m in ref["anchor_meta"]]
        assert list(batch["positive_meta"]["lineage_id"]) == [m["lineage_id"] for m in ref["positive_meta"]]
        if step == 2:
            break


def test_fit_batch_contract(index):
    batch = next(iter(loader(index, final_patch=(24, 24), z_reduction="max")))
    assert set(batch) == {"anchor", "positive", "anchor_meta", "positive_meta"}
    for key in ("anchor", "positive"):
        assert batch[key].shape == (BATCH, 2, 1, 24, 24) and batch[key].dtype == torch.float32
    assert set(batch["anchor_meta"]) == {"experiment", "perturbation", "fov_name", "track_id", "global_track_id",
                                         "lineage_id", "t", "hours_post_perturbation"}
    assert all(len(v) == BATCH for v in batch["anchor_meta"].values())
    dicts = next(iter(loader(index, meta="dicts")))
    assert isinstance(dicts["anchor_meta"], list) and dicts["anchor_meta"][0]["t"] >= 0


def test_predict_batch_contract_covers_every_row(index):
    dali = loader(index, predict=True, normalize=False, meta="dicts")
    seen = []
    for step, batch in enumerate(dali):
        assert set(batch) == {"anchor", "index", "anchor_norm"}
        assert batch["anchor"].shape[1:] == (2, 4, 32, 32)
        plan = dali.sampler.plan(step, 0)
        y = np.floor(index.values("y", plan.anchor_rows)).astype(int) - plan.anchor_boxes.y
        x = np.floor(index.values("x", plan.anchor_rows)).astype(int) - plan.anchor_boxes.x
        tid, t = decode(batch["anchor"].numpy()[np.arange(len(y)), 0, 0, y, x])
        assert tid.tolist() == [d["track_id"] for d in batch["index"]]
        assert t.tolist() == [d["t"] for d in batch["index"]]
        seen += [(d["experiment"], d["fov_name"], d["track_id"], d["t"]) for d in batch["index"]]
    assert len(seen) == len(set(seen)) == len(index)


def test_normalization_statistics_travel_in_both_shapes(index):
    arrays = loader(index, normalize=False)
    batch = next(iter(arrays))
    plan = arrays.sampler.plan(0, 0)
    np.testing.assert_array_equal(batch["anchor_norm"].numpy(), plan.anchor_norm)
    np.testing.assert_array_equal(batch["positive_norm"].numpy(), plan.positive_norm)
    reference = next(iter(loader(index, normalize=False, norm_meta="reference")))
    meta = reference["anchor_norm_meta"]
    assert len(meta) == BATCH and list(meta[0]) == index.labels
    assert meta[3][index.labels[1]]["timepoint_statistics"]["std"].item() == pytest.approx(float(plan.anchor_norm[3, 1, 1]))


def test_channel_remap_across_experiments(index):
    batch = next(iter(loader(index, normalize=False, seed=3)))
    plan = TripletSampler(index, BATCH, seed=3).plan(0, 0)
    assert len(set(index.values("experiment", plan.anchor_rows))) == 2
    y = np.floor(index.values("y", plan.anchor_rows)).astype(int) - plan.anchor_boxes.y
    x = np.floor(index.values("x", plan.anchor_rows)).astype(int) - plan.anchor_boxes.x
    pixels = batch["anchor"].numpy()[np.arange(BATCH), :, :, y, x]  # (B, C, Z)
    assert (decode_channel(pixels) == np.arange(2)[None, :, None]).all()
    assert (decode(pixels[:, 0, 0])[0] == index.values("track_id", plan.anchor_rows)).all()


@pytest.mark.parametrize("drop_last", [True, False])
def test_exact_epoch_lengths_over_two_epochs(index, drop_last):
    dali = loader(index, drop_last=drop_last)
    n_valid = len(index.valid)
    for epoch in range(2):
        sizes = [len(batch["anchor"]) for batch in dali]
        assert dali.epoch == epoch and len(sizes) == len(dali)
        if drop_last:
            assert sizes == [BATCH] * (n_valid // BATCH)
        else:
            assert sum(sizes) == n_valid and sizes[-1] == (n_valid % BATCH or BATCH)


def _anchor_keys(batch) -> list[tuple]:
    meta = batch["anchor_meta"]
    return list(zip(meta["global_track_id"], meta["t"]))


def test_resume_beyond_the_prefetch_depth_yields_exactly_the_unseen_batches(index):
    reference = [_anchor_keys(b) for b in loader(index, seed=5)]
    first = loader(index, seed=5, prefetch=2, read_ahead=2)
    seen = []
    for batch in first:
        seen.append(_anchor_keys(batch))
        if len(seen) == 7:
            break
    state = first.state_dict()
    assert state["step"] == 7 and state["epoch"] == 0
    resumed = loader(index, seed=5)
    resumed.load_state_dict(state)
    rest = [_anchor_keys(b) for b in resumed]
    assert seen + rest == reference


def test_set_epoch_between_epochs_and_after_an_abandoned_epoch(index):
    dali = loader(index, seed=1)
    sampler = TripletSampler(index, BATCH, seed=1)
    want = {e: [tuple(zip(index.values("global_track_id", sampler.plan(s, e).anchor_rows),
                          index.values("t", sampler.plan(s, e).anchor_rows))) for s in range(2)] for e in (0, 1, 5, 9)}
    got0 = [tuple(_anchor_keys(b)) for b in dali]
    assert got0[:2] == want[0]
    dali.set_epoch(5)  # DALI already prefetched nothing of epoch 1: the feed is positioned lazily
    it = iter(dali)
    assert [tuple(_anchor_keys(next(it))) for _ in range(2)] == want[5]
    it.close()  # abandon epoch 5 after two steps, with DALI's prefetch in flight
    dali.set_epoch(9)
    assert [tuple(_anchor_keys(b)) for _, b in zip(range(2), dali)] == want[9]
    dali.set_epoch(9)  # the epoch already loaded: a no-op that keeps the position
    assert dali.step == 2


def test_loader_never_forks(index):
    forks = []
    os.register_at_fork(before=lambda: forks.append(1))
    for _ in zip(range(3), loader(index)):
        pass
    assert forks == []


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="no CUDA device visible to DALI")
def test_gpu_batch_contract_and_parity(index):
    dali = loader(index, device="gpu", final_patch=(24, 24), z_reduction="max")
    cpu = loader(index, final_patch=(24, 24), z_reduction="max")
    for (g, c), _ in zip(zip(dali, cpu), range(3)):
        assert g["anchor"].device == torch.device("cuda", 0) and g["anchor"].dtype == torch.float32
        np.testing.assert_allclose(g["anchor"].cpu().numpy(), c["anchor"].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g["positive"].cpu().numpy(), c["positive"].numpy(), rtol=1e-5, atol=1e-5)


def test_parallel_spawned_source_gives_the_same_batches(index):
    inproc = loader(index, seed=2)
    want = {e: [_anchor_keys(b) for b in inproc] for e in (0, 1)}
    inproc.set_epoch(4)
    want[4] = [_anchor_keys(b) for b in inproc]
    parallel = loader(index, seed=2, workers=2)
    assert [_anchor_keys(b) for b in parallel] == want[0]
    assert [_anchor_keys(b) for b in parallel] == want[1]  # the next epoch reuses the workers
    parallel.set_epoch(4)  # not the next epoch: the workers restart at the new position
    first = next(iter(parallel))
    assert _anchor_keys(first) == want[4][0]
    state = parallel.state_dict()
    resumed = loader(index, seed=2, workers=2)
    resumed.load_state_dict(state)
    assert [_anchor_keys(b) for b in resumed] == want[4][1:]


def test_without_augmentations_only_the_centre_crop_is_read(index):
    from sampler.augment import AugmentConfig, Flip

    plain = loader(index, final_patch=(24, 20), z_reduction="max")
    assert plain.reader.crop_yx == (24, 20) and plain.spec.final_patch is None
    assert plain.spec.read_shape == (index.read_shape[0], 24, 20)
    cached = loader(index, final_patch=(24, 20), z_reduction="max", cache_bytes=1 << 26)
    dataset = MultiExperimentTripletDataset(index)
    for step, (a, c) in enumerate(zip(plain, cached)):
        plan = plain.sampler.plan(step, 0)
        ref = dataset.__getitems__(plan)
        for role, norm in (("anchor", plan.anchor_norm), ("positive", plan.positive_norm)):
            want = numpy_reference(ref[role].numpy(), norm, final_patch=(24, 20), z_reduction="max")
            np.testing.assert_allclose(a[role].numpy(), want, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(c[role].numpy(), a[role].numpy())
        if step == 1:
            break
    # augmentations see the whole read box: nothing is cropped at read time
    sampler = TripletSampler(index, BATCH, seed=0, augment=AugmentConfig(flip=Flip(0.5)))
    augmented = TripletLoader(index, sampler, device="cpu", final_patch=(24, 20))
    assert augmented.reader.crop_yx is None and augmented.spec.read_shape == index.read_shape
