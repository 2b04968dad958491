"""The lineage index on real Cell Tracking Challenge tracks (../shared/data/ctc)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from dali_pipeline.datasets.ctc import ctc_tracks
from dali_pipeline.datasets.omezarr import EmptyArray, write_plate
from sampler import ExperimentRegistry, IndexConfig, LineageIndex

CTC = Path(__file__).resolve().parents[2] / "shared" / "data" / "ctc"
GT = CTC / "Fluo-N2DH-SIM+_02_GT"


@pytest.fixture(scope="module")
def ctc_index(tmp_path_factory) -> LineageIndex:
    if not (GT / "TRA" / "man_track.txt").exists():
        pytest.skip(f"CTC data not found at {CTC}: the real-track tests need ../shared/data/ctc")
    root = tmp_path_factory.mktemp("ctc")
    tracks = ctc_tracks(GT, with_centroids=True)
    write_plate(root / "ctc.zarr", {"A/1/0": EmptyArray((150, 1, 1, 773, 739))}, ["nuclei"])
    os.makedirs(root / "tracks" / "A/1/0")
    tracks.to_csv(root / "tracks" / "A/1/0" / "tracks.csv", index=False)
    (root / "c.yml").write_text(yaml.safe_dump({"experiments": [dict(
        name="sim02", data_path="ctc.zarr", tracks_path="tracks", channels={"nuclei": "nuclei"},
        perturbation_wells={"none": ["A/1"]}, interval_minutes=30)]}))
    registry = ExperimentRegistry.from_yaml(root / "c.yml")
    # a 16 px maximum shift with a 32 px patch keeps every cell inside the image
    config = IndexConfig(patch_yx=(32, 32), max_border_shift=16, norm_level=None, tau_range_hours=(0.5, 0.5))
    return LineageIndex.build(registry, config, progress=False)


def test_counts_match_the_ground_truth(ctc_index):
    s = ctc_index.summary().iloc[0]
    assert (s.tracks, s.observations, s.lineages, s.divisions, s.single_daughter) == (107, 3371, 17, 44, 2)
    assert s.dropped_outside == 0 and s.dropped_border == 0


def test_every_division_links_mother_and_daughters(ctc_index):
    tr = ctc_index.tracks
    man = np.loadtxt(GT / "TRA" / "man_track.txt", dtype=np.int64, ndmin=2)
    lineage = tr.groupby("track_id").lineage_id.first().astype(str)
    daughters: dict[int, set[int]] = {}
    for label, _, _, parent in man:
        if parent:
            daughters.setdefault(int(parent), set()).add(int(label))
            assert lineage[label] == lineage[parent]
    assert len(daughters) == 46
    track_id, t, group = (tr[c].to_numpy() for c in ("track_id", "t", "group"))
    for mother, kids in daughters.items():
        end = int(man[man[:, 0] == mother, 2][0])
        row = np.flatnonzero((track_id == mother) & (t == end))
        start, stop = ctc_index.rows_at(group[row], t[row] + 1)
        nxt = np.arange(start[0], stop[0])
        assert kids <= set(track_id[nxt])  # the lineage may hold aunts and cousins too
        assert set(track_id[nxt[ctc_index.related(np.full(len(nxt), row[0]), nxt)]]) == kids
        # a mother's last frame is a valid anchor (tau = 1 frame): its daughters follow it
        assert row[0] in ctc_index.valid


def test_ancestry_drops_anchors_whose_only_positive_is_a_sister(ctc_index):
    ancestry = ctc_index.with_policy("ancestry")
    # tau is one frame and tracks have no gaps: a row is valid under "ancestry" unless it is the
    # last frame of a childless track; under "lineage" such a row is valid when another track of
    # its lineage lives at the next frame (computed here from man_track.txt alone)
    man = np.loadtxt(GT / "TRA" / "man_track.txt", dtype=np.int64, ndmin=2)
    parent = {int(l): int(p) for l, _, _, p in man}
    def root(label):
        while parent[label]:
            label = parent[label]
        return label
    childless = [row for row in man if row[0] not in set(man[:, 3])]
    with_relative = sum(
        any(root(o[0]) == root(c[0]) and o[1] <= c[2] + 1 <= o[2] for o in man) for c in childless)
    assert with_relative > 0
    assert len(ancestry.valid) == 3371 - len(childless)
    assert len(ctc_index.valid) == 3371 - len(childless) + with_relative
    assert set(ancestry.valid) < set(ctc_index.valid)
