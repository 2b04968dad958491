"""Positives: for each anchor, a tau and an observation of its lineage at t + tau, whole batch at once."""

from __future__ import annotations

import numpy as np

from sampler.index import LineageIndex
from sampler.tau import sample_tau


def draw_positives(
    index: LineageIndex, anchor_rows: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(positive rows, tau) for anchor rows of `index`, under the index's positive policy.

    Candidates at t + tau are the rows of the anchor's lineage group (same experiment, lineage and,
    in bag-of-channels mode, channel label); under "ancestry" only the anchor's own track, its
    ancestors and descendants. A tau is drawn among those with a candidate (weights renormalised),
    then one candidate uniformly.
    """
    rows = np.asarray(anchor_rows, dtype=np.int64)
    n = len(rows)
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if rows.min() < 0 or rows.max() >= len(index):
        raise IndexError(f"anchor rows must lie in [0, {len(index)}), got {rows.min()}..{rows.max()}")
    taus, allowed = index.tau_grid(rows)
    width = taus.shape[1]
    group = index.column("group")[rows]
    t = index.column("t")[rows].astype(np.int64)
    start, stop = index.rows_at(np.repeat(group, width), (t[:, None] + taus).ravel())
    lengths = np.where(allowed.ravel(), stop - start, 0)

    # every candidate of every (anchor, tau) pair, flattened
    pair = np.repeat(np.arange(n * width), lengths)
    offsets = np.cumsum(lengths) - lengths
    cand = start[pair] + (np.arange(len(pair)) - offsets[pair])
    anchor_of = pair // width
    if index.config.positive_policy == "ancestry":
        keep = index.related(rows[anchor_of], cand)
    else:
        keep = np.ones(len(cand), dtype=bool)
    counts = np.bincount(pair[keep], minlength=n * width).reshape(n, width)

    if (counts.sum(axis=1) == 0).any():
        bad = rows[counts.sum(axis=1) == 0]
        raise ValueError(
            f"anchor rows {bad[:10].tolist()} have no positive under policy "
            f"'{index.config.positive_policy}': draw anchors from index.valid"
        )
    exp = index.column("exp")[rows]
    tau = sample_tau(
        index.experiments.tau_min.to_numpy()[exp], index.experiments.tau_max.to_numpy()[exp],
        index.config.tau_decay, rng, available=counts > 0,
    )
    k = tau - taus[:, 0]
    pick = np.floor(rng.random(n) * counts[np.arange(n), k]).astype(np.int64)
    chosen = keep & (pair % width == k[anchor_of])
    where = np.flatnonzero(chosen)
    first = np.searchsorted(anchor_of[where], np.arange(n))
    return cand[where[first + pick]], tau
