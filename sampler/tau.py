"""Tau (frame offset of the positive): weights over each experiment's range and vectorised draws."""

from __future__ import annotations

import numpy as np


def tau_weights(taus: np.ndarray, tau_min: np.ndarray, tau_max: np.ndarray, decay: float) -> np.ndarray:
    """Unnormalised weights exp(-decay * (tau - tau_min) / (tau_max - tau_min)); 1 when the range is one tau."""
    taus = np.asarray(taus, dtype=np.float64)
    lo = np.asarray(tau_min, dtype=np.float64)[:, None]
    width = np.asarray(tau_max, dtype=np.float64)[:, None] - lo
    scaled = np.divide(taus - lo, width, out=np.zeros_like(taus), where=width > 0)
    return np.exp(-decay * scaled)


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
    tau_min = np.asarray(tau_min, dtype=np.int64)
    tau_max = np.asarray(tau_max, dtype=np.int64)
    width = int((tau_max - tau_min).max(initial=0)) + 1
    taus = tau_min[:, None] + np.arange(width)[None, :]
    allowed = (taus <= tau_max[:, None]) & (taus != 0)
    if available is not None:
        allowed &= np.asarray(available, dtype=bool)[:, :width]
    weights = np.where(allowed, tau_weights(taus, tau_min, tau_max, decay), 0.0)
    total = weights.sum(axis=1)
    if (total <= 0).any():
        row = int(np.flatnonzero(total <= 0)[0])
        raise ValueError(
            f"no tau to draw for row {row}: range [{tau_min[row]}, {tau_max[row]}] without 0 "
            "has no tau with a candidate"
        )
    cum = np.cumsum(weights, axis=1)
    u = rng.random(len(tau_min)) * total
    k = np.minimum((cum <= u[:, None]).sum(axis=1), width - 1)
    # guard against float round-off landing on a zero-weight tau at the end of the row
    k = np.where(allowed[np.arange(len(k)), k], k, np.argmax(np.where(allowed, cum, -1), axis=1))
    return taus[np.arange(len(k)), k]
