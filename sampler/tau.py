"""Tau (frame offset of the positive): weights over each experiment's range and vectorised draws."""

from __future__ import annotations

import numpy as np


def tau_weights(taus: np.ndarray, tau_min: np.ndarray, tau_max: np.ndarray, decay: float) -> np.ndarray:
    """Unnormalised weights exp(-decay * (tau - tau_min) / (tau_max - tau_min)); 1 when the range is one tau."""
    lo = np.asarray(tau_min, dtype=np.float64)[:, None]
    width = np.maximum(np.asarray(tau_max, dtype=np.float64)[:, None] - lo, 1.0)
    return np.exp((lo - taus) * (decay / width))


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
    taus = tau_min[:, None] + np.arange(int((tau_max - tau_min).max(initial=0)) + 1)
    weights = tau_weights(taus, tau_min, tau_max, decay)
    weights *= (taus <= tau_max[:, None]) & (taus != 0)
    if available is not None:
        weights *= available[:, : taus.shape[1]]
    cum = np.cumsum(weights, axis=1)
    total = cum[:, -1]
    if not (total > 0).all():
        row = int(np.flatnonzero(~(total > 0))[0])
        raise ValueError(
            f"no tau to draw for row {row}: range [{tau_min[row]}, {tau_max[row]}] without 0 "
            "has no tau with a candidate"
        )
    # u < total strictly, so the first column whose cumulative weight exceeds u has weight > 0
    u = np.minimum(rng.random(len(total)) * total, np.nextafter(total, 0))
    return tau_min + (cum <= u[:, None]).sum(axis=1)
