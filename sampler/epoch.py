"""TripletSampler: which anchor rows form each step, for every rank, epoch after epoch.

Deterministic, elastic and resumable. Every plan is rebuilt from (seed, epoch, global step, rank)
alone: the step generator is

    np.random.default_rng(np.random.SeedSequence([seed, epoch, step, rank]))

(`step_generator`). With composition options the sampler first shuffles the step's rows with it
(strata and leak mixed); then `sampler.make_plan` receives it and draws the positives. Which rows a
step holds comes from epoch-level generators keyed by (seed, epoch, purpose)
(`composition.epoch_generator`). Nothing depends on the order in which steps are requested, on
other instances, on threads, or on the steps consumed before a resume.

Epochs without composition options: one permutation of `index.valid` per (seed, epoch), independent
of the world size; global step s holds the anchors [s*B*W, (s+1)*B*W) of it and rank r the slice
[r*B, (r+1)*B). Ranks are disjoint, have the same number of steps, and an epoch at any world size
consumes a prefix of the same permutation. `drop_last=False` adds a last step with the
remaining anchors split evenly over the ranks, ceil(rest / W) each; the few slots beyond the end
(fewer than W) wrap around to the first anchors of the epoch, so every rank has the same steps.
With `locality_frames=k` that permutation is drawn in blocks of (fov, t // k) (`sampler.locality`):
blocks in random order, each shuffled and contiguous; slicing, ranks, drop_last and resume as above.

FOV-sharded epochs (`fov_shards=True`, the documented exception to the prefix rule): the FOVs are
assigned to the ranks (`sampler.shards`: balanced by the bytes of the chunks their rows' read boxes
touch, deterministic from (seed, period), period = epoch // reshard_every, or 0 when
reshard_every is None); rank r's epoch order is the same global permutation (or locality order)
restricted to its FOVs, so it is a uniform permutation of its own anchors. Every rank takes
S = min_r floor(n_r / B) steps (ceil with drop_last=False), S fixed by the assignment of period 0
so that every epoch has the same length; rank r's step s holds positions [s*B, (s+1)*B) of its
order, modulo n_r. So the anchors of a rank beyond S*B are dropped for that epoch (a new random
subset each epoch, none carried over), and a rank of a later period with fewer than S*B anchors
repeats its first ones. Resume: exact at the same world and batch size; at another, the epoch
finishes under the new world size's assignment from step floor(anchors consumed / (B*W')).

With composition options (`group_by`, `stratify_by`, `temporal_enrichment`) an epoch has
N // (B*W) full steps (ceil(N / (B*W)) with drop_last=False, still full: draws go on in the
reshuffled groups and strata), drawn by `sampler.composition` (see there).

Cost: a plain epoch is one permutation of the valid anchors (computed on first use, cached for the
last two epochs; the locality order costs about 2.5x as much, 0.25 s for 2.6e6 anchors), then every
step and every resume is O(1): a slice. A composed epoch computes all its draws at once, vectorised,
O(N log N) (about 0.6 s for 2.5e6 anchors); resuming at any step costs the same and reads no pixels.
Each step then costs one generator and a slice, plus make_plan.

Predict: every row of `index.tracks` once, in index order; global step s covers rows
[s*B*W, (s+1)*B*W) and rank r the slice [r*B, (r+1)*B) of it, the last one short; ranks differ by at
most one step and nothing is padded or repeated.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from sampler import composition as comp_mod
from sampler.composition import EpochDraws, as_columns, check_columns, encode_keys, epoch_generator, label_encoder
from sampler.augment import AugmentConfig
from sampler.index import LineageIndex
from sampler.locality import block_codes, block_order
from sampler.plan import BatchPlan, make_plan
from sampler.shards import ShardAssignment, assign_fovs, fov_chunk_bytes

STATE_VERSION = 1
SEED_LIMIT = 1 << 32  # each key word of the step generator is one uint32 (larger ints would alias)
_LATER_OPTIONS = dict(locality_frames=None, fov_shards=False, reshard_every=None)  # options newer than STATE_VERSION 1, with their "off" value


def step_generator(seed: int, epoch: int, step: int, rank: int) -> np.random.Generator:
    """The generator of one step of one rank: every random choice of its plan comes from it."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, step, rank]))


class TripletSampler:
    """Iterable over the BatchPlans of one rank; one epoch at a time.

    Args:
        index: the LineageIndex (fit: anchors from `index.valid`; predict: every row).
        batch_size: anchors per step and rank (B).
        seed: in [0, 2**32).
        rank, world_size: this process and the number of processes (DDP); every rank builds the
            same sampler with its own rank.
        drop_last: fit only; False adds a last step (see the module docstring). Predict always
            keeps its short last step.
        group_by: column(s) of `index.tracks`; each global step draws from one group (all ranks),
            groups chosen by `group_weights` ({group name: weight}, missing groups weigh 0; multi-column
            names are "a|b" or a tuple), by default in proportion to their valid anchors.
        leaky: fraction of each rank's batch, `int(B * leaky)` rows, drawn uniformly from the rows of
            the other groups (needs group_by).
        stratify_by: column(s); each rank's batch (less the leak) is split equally over the strata
            present in the step's group (floor or ceil of n / k each).
        temporal_enrichment: per global step one focal time, uniform over the distinct
            hours_post_perturbation of the group; in each stratum `floor(share *
            temporal_global_fraction)` rows come from outside the window |hpi - focal| <=
            temporal_window_hours and the rest from inside it. Combines with stratify_by.
        predict: every row of index.tracks once (no positives; composition options are an error).
        label_columns: {name: column}: integer labels of the anchors for auxiliary heads, one encoder
            per column fixed from the whole index (sorted distinct values; missing values are -1);
            see `labels()` and `label_classes`.
        augment: an AugmentConfig; its per-sample parameters are drawn into every plan from the
            step generator (None: no augmentation, the default for validation and predict).
        locality_frames: None (default: a uniform permutation of the anchors) or an int k >= 1: the
            epoch's order shuffles blocks of anchors sharing (fov, t // k), each block shuffled and
            contiguous, so consecutive steps reuse the image chunks a chunk cache holds. Trade-off:
            batches are correlated (few FOVs and frames per batch, so more similar negatives for
            contrastive learning); plain epochs only (not with composition options or predict).
        fov_shards: False (default) or True: each rank owns disjoint FOVs, balanced by the bytes of
            the chunks their rows touch, and draws its anchors (so its positives and chunks) only
            from them, so the ranks' chunk caches partition the dataset (see the module docstring
            for steps, dropped anchors and resume). Trade-off: a rank's batch holds negatives from
            fewer FOVs. Combines with locality_frames; not with composition options or predict.
        reshard_every: None (default: one assignment for the whole run) or R >= 1: a new assignment
            every R epochs (epochs pR .. pR + R - 1 share period p's). Needs fov_shards.

    State: `epoch` and `step` (steps of the current epoch already consumed). Iterating yields the
    plans from `step` to the end of the epoch and counts each plan handed out as consumed; a loader
    that prefetches reports what its user actually received through
    `state_dict(steps_consumed=...)`. `set_epoch(e)` starts epoch e at step 0, unless e is the
    epoch already loaded (then nothing changes, so a restored step survives Lightning's call).
    Iterating again after a completed epoch starts the next one. `plan(step, epoch)` gives any plan
    directly (a loader keyed by its own epoch and step needs nothing else).
    """

    def __init__(
        self,
        index: LineageIndex,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        group_by: str | Sequence[str] | None = None,
        group_weights: Mapping[Any, float] | None = None,
        leaky: float = 0.0,
        stratify_by: str | Sequence[str] | None = None,
        temporal_enrichment: bool = False,
        temporal_window_hours: float = 2.0,
        temporal_global_fraction: float = 0.3,
        predict: bool = False,
        label_columns: Mapping[str, str] | None = None,
        augment: AugmentConfig | None = None,
        locality_frames: int | None = None,
        fov_shards: bool = False,
        reshard_every: int | None = None,
    ) -> None:
        _check_int("batch_size", batch_size, 1)
        _check_int("world_size", world_size, 1)
        _check_int("seed", seed, 0, SEED_LIMIT)
        _check_int("rank", rank, 0, world_size, f"rank must lie in [0, world_size={world_size}), got {rank!r}")
        self.index = index
        self.augment = augment
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.predict = bool(predict)
        tracks = index.tracks
        channel_mode = getattr(index.config, "channel_mode", None)

        group_cols = as_columns(group_by, "group_by")
        strat_cols = as_columns(stratify_by, "stratify_by")
        if not 0.0 <= leaky < 1.0:
            raise ValueError(f"leaky must lie in [0, 1), got {leaky!r}")
        if leaky > 0 and not group_cols:
            raise ValueError("leaky mixes rows from other groups: it needs group_by")
        if group_weights is not None and not group_cols:
            raise ValueError("group_weights weigh the groups of group_by: it needs group_by")
        if temporal_enrichment:
            if not 0.0 <= temporal_global_fraction <= 1.0:
                raise ValueError(f"temporal_global_fraction must lie in [0, 1], got {temporal_global_fraction!r}")
            if not temporal_window_hours >= 0:
                raise ValueError(f"temporal_window_hours must be >= 0, got {temporal_window_hours!r}")
            check_columns(tracks, ["hours_post_perturbation"], "temporal_enrichment needs the column", channel_mode)
        if group_cols:
            check_columns(tracks, group_cols, "group_by", channel_mode)
        if strat_cols:
            check_columns(tracks, strat_cols, "stratify_by", channel_mode)
        self.composed = bool(group_cols or strat_cols or temporal_enrichment)
        if self.predict and self.composed:
            raise ValueError("predict covers every row once: group_by, stratify_by and temporal_enrichment "
                             "apply to training only")
        if locality_frames is not None:
            _check_int("locality_frames", locality_frames, 1,
                       message=f"locality_frames must be None or an int >= 1, got {locality_frames!r}")
            if self.predict:
                raise ValueError("locality_frames orders training anchors: predict covers every row once "
                                 "in index order")
            if self.composed:
                raise ValueError("locality_frames applies to plain epochs only: it cannot combine with "
                                 "group_by, stratify_by or temporal_enrichment")
        if not isinstance(fov_shards, (bool, np.bool_)):
            raise ValueError(f"fov_shards must be True or False, got {fov_shards!r}")
        if reshard_every is not None:
            _check_int("reshard_every", reshard_every, 1,
                       message=f"reshard_every must be None or an int >= 1 (epochs per FOV assignment), got "
                               f"{reshard_every!r}")
            if not fov_shards:
                raise ValueError("reshard_every re-assigns the FOV shards: it needs fov_shards=True")
        if fov_shards:
            if self.predict:
                raise ValueError("fov_shards applies to training only: predict covers every row once in index "
                                 "order; build the predict sampler without fov_shards")
            if self.composed:
                raise ValueError("fov_shards cannot combine with group_by, stratify_by or temporal_enrichment "
                                 "(each global step draws one group for all ranks, across FOV shards): drop "
                                 "those options or fov_shards")
        self.options = dict(
            group_by=group_cols or None,
            group_weights=None if group_weights is None else {_group_key(k): float(v) for k, v in group_weights.items()},
            leaky=float(leaky), stratify_by=strat_cols or None, temporal_enrichment=bool(temporal_enrichment),
            temporal_window_hours=float(temporal_window_hours),
            temporal_global_fraction=float(temporal_global_fraction),
            label_columns=None if label_columns is None else dict(label_columns),
            locality_frames=None if locality_frames is None else int(locality_frames),
            fov_shards=bool(fov_shards), reshard_every=None if reshard_every is None else int(reshard_every),
        )

        # labels for auxiliary heads
        self._label_codes: dict[str, np.ndarray] = {}
        self.label_classes: dict[str, np.ndarray] = {}
        if label_columns is not None:
            if not isinstance(label_columns, Mapping):
                raise ValueError(f"label_columns must map a label name to a column, got {label_columns!r}")
            for name, col in label_columns.items():
                if not isinstance(col, str):
                    raise ValueError(f"label_columns[{name!r}] must be a column name, got {col!r}")
                check_columns(tracks, [col], f"label_columns[{name!r}]", channel_mode)
                self._label_codes[name], self.label_classes[name] = label_encoder(tracks[col])

        # the anchors and the epoch length
        if self.predict:
            self._n = len(tracks)
            span = self.batch_size * self.world_size
            rest = self._n - self.rank * self.batch_size
            self._len = max(0, -(-rest // span))
        else:
            self._valid = np.asarray(index.valid, dtype=np.int64)
            self._n = len(self._valid)
            if self._n == 0:
                frames = {n: f"{lo}..{hi}" for n, lo, hi in zip(index.experiments.name, index.exp_tau_min,
                                                                      index.exp_tau_max)}
                raise ValueError(
                    f"No valid anchors in {len(index)} observations: no row has a positive under policy "
                    f"'{index.config.positive_policy}' at tau_range_hours={index.config.tau_range_hours} "
                    f"(frames per experiment: {frames}, tau = 0 excluded). Widen the tau range, or check that "
                    "tracks last longer than one frame."
                )
            span = self.batch_size * self.world_size
            self._len = self._n // span if self.drop_last else -(-self._n // span)
            if self._len == 0:
                raise ValueError(
                    f"batch_size * world_size = {span} exceeds the {self._n} valid anchors: an epoch would "
                    "have no step; lower batch_size or pass drop_last=False"
                )
        self._composition = self._build_composition(group_cols, strat_cols, group_weights, leaky) if self.composed else None
        self._blocks: tuple[np.ndarray, int] | None = None  # (block code per valid anchor, number of blocks)
        if locality_frames is not None:
            self._blocks = block_codes(index.column("fov")[self._valid], index.column("t")[self._valid],
                                       int(locality_frames))

        self._epoch = 0
        self._step = 0
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, Any] = OrderedDict()  # epoch -> permutation or EpochDraws
        self._cache_size = 2
        self._assignments: OrderedDict[int, ShardAssignment] = OrderedDict()  # period -> assignment
        if fov_shards:
            self._setup_shards()

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (for spawned loader workers): without the lock and the epoch cache."""
        state = dict(self.__dict__)
        state["_lock"] = None
        state["_cache"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ composition setup
    def _build_composition(self, group_cols, strat_cols, group_weights, leaky) -> comp_mod.Composition:
        tracks = self.index.tracks
        valid = self._valid
        if group_cols:
            group, group_names = encode_keys(tracks, group_cols, valid)
        else:
            group, group_names = np.zeros(len(valid), dtype=np.int64), ["all"]
        if strat_cols:
            stratum, stratum_names = encode_keys(tracks, strat_cols, valid)
        else:
            stratum, stratum_names = np.zeros(len(valid), dtype=np.int64), ["all"]
        sizes = np.bincount(group, minlength=len(group_names)).astype(np.float64)
        if group_weights is None:
            weight = sizes
        else:
            given = {_group_key(k): v for k, v in group_weights.items()}
            unknown = sorted(set(given) - set(group_names))
            if unknown:
                raise ValueError(f"group_weights name groups {unknown} that have no valid anchors; "
                                 f"the groups of group_by={group_cols} are {group_names}")
            weight = np.array([float(given.get(n, 0.0)) for n in group_names])
            if (weight < 0).any() or not np.isfinite(weight).all() or weight.sum() <= 0:
                raise ValueError(f"group_weights must be finite, >= 0 and not all 0, got {dict(given)}")
        if leaky > 0 and len(group_names) < 2:
            raise ValueError(f"leaky draws from other groups, but group_by={group_cols} has one group "
                             f"({group_names[0]!r}) among the valid anchors")
        hours = None
        if self.options["temporal_enrichment"]:
            hours = tracks["hours_post_perturbation"].to_numpy()[valid].astype(np.float64)
            if np.isnan(hours).any():
                raise ValueError("temporal_enrichment: hours_post_perturbation is missing (NaN) for some valid anchors")
        comp = comp_mod.build_composition(
            valid, group, group_names, weight, stratum, stratum_names, hours, batch_size=self.batch_size,
            world_size=self.world_size, leaky=leaky, global_fraction=self.options["temporal_global_fraction"],
            window=self.options["temporal_window_hours"],
        )
        small = comp_mod.small_share_warnings(comp)
        if small:
            warnings.warn(
                f"{len(small)} group/stratum pool(s) are smaller than their share of one global step, so "
                f"their rows repeat inside a step: {small[:5]}", stacklevel=3,
            )
        return comp

    # ------------------------------------------------------------------ FOV shards
    def _setup_shards(self) -> None:
        """FOV weights, the period-0 assignment and the common step count S (fixed for the run)."""
        fov_all = self._fov_all = self.index.column("fov").astype(np.int64)
        self._fov_bytes = fov_chunk_bytes(self.index, self._valid)
        self._fov_anchors = np.bincount(fov_all[self._valid], minlength=len(self.index.fovs))
        with_anchors = np.unique(fov_all[self._valid])
        if len(with_anchors) < self.world_size:
            raise ValueError(
                f"fov_shards gives every rank its own FOVs, but only {len(with_anchors)} FOV(s) hold valid anchors "
                f"for world_size={self.world_size}: use fewer ranks or fov_shards=False")
        first = self.shards(0)
        B = self.batch_size
        self._len = int(first.anchors.min() // B if self.drop_last else -(-first.anchors.min() // B))
        if self._len == 0:
            raise ValueError(
                f"fov_shards: the smallest FOV shard holds {int(first.anchors.min())} anchors, fewer than "
                f"batch_size={B}: an epoch would have no step; lower batch_size, use fewer ranks, or pass "
                "drop_last=False")
        span = B * self.world_size
        uniform = self._n // span if self.drop_last else -(-self._n // span)
        extra = (uniform - self._len) * span  # anchors left out beyond a uniform epoch's remainder
        if extra > 0.1 * self._n:
            warnings.warn(
                f"fov_shards leaves {extra} more of the {self._n} anchors ({extra / self._n:.0%}) out of each epoch "
                f"than a uniform epoch: the shards hold {first.anchors.tolist()} anchors (balanced by chunk bytes, "
                f"not anchors) and every rank takes {self._len} steps of {B} (uniform: {uniform}); use fewer "
                "ranks or a smaller batch_size", stacklevel=3)

    def period(self, epoch: int | None = None) -> int:
        """The FOV-assignment period of `epoch` (epoch // reshard_every; 0 when never re-assigned)."""
        every = self.options["reshard_every"]
        epoch = self._epoch if epoch is None else int(epoch)
        return 0 if every is None else epoch // every

    def shards(self, epoch: int | None = None) -> ShardAssignment:
        """The FOV assignment of `epoch` (default: the current one), the same on every rank."""
        if not self.options["fov_shards"]:
            raise ValueError("shards() describes FOV-sharded epochs: build the sampler with fov_shards=True")
        period = self.period(epoch)
        with self._lock:
            found = self._assignments.get(period)
            if found is None:
                owner = assign_fovs(self._fov_bytes, self._fov_anchors, self.world_size,
                                    epoch_generator(self.seed, period, comp_mod.SHARDS))
                anchor_owner = owner[self._fov_all[self._valid]]
                found = ShardAssignment(
                    owner=owner, chunk_bytes=np.bincount(owner, self._fov_bytes, self.world_size).astype(np.int64),
                    anchors=np.bincount(anchor_owner, minlength=self.world_size).astype(np.int64))
                self._assignments[period] = found
                while len(self._assignments) > self._cache_size:
                    self._assignments.popitem(last=False)
            return found

    # ------------------------------------------------------------------ sizes and state
    def __len__(self) -> int:
        """Steps of this rank in one epoch (the same on every rank, except predict: at most one less)."""
        return self._len

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def step(self) -> int:
        """Steps of the current epoch already consumed (where iteration resumes)."""
        return self._step

    def remaining(self) -> int:
        """Steps the next iteration will yield."""
        return self._len if self._complete() else self._len - self._step

    def _complete(self) -> bool:
        return self._len > 0 and self._step >= self._len

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` at step 0; a no-op when `epoch` is the epoch already loaded."""
        _check_int("epoch", epoch, 0, SEED_LIMIT)
        with self._lock:
            if int(epoch) != self._epoch:
                self._epoch, self._step = int(epoch), 0

    def state_dict(self, steps_consumed: int | None = None, epoch: int | None = None) -> dict[str, Any]:
        """(seed, epoch, steps consumed, world size, batch size, options, index size).

        `steps_consumed` (with `epoch`, default the current one) overrides the sampler's own count,
        which counts plans handed out by iteration: pass the steps your training loop received when a
        DataLoader or a loader prefetches ahead.
        """
        step = self._step if steps_consumed is None else int(steps_consumed)
        ep = self._epoch if epoch is None else int(epoch)
        if not 0 <= step <= self._len:
            raise ValueError(f"steps_consumed must lie in [0, {self._len}], got {step}")
        return dict(
            version=STATE_VERSION, seed=self.seed, epoch=ep, step=step, batch_size=self.batch_size,
            world_size=self.world_size, drop_last=self.drop_last, predict=self.predict, composed=self.composed,
            steps_per_epoch=self._len, anchors=self._n, index_rows=len(self.index.tracks),
            anchors_consumed=step * self.batch_size * self.world_size, options=_jsonable(self.options),
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume where `state` was saved: the next iteration yields exactly the plans not yet consumed.

        The seed, the options and the index must match (ValueError otherwise). Without composition
        options the world size or batch size may change (elastic): the epoch resumes at the first step
        at or before the anchors already consumed (a few anchors repeat when the new step size does
        not divide them; a warning says how many). With composition options a mid-epoch resume needs
        the same batch and world sizes.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')!r}, this sampler reads {STATE_VERSION}")
        mine = self.state_dict()
        saved = dict(state)
        if isinstance(saved.get("options"), Mapping):  # options added later default to off in older states
            saved["options"] = {**_LATER_OPTIONS, **saved["options"]}
        diffs = [k for k in ("seed", "predict", "composed", "anchors", "index_rows", "options")
                 if _jsonable(saved.get(k)) != mine[k]]
        if state.get("drop_last") != self.drop_last and not self.predict:
            diffs.append("drop_last")
        if diffs:
            raise ValueError(
                "the saved sampler state does not match this sampler: "
                + "; ".join(f"{k}: saved {state.get(k)!r}, here {mine[k]!r}" for k in diffs)
            )
        epoch, step = int(state["epoch"]), int(state["step"])
        same_shape = state["batch_size"] == self.batch_size and state["world_size"] == self.world_size
        if not same_shape:
            if step in (0, state["steps_per_epoch"]):
                step = 0 if step == 0 else self._len
            elif self.composed:
                raise ValueError(
                    f"composed epochs depend on batch_size * world_size: the state was saved mid-epoch "
                    f"(step {step}) with batch_size={state['batch_size']}, world_size={state['world_size']}, "
                    f"here {self.batch_size}, {self.world_size}; resume with those or at an epoch boundary"
                )
            else:
                consumed = int(state["anchors_consumed"])
                span = self.batch_size * self.world_size
                step = min(consumed // span, self._len)
                if self.options["fov_shards"] and 0 < step < self._len and state["world_size"] != self.world_size:
                    warnings.warn(
                        f"fov_shards: resuming epoch {epoch} at world_size={self.world_size} (saved at "
                        f"{state['world_size']}): it finishes from step {step} of {self._len} under this world "
                        "size's FOV assignment; anchors consumed under the old one may repeat, others are "
                        "skipped this epoch", stacklevel=2,
                    )
                elif consumed % span and step < self._len:
                    warnings.warn(
                        f"resuming with batch_size*world_size={span} after {consumed} anchors consumed at "
                        f"{state['batch_size']}*{state['world_size']}: restarting at step {step}, "
                        f"{consumed - step * span} anchors repeat", stacklevel=2,
                    )
        with self._lock:
            self._epoch, self._step = epoch, min(step, self._len)

    # ------------------------------------------------------------------ plans
    def generator(self, step: int, epoch: int | None = None) -> np.random.Generator:
        """The step generator of this rank (a fresh one on every call)."""
        return step_generator(self.seed, self._epoch if epoch is None else int(epoch), int(step), self.rank)

    def step_inputs(self, step: int, epoch: int | None = None) -> tuple[np.ndarray, np.random.Generator | None]:
        """(anchor rows, generator) exactly as `plan` hands them to `make_plan` (generator None in predict).

        For callers that build the plan themselves, e.g. `make_plan(index, rows, rng, augment=...)`.
        """
        epoch = self._epoch if epoch is None else int(epoch)
        step = self._check_step(step)
        if self.predict:
            start = step * self.batch_size * self.world_size + self.rank * self.batch_size
            return np.arange(start, min(start + self.batch_size, self._n), dtype=np.int64), None
        rng = self.generator(step, epoch)
        if self.composed:
            rows = self._epoch_data(epoch).rows[step]
            rows = rows[rng.permutation(len(rows))]  # strata and leak mixed inside the step
        elif self.options["fov_shards"]:
            order = self._epoch_data(epoch)  # this rank's anchors, in epoch order
            rows = order[(step * self.batch_size + np.arange(self.batch_size)) % len(order)]
        else:
            rows = self._plain_rows(self._epoch_data(epoch), step)
        return rows, rng

    def anchor_rows(self, step: int, epoch: int | None = None) -> np.ndarray:
        """This rank's anchor rows of `step` in `epoch` (default: the current one), in plan order."""
        return self.step_inputs(step, epoch)[0]

    def plan(self, step: int, epoch: int | None = None) -> BatchPlan:
        """The BatchPlan of this rank at `step` of `epoch` (default: the current epoch)."""
        rows, rng = self.step_inputs(step, epoch)
        plan = make_plan(self.index, rows, rng, self.augment, predict=self.predict)
        if self._label_codes:
            plan = dataclasses.replace(plan, labels=self.labels(plan))
        return plan

    def _plain_rows(self, order: np.ndarray, step: int) -> np.ndarray:
        B, W, r = self.batch_size, self.world_size, self.rank
        full = self._n // (B * W)
        if step < full:
            start = step * B * W + r * B
            return order[start:start + B]
        # drop_last=False: the short last step, ceil(rest / W) per rank, wrapping past the end
        rest = self._n - full * B * W
        per = -(-rest // W)
        pos = full * B * W + r * per + np.arange(per)
        return order[pos % self._n]

    def step_info(self, step: int, epoch: int | None = None) -> dict[str, Any]:
        """What a global step was drawn from: its group and focal time (composition), for logs and tests."""
        epoch = self._epoch if epoch is None else int(epoch)
        step = self._check_step(step)
        info: dict[str, Any] = dict(epoch=epoch, step=step, rank=self.rank, group=None, focal_hours=None)
        if self.composed:
            draws: EpochDraws = self._epoch_data(epoch)
            if self.options["group_by"]:
                info["group"] = self._composition.group_names[int(draws.group[step])]
            if draws.focal is not None:
                info["focal_hours"] = float(draws.focal[step])
        return info

    def labels(self, plan_or_rows: BatchPlan | np.ndarray) -> dict[str, np.ndarray]:
        """{name: int64 (B,)} label codes of a plan's anchors (or of index rows); classes in `label_classes`."""
        rows = plan_or_rows.anchor_rows if isinstance(plan_or_rows, BatchPlan) else np.asarray(plan_or_rows)
        return {name: codes[rows] for name, codes in self._label_codes.items()}

    def _check_step(self, step: int) -> int:
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an int, got {step!r}")
        if not 0 <= step < self._len:
            raise IndexError(f"step {step} outside the epoch's {self._len} steps")
        return int(step)

    def _epoch_data(self, epoch: int):
        """The epoch's permutation (plain; this rank's part of it with FOV shards) or draws (composed),
        computed once and cached (last two)."""
        owner = self.shards(epoch).owner if self.options["fov_shards"] else None  # outside the lock
        with self._lock:
            data = self._cache.get(epoch)
            if data is not None:
                self._cache.move_to_end(epoch)
                return data
            if self.composed:
                data = comp_mod.compose_epoch(self._composition, self.seed, epoch, self._len, self.rank)
            elif self._blocks is not None:  # same purpose key: the two orders are alternatives
                rng = epoch_generator(self.seed, epoch, comp_mod.PERMUTATION)
                data = self._valid[block_order(*self._blocks, rng)]
            else:
                perm = epoch_generator(self.seed, epoch, comp_mod.PERMUTATION).permutation(self._n)
                data = self._valid[perm]
            if owner is not None:  # the global order restricted to this rank's FOVs
                data = data[owner[self._fov_all[data]] == self.rank]
            self._cache[epoch] = data
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return data

    # ------------------------------------------------------------------ iteration
    def iter_from(self, step: int = 0, epoch: int | None = None) -> Iterator[BatchPlan]:
        """Plans of `epoch` from `step` to its end, without touching the sampler's state."""
        epoch = self._epoch if epoch is None else int(epoch)
        if not 0 <= step <= self._len:
            raise IndexError(f"step {step} outside [0, {self._len}]")
        return (self.plan(s, epoch) for s in range(step, self._len))

    def __iter__(self) -> Iterator[BatchPlan]:
        """Plans from the consumed step to the end of the epoch; each plan handed out counts as consumed.

        When the current epoch is complete, the next one starts (as the reference sampler does).
        """
        with self._lock:
            if self._complete():
                self._epoch, self._step = self._epoch + 1, 0
            epoch, start = self._epoch, self._step
        return self._run(epoch, start)

    def _run(self, epoch: int, start: int) -> Iterator[BatchPlan]:
        for s in range(start, self._len):
            plan = self.plan(s, epoch)
            with self._lock:
                if self._epoch == epoch and self._step <= s:
                    self._step = s + 1
            yield plan

    def batch_sampler(self) -> "PlanBatchSampler":
        """A torch batch-sampler view: `DataLoader(dataset, batch_sampler=..., collate_fn=identity)`.

        The DataLoader hands each BatchPlan to `dataset.__getitems__(plan)`.
        """
        return PlanBatchSampler(self)

    def __repr__(self) -> str:
        mode = "predict" if self.predict else ("composed" if self.composed else "permutation")
        opts = {k: v for k, v in self.options.items() if v not in (None, 0.0, False)}
        return (f"TripletSampler({mode}, batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, "
                f"seed={self.seed}, epoch={self._epoch}, step={self._step}/{self._len}, anchors={self._n}, {opts})")


class PlanBatchSampler:
    """Torch batch-sampler view of a TripletSampler: iterable over BatchPlans with a length.

    It needs no torch import: a DataLoader accepts any iterable with `__len__` as `batch_sampler`.
    `set_epoch`, `state_dict` and `load_state_dict` go to the sampler (Lightning calls `set_epoch`).
    """

    def __init__(self, sampler: TripletSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[BatchPlan]:
        return iter(self.sampler)

    def __len__(self) -> int:
        return self.sampler.remaining()

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self, steps_consumed: int | None = None, epoch: int | None = None) -> dict[str, Any]:
        return self.sampler.state_dict(steps_consumed, epoch)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)


# ---------------------------------------------------------------------- helpers
def _check_int(name: str, value: Any, low: int, high: int | None = None, message: str | None = None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if ok and value >= low and (high is None or value < high):
        return
    bound = f">= {low}" if high is None else f"in [{low}, {high})"
    raise ValueError(message or f"{name} must be an int {bound}, got {value!r}")


def _group_key(key: Any) -> str:
    """A group_weights key as a group name: tuples of column values join with '|'."""
    if isinstance(key, tuple):
        return "|".join(str(k) for k in key)
    return str(key)


def _jsonable(value: Any) -> Any:
    """Options in a form that compares equal after a JSON or torch.save round trip."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
