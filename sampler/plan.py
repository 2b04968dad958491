"""BatchPlan: everything a step needs to read and normalise, decided before any pixel is read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sampler.augment import AugmentConfig, draw_augment
from sampler.index import CHANNEL, EXP, FOV, T, X_CLAMP, Y_CLAMP, LineageIndex
from sampler.positives import positives_of


@dataclass(frozen=True, eq=False)
class ReadBoxes:
    """Where each patch lives: FOV code (row of `index.fovs`), t, box start and channel indices.

    The box size is that of the sample's experiment (`index.exp_box`, which is `index.read_shape`
    unless pixel sizes differ); `channels` (B, C) are zarr channel indices in canonical order.
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
    anchors for auxiliary heads, when the sampler was asked for label columns. `anchor_aug` and
    `positive_aug` hold per-sample augmentation parameters (`sampler.augment.PARAMS`) when the plan
    was made with an augmentation config.
    """

    anchor_rows: np.ndarray
    anchor_boxes: ReadBoxes
    anchor_norm: np.ndarray  # float32 (B, C, 2): subtrahend, divisor
    positive_rows: np.ndarray | None = None
    positive_boxes: ReadBoxes | None = None
    positive_norm: np.ndarray | None = None
    tau: np.ndarray | None = None
    labels: dict[str, np.ndarray] | None = None
    anchor_aug: dict[str, np.ndarray] | None = None
    positive_aug: dict[str, np.ndarray] | None = None

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
    exp = hot[:, EXP]
    half = index.exp_box[exp] // 2
    if index.config.channel_mode == "bag":
        channels = hot[:, CHANNEL, None].copy()
    else:
        channels = index.exp_channels[exp]
    return ReadBoxes(
        fov=hot[:, FOV].copy(), t=hot[:, T].copy(), z=index.exp_z_start[exp],
        y=hot[:, Y_CLAMP] - half[:, 1], x=hot[:, X_CLAMP] - half[:, 2], channels=channels,
    )


def make_plan(
    index: LineageIndex,
    anchor_rows: np.ndarray,
    rng: np.random.Generator | None,
    augment: AugmentConfig | None = None,
    *,
    predict: bool = False,
) -> BatchPlan:
    """The plan for anchor rows: positives drawn with `rng` (fit), or none at all (`predict=True`).

    With `augment`, the augmentation parameters of anchors and positives are drawn from `rng` too,
    after the positives (so the positives do not depend on the augmentation config).
    """
    rows = np.asarray(anchor_rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(index)):
        raise IndexError(f"anchor rows must lie in [0, {len(index)}), got {rows.min()}..{rows.max()}")
    if rng is None and (not predict or augment is not None):
        raise ValueError("a training or augmented plan needs a generator (rng); pass predict=True for none")
    hot = index.hot_rows(rows)
    plan = dict(anchor_rows=rows, anchor_boxes=_boxes(index, hot), anchor_norm=index.hot_norm(hot))
    if not predict:
        positive, tau = positives_of(index, rows, hot, rng)
        positive_hot = index.hot_rows(positive)
        plan.update(positive_rows=positive, positive_boxes=_boxes(index, positive_hot),
                    positive_norm=index.hot_norm(positive_hot), tau=tau.astype(np.int32))
    if augment is not None:
        args = (len(rows), index.n_channels, index.read_shape, rng)
        plan["anchor_aug"] = draw_augment(augment, *args)
        if not predict:
            plan["positive_aug"] = draw_augment(augment, *args)
    return BatchPlan(**plan)
