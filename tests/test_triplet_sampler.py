"""TripletSampler: coverage, prefix and rank properties, determinism, resume, composition, predict, errors.

Expectations are computed independently of the sampler: from `index.valid`, from `index.tracks`
with pandas, or from the documented generator key. Two tiny collections (all-channels and
bag-of-channels views of the same plates) are built once per module.
"""

from __future__ import annotations

import random
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

from builders import make_experiment, tracks_table, write_collection
from sampler import ExperimentRegistry, IndexConfig, LineageIndex, make_plan
from sampler.epoch import PlanBatchSampler, TripletSampler

chisquare = pytest.importorskip("scipy.stats").chisquare  # not on the GPU test machine

N_T = 16
WELLS = {"A/1": "mock", "A/2": "infected", "B/1": "infected", "C/1": "mock"}


def lineages(seed: int, n_roots: int) -> pd.DataFrame:
    """Roots that may divide into two daughters (which may divide again), near the image centre."""
    rng = np.random.default_rng(seed)
    rows, next_id = [], 1
    stack = [(-1, int(rng.integers(0, 5))) for _ in range(n_roots)]
    while stack:
        parent, start = stack.pop()
        tid, next_id = next_id, next_id + 1
        end = min(N_T - 1, start + int(rng.integers(2, 9)))
        rows += [(tid, t, 32.0 + rng.normal(0, 2), 32.0 + rng.normal(0, 2), parent) for t in range(start, end + 1)]
        if end < N_T - 2 and rng.random() < 0.5:
            stack += [(tid, end + 1), (tid, end + 1)]
    return tracks_table(pd.DataFrame(rows, columns=["track_id", "t", "y", "x", "parent_track_id"]))


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler")
    exps = []
    for k, (name, interval, start) in enumerate([("e30", 30.0, 2.0), ("e15", 15.0, 3.5)]):
        # C/1 holds a small FOV: a stratum smaller than its share of a step
        fovs = {f"{well}/0": lineages(10 * k + i, 2 if well == "C/1" else 12) for i, well in enumerate(WELLS)}
        perturbations = {}
        for well, pert in WELLS.items():
            perturbations.setdefault(pert, []).append(well)
        exps.append(make_experiment(root, name, fovs, ["P", "G"], {"phase": "P", "gfp": "G"}, n_t=N_T,
                                    shape=(1, 64, 64), interval_minutes=interval, perturbation_wells=perturbations,
                                    start_hpi=start))
    registry = ExperimentRegistry.from_yaml(write_collection(root, exps))
    all_channels = LineageIndex.build(registry, IndexConfig(patch_yx=(32, 32)), progress=False)
    bag = LineageIndex.build(registry, IndexConfig(patch_yx=(32, 32), channel_mode="bag"), progress=False)
    return all_channels, bag


@pytest.fixture(scope="module")
def index(indexes):
    return indexes[0]


def anchors_of(plans) -> np.ndarray:
    return np.concatenate([p.anchor_rows for p in plans]) if plans else np.empty(0, np.int64)


def global_order(index, batch, world, **kw) -> list[list[np.ndarray]]:
    """[step][rank] anchor rows of one epoch, from W independently built samplers."""
    per_rank = [list(TripletSampler(index, batch, rank=r, world_size=world, **kw)) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1, "ranks must take the same number of steps"
    return [[per_rank[r][s].anchor_rows for r in range(world)] for s in range(len(per_rank[0]))]


def col(index, name: str, rows: np.ndarray) -> np.ndarray:
    return index.tracks[name].to_numpy()[rows]


def assert_same_plans(a, b):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p.anchor_rows, q.anchor_rows)
        np.testing.assert_array_equal(p.positive_rows, q.positive_rows)
        np.testing.assert_array_equal(p.tau, q.tau)


COMPOSED = dict(group_by="experiment", leaky=0.25, stratify_by="perturbation", temporal_enrichment=True,
                temporal_window_hours=1.0)


# ---------------------------------------------------------------------- epochs without composition
def test_epoch_covers_every_valid_anchor_exactly_once(index):
    n = len(index.valid)
    assert n > 300
    plans = list(TripletSampler(index, 16, seed=1, drop_last=False))
    assert len(plans) == -(-n // 16) and len(plans[-1]) == n - 16 * (len(plans) - 1)
    np.testing.assert_array_equal(np.sort(anchors_of(plans)), np.sort(index.valid))
    for p in plans:  # positives are real positives of their anchors: same lineage, t + tau
        np.testing.assert_array_equal(col(index, "t", p.positive_rows) - col(index, "t", p.anchor_rows), p.tau)
        assert (col(index, "lineage_id", p.positive_rows) == col(index, "lineage_id", p.anchor_rows)).all()
    dropped = anchors_of(list(TripletSampler(index, 16, seed=1)))
    assert len(dropped) == n // 16 * 16 and len(np.unique(dropped)) == len(dropped)
    assert np.isin(dropped, index.valid).all()
    # another epoch is another permutation of the same anchors
    s = TripletSampler(index, 16, seed=1, drop_last=False)
    s.set_epoch(1)
    other = anchors_of(list(s))
    np.testing.assert_array_equal(np.sort(other), np.sort(index.valid))
    assert (other != anchors_of(plans)).any()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_prefix_property_for_any_world_size(index, world):
    reference = anchors_of(list(TripletSampler(index, 8, seed=5, drop_last=False)))  # one rank, whole epoch
    steps = global_order(index, 8, world, seed=5)
    consumed = np.concatenate([rows for step in steps for rows in step])
    assert len(consumed) == len(index.valid) // (8 * world) * 8 * world
    np.testing.assert_array_equal(consumed, reference[:len(consumed)])  # a prefix of the same permutation
    for step in steps:
        assert all(len(rows) == 8 for rows in step)


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_are_disjoint_and_take_equal_steps(index, drop_last):
    world, batch = 3, 16
    samplers = [TripletSampler(index, batch, seed=2, rank=r, world_size=world, drop_last=drop_last) for r in range(world)]
    assert len({len(s) for s in samplers}) == 1
    per_rank = [anchors_of(list(s)) for s in samplers]
    n = len(index.valid)
    if drop_last:
        assert len(samplers[0]) == n // (batch * world)
        joined = np.concatenate(per_rank)
        assert len(np.unique(joined)) == len(joined)
    else:
        rest = n - (n // (batch * world)) * batch * world
        per = -(-rest // world)
        assert [len(s.plan(len(s) - 1)) for s in samplers] == [per] * world  # equal short last step
        joined = np.concatenate(per_rank)
        np.testing.assert_array_equal(np.unique(joined), np.sort(index.valid))  # every anchor
        assert len(joined) - n == per * world - rest < world  # the few wrapped slots repeat epoch starts
        first = anchors_of(list(TripletSampler(index, batch * world, seed=2, drop_last=False)))[:world]
        values, counts = np.unique(joined, return_counts=True)
        assert set(values[counts > 1]) <= set(first)


def test_step_generator_is_the_documented_key(index):
    s = TripletSampler(index, 16, seed=7, rank=1, world_size=2)
    s.set_epoch(3)
    plan = s.plan(4)
    expected = make_plan(index, plan.anchor_rows, np.random.default_rng(np.random.SeedSequence([7, 3, 4, 1])))
    np.testing.assert_array_equal(plan.positive_rows, expected.positive_rows)
    np.testing.assert_array_equal(plan.tau, expected.tau)


@pytest.mark.parametrize("options", [{}, COMPOSED], ids=["plain", "composed"])
def test_identical_plans_across_instances_orders_threads_and_resume(index, options):
    world = 2
    first = [list(TripletSampler(index, 16, seed=11, rank=r, world_size=world, **options)) for r in range(world)]
    # another instance, other construction order, steps asked in a shuffled order, from 4 threads
    order = list(range(world))
    random.Random(0).shuffle(order)
    samplers = {r: TripletSampler(index, 16, seed=11, rank=r, world_size=world, **options) for r in order}
    for r in order:
        steps = list(range(len(samplers[r])))
        random.Random(r).shuffle(steps)
        with ThreadPoolExecutor(4) as pool:
            got = dict(zip(steps, pool.map(samplers[r].plan, steps)))
        assert_same_plans(first[r], [got[k] for k in range(len(steps))])
    # resume in the middle: a new instance continues with exactly the plans not yet consumed
    for r in range(world):
        s = TripletSampler(index, 16, seed=11, rank=r, world_size=world, **options)
        it = iter(s)
        head = [next(it) for _ in range(5)]
        state = s.state_dict()
        assert state["step"] == 5
        resumed = TripletSampler(index, 16, seed=11, rank=r, world_size=world, **options)
        resumed.load_state_dict(state)
        resumed.set_epoch(0)  # the epoch already loaded: a no-op, the step survives
        assert resumed.step == 5
        assert_same_plans(first[r][:5], head)
        assert_same_plans(first[r][5:], list(resumed))
    # another epoch or seed gives other plans
    other = TripletSampler(index, 16, seed=11, world_size=world, **options)
    other.set_epoch(1)
    assert (anchors_of(list(other)) != anchors_of(first[0])).any()


def test_consumption_state_epochs_and_prefetching_loaders(index):
    s = TripletSampler(index, 32, seed=0)
    n = len(s)
    it = iter(s)
    for _ in range(3):
        next(it)
    assert (s.epoch, s.step, s.remaining()) == (0, 3, n - 3)
    # a loader that ran ahead reports what its user received
    assert s.state_dict(steps_consumed=2)["step"] == 2
    s.set_epoch(0)
    assert s.step == 3
    rest = list(it)
    assert len(rest) == n - 3 and s.step == n and s.state_dict()["step"] == n
    # iterating again after a completed epoch starts the next one
    nxt = list(s)
    assert s.epoch == 1 and len(nxt) == n
    ref = TripletSampler(index, 32, seed=0)
    ref.set_epoch(1)
    assert_same_plans(list(ref), nxt)
    # a completed epoch restored: the next iteration is the next epoch
    fresh = TripletSampler(index, 32, seed=0)
    fresh.load_state_dict(ref.state_dict())
    assert fresh.epoch == 1 and fresh.step == n
    assert fresh.remaining() == n and len(list(fresh)) == n and fresh.epoch == 2
    s.set_epoch(5)
    assert (s.epoch, s.step) == (5, 0)
    # iter_from and plan(step, epoch) leave the state alone
    assert_same_plans(list(s.iter_from(n - 2, epoch=1)), nxt[-2:])
    assert (s.epoch, s.step) == (5, 0)


def test_elastic_resume_without_composition(index):
    batch = 8
    reference = anchors_of(list(TripletSampler(index, batch, seed=4, drop_last=False)))
    saved = TripletSampler(index, batch, seed=4, rank=0, world_size=2)
    it = iter(saved)
    for _ in range(3):
        next(it)
    state = saved.state_dict()  # 3 steps * 8 * 2 = 48 anchors consumed
    # 3 ranks of 8 take 24 per step: resume at step 2, the remaining anchors follow the same permutation
    resumed = [TripletSampler(index, batch, seed=4, rank=r, world_size=3) for r in range(3)]
    for s in resumed:
        s.load_state_dict(state)
        assert s.step == 2
    tail = np.concatenate([s.plan(k).anchor_rows for k in range(2, len(resumed[0])) for s in resumed])
    np.testing.assert_array_equal(tail, reference[48:48 + len(tail)])
    # 5 ranks take 40: 48 is not a multiple, the resume restarts at 40 with a warning
    five = TripletSampler(index, batch, seed=4, rank=0, world_size=5)
    with pytest.warns(UserWarning, match="8 anchors repeat"):
        five.load_state_dict(state)
    assert five.step == 1
    # composed epochs depend on the world size: a mid-epoch change is refused, an epoch boundary is fine
    comp = TripletSampler(index, batch, seed=4, world_size=2, **COMPOSED)
    comp_state = comp.state_dict(steps_consumed=3)
    with pytest.raises(ValueError, match="composed epochs depend on batch_size"):
        TripletSampler(index, batch, seed=4, world_size=3, **COMPOSED).load_state_dict(comp_state)
    boundary = TripletSampler(index, batch, seed=4, world_size=3, **COMPOSED)
    boundary.load_state_dict(comp.state_dict(steps_consumed=0, epoch=2))
    assert (boundary.epoch, boundary.step) == (2, 0)


# ---------------------------------------------------------------------- locality-aware order
def blocks_of(index, rows: np.ndarray, k: int) -> np.ndarray:
    """(fov, t // k) of rows as one string per row, from index.tracks with pandas (not the sampler's codes)."""
    df = index.tracks.iloc[rows]
    return (df["fov"].astype(str) + ":" + (df["t"] // k).astype(str)).to_numpy()


def runs(keys: np.ndarray) -> int:
    """Contiguous runs of equal keys: 1 + the block boundaries."""
    return int(len(keys) > 0) + int((keys[1:] != keys[:-1]).sum())


def test_locality_off_is_the_uniform_permutation(index):
    for seed, epoch in ((1, 0), (3, 2)):
        ref, off = TripletSampler(index, 16, seed=seed), TripletSampler(index, 16, seed=seed, locality_frames=None)
        ref.set_epoch(epoch)
        off.set_epoch(epoch)
        assert_same_plans(list(ref), list(off))
        assert off.state_dict() == ref.state_dict()
    expected = index.valid[np.random.default_rng(np.random.SeedSequence([1, 0], spawn_key=(0,))).permutation(
        len(index.valid))]  # the documented epoch key (seed, epoch, purpose PERMUTATION = 0)
    np.testing.assert_array_equal(anchors_of(list(TripletSampler(index, 16, seed=1, drop_last=False))), expected)


@pytest.mark.parametrize("k", [1, 4])
def test_locality_order_covers_every_anchor_in_contiguous_blocks(index, k):
    n, batch = len(index.valid), 16
    valid_blocks = blocks_of(index, index.valid, k)
    n_blocks = len(set(valid_blocks))
    assert 8 < n_blocks < n // 4
    epochs = []
    for epoch in range(2):
        s = TripletSampler(index, batch, seed=1, drop_last=False, locality_frames=k)
        s.set_epoch(epoch)
        order = anchors_of(list(s))
        assert len(order) == n
        np.testing.assert_array_equal(np.sort(order), np.sort(index.valid))  # each valid anchor exactly once
        again = TripletSampler(index, batch, seed=1, drop_last=False, locality_frames=k)
        again.set_epoch(epoch)
        np.testing.assert_array_equal(anchors_of(list(again)), order)  # deterministic for (seed, epoch)
        keys = blocks_of(index, order, k)
        assert runs(keys) == n_blocks  # every block is one contiguous run of the epoch
        epochs.append((order, keys))
    (order0, keys0), (order1, keys1) = epochs
    assert (order0 != order1).any()
    assert (pd.unique(keys0) != pd.unique(keys1)).any()  # another block order
    # and another order inside the blocks
    assert any((order0[keys0 == b] != order1[keys1 == b]).any() for b in set(valid_blocks) if (keys0 == b).sum() > 2)
    # batches hold few blocks, far fewer than uniform ones, and as many as their block boundaries say
    uniform = TripletSampler(index, batch, seed=1)
    local = TripletSampler(index, batch, seed=1, locality_frames=k)
    u = np.mean([len(set(blocks_of(index, uniform.anchor_rows(i), k))) for i in range(len(uniform))])
    counts = []
    for i in range(len(local)):
        keys = blocks_of(index, local.anchor_rows(i), k)
        assert len(set(keys)) == runs(keys)
        counts.append(len(set(keys)))
    assert np.mean(counts) < u / 2
    assert sum(counts) <= len(local) + n_blocks - 1  # each of the epoch's n_blocks - 1 boundaries splits a batch once


def test_locality_ranks_are_disjoint_prefix_and_resume(index):
    batch, world, k = 8, 2, 4
    reference = anchors_of(list(TripletSampler(index, batch, seed=5, drop_last=False, locality_frames=k)))
    steps = global_order(index, batch, world, seed=5, locality_frames=k)
    per_rank = [np.concatenate([step[r] for step in steps]) for r in range(world)]
    assert not np.intersect1d(per_rank[0], per_rank[1]).size  # disjoint ranks
    consumed = np.concatenate([rows for step in steps for rows in step])
    assert len(consumed) == len(index.valid) // (batch * world) * batch * world
    np.testing.assert_array_equal(consumed, reference[:len(consumed)])  # the world_size=1 prefix
    # resume mid-epoch: the same remaining plans, on every rank
    for r in range(world):
        s = TripletSampler(index, batch, seed=5, rank=r, world_size=world, locality_frames=k)
        s.set_epoch(1)
        full = list(TripletSampler(index, batch, seed=5, rank=r, world_size=world, locality_frames=k).iter_from(0, 1))
        it = iter(s)
        head = [next(it) for _ in range(7)]
        resumed = TripletSampler(index, batch, seed=5, rank=r, world_size=world, locality_frames=k)
        resumed.load_state_dict(s.state_dict())
        assert (resumed.epoch, resumed.step) == (1, 7)
        assert_same_plans(head, full[:7])
        assert_same_plans(list(resumed), full[7:])
    # elastic: 1 rank of 16 resumes after 7 steps of 2 * 8 anchors on the same order
    one = TripletSampler(index, 2 * batch, seed=5, locality_frames=k)
    one.load_state_dict(s.state_dict())
    one_ref = TripletSampler(index, 2 * batch, seed=5, drop_last=False, locality_frames=k)
    one_ref.set_epoch(1)
    np.testing.assert_array_equal(one.plan(7).anchor_rows, anchors_of(list(one_ref))[7 * 16:8 * 16])
    assert "locality_frames" in repr(one) and "locality_frames" not in repr(TripletSampler(index, 16))


def test_locality_errors_and_state_checks(index):
    for bad in (0, -1, 2.0, "4", True):
        with pytest.raises(ValueError, match=r"locality_frames must be None or an int >= 1, got"):
            TripletSampler(index, 16, locality_frames=bad)
    for composed in (dict(group_by="experiment"), dict(stratify_by="perturbation"), dict(temporal_enrichment=True)):
        with pytest.raises(ValueError, match="locality_frames applies to plain epochs only"):
            TripletSampler(index, 16, locality_frames=4, **composed)
    with pytest.raises(ValueError, match="locality_frames orders training anchors"):
        TripletSampler(index, 16, predict=True, locality_frames=4)
    # a state saved with another order (or none) does not resume here, and the reverse
    plain, local = TripletSampler(index, 16, seed=1), TripletSampler(index, 16, seed=1, locality_frames=4)
    with pytest.raises(ValueError, match="options: saved .*'locality_frames': None"):
        local.load_state_dict(plain.state_dict(steps_consumed=2))
    with pytest.raises(ValueError, match="options: saved .*'locality_frames': 4"):
        plain.load_state_dict(local.state_dict(steps_consumed=2))
    with pytest.raises(ValueError, match="options"):
        TripletSampler(index, 16, seed=1, locality_frames=2).load_state_dict(local.state_dict(steps_consumed=2))
    # a state saved before the option existed (no key) resumes a sampler without it, not one with it
    old = plain.state_dict(steps_consumed=2)
    old["options"] = {k: v for k, v in old["options"].items() if k != "locality_frames"}
    TripletSampler(index, 16, seed=1).load_state_dict(old)
    with pytest.raises(ValueError, match="options"):
        local.load_state_dict(old)


# ---------------------------------------------------------------------- composition
def test_group_and_leaky_proportions_exact_per_step(index):
    world, batch = 2, 16
    samplers = [TripletSampler(index, batch, seed=3, rank=r, world_size=world, group_by="experiment", leaky=0.25)
                for r in range(world)]
    assert len(samplers[0]) == len(index.valid) // (batch * world)
    for step in range(len(samplers[0])):
        infos = [s.step_info(step) for s in samplers]
        assert len({i["group"] for i in infos}) == 1  # one group for all ranks
        for s, info in zip(samplers, infos):
            exp = col(index, "experiment", s.plan(step).anchor_rows)
            assert (exp == info["group"]).sum() == batch - int(batch * 0.25) and (exp != info["group"]).sum() == 4
    weighted = TripletSampler(index, batch, seed=3, group_by="experiment", group_weights={"e15": 1.0}, leaky=0.25)
    for step in range(len(weighted)):  # e30 weighs 0: never the group, but still leaks in
        assert weighted.step_info(step)["group"] == "e15"
        assert (col(index, "experiment", weighted.plan(step).anchor_rows) == "e30").sum() == 4


def test_group_frequencies_follow_weights(index):
    s = TripletSampler(index, 8, seed=0, group_by="experiment", group_weights={"e30": 3.0, "e15": 1.0})
    groups = []
    for epoch in range(12):
        s.set_epoch(epoch)
        groups += [s.step_info(k)["group"] for k in range(len(s))]
    counts = np.array([groups.count("e30"), groups.count("e15")])
    assert chisquare(counts, len(groups) * np.array([0.75, 0.25])).pvalue > 1e-3
    default = TripletSampler(index, 8, seed=0, group_by="experiment")  # by size
    size = pd.Series(col(index, "experiment", index.valid)).value_counts()
    assert default._composition.group_prob.tolist() == pytest.approx(
        [size[g] / size.sum() for g in default._composition.group_names])


def test_stratified_steps_are_equal_shares_shuffled_without_repeats(index):
    world, batch = 2, 18
    strata = ["perturbation", "experiment"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samplers = [TripletSampler(index, batch, seed=8, rank=r, world_size=world, stratify_by=strata)
                    for r in range(world)]
    key = pd.Series(col(index, "perturbation", index.valid)).astype(str) + "|" + \
        pd.Series(col(index, "experiment", index.valid)).astype(str)
    sizes = key.value_counts()
    assert len(sizes) == 4
    row_key = pd.Series(index.tracks.perturbation.astype(str) + "|" + index.tracks.experiment.astype(str)).to_numpy()
    drawn = {k: [] for k in sizes.index}
    mixed = False
    for step in range(len(samplers[0])):
        for s in samplers:
            plan = s.plan(step)
            np.testing.assert_array_equal(plan.anchor_rows, s.anchor_rows(step))
            keys = row_key[plan.anchor_rows]
            counts = pd.Series(keys).value_counts()
            assert sorted(counts.tolist()) == [4, 4, 5, 5]  # 18 over 4 strata: floor or ceil each
            codes = pd.Categorical(keys, categories=sorted(sizes.index)).codes
            mixed |= bool((np.diff(codes) < 0).any())
            for k in sizes.index:
                drawn[k].append(plan.anchor_rows[keys == k])
    assert mixed, "strata must be shuffled inside the step, not in blocks"
    for k, parts in drawn.items():
        rows = np.concatenate(parts)
        # no repeat while the stratum lasts (every (step, rank) batch before the stratum runs out) ...
        lasts = np.cumsum([len(p) for p in parts]) <= sizes[k]
        first = np.concatenate([p for p, ok in zip(parts, lasts) if ok])
        assert len(np.unique(first)) == len(first)
        assert len(first) > sizes[k] - 2 * 5 if len(rows) >= sizes[k] else len(first) == len(rows)
        # ... and afterwards each pass is a fresh permutation of the stratum: counts differ by one at most
        _, counts = np.unique(rows, return_counts=True)
        if len(rows) >= sizes[k]:
            assert counts.max() - counts.min() <= 1 and len(counts) == sizes[k]


def test_small_stratum_warns_and_cycles_evenly(index):
    # 8 strata share 128 anchors: 16 each per step, more than the 13 valid anchors of e15 in well C/1
    with pytest.warns(UserWarning, match="smaller than their share.*e15\\|C/1"):
        s = TripletSampler(index, 128, seed=1, stratify_by=["experiment", "well"])
    small = index.valid[(col(index, "well", index.valid) == "C/1") & (col(index, "experiment", index.valid) == "e15")]
    assert len(small) == 13
    rows = anchors_of(list(s))
    mine = rows[np.isin(rows, small)]
    assert len(mine) == 16 * len(s)
    _, counts = np.unique(mine, return_counts=True)
    assert len(counts) == len(small) and counts.max() - counts.min() <= 1  # reshuffled after each pass


def test_temporal_enrichment_combines_with_strata(index):
    batch, window, fraction = 16, 1.0, 0.25
    s = TripletSampler(index, batch, seed=6, group_by="experiment", stratify_by="perturbation",
                       temporal_enrichment=True, temporal_window_hours=window, temporal_global_fraction=fraction)
    hours = index.tracks.hours_post_perturbation.to_numpy().astype(np.float64)
    valid = index.valid
    seen_split = False
    for step in range(len(s)):
        info = s.step_info(step)
        rows = s.plan(step).anchor_rows
        in_group = col(index, "experiment", valid) == info["group"]
        assert info["focal_hours"] in set(hours[valid[in_group]])
        assert (col(index, "experiment", rows) == info["group"]).all()
        for pert in ("infected", "mock"):
            mine = rows[col(index, "perturbation", rows) == pert]
            assert len(mine) == batch // 2
            pool = valid[in_group & (col(index, "perturbation", valid) == pert)]
            inside_pool = np.abs(hours[pool] - info["focal_hours"]) <= window
            outside = (np.abs(hours[mine] - info["focal_hours"]) > window).sum()
            if inside_pool.all():
                assert outside == 0
            elif not inside_pool.any():
                assert outside == len(mine)
            else:
                assert outside == int(len(mine) * fraction)
                seen_split = True
    assert seen_split


def test_bag_of_channels_production_settings(indexes):
    _, bag = indexes
    batch = 16
    for options in (dict(stratify_by=["perturbation", "marker"]), dict(group_by="marker", stratify_by="experiment")):
        s = TripletSampler(bag, batch, seed=2, **options)
        for step in range(len(s)):
            plan = s.plan(step)
            marker = col(bag, "marker", plan.anchor_rows)
            assert (col(bag, "marker", plan.positive_rows) == marker).all()  # positives keep the channel label
            assert (plan.anchor_boxes.channels == plan.positive_boxes.channels).all()
            if "group_by" in options:
                assert (marker == s.step_info(step)["group"]).all()
                assert (pd.Series(col(bag, "experiment", plan.anchor_rows)).value_counts() == batch // 2).all()
            else:
                keys = pd.Series(col(bag, "perturbation", plan.anchor_rows)).astype(str) + "|" + marker.astype(str)
                assert (keys.value_counts() == batch // 4).all() and keys.nunique() == 4


# ---------------------------------------------------------------------- predict, labels, torch view
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_predict_covers_every_row_once_across_ranks(index, world):
    batch = 7
    samplers = [TripletSampler(index, batch, rank=r, world_size=world, predict=True) for r in range(world)]
    lengths = [len(s) for s in samplers]
    assert max(lengths) - min(lengths) <= 1
    per_rank = [list(s) for s in samplers]
    rows = np.concatenate([anchors_of(p) for p in per_rank])
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(index)))  # every row once, not only valid ones
    assert len(index) > len(index.valid)
    for plans in per_rank:
        assert all(not p.fit and p.positive_rows is None for p in plans)
        assert (np.diff(anchors_of(plans)) > 0).all()  # stable (index) order
    stepwise = [p.anchor_rows for k in range(max(lengths)) for p in (pr[k] for pr in per_rank if k < len(pr))]
    np.testing.assert_array_equal(np.concatenate(stepwise), np.arange(len(index)))
    assert sum(len(p[-1]) < batch for p in per_rank if p) <= 1  # one short last step at most


def test_label_columns_encode_with_fixed_sorted_classes(index):
    s = TripletSampler(index, 16, seed=0, label_columns={"exp": "experiment", "pert": "perturbation", "t": "t"})
    assert s.label_classes["exp"].tolist() == ["e15", "e30"]
    assert s.label_classes["pert"].tolist() == ["infected", "mock"]
    assert s.label_classes["t"].tolist() == sorted(index.tracks.t.unique())
    plan = s.plan(0)
    labels = s.labels(plan)
    assert plan.labels.keys() == labels.keys()  # the plan carries them to the loaders
    for name, column in (("exp", "experiment"), ("pert", "perturbation"), ("t", "t")):
        assert labels[name].dtype == np.int64 and labels[name].shape == (16,)
        np.testing.assert_array_equal(s.label_classes[name][labels[name]], col(index, column, plan.anchor_rows))
        np.testing.assert_array_equal(plan.labels[name], labels[name])
    predict = TripletSampler(index, 16, predict=True, label_columns={"exp": "experiment"})
    assert predict.labels(predict.plan(0))["exp"].min() >= 0


def test_torch_batch_sampler_view(index):
    torch = pytest.importorskip("torch")

    class PlanDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(index)

        def __getitems__(self, plan):
            return plan

    s = TripletSampler(index, 16, seed=9, rank=1, world_size=2)
    view = s.batch_sampler()
    assert isinstance(view, PlanBatchSampler)
    loader = torch.utils.data.DataLoader(PlanDataset(), batch_sampler=view, collate_fn=lambda x: x)
    assert len(loader) == len(s)
    got = list(loader)
    ref = TripletSampler(index, 16, seed=9, rank=1, world_size=2)
    assert_same_plans(got, list(ref))
    view.set_epoch(1)
    assert s.epoch == 1 and len(loader) == len(s)
    ref.set_epoch(1)
    assert_same_plans(list(loader), list(ref))


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(stratify_by=["perturbation", "condition"]), ValueError, r"unknown column\(s\) \['condition'\].*has columns \["),
    (dict(group_by="marker"), ValueError, r"'marker' is a column in bag-of-channels mode only"),
    (dict(label_columns={"x": "nope"}), ValueError, r"label_columns\['x'\].*unknown column"),
    (dict(leaky=0.2), ValueError, "leaky mixes rows from other groups: it needs group_by"),
    (dict(group_by="experiment", leaky=1.0), ValueError, r"leaky must lie in \[0, 1\)"),
    (dict(group_weights={"e30": 1.0}), ValueError, "it needs group_by"),
    (dict(group_by="experiment", group_weights={"e99": 1.0}), ValueError, r"groups \['e99'\] that have no valid"),
    (dict(group_by="experiment", group_weights={"e30": 0.0}), ValueError, "not all 0"),
    (dict(group_by="perturbation", stratify_by=[]), ValueError, "non-empty list of column names"),
    (dict(rank=2, world_size=2), ValueError, r"rank must lie in \[0, world_size=2\)"),
    (dict(seed=-1), ValueError, r"seed must be an int in \[0, 4294967296\)"),
    (dict(batch_size=0), ValueError, "batch_size must be an int >= 1"),
    (dict(batch_size=10**6), ValueError, "exceeds the .* valid anchors"),
    (dict(predict=True, stratify_by="perturbation"), ValueError, "apply to training only"),
    (dict(temporal_enrichment=True, temporal_global_fraction=1.5), ValueError, "temporal_global_fraction"),
])
def test_bad_options_give_clear_errors(index, kwargs, error, match):
    kwargs = {"batch_size": 16, **kwargs}
    with pytest.raises(error, match=match):
        TripletSampler(index, **kwargs)


def test_bad_state_and_steps(index):
    s = TripletSampler(index, 16, seed=1)
    with pytest.raises(IndexError, match="outside the epoch"):
        s.plan(len(s))
    with pytest.raises(ValueError, match="seed: saved 1, here 2"):
        TripletSampler(index, 16, seed=2).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="options"):
        TripletSampler(index, 16, seed=1, stratify_by="perturbation").load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="steps_consumed must lie in"):
        s.state_dict(steps_consumed=len(s) + 1)
    with pytest.raises(ValueError, match="state version"):
        s.load_state_dict({"version": 0})
    assert set(index.tracks.z) == {0}  # one value: one group, nothing to leak from
    with pytest.raises(ValueError, match="has one group"):
        TripletSampler(index, 16, group_by="z", leaky=0.5)
