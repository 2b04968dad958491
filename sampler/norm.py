"""Per-FOV normalization statistics (the reference's `normalization` attributes) as arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

LEVELS = ("dataset_statistics", "fov_statistics", "timepoint_statistics")


def fov_norm_table(
    attrs: dict[str, Any],
    zarr_names: list[str | None],
    n_t: int,
    level: str | None,
    subtrahend: str,
    divisor: str,
) -> np.ndarray:
    """(T, len(zarr_names), 2) float64 of (subtrahend, divisor); NaN where a statistic is missing.

    `level=None` means no normalization statistics: (0, 1) everywhere. A `None` channel name (a
    label this FOV lacks) gets NaN.
    """
    table = np.full((n_t, len(zarr_names), 2), np.nan)
    if level is None:
        table[...] = (0.0, 1.0)
        return table
    if level not in LEVELS:
        raise ValueError(f"unknown normalization level {level!r}; use one of {LEVELS}")
    norm = attrs.get("normalization") or {}
    for c, name in enumerate(zarr_names):
        if name is None:
            continue
        stats = (norm.get(name) or {}).get(level)
        if not stats:
            continue
        if level == "timepoint_statistics":
            for key, per_t in stats.items():
                t = int(key)
                if 0 <= t < n_t:
                    table[t, c] = (_get(per_t, subtrahend), _get(per_t, divisor))
        else:
            table[:, c] = (_get(stats, subtrahend), _get(stats, divisor))
    return table


def _get(stats: dict[str, Any], name: str) -> float:
    value = stats.get(name)
    return np.nan if value is None else float(value)
