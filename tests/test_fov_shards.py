"""FOV-sharded epochs: chunk-byte weights, the balanced assignment, ranks, steps, re-assignment, resume.

Expectations are independent of the code under test: chunk bytes counted by hand from the track
positions and the chunk grid; assignments checked on weights whose outcome is forced; a rank's
anchors compared with the unsharded single-process permutation restricted (with pandas) to the
FOVs it owns; step counts from per-FOV anchor counts.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from builders import make_experiment, track_rows, tracks_table, write_collection
from sampler import ExperimentRegistry, IndexConfig, LineageIndex
from sampler.epoch import TripletSampler
from sampler.shards import assign_fovs, fov_chunk_bytes

N_T = 12
WELLS = ["A/1", "A/2", "B/1", "B/2"]


def scattered(seed: int, n_tracks: int) -> pd.DataFrame:
    """Tracks at random places (so FOVs touch different chunks), 3 to 8 frames each."""
    rng = np.random.default_rng(seed)
    parts = []
    for k in range(n_tracks):
        start = int(rng.integers(0, N_T - 3))
        stop = min(N_T, start + int(rng.integers(3, 9)))
        parts.append(track_rows(k + 1, range(start, stop), y=float(rng.uniform(16, 48)), x=float(rng.uniform(16, 48))))
    return tracks_table(*parts)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    exps = []
    for e, name in enumerate(["ea", "eb"]):
        fovs = {f"{well}/0": scattered(10 * e + i, 4 + 3 * i) for i, well in enumerate(WELLS)}
        exps.append(make_experiment(root, name, fovs, ["P", "G"], {"phase": "P", "gfp": "G"}, n_t=N_T,
                                    shape=(1, 64, 64), chunks=(1, 1, 1, 32, 32), interval_minutes=30.0))
    registry = ExperimentRegistry.from_yaml(write_collection(root, exps))
    return LineageIndex.build(registry, IndexConfig(patch_yx=(32, 32)), progress=False)


def fov_of(index, rows: np.ndarray) -> np.ndarray:
    """FOV code of index rows, from the tracks table (experiment + fov_name looked up in index.fovs)."""
    key = index.tracks["experiment"].astype(str).to_numpy()[rows] + "|" + index.tracks["fov_name"].astype(str).to_numpy()[rows]
    table = {f"{e}|{n}": k for k, (e, n) in enumerate(zip(index.fovs.experiment, index.fovs.fov_name))}
    return np.array([table[k] for k in key])


def samplers(index, world: int, batch: int = 4, **kw) -> list[TripletSampler]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the left-out share is tested on its own
        return [TripletSampler(index, batch, seed=3, rank=r, world_size=world, fov_shards=True, **kw)
                for r in range(world)]


def rows_of(plans) -> np.ndarray:
    return np.concatenate([p.anchor_rows for p in plans])


# ---------------------------------------------------------------------- weights, by hand
def test_chunk_bytes_per_fov_counted_by_hand(tmp_path):
    """64x64 uint16 images, chunks 32 (y) x 24 (x): x chunks [0,24) [24,48) [48,64) (the last 16 wide)."""
    fovs = {
        # two tracks whose 32x32 boxes ([0,32) x [0,32) and [0,32) x [4,36)) touch the same 2 chunks
        "A/1/0": tracks_table(track_rows(1, range(0, 4), y=16, x=16), track_rows(2, range(0, 4), y=16, x=20)),
        "A/2/0": tracks_table(track_rows(1, range(0, 3), y=32, x=32)),  # box [16,48)^2: 2 x 2 chunks
        "B/1/0": tracks_table(track_rows(1, range(0, 4), y=16, x=48)),  # box x [32,64): chunks 1 and 2 (16 wide)
        "B/2/0": tracks_table(track_rows(1, range(0, 1), y=16, x=16)),  # one frame: no valid anchor
    }
    exp = make_experiment(tmp_path, "hand", fovs, ["P", "G"], {"phase": "P", "gfp": "G"}, n_t=4, shape=(1, 64, 64),
                          chunks=(1, 1, 1, 32, 24), interval_minutes=30.0)
    index = LineageIndex.build(ExperimentRegistry.from_yaml(write_collection(tmp_path, [exp])),
                               IndexConfig(patch_yx=(32, 32)), progress=False)
    got = dict(zip(index.fovs.fov_name, fov_chunk_bytes(index, index.valid)))
    per_tc = {  # bytes per (t, channel): chunk areas (clipped at the image edge) x 2 bytes
        "A/1/0": (32 * 24 + 32 * 24) * 2,
        "A/2/0": 4 * 32 * 24 * 2,
        "B/1/0": (32 * 24 + 32 * 16) * 2,
    }
    frames = {"A/1/0": 4, "A/2/0": 3, "B/1/0": 4}
    want = {f: per_tc[f] * frames[f] * 2 for f in per_tc}  # 2 channels
    want["B/2/0"] = 0
    assert got == want


# ---------------------------------------------------------------------- the assignment
def test_assignment_forced_outcome_and_balance_bound():
    # rounds (10, 9) then (1, 1): the first 1 goes to the 9 (fewer bytes), the second to the 10 (equal
    # bytes, fewer anchors), whatever the order inside a round: loads 11 and 10
    for seed in range(6):
        owner = assign_fovs(np.array([10, 9, 1, 1]), np.ones(4), 2, np.random.default_rng(seed))
        assert sorted(np.bincount(owner, [10, 9, 1, 1], 2).tolist()) == [10, 11]
        assert owner[0] != owner[1] and owner[2] != owner[3]
    # equal bytes: the anchor tie-break gives each rank one heavy-anchor and one light-anchor FOV
    owner = assign_fovs(np.full(4, 5), np.array([100, 90, 10, 1]), 2, np.random.default_rng(0))
    assert sorted(np.bincount(owner, [100, 90, 10, 1], 2).tolist()) == [91, 110]
    # any weights: every FOV assigned, the spread at most the heaviest FOV, same generator -> same result
    rng = np.random.default_rng(7)
    for _ in range(20):
        w = rng.integers(1, 1000, size=int(rng.integers(4, 40)))
        world = int(rng.integers(2, 5))
        owner = assign_fovs(w, np.ones(len(w)), world, np.random.default_rng(1))
        loads = np.bincount(owner, w, world)
        assert loads.sum() == w.sum() and loads.max() - loads.min() <= w.max()
        np.testing.assert_array_equal(owner, assign_fovs(w, np.ones(len(w)), world, np.random.default_rng(1)))
    # equal FOVs: a new generator gives another partition (what re-assignment relies on)
    parts = {tuple(assign_fovs(np.full(8, 3), np.ones(8), 2, np.random.default_rng(s)) == 0) for s in range(10)}
    assert len(parts) > 1 and all(sum(p) == 4 for p in parts)


# ---------------------------------------------------------------------- ranks and steps
@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_own_disjoint_fovs_and_take_equal_full_steps(index, world):
    batch = 4
    ranks = samplers(index, world, batch)
    owner = ranks[0].shards().owner
    for s in ranks[1:]:  # every rank computes the same assignment
        np.testing.assert_array_equal(s.shards().owner, owner)
    per_fov = pd.Series(fov_of(index, index.valid)).value_counts()
    anchors = np.array([per_fov[np.isin(per_fov.index, np.flatnonzero(owner == r))].sum() for r in range(world)])
    steps = anchors.min() // batch
    assert {len(s) for s in ranks} == {steps} and steps > 0
    weights = fov_chunk_bytes(index, index.valid)
    assert ranks[0].shards().chunk_bytes.tolist() == [int(weights[owner == r].sum()) for r in range(world)]
    assert np.ptp(ranks[0].shards().chunk_bytes) <= weights.max()
    seen = []
    for r, s in enumerate(ranks):
        plans = list(s)
        got = rows_of(plans)
        assert all(len(p) == batch for p in plans)
        assert set(fov_of(index, got)) <= set(np.flatnonzero(owner == r))  # anchors from its own FOVs only
        np.testing.assert_array_equal(fov_of(index, np.concatenate([p.positive_rows for p in plans])),
                                      fov_of(index, got))  # positives in the anchor's FOV
        assert len(np.unique(got)) == len(got) == steps * batch  # no repeat; the rest is left out
        seen.append(got)
    all_rows = np.concatenate(seen)
    assert len(np.unique(all_rows)) == len(all_rows) and np.isin(all_rows, index.valid).all()


def test_a_rank_takes_the_global_permutation_restricted_to_its_fovs(index):
    reference = rows_of(list(TripletSampler(index, 4, seed=3, drop_last=False)))  # unsharded, one process
    ranks = samplers(index, 3)
    owner = ranks[0].shards().owner
    for r, s in enumerate(ranks):
        mine = reference[np.isin(fov_of(index, reference), np.flatnonzero(owner == r))]
        np.testing.assert_array_equal(rows_of(list(s)), mine[:len(s) * 4])
    # one rank: sharding changes nothing
    plain = list(TripletSampler(index, 4, seed=3))
    one = list(samplers(index, 1)[0])
    np.testing.assert_array_equal(rows_of(one), rows_of(plain))
    np.testing.assert_array_equal(np.concatenate([p.positive_rows for p in one]),
                                  np.concatenate([p.positive_rows for p in plain]))


def test_left_out_anchors_change_every_epoch_and_drop_last_false_fills_the_last_step(index):
    s = samplers(index, 2)[0]
    n_mine = int(s.shards().anchors[0])
    used = [set(rows_of([s.plan(k, e) for k in range(len(s))]).tolist()) for e in range(4)]
    assert n_mine > len(s) * 4  # this rank has anchors left out ...
    assert len(set.union(*used)) > len(used[0])  # ... and they differ from epoch to epoch
    full = samplers(index, 2, drop_last=False)
    n = full[0].shards().anchors
    assert {len(t) for t in full} == {int(-(-n.min() // 4))}
    small = int(np.argmin(n))
    got = rows_of(list(full[small]))  # the rank with the fewest anchors takes all, wrapping onto its first ones
    assert len(np.unique(got)) == n[small] and len(got) == len(full[small]) * 4


def test_a_warning_when_sharding_leaves_out_more_than_a_tenth_of_the_anchors(index):
    n, outcomes = len(index.valid), set()
    for world, batch in ((2, 4), (3, 8), (3, 16), (4, 4)):
        anchors = samplers(index, world, batch)[0].shards().anchors
        extra = (n // (batch * world) - anchors.min() // batch) * batch * world  # beyond the uniform remainder
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            TripletSampler(index, batch, seed=3, rank=0, world_size=world, fov_shards=True)
        warned = any(f"leaves {extra} more of the {n} anchors" in str(w.message) for w in caught)
        assert warned == (extra > 0.1 * n)
        outcomes.add(warned)
    assert outcomes == {True, False}


def test_reshard_every_r_epochs_keeps_the_length_and_the_rank_disjointness(index):
    world = 2
    ranks = samplers(index, world, reshard_every=2)
    owners = [ranks[0].shards(e).owner for e in range(12)]
    for p in range(6):
        np.testing.assert_array_equal(owners[2 * p], owners[2 * p + 1])  # one assignment per period
    assert any((owners[2 * p] != owners[0]).any() for p in range(1, 6))  # periods re-assign
    np.testing.assert_array_equal(owners[0], samplers(index, world)[0].shards(10).owner)  # without: never
    steps = len(ranks[0])
    for e in range(0, 12, 2):
        per_rank = [rows_of([s.plan(k, e) for k in range(steps)]) for s in ranks]
        for r, got in enumerate(per_rank):
            assert set(fov_of(index, got)) <= set(np.flatnonzero(owners[e] == r))
            n_r = int(ranks[r].shards(e).anchors[r])
            assert len(np.unique(got)) == min(n_r, steps * 4)  # repeats only when the shard is short
        assert not set(per_rank[0]) & set(per_rank[1])


def test_locality_order_works_inside_a_shard(index):
    reference = rows_of(list(TripletSampler(index, 4, seed=3, drop_last=False, locality_frames=3)))
    ranks = samplers(index, 2, locality_frames=3)
    owner = ranks[0].shards().owner
    for r, s in enumerate(ranks):
        mine = reference[np.isin(fov_of(index, reference), np.flatnonzero(owner == r))]
        np.testing.assert_array_equal(rows_of(list(s)), mine[:len(s) * 4])


# ---------------------------------------------------------------------- resume
def test_resume_at_the_same_world_size_is_exact(index):
    world = 2
    for kw in ({}, {"reshard_every": 1}):
        whole = [list(s) + list(s) for s in samplers(index, world, **kw)]  # epochs 0 and 1
        steps = len(whole[0]) // 2
        for r in range(world):
            first = samplers(index, world, **kw)[r]
            first.set_epoch(1)
            it = iter(first)
            for _ in range(3):
                next(it)
            state = first.state_dict()
            again = samplers(index, world, **kw)[r]
            again.load_state_dict(state)
            rest = list(again)
            assert len(rest) == steps - 3
            for p, q in zip(rest, whole[r][steps + 3:]):
                np.testing.assert_array_equal(p.anchor_rows, q.anchor_rows)
                np.testing.assert_array_equal(p.positive_rows, q.positive_rows)


def test_resume_at_another_world_size_finishes_the_epoch_under_the_new_assignment(index):
    old = samplers(index, 2)[0]
    old.set_epoch(1)
    it = iter(old)
    for _ in range(5):
        next(it)
    state = old.state_dict()  # 5 steps x 4 anchors x 2 ranks = 40 anchors consumed
    new = samplers(index, 3)
    with pytest.warns(UserWarning, match="finishes from step 3"):
        for s in new:
            s.load_state_dict(state)
    assert all((s.epoch, s.step) == (1, 40 // 12) for s in new)
    fresh = samplers(index, 3)
    for s, f in zip(new, fresh):
        np.testing.assert_array_equal(rows_of(list(s)), rows_of([f.plan(k, 1) for k in range(3, len(f))]))
    # at an epoch boundary nothing is replayed or skipped
    done = samplers(index, 2)[0]
    list(done)
    for s in samplers(index, 3):
        s.load_state_dict(done.state_dict())
        assert (s.epoch, s.step, s.remaining()) == (0, len(s), len(s))


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(fov_shards=True, predict=True), "fov_shards applies to training only"),
    (dict(fov_shards=True, group_by="experiment"), "cannot combine with group_by"),
    (dict(fov_shards=True, stratify_by="perturbation"), "cannot combine with group_by, stratify_by"),
    (dict(reshard_every=2), "needs fov_shards=True"),
    (dict(fov_shards=True, reshard_every=0), "reshard_every must be None or an int >= 1"),
    (dict(fov_shards="yes"), "fov_shards must be True or False"),
    (dict(fov_shards=True, world_size=9), "only 8 FOV"),
    (dict(fov_shards=True, world_size=2, batch_size=140), "fewer than batch_size=140: .*lower batch_size"),
])
def test_bad_options_name_the_option_and_the_fix(index, kwargs, match):
    kwargs = {"batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        TripletSampler(index, **kwargs)


def test_states_of_sharded_and_plain_samplers_do_not_mix(index):
    plain = TripletSampler(index, 4, seed=3)
    sharded = samplers(index, 1)[0]
    with pytest.raises(ValueError, match="options"):
        sharded.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="options"):
        plain.load_state_dict(sharded.state_dict())
    with pytest.raises(ValueError, match="fov_shards=True"):
        plain.shards()
    # a state saved before the option existed loads into a plain sampler
    old = plain.state_dict()
    old["options"] = {k: v for k, v in old["options"].items() if k not in ("fov_shards", "reshard_every")}
    TripletSampler(index, 4, seed=3).load_state_dict(old)
