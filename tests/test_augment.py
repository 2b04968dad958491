"""Augmentations in the DALI graph (CPU) against numpy/scipy with their randomness forced."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dali_pipeline.augment_graph import param_arrays, used_params
from dali_pipeline.feed import source_names
from dali_pipeline.pipeline import GraphSpec, build_pipeline
from sampler.augment import (Affine, AugmentConfig, ChannelDropout, Flip, Gamma, IntensityScale, Noise, Smooth,
                             affine_matrices, draw_augment)

gaussian_filter = pytest.importorskip("scipy.ndimage").gaussian_filter  # not on the GPU test machine

SHAPE = (5, 24, 20)  # (Z, Y, X)


def run_graph(x: np.ndarray, config: AugmentConfig, params: dict[str, np.ndarray] | None = None, seed: int = 0):
    """The anchors of one predict step through the real DALI CPU graph (no normalization)."""
    n, c = x.shape[:2]
    params = params or draw_augment(config, n, c, SHAPE, np.random.default_rng(seed))
    ones = np.ones((n, c, 1, 1, 1), np.float32)
    names = used_params(config)
    outputs = (x, 0 * ones, ones, *param_arrays(params, names), np.arange(n, dtype=np.int64)[:, None])
    spec = GraphSpec(fit=False, device="cpu", storage_dtype=np.dtype(np.float32), read_shape=SHAPE,
                     normalize=False, augment=config)
    pipe = build_pipeline(lambda info: outputs, source_names(False, names), spec, batch_size=n, device_id=None,
                          seed=seed)
    anchor = pipe.run()[0]
    return np.stack([np.asarray(anchor[i]) for i in range(n)]), params


def volume(n=3, c=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, c, *SHAPE)).astype(np.float32)


def test_disabled_transforms_are_the_identity():
    x = volume()
    got, _ = run_graph(x, AugmentConfig())
    np.testing.assert_array_equal(got, x)


def test_flips_exact():
    x = volume()
    got, p = run_graph(x, AugmentConfig(flip=Flip(1.0)))
    assert (p["flip_x"] == 1).all() and (p["flip_y"] == 1).all()
    np.testing.assert_array_equal(got, x[..., ::-1, ::-1])
    params = draw_augment(AugmentConfig(flip=Flip(0.5)), 3, 2, SHAPE, np.random.default_rng(4))
    params["flip_y"][:] = [1, 0, 0]
    params["flip_x"][:] = [0, 1, 0]
    got, _ = run_graph(x, AugmentConfig(flip=Flip(0.5)), params)
    np.testing.assert_array_equal(got[0], x[0, :, :, ::-1])
    np.testing.assert_array_equal(got[1], x[1, ..., ::-1])
    np.testing.assert_array_equal(got[2], x[2])


def test_affine_moves_a_point_where_the_matrix_says():
    x = np.zeros((1, 1, *SHAPE), np.float32)
    x[0, 0, 2, 6, 5] = 1.0  # (z, y, x)
    config = AugmentConfig(affine=Affine(prob=1.0, rotate_z=(math.pi / 2, math.pi / 2), scale=((1, 1),) * 3,
                                         translate=(0, 0, 0)))
    got, params = run_graph(x, config)
    # forward map of the centre (x, y) of voxel (5, 6): c + R (p - c), R a 90 degree rotation
    c = np.array([SHAPE[2] / 2, SHAPE[1] / 2])
    p = np.array([5.5, 6.5])
    q = c + np.array([[0, -1], [1, 0]]) @ (p - c) - 0.5
    assert np.unravel_index(got[0, 0].argmax(), SHAPE) == (2, int(round(q[1])), int(round(q[0])))
    assert got.max() == pytest.approx(1.0, abs=1e-5)
    # a pure translation by (1, 2, 3) voxels moves it by exactly that
    shift = affine_matrices(np.zeros(1), np.ones((1, 3)), np.zeros((1, 2)), np.array([[1.0, 2.0, 3.0]]), SHAPE)
    got, _ = run_graph(x, config, {**params, "affine": shift})
    assert np.unravel_index(got[0, 0].argmax(), SHAPE) == (3, 8, 8) and got.max() == pytest.approx(1.0)


def test_gamma_on_negative_values_is_finite_and_as_expected():
    x = volume()  # normal values: negatives included
    got, p = run_graph(x, AugmentConfig(gamma=Gamma(1.0, (2.0, 2.0))))
    lo = x.min(axis=(1, 2, 3, 4), keepdims=True)
    span = x.max(axis=(1, 2, 3, 4), keepdims=True) - lo
    want = ((x - lo) / (span + 1e-7)) ** 2.0 * span + lo
    assert np.isfinite(got).all() and (p["gamma"] == 2.0).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_intensity_scaling():
    x = volume()
    got, p = run_graph(x, AugmentConfig(intensity=IntensityScale(1.0, 0.5)))
    assert ((p["scale"] >= 0.5) & (p["scale"] <= 1.5)).all() and len(set(p["scale"])) == 3
    np.testing.assert_allclose(got, x * p["scale"][:, None, None, None, None], rtol=1e-6)


def test_smoothing_matches_scipy():
    x = volume()
    got, p = run_graph(x, AugmentConfig(smooth=Smooth(1.0, (0.6, 0.9), (0.0, 0.0))))
    for i in range(len(x)):
        sigma = (0.0, float(p["sigma"][i, 1]), float(p["sigma"][i, 2]))
        want = np.stack([gaussian_filter(x[i, c].astype(np.float64), sigma, mode="mirror") for c in range(2)])
        np.testing.assert_allclose(got[i], want, atol=2e-3)


def test_noise_fields_are_independent_across_samples():
    x = np.zeros((4, 1, *SHAPE), np.float32)  # identical samples
    got, p = run_graph(x, AugmentConfig(noise=Noise(1.0, 1.0)))
    fields = got.reshape(4, -1)
    np.testing.assert_allclose(fields.std(axis=1), p["noise_std"], rtol=0.1)
    corr = np.corrcoef(fields)
    assert np.abs(corr[np.triu_indices(4, 1)]).max() < 0.1


def test_random_crop_placement():
    x = volume()
    config = AugmentConfig(crop=(3, 16, 12))
    got, p = run_graph(x, config)
    assert got.shape == (3, 2, 3, 16, 12)
    for i, (z0, y0, x0) in enumerate(p["crop_start"]):
        np.testing.assert_array_equal(got[i], x[i, :, z0:z0 + 3, y0:y0 + 16, x0:x0 + 12])
    starts = draw_augment(config, 2000, 2, SHAPE, np.random.default_rng(1))["crop_start"]
    assert starts.min(axis=0).tolist() == [0, 0, 0] and starts.max(axis=0).tolist() == [2, 8, 8]


def test_channel_dropout_rate_and_zeroing():
    keep = draw_augment(AugmentConfig(channel_dropout=ChannelDropout(0.3)), 4000, 2, SHAPE,
                        np.random.default_rng(2))["keep"]
    assert abs(1 - keep.mean() - 0.3) < 0.02
    x = volume(n=8)
    got, p = run_graph(x, AugmentConfig(channel_dropout=ChannelDropout(0.5)), seed=3)
    np.testing.assert_array_equal(got, x * p["keep"][:, :, None, None, None])
    assert 0 < p["keep"].sum() < p["keep"].size


def test_presets_and_yaml_form():
    assert AugmentConfig.preset("2d").crop == (10, 192, 192)
    assert AugmentConfig.preset("3d").smooth.sigma_z == (0.0, 0.2)
    cfg = AugmentConfig.from_dict({"flip": {"prob": 0.5}, "noise": {"prob": 0.5, "std": 0.1}, "crop": [3, 16, 16]})
    assert cfg.flip.prob == 0.5 and cfg.crop == (3, 16, 16) and cfg.affine.prob == 0.0
    with pytest.raises(ValueError, match=r"unknown augmentation\(s\) \['blur'\]"):
        AugmentConfig.from_dict({"blur": {}})
    with pytest.raises(ValueError, match="flip.prob must lie in"):
        AugmentConfig.from_dict({"flip": {"prob": 2}})
    with pytest.raises(ValueError, match="augmentation 'noise'"):
        AugmentConfig.from_dict({"noise": {"sigma": 1}})


# ---------------------------------------------------------------------- through the loader
@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from dali_pipeline.datasets.synthetic import demo_spec, write_synthetic
    from sampler import ExperimentRegistry, IndexConfig, LineageIndex

    yaml_path = write_synthetic(tmp_path_factory.mktemp("demo") / "demo", demo_spec())
    return LineageIndex.build(ExperimentRegistry.from_yaml(yaml_path), IndexConfig(patch_yx=(32, 32)), progress=False)


STRONG = AugmentConfig(affine=Affine(0.8, scale=((0.9, 1.1),) * 3, shear=0.05), flip=Flip(0.5), gamma=Gamma(0.5),
                       intensity=IntensityScale(0.5), smooth=Smooth(0.5), crop=(4, 28, 28))


def augmented_loader(index, seed=0, rank=0, world_size=1, config=STRONG, batch=8):
    from dali_pipeline.loader import TripletLoader
    from sampler import TripletSampler

    sampler = TripletSampler(index, batch, seed=seed, rank=rank, world_size=world_size, augment=config)
    return TripletLoader(index, sampler, device="cpu", final_patch=(24, 24), z_reduction="max")


def test_same_key_same_batch_including_after_a_resume(index):
    full = [b["anchor"].numpy().copy() for _, b in zip(range(6), augmented_loader(index))]
    again = [b["anchor"].numpy().copy() for _, b in zip(range(6), augmented_loader(index))]
    for a, b in zip(full, again):
        np.testing.assert_array_equal(a, b)
    first = augmented_loader(index)
    for _ in zip(range(3), first):  # range first: zip must not pull a fourth batch
        pass
    assert first.step == 3
    resumed = augmented_loader(index)
    resumed.load_state_dict(first.state_dict())
    for want, (_, got) in zip(full[3:], zip(range(3), resumed)):
        np.testing.assert_array_equal(got["anchor"].numpy(), want)
    assert full[0].shape == (8, 2, 1, 24, 24)


def test_anchor_positive_and_ranks_get_different_parameters(index):
    from sampler import TripletSampler

    plan = TripletSampler(index, 8, seed=0, augment=STRONG).plan(0, 0)
    assert not np.array_equal(plan.anchor_aug["affine"], plan.positive_aug["affine"])
    assert not np.array_equal(plan.anchor_aug["crop_start"], plan.positive_aug["crop_start"])
    rank0 = TripletSampler(index, 8, seed=0, rank=0, world_size=2, augment=STRONG).plan(0, 0)
    rank1 = TripletSampler(index, 8, seed=0, rank=1, world_size=2, augment=STRONG).plan(0, 0)
    assert not np.array_equal(rank0.anchor_aug["affine"], rank1.anchor_aug["affine"])
    # augmentation draws come after the positives: the same positives with or without them
    plain = TripletSampler(index, 8, seed=0).plan(0, 0)
    np.testing.assert_array_equal(plain.positive_rows, plan.positive_rows)


NOISY = AugmentConfig(flip=Flip(0.5), noise=Noise(1.0, 0.5), crop=(4, 28, 28))


def test_noise_fields_are_restored_by_a_resume_mid_epoch_and_at_an_epoch_end(index):
    def anchors(loader, n):
        return [b["anchor"].numpy().copy() for _, b in zip(range(n), loader)]

    full = augmented_loader(index, config=NOISY, batch=32)
    steps = len(full)
    epoch0 = anchors(full, steps)
    epoch1 = anchors(full, 2)
    assert not np.array_equal(epoch0[0], anchors(augmented_loader(index, config=NOISY, batch=32, seed=1), 1)[0])
    # mid-epoch: the noise stream continues where it was
    first = augmented_loader(index, config=NOISY, batch=32)
    anchors(first, 3)
    resumed = augmented_loader(index, config=NOISY, batch=32)
    resumed.load_state_dict(first.state_dict())
    for want, got in zip(epoch0[3:5], anchors(resumed, 2)):
        np.testing.assert_array_equal(got, want)
    # at the end of an epoch: the next epoch's fields are those of the uninterrupted run
    first = augmented_loader(index, config=NOISY, batch=32)
    anchors(first, steps)
    state = first.state_dict()
    assert state["step"] == steps and "dali" in state
    resumed = augmented_loader(index, config=NOISY, batch=32)
    resumed.load_state_dict(state)
    for want, got in zip(epoch1, anchors(resumed, 2)):
        np.testing.assert_array_equal(got, want)


def test_another_ranks_noise_checkpoint_is_refused(index):
    state = None
    first = augmented_loader(index, config=NOISY, batch=8, rank=0, world_size=2)
    for _ in zip(range(2), first):
        pass
    state = first.state_dict()
    assert state["dali"]["rank"] == 0
    other = augmented_loader(index, config=NOISY, batch=8, rank=1, world_size=2)
    with pytest.warns(UserWarning, match="noise stream of rank 0 of 2, this loader is rank 1 of 2"):
        other.load_state_dict(state)
    assert other.step == 2 and "dali" not in other.state_dict()
