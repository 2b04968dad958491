"""PNG figures of the command line: pairs montage, loss curve, lineage trees, benchmark bars.

Matplotlib's object API on the Agg canvas (no pyplot, no global backend change). Every figure has a
fixed size in pixels (`figsize * DPI`, no tight bounding box), and `save_png` writes atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sampler.atomic import PNG, atomic_output

DPI = 100
PANEL_IN = 1.15  #: one patch panel of the pairs montage, inches
LABEL_IN = 2.5  #: the text column of the pairs montage
TITLE_IN = 0.75  #: title and column heads of the pairs montage
DIVISION_COLOR = "#d62728"
LOSS_SIZE_IN = (6.4, 4.0)
TREE_SIZE_IN = (10.0, 6.0)
BENCH_SIZE_IN = (7.2, 3.2)


def save_png(fig: Figure, path: str | os.PathLike[str], overwrite: bool = True) -> str:
    """Write `fig` as a PNG at `path` atomically (temporary file beside it, then renamed).

    `overwrite` replaces an existing PNG only; anything else at `path` is refused (FileExistsError).
    """
    path = os.fspath(path)
    with atomic_output(path, overwrite, kind=PNG) as tmp, open(tmp, "wb") as f:
        FigureCanvasAgg(fig)
        fig.savefig(f, format="png", dpi=DPI)
    return path


def _pixels(size_in: tuple[float, float]) -> tuple[int, int]:
    return round(size_in[0] * DPI), round(size_in[1] * DPI)


# ---------------------------------------------------------------------- pairs
@dataclass(frozen=True)
class PairLabel:
    """What the montage writes beside one anchor/positive pair."""

    experiment: str
    fov_name: str
    lineage: str  # the root track of the lineage (the lineage_id's last part)
    anchor_track: int
    positive_track: int
    t_anchor: int
    t_positive: int
    tau_hours: float | None = None
    perturbation: str | None = None

    @property
    def division(self) -> bool:
        """The positive is another track of the lineage: the pair crosses a division."""
        return self.anchor_track != self.positive_track


def pair_labels(anchor: Mapping[str, np.ndarray], positive: Mapping[str, np.ndarray]) -> list[PairLabel]:
    """Labels from the anchor and positive meta columns (experiment, fov_name, track_id, lineage_id, t, ...)."""
    hours_a, hours_p = anchor.get("hours_post_perturbation"), positive.get("hours_post_perturbation")
    perturbation = anchor.get("perturbation")
    out = []
    for i in range(len(anchor["t"])):
        out.append(PairLabel(
            experiment=str(anchor["experiment"][i]), fov_name=str(anchor["fov_name"][i]),
            lineage=str(anchor["lineage_id"][i]).rsplit("_", 1)[-1],
            anchor_track=int(anchor["track_id"][i]), positive_track=int(positive["track_id"][i]),
            t_anchor=int(anchor["t"][i]), t_positive=int(positive["t"][i]),
            tau_hours=None if hours_a is None else float(hours_p[i]) - float(hours_a[i]),
            perturbation=None if perturbation is None else str(perturbation[i]),
        ))
    return out


def montage_size(n_pairs: int, n_channels: int) -> tuple[int, int]:
    """(width, height) in pixels of `pairs_figure` for n pairs of n-channel patches."""
    return _pixels((LABEL_IN + 2 * n_channels * PANEL_IN, TITLE_IN + n_pairs * PANEL_IN))


def pairs_figure(
    anchor: np.ndarray, positive: np.ndarray, labels: Sequence[PairLabel], channel_names: Sequence[str], title: str
) -> Figure:
    """A montage: one row per pair, anchor and positive side by side for each channel.

    `anchor`, `positive`: (N, C, Y, X) float arrays (normalized or not; each row and channel is
    displayed between its 1st and 99.5th percentile, shared by anchor and positive). Pairs that
    cross a division (positive on another track of the lineage) get a red frame and a red note.
    """
    n, c = anchor.shape[:2]
    if positive.shape != anchor.shape or len(labels) != n or len(channel_names) != c:
        raise ValueError(f"pairs_figure: shapes {anchor.shape}/{positive.shape}, {len(labels)} labels, "
                         f"{len(channel_names)} channel names do not agree")
    width_in, height_in = LABEL_IN + 2 * c * PANEL_IN, TITLE_IN + n * PANEL_IN
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    fig.suptitle(title, fontsize=9, y=1 - 0.12 / height_in, va="top")
    top = 1 - TITLE_IN / height_in
    grid = fig.add_gridspec(
        n, 1 + 2 * c, left=0.01, right=0.995, bottom=0.005, top=top, wspace=0.04, hspace=0.06,
        width_ratios=[LABEL_IN / PANEL_IN] + [1.0] * (2 * c),
    )
    for i, label in enumerate(labels):
        tau = label.t_positive - label.t_anchor
        text_ax = fig.add_subplot(grid[i, 0])
        text_ax.axis("off")
        lines = [
            f"{label.experiment}  {label.fov_name}" + (f"  ({label.perturbation})" if label.perturbation else ""),
            f"lineage {label.lineage}: track {label.anchor_track}"
            + (f" \u2192 {label.positive_track}" if label.division else ""),
            f"t {label.t_anchor} \u2192 {label.t_positive}  (tau {tau} frame{'' if tau == 1 else 's'}"
            + (f", {label.tau_hours:.3g} h)" if label.tau_hours is not None else ")"),
        ]
        text_ax.text(0.0, 0.62, "\n".join(lines), fontsize=7.5, va="center", ha="left", transform=text_ax.transAxes,
                     family="monospace")
        if label.division:
            text_ax.text(0.0, 0.12, "\u2716 crosses a division", fontsize=7.5, color=DIVISION_COLOR,
                         fontweight="bold", va="center", transform=text_ax.transAxes)
        for ch in range(c):
            both = np.concatenate([np.ravel(anchor[i, ch]), np.ravel(positive[i, ch])])
            finite = both[np.isfinite(both)]
            lo, hi = (np.percentile(finite, [1.0, 99.5]) if finite.size else (0.0, 1.0))
            if hi <= lo:
                hi = lo + 1.0
            for k, (role, data) in enumerate((("anchor", anchor), ("positive", positive))):
                ax = fig.add_subplot(grid[i, 1 + 2 * ch + k])
                ax.imshow(data[i, ch], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                yy, xx = data.shape[-2] / 2 - 0.5, data.shape[-1] / 2 - 0.5
                ax.plot([xx], [yy], marker="+", color="#1f77b4", markersize=5, markeredgewidth=0.8)
                if i == 0:
                    ax.set_title(f"{role}\n{channel_names[ch]}", fontsize=7.5, pad=3)
                if role == "positive" and label.division:
                    for spine in ax.spines.values():
                        spine.set_edgecolor(DIVISION_COLOR)
                        spine.set_linewidth(2.5)
    return fig


# ---------------------------------------------------------------------- loss
def loss_size() -> tuple[int, int]:
    return _pixels(LOSS_SIZE_IN)


def loss_figure(losses: Sequence[float], title: str, window: int = 10) -> Figure:
    """The training loss per step and its moving average."""
    losses = np.asarray(losses, dtype=np.float64)
    fig = Figure(figsize=LOSS_SIZE_IN, dpi=DPI)
    ax = fig.add_axes((0.11, 0.13, 0.85, 0.76))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="#9ecae1", linewidth=0.8, label="loss per step")
    if len(losses) >= window:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="#08519c", linewidth=1.8, label=f"mean of {window} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("NT-Xent loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return fig


# ---------------------------------------------------------------------- lineage trees
def tree_size() -> tuple[int, int]:
    return _pixels(TREE_SIZE_IN)


def _leaf_layout(tracks: list[int], parent: Mapping[int, int], first_t: Mapping[int, int]) -> dict[int, float]:
    """Y positions: leaves in depth-first order, a mother at the mean of its daughters."""
    children: dict[int, list[int]] = {tid: [] for tid in tracks}
    roots = []
    for tid in tracks:
        p = parent.get(tid, -1)
        if p in children and p != tid:
            children[p].append(tid)
        else:
            roots.append(tid)
    order_key = lambda tid: (first_t[tid], tid)  # noqa: E731
    y: dict[int, float] = {}
    next_leaf = 0.0
    for root in sorted(roots, key=order_key):
        stack: list[tuple[int, bool]] = [(root, False)]
        while stack:
            tid, done = stack.pop()
            kids = sorted(children[tid], key=order_key)
            if done or not kids:
                if kids:
                    y[tid] = float(np.mean([y[k] for k in kids]))
                else:
                    y[tid] = next_leaf
                    next_leaf += 1.0
                continue
            if tid in y:  # a cycle cannot happen here (the index refused it), but never loop
                continue
            stack.append((tid, True))
            stack.extend((k, False) for k in reversed(kids))
        next_leaf += 0.6  # a gap between lineages
    return y


def lineage_figure(
    track_id: np.ndarray, t: np.ndarray, parent_track_id: np.ndarray, kept: np.ndarray, title: str
) -> Figure:
    """Lineage trees of one FOV: time on x, one line per track, divisions as branches.

    Arguments are the rows of the FOV's tracks CSV; `kept` marks the rows the index keeps (others
    were dropped at the border or outside the image and are drawn as grey crosses).
    """
    track_id, t = np.asarray(track_id, dtype=np.int64), np.asarray(t, dtype=np.int64)
    parent_track_id, kept = np.asarray(parent_track_id, dtype=np.int64), np.asarray(kept, dtype=bool)
    tracks = sorted(set(track_id.tolist()))
    first_t = {tid: int(t[track_id == tid].min()) for tid in tracks}
    last_t = {tid: int(t[track_id == tid].max()) for tid in tracks}
    parent = {}
    for tid in tracks:
        p = int(parent_track_id[track_id == tid][0])
        parent[tid] = p if p in first_t else -1
    y = _leaf_layout(tracks, parent, first_t)
    root_of = {}
    for tid in tracks:
        r, seen = tid, set()
        while parent[r] >= 0 and r not in seen:
            seen.add(r)
            r = parent[r]
        root_of[tid] = r
    roots = sorted(set(root_of.values()), key=lambda r: (first_t[r], r))
    colors = {r: f"C{i % 10}" for i, r in enumerate(roots)}

    fig = Figure(figsize=TREE_SIZE_IN, dpi=DPI)
    ax = fig.add_axes((0.06, 0.15, 0.92, 0.77))
    divisions = 0
    for tid in tracks:
        color = colors[root_of[tid]]
        ax.plot([first_t[tid], last_t[tid]], [y[tid], y[tid]], color=color, linewidth=1.6, solid_capstyle="round")
        p = parent[tid]
        if p >= 0:
            ax.plot([last_t[p], first_t[tid]], [y[p], y[tid]], color=color, linewidth=1.0, alpha=0.8)
    for p in set(v for v in parent.values() if v >= 0):
        divisions += sum(1 for v in parent.values() if v == p) >= 2
        ax.plot([last_t[p]], [y[p]], marker="o", color=colors[root_of[p]], markersize=4)
    yk = np.array([y[v] for v in track_id.tolist()])
    ax.scatter(t[kept], yk[kept], s=6, c="k", alpha=0.35, linewidths=0, label="observation kept by the index")
    if (~kept).any():
        ax.scatter(t[~kept], yk[~kept], s=14, c="0.55", marker="x", linewidths=0.8,
                   label="dropped (border / outside image)")
    if len(tracks) <= 80:
        for tid in tracks:
            ax.text(first_t[tid] - 0.15, y[tid], str(tid), fontsize=6, ha="right", va="center")
    ax.set_xlabel("t (frame)")
    ax.set_yticks([])
    ax.set_xlim(min(first_t.values(), default=0) - 1, max(last_t.values(), default=1) + 0.5)
    ax.set_title(f"{title}: {len(tracks)} tracks, {len(roots)} lineages, {divisions} divisions", fontsize=9)
    ax.invert_yaxis()
    fig.legend(loc="lower right", ncol=2, fontsize=7.5, frameon=False)
    return fig


# ---------------------------------------------------------------------- benchmark
def bench_size() -> tuple[int, int]:
    return _pixels(BENCH_SIZE_IN)


def bench_figure(names: Sequence[str], pairs_per_s: Sequence[float], title: str) -> Figure:
    """Horizontal bars of pairs/s per loader path."""
    fig = Figure(figsize=BENCH_SIZE_IN, dpi=DPI)
    ax = fig.add_axes((0.22, 0.17, 0.72, 0.68))
    pos = np.arange(len(names))[::-1]
    bars = ax.barh(pos, pairs_per_s, color=[f"C{i}" for i in range(len(names))])
    ax.set_yticks(pos, list(names), fontsize=8)
    ax.set_xlabel("pairs / s (higher is better)")
    ax.set_title(title, fontsize=9)
    top = max(pairs_per_s, default=1.0) or 1.0
    ax.set_xlim(0, top * 1.22)
    for bar, value in zip(bars, pairs_per_s):
        ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2, f"{value:,.0f}",
                va="center", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig
