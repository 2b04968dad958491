"""Per-channel Z reduction, as the reference's BatchedChannelWiseZReductiond: label-free channels
(phase, brightfield, retardance, DIC, ...) keep their centre slice, fluorescence is max-projected.

A max projection of a phase image mixes defocused planes; a centre slice of a sparse fluorescence
stack misses most signal: the reduction is chosen per channel label, so in bag-of-channels mode
per sample. `CenterSlices` turns that choice into a (B, C, 1, 1, 1) float mask the graph reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sampler import LineageIndex

#: label names the reference treats as label-free (its parse_channel_name rule), case-insensitive
LABEL_FREE = re.compile(r"phase|brightfield|retardance|dic|phc|\bbf\b|\bpol", re.IGNORECASE)
MODES = ("max", "center")


def is_label_free(label: str) -> bool:
    """Whether a channel label names a label-free modality (centre slice under "channelwise")."""
    return LABEL_FREE.search(str(label)) is not None


def modes_by_label(labels: list[str], z_reduction: str | Mapping[str, str]) -> dict[str, str]:
    """{label: "max" | "center"} for "channelwise" (the label-free rule) or an explicit mapping."""
    if z_reduction == "channelwise":
        return {label: "center" if is_label_free(label) else "max" for label in labels}
    if not isinstance(z_reduction, Mapping):
        raise ValueError(f"z_reduction must be None, 'max', 'center', 'channelwise' or {{label: mode}}, "
                         f"got {z_reduction!r}")
    missing = [label for label in labels if label not in z_reduction]
    unknown = [key for key in z_reduction if key not in labels]
    bad = {key: mode for key, mode in z_reduction.items() if mode not in MODES}
    if missing or unknown or bad:
        raise ValueError(
            f"z_reduction mapping must give 'max' or 'center' for every channel label {labels}: "
            + "; ".join(part for part in (f"missing {missing}" if missing else "",
                                          f"unknown labels {unknown}" if unknown else "",
                                          f"invalid modes {bad}" if bad else "") if part)
        )
    return dict(z_reduction)


@dataclass(frozen=True)
class CenterSlices:
    """1.0 where a (sample, channel) takes the centre slice, 0.0 where it takes the max projection.

    All-channels mode: one value per canonical channel. Bag-of-channels mode: one value per index
    row (its channel label). Picklable, O(batch) per call.
    """

    per_channel: np.ndarray | None = None  # (C,) float32
    per_row: np.ndarray | None = None  # (rows,) float32

    @classmethod
    def build(cls, index: LineageIndex, z_reduction: str | Mapping[str, str]) -> CenterSlices:
        modes = modes_by_label(list(index.labels), z_reduction)
        if index.config.channel_mode == "all":
            return cls(per_channel=np.array([modes[label] == "center" for label in index.labels], np.float32))
        marker = index.tracks["marker"].cat
        by_code = np.array([modes[label] == "center" for label in marker.categories], dtype=np.float32)
        return cls(per_row=by_code[marker.codes.to_numpy()])

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if self.per_channel is not None:
            mask = np.broadcast_to(self.per_channel, (len(rows), len(self.per_channel)))
        else:
            mask = self.per_row[rows][:, None]
        return np.ascontiguousarray(mask, dtype=np.float32).reshape(len(rows), -1, 1, 1, 1)
