"""Locality-aware anchor order: blocks of anchors that share an FOV and a time window.

A downstream chunk cache decodes each image chunk once and crops every patch that needs it, so
consecutive steps whose anchors come from the same FOV and nearby frames reuse cached chunks.
`block_codes` groups the anchors by (fov, t // frames) once; `block_order` then makes one epoch's
order: the blocks in a uniformly random order, the anchors of each block uniformly shuffled, the
blocks concatenated (each block one contiguous run). Both are vectorised numpy; for 2.6e6 anchors
the codes take about 0.03 s (once) and each epoch's order about 0.25 s (a uniform permutation: 0.1 s).
"""

from __future__ import annotations

import numpy as np


def block_codes(fov: np.ndarray, t: np.ndarray, frames: int) -> tuple[np.ndarray, int]:
    """(int64 code of each anchor's block (fov, t // frames), number of blocks).

    Codes are dense, 0..n_blocks-1, numbered in (fov, window) order.
    """
    f = np.asarray(fov, dtype=np.int64)
    w = np.asarray(t, dtype=np.int64) // int(frames)
    if len(f) == 0:
        return np.zeros(0, dtype=np.int64), 0
    f = f - f.min()
    w = w - w.min()
    key = f * (int(w.max()) + 1) + w
    span = int(key.max()) + 1
    if span <= 4 * len(key) + 4096:  # the usual case: densify through a table, O(n + span)
        present = np.zeros(span, dtype=bool)
        present[key] = True
        dense = np.cumsum(present, dtype=np.int64) - 1
        return dense[key], int(dense[-1]) + 1
    values, inverse = np.unique(key, return_inverse=True)  # sparse keys: O(n log n)
    return inverse.reshape(-1).astype(np.int64, copy=False), len(values)


def block_order(block: np.ndarray, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Positions 0..n-1 of the anchors: blocks in random order, each block shuffled, one run per block.

    With q a uniform permutation of the positions and rank a uniform permutation of the blocks, the
    order is q stably sorted by the rank of each position's block: the blocks come in the order of
    rank, and inside a block the positions keep their (uniformly random) order in q. The sort key
    rank * n + j (j the place in q) is unique, so the result does not depend on the sort algorithm;
    sorting the keys themselves (not argsort) is the fast path, j = key % n gives the place back.
    n_blocks <= n keeps the keys below n**2 (int64 holds them for n < 3e9).
    """
    block = np.asarray(block, dtype=np.int64)
    n = len(block)
    rank = rng.permutation(n_blocks).astype(np.int64)
    q = rng.permutation(n)
    keys = rank[block[q]] * n
    keys += np.arange(n, dtype=np.int64)
    keys.sort()
    return q[keys % n] if n else q
