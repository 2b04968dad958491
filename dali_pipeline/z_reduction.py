"""Per-channel Z reduction, as the reference's BatchedChannelWiseZReductiond: label-free channels
(phase, brightfield, retardance, DIC, ...) keep their centre slice, fluorescence is max-projected.

A max projection of a phase image mixes defocused planes; a centre slice of a sparse fluorescence
stack misses most signal: the reduction is chosen per channel label. With all channels the
labels sit at fixed positions, so the graph reduces each channel statically (`channel_modes`);
in bag-of-channels mode the sample's label decides, and `CenterSlices` gives the graph one pick
per sample. Either way exactly one reduction is computed into each output value (no blend of
both, which would let a NaN in the unused one through).
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


def channel_modes(index: LineageIndex, z_reduction: str | Mapping[str, str]) -> tuple[str, ...]:
    """"max" or "center" for each canonical channel, in order (all-channels mode)."""
    modes = modes_by_label(list(index.labels), z_reduction)
    return tuple(modes[label] for label in index.labels)


@dataclass(frozen=True)
class CenterSlices:
    """Bag-of-channels mode: 1 where a sample's channel takes the centre slice, 0 for the max projection.

    One int32 per index row (its channel label), looked up O(batch) per call; picklable.
    """

    per_row: np.ndarray  # (rows,) int32

    @classmethod
    def build(cls, index: LineageIndex, z_reduction: str | Mapping[str, str]) -> CenterSlices:
        if index.config.channel_mode != "bag":
            raise ValueError("CenterSlices picks per sample in bag-of-channels mode; with all channels use "
                             "channel_modes (one static reduction per channel)")
        modes = modes_by_label(list(index.labels), z_reduction)
        marker = index.tracks["marker"].cat
        by_code = np.array([modes[label] == "center" for label in marker.categories], dtype=np.int32)
        return cls(per_row=by_code[marker.codes.to_numpy()])

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """(B,) int32: the pick of each sample (the graph slices [max, centre] at it)."""
        return np.ascontiguousarray(self.per_row[rows])
