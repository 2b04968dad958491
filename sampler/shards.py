"""FOV shards: each rank owns disjoint FOVs, balanced by the bytes of the image chunks they touch.

Under DDP a uniform epoch hands every rank anchors from every FOV, so every rank's chunk cache needs
the whole dataset's chunks. With FOV shards a rank draws anchors (and so positives, which stay in
the anchor's FOV) only from its own FOVs: the ranks' caches partition the working set instead of
each holding all of it.

`fov_chunk_bytes` measures each FOV's working set once (metadata only, no pixels): the bytes of
the distinct chunks the read boxes of its rows touch (every row of the FOV, since any row may be a
positive; FOVs without a valid anchor weigh 0), edge chunks clipped to the array as a chunk cache
stores them. `assign_fovs` splits the FOVs over the ranks: the FOVs sorted by weight (heaviest
first; equal weights: more anchors first) are taken in rounds of W, each round in a random order
from the generator, and each FOV goes to the rank with the fewest bytes so far (ties: the fewest
anchors so far, then the lowest rank). That is the classic longest-processing-time rule with the
order inside a round randomised, so a new generator gives a new assignment of about the same
balance; the heaviest rank exceeds the lightest by at most the heaviest FOV. The anchor tie-break
matters when FOVs weigh the same (small images whose every chunk is touched): it keeps the ranks'
anchor counts, and so the anchors left out of an epoch, small. Cost: O(F log F) and a loop over
the F FOVs, once per assignment (not per step).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from sampler.index import LineageIndex
from sampler.plan import read_boxes


def fov_chunk_bytes(index: LineageIndex, valid: np.ndarray) -> np.ndarray:
    """(F,) int64: bytes of the distinct chunks touched by the read boxes of each FOV's rows.

    Only FOVs holding at least one of the anchors `valid` count (the others weigh 0). Vectorised:
    one key per (box, channel, chunk), de-duplicated with one sort.
    """
    fovs = index.fovs
    n_fov = len(fovs)
    fov_of_row = index.column("fov").astype(np.int64)
    used = np.zeros(n_fov, dtype=bool)
    used[fov_of_row[np.asarray(valid, dtype=np.int64)]] = True
    rows = np.flatnonzero(used[fov_of_row])
    weights = np.zeros(n_fov, dtype=np.int64)
    if len(rows) == 0:
        return weights
    boxes = read_boxes(index, rows)
    exp = index.column("exp")[rows].astype(np.int64)
    grid = fovs[[f"chunk_{a}" for a in "tczyx"]].to_numpy().astype(np.int64)  # (F, 5)
    shape = fovs[["T", "C", "Z", "Y", "X"]].to_numpy().astype(np.int64)
    n_c = boxes.channels.shape[1]
    fov = np.repeat(boxes.fov.astype(np.int64), n_c)
    start = np.stack(np.broadcast_arrays(boxes.t[:, None], boxes.channels, boxes.z[:, None], boxes.y[:, None],
                                         boxes.x[:, None]), axis=-1).reshape(-1, 5).astype(np.int64)
    size = np.ones_like(start)
    size[:, 2:] = np.repeat(index.exp_box[exp].astype(np.int64), n_c, axis=0)
    g = grid[fov]
    first = start // g
    count = (start + size - 1) // g - first + 1
    total = np.prod(count, axis=1)
    owner = np.repeat(np.arange(len(first)), total)
    rest = np.arange(len(owner)) - np.repeat(np.cumsum(total) - total, total)
    chunk = np.empty((len(owner), 6), np.int64)
    chunk[:, 0] = fov[owner]
    for axis in range(4, -1, -1):
        k = count[owner, axis]
        chunk[:, axis + 1] = first[owner, axis] + rest % k
        rest //= k
    chunk = np.unique(chunk, axis=0)
    origin = chunk[:, 1:] * grid[chunk[:, 0]]
    extent = np.minimum(origin + grid[chunk[:, 0]], shape[chunk[:, 0]]) - origin
    itemsize = np.array([np.dtype(d).itemsize for d in index.experiments.storage_dtype], dtype=np.int64)
    nbytes = np.prod(extent, axis=1) * itemsize[fovs.exp.to_numpy().astype(np.int64)[chunk[:, 0]]]
    np.add.at(weights, chunk[:, 0], nbytes)
    return weights


def assign_fovs(weights: np.ndarray, anchors: np.ndarray, world_size: int, rng: np.random.Generator) -> np.ndarray:
    """(F,) int64 rank of each FOV: longest-processing-time by `weights` (bytes; ties by `anchors`),
    each round of W FOVs in random order (see the module docstring)."""
    w = np.asarray(weights, dtype=np.int64)
    a = np.asarray(anchors, dtype=np.int64)
    order = np.lexsort((-a, -w))
    n = len(order)
    rounds = -(-n // world_size)
    # inside each round of W consecutive FOVs (by weight) a random order: one permutation per round
    key = np.repeat(np.arange(rounds), world_size)[:n] * 2.0 + rng.random(n)
    order = order[np.argsort(key, kind="stable")]
    owner = np.empty(n, dtype=np.int64)
    heap = [(0, 0, r) for r in range(world_size)]
    for f in order.tolist():  # one pass over the FOVs, once per assignment
        load, count, r = heapq.heappop(heap)
        owner[f] = r
        heapq.heappush(heap, (load + int(w[f]), count + int(a[f]), r))
    return owner


@dataclass(frozen=True)
class ShardAssignment:
    """One assignment of the FOVs to the ranks (one re-assignment period)."""

    owner: np.ndarray  # (F,) rank of each FOV
    chunk_bytes: np.ndarray  # (W,) working-set bytes of each rank (sum of its FOVs' weights)
    anchors: np.ndarray  # (W,) valid anchors of each rank

    def fovs(self, rank: int) -> np.ndarray:
        """The FOV codes (rows of `index.fovs`) rank `rank` owns."""
        return np.flatnonzero(self.owner == rank)
