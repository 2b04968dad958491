"""Tau (frame offset of the positive): weights over each experiment's range and vectorised draws."""

from __future__ import annotations

import functools

import numpy as np


class NoTauError(ValueError):
    """Rows without any tau to draw (every weight zero); `rows` holds their positions."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows
        super().__init__(f"no tau to draw for rows {rows[:10].tolist()}: no tau != 0 in range has a candidate")


def tau_weight_table(tau_min: np.ndarray, tau_max: np.ndarray, decay: float) -> np.ndarray:
    """(n, K) weights exp(-decay * (tau - tau_min) / (tau_max - tau_min)), column k for tau_min + k.

    Zero beyond tau_max and at tau = 0 (never drawn); 1 for a range of one tau. Not normalised.
    """
    tau_min = np.asarray(tau_min, dtype=np.int64)
    tau_max = np.asarray(tau_max, dtype=np.int64)
    width = np.maximum(tau_max - tau_min, 1).astype(np.float64)[:, None]
    offsets = np.arange(int((tau_max - tau_min).max(initial=0)) + 1)
    taus = tau_min[:, None] + offsets
    weights = np.exp(-decay * offsets / width)
    return weights * ((taus <= tau_max[:, None]) & (taus != 0))


@functools.lru_cache(maxsize=8)
def _upper_ones(k: int) -> np.ndarray:
    """(k, k) upper-triangular ones: `w @ it` is the row-wise cumulative sum of w (fast for small k)."""
    return np.triu(np.ones((k, k)))


def draw_tau_column(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per row, a column k drawn with probability weights[k] / sum(weights) (the weights renormalised).

    Raises NoTauError for rows whose weights are all zero.
    """
    cum = weights @ _upper_ones(weights.shape[1])
    total = cum[:, -1]
    if not (total > 0).all():
        raise NoTauError(np.flatnonzero(~(total > 0)))
    # u < total strictly (the factor absorbs rounding), so the first column whose cumulative weight
    # exceeds u exists and has weight > 0
    u = rng.random(len(total)) * (total * (1.0 - 2.0**-52))
    return np.argmax(cum > u[:, None], axis=1)


def sample_tau(
    tau_min: np.ndarray,
    tau_max: np.ndarray,
    decay: float,
    rng: np.random.Generator,
    available: np.ndarray | None = None,
) -> np.ndarray:
    """One tau per row, drawn with the decaying weights over [tau_min, tau_max] (int64, shape (B,)).

    tau = 0 is never drawn; `available` (B, K), column k standing for tau_min + k, removes the taus
    without a candidate; the remaining weights are renormalised. A row with nothing left is an error.
    """
    weights = tau_weight_table(tau_min, tau_max, decay)
    if available is not None:
        weights = weights * available[:, : weights.shape[1]]
    return np.asarray(tau_min, dtype=np.int64) + draw_tau_column(weights, rng)
