"""Batch composition (groups, leaky mixing, strata, temporal enrichment), one whole epoch at a time.

The valid anchors are partitioned once into *cells*: one cell per (group, stratum, hours post
perturbation value) present among them (the hours only with temporal enrichment). Every draw of an
epoch picks a cell, and each cell hands out its rows from a queue: a random permutation of its rows,
then, once exhausted, a fresh permutation (the cell is reshuffled and starts over). So no anchor
repeats inside a cell (and so inside a stratum) until the cell has handed out all its rows, and a row
repeats inside one step only when its cell is smaller than its share of that step.

`compose_epoch` builds one epoch of draws for every global step and rank with vectorised numpy (no
loop over steps, rows or cells) and keeps the rows of one rank: O(N log N) per epoch, after which any
step is a slice. Resuming at step s is the same computation (the epoch's draws are replayed, no
pixels are read); its result does not depend on which steps were consumed before.

Randomness: every draw comes from generators keyed by (seed, epoch, purpose) (see
`epoch_generator`), so the draws of global step s are a function of (seed, epoch, s, rank, world
size, batch size, options and the index) only. The group of a step and its focal time are drawn
from streams that depend on (seed, epoch, step) alone, the same on every rank and for any world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

# purposes of the epoch-level generators (spawn keys; see epoch_generator)
PERMUTATION, GROUP, FOCAL, OFFSET, DRAW, CYCLE, SHARDS = range(7)  # SHARDS: keyed by period, not epoch


def epoch_generator(seed: int, epoch: int, purpose: int) -> np.random.Generator:
    """The generator of one purpose for a whole epoch.

    Keyed `SeedSequence([seed, epoch], spawn_key=(purpose,))`: the spawn key keeps it apart from the
    step generators `SeedSequence([seed, epoch, step, rank])` (without it, `[seed, epoch]` would equal
    `[seed, epoch, 0, 0]`, because SeedSequence pads short entropy with zeros).
    """
    return np.random.default_rng(np.random.SeedSequence([seed, epoch], spawn_key=(purpose,)))


# ---------------------------------------------------------------------- column codes
def as_columns(value: str | Sequence[str] | None, what: str) -> list[str]:
    """A column option (one name or a list of names) as a list; None gives []."""
    if value is None:
        return []
    cols = [value] if isinstance(value, str) else list(value)
    if not cols or not all(isinstance(c, str) for c in cols):
        raise ValueError(f"{what} must be a column name or a non-empty list of column names, got {value!r}")
    return cols


def check_columns(tracks: pd.DataFrame, cols: list[str], what: str, channel_mode: str | None = None) -> None:
    """ValueError naming the unknown columns and listing the available ones."""
    missing = [c for c in cols if c not in tracks.columns]
    if missing:
        hint = ""
        if "marker" in missing and channel_mode == "all":
            hint = " ('marker' is a column in bag-of-channels mode only: IndexConfig(channel_mode='bag'))"
        raise ValueError(
            f"{what}={cols if len(cols) > 1 else cols[0]!r}: unknown column(s) {missing}{hint}; "
            f"index.tracks has columns {list(tracks.columns)}"
        )


def _codes(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(codes, category values) of one column; -1 for a missing value. Category order, no per-row work."""
    if isinstance(series.dtype, pd.CategoricalDtype):
        return series.cat.codes.to_numpy().astype(np.int64), np.asarray(series.cat.categories)
    codes, uniques = pd.factorize(series, sort=True)
    return codes.astype(np.int64), np.asarray(uniques)


def encode_keys(tracks: pd.DataFrame, cols: list[str], rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Integer keys 0..K-1 of the combination of `cols` at `rows`, and each key's name ("a|b").

    Keys follow the columns' category order (lexicographic over the columns); missing values are the
    name "nan" (as the reference's `astype(str)`). Only combinations present at `rows` get a key.
    """
    combined = np.zeros(len(rows), dtype=np.int64)
    columns = [_codes(tracks[col]) for col in cols]
    for codes, cats in columns:
        # compressed to 0..K-1 after each column (order kept), so the mixed-radix key never overflows
        _, combined = np.unique(combined * (len(cats) + 1) + (codes[rows] + 1), return_inverse=True)
        combined = combined.astype(np.int64)
    _, first, key = np.unique(combined, return_index=True, return_inverse=True)
    rep_rows = rows[first]
    parts = [["nan" if k < 0 else str(cats[k]) for k in codes[rep_rows]] for codes, cats in columns]  # per key
    names = ["|".join(p) for p in zip(*parts)]
    return key.astype(np.int64), names


def label_encoder(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(int64 code of every row, sorted classes): one encoder per column, fixed from the whole index.

    Classes are the sorted distinct values present; a missing value is -1.
    """
    if isinstance(series.dtype, pd.CategoricalDtype):
        codes = series.cat.codes.to_numpy().astype(np.int64)
        cats = np.asarray(series.cat.categories)
        present = np.bincount(codes[codes >= 0], minlength=len(cats)) > 0
        used = np.flatnonzero(present)
        order = used[np.argsort(cats[used], kind="stable")]
        mapping = np.full(len(cats) + 1, -1, dtype=np.int64)  # last slot: code -1
        mapping[order] = np.arange(len(order))
        return mapping[codes], cats[order]
    codes, uniques = pd.factorize(series, sort=True)
    return codes.astype(np.int64), np.asarray(uniques)


# ---------------------------------------------------------------------- the static structure
@dataclass
class Composition:
    """Cells of the valid anchors and the per-step shares; built once per sampler."""

    batch_size: int
    world_size: int
    n_leak: int
    global_fraction: float
    window: float
    temporal: bool
    group_names: list[str]
    group_prob: np.ndarray  # (G,) float64, sums to 1
    group_cum: np.ndarray  # (G,) cumulative probabilities
    group_last: int  # last group with a positive weight (guards float round-off)
    stratum_names: list[str]
    members: np.ndarray  # (Nv,) index rows sorted by cell
    cell_start: np.ndarray  # (C + 1,) offsets of each cell in `members`
    cell_key: np.ndarray  # (C,) segment * H + hours bin (ascending)
    seg_lo: np.ndarray  # (S,) first cell of each (group, stratum) segment
    seg_hi: np.ndarray  # (S,) one past its last cell
    seg_stratum: np.ndarray  # (S,) stratum code
    group_seg_lo: np.ndarray  # (G,) first segment of each group
    group_seg_hi: np.ndarray  # (G,)
    group_lo: np.ndarray  # (G,) first member position of each group
    group_hi: np.ndarray  # (G,)
    hours: np.ndarray  # (H,) sorted distinct hours post perturbation (temporal), else [0.0]
    group_bins_start: np.ndarray  # (G + 1,) CSR: the hours bins present in each group
    group_bins: np.ndarray

    @property
    def n_groups(self) -> int:
        return len(self.group_names)

    @property
    def n_valid(self) -> int:
        return len(self.members)


def build_composition(
    valid: np.ndarray,
    group: np.ndarray,
    group_names: list[str],
    group_weight: np.ndarray,
    stratum: np.ndarray,
    stratum_names: list[str],
    hours: np.ndarray | None,
    *,
    batch_size: int,
    world_size: int,
    leaky: float,
    global_fraction: float,
    window: float,
) -> Composition:
    """Cells from per-valid-row group, stratum and hours codes (hours None without temporal enrichment)."""
    n_groups = len(group_names)
    temporal = hours is not None
    if temporal:
        hour_values, hour_bin = np.unique(np.asarray(hours, dtype=np.float64), return_inverse=True)
    else:
        hour_values, hour_bin = np.zeros(1), np.zeros(len(valid), dtype=np.int64)
    n_strata, n_bins = max(len(stratum_names), 1), len(hour_values)
    full_key = (group * n_strata + stratum) * n_bins + hour_bin
    order = np.argsort(full_key, kind="stable")
    members = np.asarray(valid, dtype=np.int64)[order]
    cell_full, cell_first, cell_of = np.unique(full_key[order], return_index=True, return_inverse=True)
    cell_start = np.append(cell_first, len(valid)).astype(np.int64)
    cell_group = cell_full // (n_strata * n_bins)
    cell_gs = cell_full // n_bins  # group * n_strata + stratum
    cell_bin = cell_full % n_bins
    seg_gs, seg_first = np.unique(cell_gs, return_index=True)
    seg_of_cell = np.searchsorted(seg_gs, cell_gs)
    seg_lo = seg_first.astype(np.int64)
    seg_hi = np.append(seg_first[1:], len(cell_full)).astype(np.int64)
    seg_group = seg_gs // n_strata
    group_seg_lo = np.searchsorted(seg_group, np.arange(n_groups), "left")
    group_seg_hi = np.searchsorted(seg_group, np.arange(n_groups), "right")
    group_cell_lo = np.searchsorted(cell_group, np.arange(n_groups), "left")
    group_cell_hi = np.searchsorted(cell_group, np.arange(n_groups), "right")

    # hours bins present per group (for the focal time of a step)
    gb = np.unique(cell_group * n_bins + cell_bin)
    gb_group = gb // n_bins
    group_bins_start = np.searchsorted(gb_group, np.arange(n_groups + 1))

    weight = np.asarray(group_weight, dtype=np.float64)
    prob = weight / weight.sum()
    n_leak = int(batch_size * leaky)
    return Composition(
        batch_size=batch_size, world_size=world_size, n_leak=n_leak, global_fraction=float(global_fraction),
        window=float(window), temporal=temporal, group_names=group_names, group_prob=prob,
        group_cum=np.cumsum(prob), group_last=int(np.flatnonzero(prob > 0)[-1]), stratum_names=stratum_names,
        members=members, cell_start=cell_start, cell_key=seg_of_cell.astype(np.int64) * n_bins + cell_bin,
        seg_lo=seg_lo, seg_hi=seg_hi, seg_stratum=(seg_gs % n_strata).astype(np.int64),
        group_seg_lo=group_seg_lo.astype(np.int64), group_seg_hi=group_seg_hi.astype(np.int64),
        group_lo=cell_start[group_cell_lo], group_hi=cell_start[group_cell_hi], hours=hour_values,
        group_bins_start=group_bins_start.astype(np.int64), group_bins=(gb % n_bins).astype(np.int64),
    )


def small_share_warnings(comp: Composition) -> list[str]:
    """Segments (group x stratum) smaller than their share of one rank's step: rows repeat in a step."""
    out = []
    n_primary = comp.batch_size - comp.n_leak
    for g in range(comp.n_groups):
        lo, hi = comp.group_seg_lo[g], comp.group_seg_hi[g]
        share = -(-n_primary // (hi - lo))
        sizes = comp.cell_start[comp.seg_hi[lo:hi]] - comp.cell_start[comp.seg_lo[lo:hi]]
        for s, size in zip(range(lo, hi), sizes):
            if size < share * comp.world_size:
                out.append(f"group '{comp.group_names[g]}' stratum '{comp.stratum_names[comp.seg_stratum[s]]}' "
                           f"({size} rows < {share} per rank x {comp.world_size} ranks)")
    return out


# ---------------------------------------------------------------------- one epoch
@dataclass(frozen=True)
class EpochDraws:
    """One rank's anchor rows for every step of an epoch, and what each step was drawn from."""

    rows: np.ndarray  # (n_steps, batch_size) int64, in slot order (strata blocks, then leak)
    group: np.ndarray  # (n_steps,) group code of each global step
    focal: np.ndarray | None  # (n_steps,) focal hours of each global step (temporal enrichment)


def _segments(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments of `lengths`: the segment of every element and its position inside it."""
    lengths = np.asarray(lengths, dtype=np.int64)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    offset = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return owner, offset


def compose_epoch(comp: Composition, seed: int, epoch: int, n_steps: int, rank: int) -> EpochDraws:
    """Every draw of one epoch (all global steps, all ranks), vectorised; returns `rank`'s rows.

    Per global step: one group for all ranks (by weight), and with temporal enrichment one focal
    time (uniform over the distinct hours post perturbation of the group). Per rank and step:
    `n_leak = int(B * leaky)` rows uniform over the rows of the other groups, the rest split equally
    over the group's strata (floor or ceil of n / k; which strata get the extra row rotates at random),
    and each stratum's share split into `floor(share * global_fraction)` rows away from the focal
    window and the rest inside it (all inside when nothing lies outside, all outside when nothing
    lies inside). Inside such a pool a row is picked uniformly, then the row handed out is the next
    one of its cell's queue (see the module docstring).
    """
    B, W = comp.batch_size, comp.world_size
    n_rows = n_steps * W  # one (step, rank) pair per "batch row"
    # --- per global step: group and focal window
    if comp.n_groups > 1:
        u = epoch_generator(seed, epoch, GROUP).random(n_steps)
        g_step = np.minimum(np.searchsorted(comp.group_cum, u * comp.group_cum[-1], "right"), comp.group_last)
    else:
        g_step = np.zeros(n_steps, dtype=np.int64)
    focal = None
    if comp.temporal:
        u = epoch_generator(seed, epoch, FOCAL).random(n_steps)
        n_bins_g = comp.group_bins_start[g_step + 1] - comp.group_bins_start[g_step]
        focal_bin = comp.group_bins[comp.group_bins_start[g_step] + np.minimum((u * n_bins_g).astype(np.int64),
                                                                                 n_bins_g - 1)]
        focal = comp.hours[focal_bin]
        bin_lo = np.searchsorted(comp.hours, focal - comp.window, "left")
        bin_hi = np.searchsorted(comp.hours, focal + comp.window, "right")

    # --- per batch row and stratum: shares
    row_step = np.repeat(np.arange(n_steps, dtype=np.int64), W)
    g_row = g_step[row_step]
    k_row = comp.group_seg_hi[g_row] - comp.group_seg_lo[g_row]
    rotate = (epoch_generator(seed, epoch, OFFSET).random(n_rows) * k_row).astype(np.int64)
    e_row, j = _segments(k_row)
    k = k_row[e_row]
    seg = comp.group_seg_lo[g_row[e_row]] + j
    n_primary = B - comp.n_leak
    count = n_primary // k + (((j - rotate[e_row]) % k) < (n_primary % k))
    a0 = comp.cell_start[comp.seg_lo[seg]]
    a1 = comp.cell_start[comp.seg_hi[seg]]
    if comp.temporal:
        n_b = len(comp.hours)
        s_row = row_step[e_row]
        f0 = comp.cell_start[np.searchsorted(comp.cell_key, seg * n_b + bin_lo[s_row], "left")]
        f1 = comp.cell_start[np.searchsorted(comp.cell_key, seg * n_b + bin_hi[s_row], "left")]
        inside, outside = f1 - f0, (a1 - a0) - (f1 - f0)
        n_out = (count * comp.global_fraction).astype(np.int64)
        n_out = np.where(inside == 0, count, np.where(outside == 0, 0, n_out))
        n_in = count - n_out
    else:
        f0, f1, n_in, n_out = a0, a1, count, np.zeros_like(count)

    # --- blocks of draws: (row, order) -> n draws uniform over [lo, lo + span) with a gap skipped
    big = np.int64(comp.n_valid + 1)
    blk_row = np.concatenate([np.repeat(e_row, 2), np.arange(n_rows)])
    blk_order = np.concatenate([np.tile([0, 1], len(e_row)), np.full(n_rows, 2)])
    blk_n = np.concatenate([np.stack([n_in, n_out], 1).ravel(), np.full(n_rows, comp.n_leak)])
    blk_lo = np.concatenate([np.stack([f0, a0], 1).ravel(), np.zeros(n_rows, np.int64)])
    g_lo, g_hi = comp.group_lo[g_row], comp.group_hi[g_row]
    blk_span = np.concatenate([np.stack([f1 - f0, (a1 - a0) - (f1 - f0)], 1).ravel(),
                               np.full(n_rows, comp.n_valid) - (g_hi - g_lo)])
    blk_gap = np.concatenate([np.stack([np.full_like(f0, big), f0], 1).ravel(), g_lo])
    blk_gap_size = np.concatenate([np.stack([np.zeros_like(f0), f1 - f0], 1).ravel(), g_hi - g_lo])
    keep = blk_n > 0
    sort = np.argsort((blk_row * 3 + blk_order)[keep], kind="stable")
    sel = np.flatnonzero(keep)[sort]
    blk_n, blk_lo, blk_span, blk_gap, blk_gap_size = (a[sel] for a in (blk_n, blk_lo, blk_span, blk_gap, blk_gap_size))
    if (blk_span <= 0).any():  # cannot happen: a share is only drawn from a non-empty pool
        raise AssertionError("composition drew from an empty pool")
    block, _ = _segments(blk_n)
    n_draws = len(block)
    if n_draws != n_rows * B:
        raise AssertionError(f"composition made {n_draws} draws for {n_rows} batches of {B}")
    u = blk_lo[block] + (epoch_generator(seed, epoch, DRAW).random(n_draws) * blk_span[block]).astype(np.int64)
    u += (u >= blk_gap[block]) * blk_gap_size[block]

    # --- cell queues: the i-th draw of a cell takes position i of its (cyclic, reshuffled) queue
    cell = np.searchsorted(comp.cell_start, u, "right") - 1
    n_cells = len(comp.cell_start) - 1
    by_cell = np.argsort(cell, kind="stable")
    taken = np.bincount(cell, minlength=n_cells)
    pos = np.empty(n_draws, dtype=np.int64)
    pos[by_cell] = np.arange(n_draws) - np.repeat(np.cumsum(taken) - taken, taken)
    size = np.diff(comp.cell_start)
    cycles = -(-taken // size)
    # one random permutation of the cell per cycle it needs, all at once
    seg_cell = np.repeat(np.arange(n_cells), cycles)
    seg_len = size[seg_cell]
    piece, offset = _segments(seg_len)
    material = comp.cell_start[seg_cell][piece] + offset  # member positions, cycle after cycle
    shuffle = epoch_generator(seed, epoch, CYCLE).permutation(len(material))
    piece_dtype = np.uint16 if len(seg_len) < 1 << 16 else np.int64
    material = material[shuffle[np.argsort(piece[shuffle].astype(piece_dtype), kind="stable")]]
    cell_material = np.cumsum(size * cycles) - size * cycles

    # --- this rank's rows only
    mine = (np.arange(n_steps)[:, None] * W + rank) * B + np.arange(B)[None, :]
    mine = mine.ravel()
    rows = comp.members[material[cell_material[cell[mine]] + pos[mine]]]
    return EpochDraws(rows=rows.reshape(n_steps, B), group=g_step, focal=focal)


def describe(comp: Composition) -> dict[str, Any]:
    """Sizes for logs: groups with their probabilities, strata, cells."""
    return dict(
        groups={n: float(p) for n, p in zip(comp.group_names, comp.group_prob)},
        strata=list(comp.stratum_names), cells=len(comp.cell_start) - 1, n_leak=comp.n_leak,
        temporal=comp.temporal,
    )
