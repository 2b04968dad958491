"""Tau and positive draws against independent references: closed-form weights and brute force."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from builders import make_experiment, tracks_table, write_collection
from sampler import ExperimentRegistry, IndexConfig, LineageIndex, draw_positives, make_plan, sample_tau

chisquare = pytest.importorskip("scipy.stats").chisquare  # not on the GPU test machine


def test_sample_tau_never_draws_zero_and_renormalises():
    # a 60 min interval with (0.5, 2) h gives frames (0, 2): the reference draws tau = 0 two times in three
    n = 20000
    taus = sample_tau(np.zeros(n, int), np.full(n, 2), 2.0, np.random.default_rng(0))
    w = np.exp(-2.0 * np.array([1, 2]) / 2)
    counts = np.array([(taus == 1).sum(), (taus == 2).sum()])
    assert counts.sum() == n
    assert chisquare(counts, n * w / w.sum()).pvalue > 1e-3


def test_sample_tau_frequencies_follow_decaying_weights():
    n = 30000
    taus = sample_tau(np.full(n, 3), np.full(n, 12), 2.0, np.random.default_rng(1))
    support = np.arange(3, 13)
    w = np.exp(-2.0 * (support - 3) / 9)
    expected = n * w / w.sum()
    counts = np.array([(taus == t).sum() for t in support])
    assert counts.sum() == n and chisquare(counts, expected).pvalue > 1e-3
    # the table in the reference spec: P(3) = .223 at a 10 min interval
    assert abs(w[0] / w.sum() - 0.223) < 1e-3


def test_sample_tau_available_mask_and_single_tau():
    n = 20000
    available = np.tile([True, False, True, False], (n, 1))  # taus 1 and 3 only
    taus = sample_tau(np.ones(n, int), np.full(n, 4), 1.0, np.random.default_rng(2), available=available)
    w = np.exp(-1.0 * np.array([0, 2]) / 3)
    counts = np.array([(taus == 1).sum(), (taus == 3).sum()])
    assert counts.sum() == n and chisquare(counts, n * w / w.sum()).pvalue > 1e-3
    assert (sample_tau(np.full(5, 2), np.full(5, 2), 2.0, np.random.default_rng(0)) == 2).all()
    with pytest.raises(ValueError, match=r"no tau to draw for rows \[0\]"):
        sample_tau(np.zeros(1, int), np.zeros(1, int), 2.0, np.random.default_rng(0))
    # decay 0 is uniform
    uniform = sample_tau(np.full(n, -2), np.full(n, 2), 0.0, np.random.default_rng(3))
    counts = np.array([(uniform == t).sum() for t in (-2, -1, 1, 2)])
    assert counts.sum() == n and chisquare(counts).pvalue > 1e-3


# ---------------------------------------------------------------------- brute force on random lineages
def random_family(seed: int, n_tracks: int = 40) -> pd.DataFrame:
    """Random lineages: divisions, single daughters, overlaps, gaps and roots, in one FOV."""
    rng = np.random.default_rng(seed)
    rows, spans = [], {}
    for tid in range(n_tracks):
        parent = -1
        if tid and rng.random() < 0.7:
            parent = int(rng.integers(0, tid))
        start = int(rng.integers(0, 4)) if parent < 0 else spans[parent][1] + int(rng.integers(-2, 2))
        start = max(start, 0)
        end = start + int(rng.integers(0, 6))
        spans[tid] = (start, end)
        for t in range(start, end + 1):
            if rng.random() < 0.85 or t in (start, end):
                rows.append((tid, t, 32.0, 32.0, parent))
    return tracks_table(pd.DataFrame(rows, columns=["track_id", "t", "y", "x", "parent_track_id"]))


def brute_candidates(df: pd.DataFrame, tau_range: tuple[int, int]):
    """{(track, t): {tau: [(track, t) candidates]}} for both policies, by walking parent links."""
    parent = df.groupby("track_id").parent_track_id.first().to_dict()

    def ancestors(tid):
        out = []
        while parent[tid] >= 0:
            tid = parent[tid]
            out.append(tid)
        return out

    root = {tid: (ancestors(tid) or [tid])[-1] for tid in parent}
    related = {a: {a, *ancestors(a)} | {b for b in parent if a in ancestors(b)} for a in parent}
    at = df.groupby("t").track_id.apply(list).to_dict()
    out = {"lineage": {}, "ancestry": {}}
    for tid, t in zip(df.track_id, df.t):
        for policy in out:
            per_tau = {}
            for tau in range(tau_range[0], tau_range[1] + 1):
                if tau == 0:
                    continue
                cands = [c for c in at.get(t + tau, []) if root[c] == root[tid]]
                if policy == "ancestry":
                    cands = [c for c in cands if c in related[tid]]
                if cands:
                    per_tau[tau] = cands
            out[policy][(tid, t)] = per_tau
    return out


@pytest.mark.parametrize("seed, hours", [(0, (0.5, 2.0)), (1, (0.5, 2.0)), (2, (-1.0, 1.5)), (3, (0.0, 1.0))])
def test_valid_anchors_and_supports_match_brute_force(tmp_path, seed, hours):
    df = random_family(seed)
    e = make_experiment(tmp_path, "x", {"A/1/0": df}, ["P"], {"p": "P"}, n_t=int(df.t.max()) + 1)
    reg = ExperimentRegistry.from_yaml(write_collection(tmp_path, [e]))
    index = LineageIndex.build(reg, IndexConfig(patch_yx=(32, 32), tau_range_hours=hours), progress=False)
    expected = brute_candidates(df, reg.tau_range_frames("x", hours))
    keys = list(zip(index.tracks.track_id, index.tracks.t))
    tid, t = index.tracks.track_id.to_numpy(), index.tracks.t.to_numpy()
    for policy in ("lineage", "ancestry"):
        policy_index = index.with_policy(policy)
        got = {keys[r] for r in policy_index.valid}
        want = {k for k, per_tau in expected[policy].items() if per_tau}
        assert got == want, policy
        plan = make_plan(policy_index, np.repeat(policy_index.valid, 30), np.random.default_rng(seed))
        for a, p, tau in zip(plan.anchor_rows, plan.positive_rows, plan.tau):
            assert t[p] - t[a] == tau
            assert tid[p] in expected[policy][keys[a]][tau]


def test_positive_distribution_matches_renormalised_weights_and_uniform_pick(tmp_path):
    # anchor 1 at t=0; lineage members at t=1: {1}; t=2: none; t=3: {2, 3} (daughters); t=4: {2}
    df = tracks_table(pd.DataFrame(
        [(1, 0, -1), (1, 1, -1), (2, 3, 1), (3, 3, 1), (2, 4, 1)], columns=["track_id", "t", "parent_track_id"]
    ).assign(y=32.0, x=32.0))
    e = make_experiment(tmp_path, "x", {"A/1/0": df}, ["P"], {"p": "P"}, n_t=5)
    index = LineageIndex.build(ExperimentRegistry.from_yaml(write_collection(tmp_path, [e])),
                               IndexConfig(patch_yx=(32, 32)), progress=False)  # 30 min: tau 1..4
    anchor = int(np.flatnonzero((index.tracks.t == 0).to_numpy())[0])
    n = 40000
    pos, tau = draw_positives(index, np.full(n, anchor), np.random.default_rng(5))
    w = {k: np.exp(-2.0 * (k - 1) / 3) for k in (1, 3, 4)}
    total = sum(w.values())
    outcomes = {(1, 1): w[1] / total, (3, 2): w[3] / total / 2, (3, 3): w[3] / total / 2, (4, 2): w[4] / total}
    got_track = index.tracks.track_id.to_numpy()[pos]
    counts = np.array([((tau == k) & (got_track == c)).sum() for k, c in outcomes])
    assert counts.sum() == n
    assert chisquare(counts, n * np.array(list(outcomes.values()))).pvalue > 1e-3


def test_plans_depend_only_on_the_generator_key(tmp_path):
    df = random_family(7)
    e = make_experiment(tmp_path, "x", {"A/1/0": df}, ["P"], {"p": "P"}, n_t=int(df.t.max()) + 1)
    index = LineageIndex.build(ExperimentRegistry.from_yaml(write_collection(tmp_path, [e])),
                               IndexConfig(patch_yx=(32, 32)), progress=False)
    rows = np.repeat(index.valid, 4)
    key = np.random.SeedSequence([11, 2, 5, 0])  # (seed, epoch, step, rank)
    a = make_plan(index, rows, np.random.default_rng(key))
    b = make_plan(index, rows, np.random.default_rng(np.random.SeedSequence([11, 2, 5, 0])))
    c = make_plan(index, rows, np.random.default_rng(np.random.SeedSequence([11, 2, 6, 0])))
    for field in ("positive_rows", "tau"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(a.positive_boxes.y, b.positive_boxes.y)
    assert (a.positive_rows != c.positive_rows).any()
    assert a.ids.shape == (len(rows), 2) and a.ids.dtype == np.int64


def test_predict_plan_covers_every_row_without_positives(tmp_path):
    df = random_family(8)
    e = make_experiment(tmp_path, "x", {"A/1/0": df}, ["P"], {"p": "P"}, n_t=int(df.t.max()) + 1)
    index = LineageIndex.build(ExperimentRegistry.from_yaml(write_collection(tmp_path, [e])),
                               IndexConfig(patch_yx=(32, 32)), progress=False)
    plan = make_plan(index, np.arange(len(index)), None, predict=True)
    assert not plan.fit and plan.positive_rows is None and plan.ids.shape == (len(index), 1)
    assert len(index) == len(df) > len(index.valid)
    with pytest.raises(ValueError, match="needs a generator"):
        make_plan(index, index.valid, None)
