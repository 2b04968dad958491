"""BatchPlan: everything a step needs to read and normalise, decided before any pixel is read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sampler.index import LineageIndex
from sampler.positives import draw_positives


@dataclass(frozen=True, eq=False)
class ReadBoxes:
    """Where each patch lives: FOV code (row of `index.fovs`), t, box start and channel indices.

    The box size is `index.read_shape` for every sample; `channels` (B, C) are zarr channel
    indices in canonical order.
    """

    fov: np.ndarray  # int32 (B,)
    t: np.ndarray  # int32 (B,)
    z: np.ndarray  # int32 (B,) first slice
    y: np.ndarray  # int32 (B,) first row
    x: np.ndarray  # int32 (B,) first column
    channels: np.ndarray  # int32 (B, C)

    def __len__(self) -> int:
        return len(self.fov)


@dataclass(frozen=True, eq=False)
class BatchPlan:
    """One step: anchors (and, for training, positives), their read boxes and (B, C, 2) normalization.

    Predict plans have `positive_rows is None`. `ids` are int64 row numbers of the index: column 0
    the anchors, column 1 the positives (fit only). `labels` holds integer class codes (B,) of the
    anchors for auxiliary heads, when the sampler was asked for label columns.
    """

    anchor_rows: np.ndarray
    anchor_boxes: ReadBoxes
    anchor_norm: np.ndarray  # float32 (B, C, 2): subtrahend, divisor
    positive_rows: np.ndarray | None = None
    positive_boxes: ReadBoxes | None = None
    positive_norm: np.ndarray | None = None
    tau: np.ndarray | None = None
    labels: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.anchor_rows)

    @property
    def fit(self) -> bool:
        return self.positive_rows is not None

    @property
    def ids(self) -> np.ndarray:
        cols = [self.anchor_rows] if self.positive_rows is None else [self.anchor_rows, self.positive_rows]
        return np.stack(cols, axis=1).astype(np.int64)


def read_boxes(index: LineageIndex, rows: np.ndarray) -> ReadBoxes:
    """Read boxes of index rows (patch centred on the border-clamped position)."""
    hy, hx = index.config.patch_yx[0] // 2, index.config.patch_yx[1] // 2
    return ReadBoxes(
        fov=index.column("fov")[rows].astype(np.int32),
        t=index.column("t")[rows].astype(np.int32),
        z=index.box_z_start(rows),
        y=(index.column("y_clamp")[rows] - hy).astype(np.int32),
        x=(index.column("x_clamp")[rows] - hx).astype(np.int32),
        channels=index.channel_indices(rows).astype(np.int32),
    )


def make_plan(
    index: LineageIndex, anchor_rows: np.ndarray, rng: np.random.Generator | None, *, predict: bool = False
) -> BatchPlan:
    """The plan for anchor rows: positives drawn with `rng` (fit), or none at all (`predict=True`)."""
    rows = np.asarray(anchor_rows, dtype=np.int64)
    anchor = dict(anchor_rows=rows, anchor_boxes=read_boxes(index, rows), anchor_norm=index.norm[rows])
    if predict:
        return BatchPlan(**anchor)
    if rng is None:
        raise ValueError("a training plan needs a generator (rng) to draw positives; pass predict=True for none")
    positive, tau = draw_positives(index, rows, rng)
    return BatchPlan(
        **anchor,
        positive_rows=positive,
        positive_boxes=read_boxes(index, positive),
        positive_norm=index.norm[positive],
        tau=tau.astype(np.int32),
    )
