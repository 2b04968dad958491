"""BatchPlan: everything a step needs to read and normalise, decided before any pixel is read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sampler.index import CHANNEL, EXP, FOV, T, X_CLAMP, Y_CLAMP, LineageIndex
from sampler.positives import positives_of


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
    return _boxes(index, index.hot_rows(np.asarray(rows, dtype=np.int64)))


def _boxes(index: LineageIndex, hot: np.ndarray) -> ReadBoxes:
    hy, hx = index.config.patch_yx[0] // 2, index.config.patch_yx[1] // 2
    exp = hot[:, EXP]
    if index.config.channel_mode == "bag":
        channels = hot[:, CHANNEL, None].copy()
    else:
        channels = index.exp_channels[exp]
    return ReadBoxes(
        fov=hot[:, FOV].copy(), t=hot[:, T].copy(), z=index.exp_z_start[exp],
        y=hot[:, Y_CLAMP] - hy, x=hot[:, X_CLAMP] - hx, channels=channels,
    )


def make_plan(
    index: LineageIndex, anchor_rows: np.ndarray, rng: np.random.Generator | None, *, predict: bool = False
) -> BatchPlan:
    """The plan for anchor rows: positives drawn with `rng` (fit), or none at all (`predict=True`)."""
    rows = np.asarray(anchor_rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(index)):
        raise IndexError(f"anchor rows must lie in [0, {len(index)}), got {rows.min()}..{rows.max()}")
    hot = index.hot_rows(rows)
    anchor = dict(anchor_rows=rows, anchor_boxes=_boxes(index, hot), anchor_norm=index.hot_norm(hot))
    if predict:
        return BatchPlan(**anchor)
    if rng is None:
        raise ValueError("a training plan needs a generator (rng) to draw positives; pass predict=True for none")
    positive, tau = positives_of(index, rows, hot, rng)
    positive_hot = index.hot_rows(positive)
    return BatchPlan(
        **anchor,
        positive_rows=positive,
        positive_boxes=_boxes(index, positive_hot),
        positive_norm=index.hot_norm(positive_hot),
        tau=tau.astype(np.int32),
    )
