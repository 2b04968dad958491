"""MultiExperimentTripletDataset on the synthetic demo: which cell a patch shows is read from its pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from dali_pipeline.datasets.synthetic import decode, decode_channel, demo_spec, write_synthetic
from dali_pipeline.torch_dataset import MultiExperimentTripletDataset, identity_collate
from sampler import ExperimentRegistry, IndexConfig, LineageIndex, make_plan


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> LineageIndex:
    yaml_path = write_synthetic(tmp_path_factory.mktemp("demo") / "demo", demo_spec())
    registry = ExperimentRegistry.from_yaml(yaml_path, z_window=2)
    return LineageIndex.build(registry, IndexConfig(patch_yx=(32, 32)), progress=False)


def cell_pixels(index: LineageIndex, rows: np.ndarray, boxes, patches: torch.Tensor) -> np.ndarray:
    """Pixel values at each row's cell position inside its patch: (B, C, Z)."""
    py = np.floor(index.tracks.y.to_numpy()[rows]).astype(int) - boxes.y
    px = np.floor(index.tracks.x.to_numpy()[rows]).astype(int) - boxes.x
    data = patches.numpy()
    return data[np.arange(len(rows)), :, :, py, px]


def csv_lineage(index: LineageIndex) -> dict[tuple[str, str, int], int]:
    """Root track of every (experiment, fov, track), from the tracks CSVs alone."""
    roots = {}
    for _, fov in index.fovs.iterrows():
        exp = index.experiments.iloc[fov.exp]
        df = pd.read_csv(Path(exp.tracks_path) / fov.fov_name / "tracks.csv")
        parent = df.groupby("track_id").parent_track_id.first().to_dict()
        for tid in parent:
            root = tid
            while parent.get(root, -1) >= 0:
                root = parent[root]
            roots[(fov.experiment, fov.fov_name, tid)] = root
    return roots


def test_getitems_returns_anchor_positive_keys(index):
    batch = MultiExperimentTripletDataset(index).__getitems__(index.valid[:2].tolist())
    assert set(batch) == {"anchor", "positive", "anchor_norm_meta", "positive_norm_meta", "anchor_meta", "positive_meta"}
    for key in ("anchor", "positive"):
        assert batch[key].shape == (2, 2, 2, 32, 32) and batch[key].dtype == torch.uint16
    assert len(batch["anchor_meta"]) == 2
    assert set(batch["anchor_meta"][0]) >= {"experiment", "perturbation", "fov_name", "track_id", "global_track_id",
                                            "lineage_id", "t", "hours_post_perturbation"}
    with pytest.raises(TypeError, match="__getitems__"):
        MultiExperimentTripletDataset(index)[0]


def test_getitems_returns_norm_meta(index):
    plan = make_plan(index, index.valid[::40], np.random.default_rng(0))
    batch = MultiExperimentTripletDataset(index).__getitems__(plan)
    for i, (row, meta) in enumerate(zip(plan.anchor_rows, batch["anchor_norm_meta"])):
        fov = index.fovs.iloc[index.column("fov")[row]]
        attrs = json.loads((Path(fov.url[len("file://"):]).parent / ("zarr.json" if fov.zarr_format == 3 else ".zattrs")).read_text())
        attrs = attrs.get("attributes", attrs)
        t = str(int(index.tracks.t.iloc[row]))
        assert list(meta) == index.labels
        for c, label in enumerate(index.labels):
            zarr_name = _zarr_name(index, fov, c)
            want = attrs["normalization"][zarr_name]["timepoint_statistics"][t]
            got = meta[label]["timepoint_statistics"]
            assert got["mean"].item() == pytest.approx(want["mean"], rel=1e-6)
            assert got["std"].item() == pytest.approx(want["std"], rel=1e-6)


def _zarr_name(index: LineageIndex, fov, c: int) -> str:
    channel_index = int(index.exp_channels[fov.exp, c])
    registry_doc = json.loads((Path(fov.url[len("file://"):]).parent / ("zarr.json" if fov.zarr_format == 3 else ".zattrs")).read_text())
    attrs = registry_doc.get("attributes", registry_doc)
    omero = (attrs.get("ome", attrs))["omero"]
    return omero["channels"][channel_index]["label"]


def test_positive_same_lineage(index):
    plan = make_plan(index, index.valid, np.random.default_rng(1))
    batch = MultiExperimentTripletDataset(index).__getitems__(plan)
    a_tid, a_t = decode(cell_pixels(index, plan.anchor_rows, plan.anchor_boxes, batch["anchor"])[:, 0, 0])
    p_tid, p_t = decode(cell_pixels(index, plan.positive_rows, plan.positive_boxes, batch["positive"])[:, 0, 0])
    assert (a_tid == index.tracks.track_id.to_numpy()[plan.anchor_rows]).all()
    assert (p_t - a_t == plan.tau).all() and (plan.tau > 0).all()
    roots = csv_lineage(index)
    exp = index.tracks.experiment.astype(str).to_numpy()
    fov = index.tracks.fov_name.astype(str).to_numpy()
    a, p = plan.anchor_rows, plan.positive_rows
    assert all(roots[(exp[i], fov[i], ta)] == roots[(exp[j], fov[j], tp)] for i, j, ta, tp in zip(a, p, a_tid, p_tid))
    assert (exp[a] == exp[p]).all() and (fov[a] == fov[p]).all()


def test_positive_through_division(index):
    ancestry = index.with_policy("ancestry")  # no aunts or cousins: only the mother's descendants
    tr = index.tracks
    key = (tr.experiment.astype(str) + "/" + tr.fov_name.astype(str)).to_numpy()
    tid, t, parent = tr.track_id.to_numpy(), tr.t.to_numpy(), tr.parent_track_id.to_numpy()
    kids_of: dict[tuple[str, int], set[int]] = {}
    for k, d, p in zip(key, tid, parent):
        if p >= 0:
            kids_of.setdefault((k, int(p)), set()).add(int(d))
    for (k, mother), kids in kids_of.items():
        rows = np.flatnonzero((key == k) & (tid == mother))
        if len(kids) == 2 and len(rows) and rows[np.argmax(t[rows])] in ancestry.valid:
            last = rows[np.argmax(t[rows])]
            break
    else:
        pytest.fail("the demo has no dividing mother whose last frame is a valid anchor")
    plan = make_plan(ancestry, np.full(200, last), np.random.default_rng(2))
    batch = MultiExperimentTripletDataset(ancestry).__getitems__(plan)
    p_tid, _ = decode(cell_pixels(ancestry, plan.positive_rows, plan.positive_boxes, batch["positive"])[:, 0, 0])
    descendants, frontier = set(), set(kids)
    while frontier:
        descendants |= frontier
        frontier = set().union(*(kids_of.get((k, d), set()) for d in frontier)) - descendants
    assert set(p_tid) <= descendants and set(p_tid) & kids
    metas = batch["positive_meta"]
    assert all(m["lineage_id"] == batch["anchor_meta"][0]["lineage_id"] for m in metas)
    assert all(m["global_track_id"] != batch["anchor_meta"][0]["global_track_id"] for m in metas)


def test_channel_remapping(index):
    # the demo's experiments store their channels in different orders
    assert index.exp_channels[0].tolist() != index.exp_channels[1].tolist()
    plan = make_plan(index, index.valid, np.random.default_rng(3))
    batch = MultiExperimentTripletDataset(index).__getitems__(plan)
    values = cell_pixels(index, plan.anchor_rows, plan.anchor_boxes, batch["anchor"])  # (B, C, Z)
    channel = decode_channel(values)
    assert (channel == np.arange(len(index.labels))[None, :, None]).all()
    assert len(set(index.tracks.experiment.to_numpy()[plan.anchor_rows])) == 2


def test_predict_mode_returns_index(index):
    dataset = MultiExperimentTripletDataset(index, fit=False)
    assert len(dataset) == len(index)
    rows = np.arange(0, len(index), 7)
    batch = dataset.__getitems__(rows.tolist())
    assert set(batch) == {"anchor", "anchor_norm_meta", "index"}
    assert set(batch["index"][0]) >= {"fov_name", "well", "track_id", "t", "id", "parent_track_id", "parent_id",
                                      "z", "y", "x", "experiment", "lineage_id"}
    plan = make_plan(index, rows, None, predict=True)
    tid, t = decode(cell_pixels(index, rows, plan.anchor_boxes, batch["anchor"])[:, 0, 0])
    assert tid.tolist() == [d["track_id"] for d in batch["index"]]
    assert t.tolist() == [d["t"] for d in batch["index"]]


def test_spawn_worker_dataloader_epoch(index):
    dataset = MultiExperimentTripletDataset(index)
    plans = [make_plan(index, index.valid[i::4], np.random.default_rng(i)) for i in range(4)]
    loader = DataLoader(dataset, batch_sampler=plans, num_workers=2, multiprocessing_context="spawn",
                        collate_fn=identity_collate)
    seen = 0
    for plan, batch in zip(plans, loader):
        tid, t = decode(cell_pixels(index, plan.anchor_rows, plan.anchor_boxes, batch["anchor"])[:, 0, 0])
        assert (tid == index.tracks.track_id.to_numpy()[plan.anchor_rows]).all()
        assert (t == index.tracks.t.to_numpy()[plan.anchor_rows]).all()
        seen += len(plan)
    assert seen == len(index.valid)
