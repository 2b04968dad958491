"""Positives: for each anchor, a tau and an observation of its lineage at t + tau, whole batch at once."""

from __future__ import annotations

import numpy as np

from sampler.index import EXP, GROUP, T, LineageIndex
from sampler.tau import NoTauError, draw_tau_column


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
    if len(rows) and (rows.min() < 0 or rows.max() >= len(index)):
        raise IndexError(f"anchor rows must lie in [0, {len(index)}), got {rows.min()}..{rows.max()}")
    return positives_of(index, rows, index.hot_rows(rows), rng)


def positives_of(
    index: LineageIndex, rows: np.ndarray, hot: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`draw_positives` for rows whose hot fields (`index.hot_rows(rows)`) are already gathered."""
    n = len(rows)
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    exp = hot[:, EXP]
    tau_min = index.exp_tau_min[exp]
    weights = index.tau_table[exp]
    taus = tau_min[:, None] + np.arange(weights.shape[1])
    start, stop = index.rows_at(hot[:, GROUP, None], hot[:, T, None] + taus)
    counts = stop - start
    if index.config.positive_policy == "ancestry":
        counts, nth = _related_candidates(index, rows, start, counts)
    else:
        nth = None  # every row of the slot is a candidate: rows start .. stop-1
    try:
        k = draw_tau_column(weights * (counts > 0), rng)
    except NoTauError as err:
        raise ValueError(
            f"anchor rows {rows[err.rows][:10].tolist()} have no positive under policy "
            f"'{index.config.positive_policy}': draw anchors from index.valid"
        ) from None
    b = np.arange(n)
    pick = (rng.random(n) * counts[b, k]).astype(np.int64)
    positive = start[b, k] + pick if nth is None else nth(k, pick)
    return positive, tau_min + k


def _related_candidates(index: LineageIndex, rows: np.ndarray, start: np.ndarray, lengths: np.ndarray):
    """Counts (B, K) of ancestry-related candidates and a function (k, j) -> the j-th of them."""
    n, width = lengths.shape
    flat = lengths.ravel()
    pair = np.repeat(np.arange(n * width), flat)
    offsets = np.cumsum(flat) - flat
    cand = start.ravel()[pair] + (np.arange(len(pair)) - offsets[pair])
    anchor_of = pair // width
    keep = index.related(rows[anchor_of], cand)
    counts = np.bincount(pair[keep], minlength=n * width).reshape(n, width)

    def nth(k: np.ndarray, j: np.ndarray) -> np.ndarray:
        where = np.flatnonzero(keep & (pair % width == k[anchor_of]))
        first = np.searchsorted(anchor_of[where], np.arange(n))
        return cand[where[first + j]]

    return counts, nth
