"""Lineage forests from parent links: roots, depths and Euler-tour intervals, vectorised."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class LineageCycleError(ValueError):
    """Parent links that loop back on themselves."""


@dataclass(frozen=True)
class Forest:
    """Per-track arrays of a forest of lineages (one entry per track, indexed by track code).

    `tin`/`tout` are pre-order Euler-tour bounds: track a is an ancestor-or-self of b exactly when
    tin[a] <= tin[b] <= tout[a].
    """

    parent: np.ndarray  # int64, -1 for a root
    root: np.ndarray  # int64 track code of the root ancestor
    depth: np.ndarray  # int32, 0 for a root
    tin: np.ndarray  # int64
    tout: np.ndarray  # int64


def build_forest(parent: np.ndarray) -> Forest:
    """Roots, depths and Euler-tour bounds of the forest given by `parent` (-1 = root).

    Raises LineageCycleError (with `.tracks`, the codes on or under a cycle) when links loop.
    """
    parent = np.asarray(parent, dtype=np.int64)
    n = len(parent)
    own = np.arange(n, dtype=np.int64)
    anc = np.where(parent >= 0, parent, own)
    dist = (parent >= 0).astype(np.int64)
    for _ in range(max(1, int(np.ceil(np.log2(max(n, 2))))) + 1):
        dist = dist + dist[anc]
        anc = anc[anc]
    stuck = parent[anc] >= 0
    if stuck.any():
        err = LineageCycleError("cycle in parent links")
        err.tracks = np.flatnonzero(stuck)  # type: ignore[attr-defined]
        raise err
    depth = dist.astype(np.int32)

    size = np.ones(n, dtype=np.int64)
    order = np.argsort(depth, kind="stable")
    bounds = np.searchsorted(depth[order], np.arange(int(depth.max(initial=0)) + 2))
    for d in range(len(bounds) - 2, 0, -1):
        nodes = order[bounds[d] : bounds[d + 1]]
        np.add.at(size, parent[nodes], size[nodes])

    tin = np.zeros(n, dtype=np.int64)
    roots = order[bounds[0] : bounds[1]]
    tin[roots] = np.cumsum(size[roots]) - size[roots]
    for d in range(1, len(bounds) - 1):
        nodes = order[bounds[d] : bounds[d + 1]]
        nodes = nodes[np.argsort(parent[nodes], kind="stable")]
        sizes = size[nodes]
        csum = np.cumsum(sizes) - sizes
        first = np.r_[True, parent[nodes][1:] != parent[nodes][:-1]]
        group_start = np.maximum.accumulate(np.where(first, np.arange(len(nodes)), 0))
        tin[nodes] = tin[parent[nodes]] + 1 + (csum - csum[group_start])
    return Forest(parent=parent, root=anc, depth=depth, tin=tin, tout=tin + size - 1)
