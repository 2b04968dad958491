"""Per-sample metadata of a batch, from index rows: columns (arrays) or the reference's dicts."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from sampler import LineageIndex

META_COLUMNS = ("experiment", "perturbation", "fov_name", "track_id", "global_track_id", "lineage_id", "t",
                "hours_post_perturbation")
INDEX_COLUMNS = ("fov_name", "well", "track_id", "t", "id", "parent_track_id", "parent_id", "z", "y", "x",
                 "experiment", "lineage_id")


def row_meta(
    index: LineageIndex, rows: np.ndarray, columns: tuple[str, ...], form: Literal["columns", "dicts"]
) -> dict[str, np.ndarray] | list[dict[str, Any]]:
    """The columns of `index.tracks` at `rows` (plus `marker` in bag mode), O(len(rows)).

    "columns": {column: array (B,)}; "dicts": one dict per row, as the reference's batches.
    """
    if "marker" in index.tracks:
        columns = (*columns, "marker")
    values = {c: index.values(c, rows) for c in columns}
    if form == "columns":
        return values
    if form != "dicts":
        raise ValueError(f"meta must be 'columns' or 'dicts', got {form!r}")
    lists = [values[c].tolist() for c in columns]
    return [dict(zip(columns, vals)) for vals in zip(*lists)]


def reference_norm_meta(index: LineageIndex, norm: np.ndarray | torch.Tensor) -> list[dict[str, dict[str, dict[str, torch.Tensor]]]]:
    """The reference's per-sample `*_norm_meta`: [{channel_key: {level: {stat: tensor}}}].

    Keys are the canonical labels, or "channel_0" in bag-of-channels mode; the level holds the
    index's subtrahend and divisor statistics, already resolved for the sample's t.
    """
    config = index.config
    keys = ["channel_0"] if config.channel_mode == "bag" else list(index.labels)
    level = config.norm_level or "none"
    values = torch.as_tensor(np.ascontiguousarray(norm)) if isinstance(norm, np.ndarray) else norm
    return [
        {key: {level: {config.norm_subtrahend: values[i, c, 0], config.norm_divisor: values[i, c, 1]}}
         for c, key in enumerate(keys)}
        for i in range(len(values))
    ]
