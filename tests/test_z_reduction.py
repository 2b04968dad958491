"""Channel-wise Z reduction: centre slice for label-free channels, max projection for the others,
per channel (all-channels mode) or per sample (bag of channels), against numpy on the torch path's patches."""

from __future__ import annotations

import numpy as np
import pytest

from dali_pipeline.datasets.synthetic import demo_spec, write_synthetic
from dali_pipeline.torch_dataset import MultiExperimentTripletDataset
from dali_pipeline.z_reduction import CenterSlices, channel_modes, is_label_free, modes_by_label
from sampler import ExperimentRegistry, IndexConfig, LineageIndex, TripletSampler


@pytest.fixture(scope="module")
def yaml_path(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("demo") / "demo", demo_spec())


def build(yaml_path, mode: str) -> LineageIndex:
    return LineageIndex.build(ExperimentRegistry.from_yaml(yaml_path),
                              IndexConfig(patch_yx=(32, 32), channel_mode=mode), progress=False)


def test_the_label_free_rule():
    for label in ("phase", "Phase3D", "BF", "brightfield", "Retardance", "DIC", "PhC", "pol"):
        assert is_label_free(label), label
    for label in ("reporter", "GFP", "mCherry", "nuclei", "BFP", "Spol"):
        assert not is_label_free(label), label
    assert modes_by_label(["phase", "reporter"], "channelwise") == {"phase": "center", "reporter": "max"}
    assert modes_by_label(["phase", "reporter"], {"phase": "max", "reporter": "center"}) == \
        {"phase": "max", "reporter": "center"}
    with pytest.raises(ValueError, match=r"missing \['reporter'\]; unknown labels \['gfp'\]; invalid modes"):
        modes_by_label(["phase", "reporter"], {"phase": "mean", "gfp": "max"})


def expected(patches: np.ndarray, center: np.ndarray) -> np.ndarray:
    """(B, C, Z, Y, X) -> (B, C, 1, Y, X): the centre slice where `center` (B, C) is set, else the max."""
    z = patches.shape[2]
    return np.where(center[:, :, None, None, None], patches[:, :, z // 2:z // 2 + 1], patches.max(axis=2, keepdims=True))


@pytest.mark.parametrize("mode", ["all", "bag"])
def test_channelwise_reduction_matches_numpy(yaml_path, mode):
    pytest.importorskip("nvidia.dali")
    from dali_pipeline.loader import TripletLoader

    index = build(yaml_path, mode)
    sampler = TripletSampler(index, 16, seed=5)
    loader = TripletLoader(index, sampler, device="cpu", z_reduction="channelwise", normalize=False)
    dataset = MultiExperimentTripletDataset(index)
    saw = set()
    for step, batch in enumerate(loader):
        plan = sampler.plan(step, 0)
        ref = dataset.__getitems__(plan)
        for role, rows in (("anchor", plan.anchor_rows), ("positive", plan.positive_rows)):
            if mode == "all":  # labels (phase, reporter): phase is label-free
                center = np.tile([True, False], (len(rows), 1))
            else:
                center = (index.values("marker", rows) == "phase")[:, None]
            saw.update(center.ravel().tolist())
            want = expected(ref[role].numpy().astype(np.float32), center)
            assert batch[role].shape == want.shape
            np.testing.assert_array_equal(batch[role].numpy(), want)
        if step == 2:
            break
    assert saw == {True, False}  # both reductions exercised


def test_an_explicit_mapping_and_normalization(yaml_path):
    pytest.importorskip("nvidia.dali")
    from dali_pipeline.loader import TripletLoader

    index = build(yaml_path, "all")
    sampler = TripletSampler(index, 8, seed=1)
    loader = TripletLoader(index, sampler, device="cpu", z_reduction={"phase": "max", "reporter": "center"})
    batch = next(iter(loader))
    plan = sampler.plan(0, 0)
    raw = MultiExperimentTripletDataset(index).__getitems__(plan)["anchor"].numpy().astype(np.float32)
    reduced = expected(raw, np.tile([False, True], (len(plan), 1)))
    norm = plan.anchor_norm
    want = (reduced - norm[..., 0][..., None, None, None]) / (norm[..., 1][..., None, None, None] + np.float32(1e-8))
    np.testing.assert_allclose(batch["anchor"].numpy(), want, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="missing"):
        TripletLoader(index, TripletSampler(index, 8), device="cpu", z_reduction={"phase": "max"})


def test_center_slices_are_o_batch_lookups(yaml_path):
    index = build(yaml_path, "bag")
    picks = CenterSlices.build(index, "channelwise")
    rows = np.arange(0, len(index.tracks), 7)
    got = picks(rows)
    assert got.shape == (len(rows),) and got.dtype == np.int32
    np.testing.assert_array_equal(got, (index.values("marker", rows) == "phase").astype(np.int32))
    assert channel_modes(build(yaml_path, "all"), "channelwise") == ("center", "max")
    with pytest.raises(ValueError, match="bag-of-channels"):
        CenterSlices.build(build(yaml_path, "all"), "channelwise")


@pytest.mark.parametrize("modes", [None, ("center", "max", "center"), ("max", "max", "center")],
                         ids=["bag-picks", "center-max-center", "max-max-center"])
def test_nan_in_the_unused_reduction_never_leaks(modes):
    """Each output value comes from exactly one reduction: a NaN that only the max projection sees
    stays out of centre-slice outputs, and a NaN in the centre slice stays out of max outputs
    beyond what the max graph itself gives (a blend `max * (1 - m) + centre * m` leaked both)."""
    pytest.importorskip("nvidia.dali")
    from dali_pipeline.feed import source_names
    from dali_pipeline.pipeline import GraphSpec, build_pipeline

    rng = np.random.default_rng(0)
    b, c, z = 4, 1 if modes is None else len(modes), 5
    x = rng.random((b, c, z, 6, 7), dtype=np.float32)
    x[:, :, 0, 2, 3] = np.nan  # off centre: only a max projection sees it
    x[:, :, z // 2, 4, 5] = np.nan  # in the centre slice
    picks = np.array([1, 0, 1, 0], np.int32)
    center = (np.repeat(picks[:, None], c, 1) if modes is None
              else np.tile([m == "center" for m in modes], (b, 1)))[:, :, None, None, None].astype(bool)
    ones = np.ones((b, c, 1, 1, 1), np.float32)
    arrays = {"anchor": x, "anchor_sub": 0 * ones, "anchor_div": ones, "anchor_zcenter": picks,
              "ids": np.arange(b, dtype=np.int64)[:, None]}

    def run(z_reduction, channelwise_modes, picked):
        names = source_names(fit=False, params=(), center=picked)
        spec = GraphSpec(fit=False, device="cpu", storage_dtype=np.float32, read_shape=(z, 6, 7),
                         z_reduction=z_reduction, channel_modes=channelwise_modes)
        pipe = build_pipeline(lambda info: tuple(arrays[n] for n in names), names, spec, batch_size=b,
                              device_id=None)
        pipe.build()
        return np.stack([np.asarray(t) for t in pipe.run()[0]])

    got = run("channelwise", modes, modes is None)
    want = np.where(center, x[:, :, z // 2 : z // 2 + 1], run("max", None, False))
    assert center.any() and (~center).any()
    np.testing.assert_array_equal(got, want)  # NaN where (and only where) the chosen reduction has one
